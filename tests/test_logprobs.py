"""Tests of rlprim.logprobs: chunked selective log-softmax, entropy, logits, reference log-probs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, Gemma2Config

from rlprim.logprobs import (
    compute_entropy,
    default_chunk_size,
    gather_logprobs,
    get_logits,
    get_logprobs,
    get_reference_logprobs,
)
from rlprim.testing import TINY_ARCHS, tiny_model

VOCAB = 512


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch, seed=11) for arch in TINY_ARCHS}


def _left_padded_batch(seed: int = 0):
    """Rows of different real lengths, left-padded, plus one right-padded completion tail."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(8, VOCAB, (3, 13), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0
    attention_mask[1, :1] = 0
    attention_mask[2, -3:] = 0  # completion padding on the right
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask


def _naive_logits(model, input_ids, attention_mask, temperature):
    """The full-forward reference: HF generate's position ids, full [B, T, V] logits."""
    mask = attention_mask.long()
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).logits
    return logits[:, :-1].float() / temperature


def _naive_logprobs(model, input_ids, attention_mask, temperature):
    logits = _naive_logits(model, input_ids, attention_mask, temperature)
    return torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def _valid(attention_mask):
    return (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()


def _numpy_logprob_and_entropy(logits: np.ndarray, token: int, temperature: float):
    """Plain per-row reference in float64."""
    z = logits.astype(np.float64) / temperature
    shift = z.max()
    normaliser = shift + math.log(sum(math.exp(v - shift) for v in z))
    probs = [math.exp(v - normaliser) for v in z]
    entropy = -sum(p * math.log(p) for p in probs if p > 0)
    return z[token] - normaliser, entropy


# --- hand-computed values --------------------------------------------------------------------


def test_gather_logprobs_and_entropy_hand_computed():
    uniform = torch.zeros(1, 4)
    assert gather_logprobs(uniform, torch.tensor([2])).item() == pytest.approx(-1.3862944)
    assert compute_entropy(uniform).item() == pytest.approx(1.3862944)
    # z = [2, 0] / 2 = [1, 0]: log p(0) = 1 - log(e + 1).
    two = torch.tensor([[2.0, 0.0]])
    assert gather_logprobs(two, torch.tensor([0]), temperature=2.0).item() == pytest.approx(
        -0.31326169
    )
    # p = [1/4, 3/4]: H = -(0.25 ln 0.25 + 0.75 ln 0.75).
    assert compute_entropy(torch.tensor([[0.0, math.log(3.0)]])).item() == pytest.approx(0.56233514)


def test_get_logprobs_hand_computed_with_zero_head():
    model = tiny_model("llama", seed=0)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    input_ids, attention_mask = _left_padded_batch()
    logprobs, entropy = get_logprobs(model, input_ids, attention_mask, return_entropy=True)
    valid = _valid(attention_mask)
    # All logits 0: every real token has probability 1/512, every distribution entropy ln 512.
    assert torch.allclose(logprobs[valid], torch.full_like(logprobs[valid], -6.2383246))
    assert torch.allclose(entropy[valid], torch.full_like(entropy[valid], 6.2383246))
    assert torch.equal(logprobs[~valid], torch.zeros_like(logprobs[~valid]))
    assert torch.equal(entropy[~valid], torch.zeros_like(entropy[~valid]))
    # Row 0 has 4 pads: its first 4 columns (targets pad, or the first real token predicted from
    # a pad) are 0; row 2's last 3 targets are padding.
    assert valid[0].tolist() == [False] * 4 + [True] * 8
    assert valid[2].tolist() == [True] * 9 + [False] * 3


# --- against the naive full log-softmax ------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("chunk_size", [1, 3, 64, 10_000, None])
def test_get_logprobs_equals_naive_log_softmax(models, arch, chunk_size):
    model = models[arch]
    input_ids, attention_mask = _left_padded_batch(seed=1)
    valid = _valid(attention_mask)
    for temperature in (1.0, 0.7, 1.6):
        with torch.no_grad():
            expected = _naive_logprobs(model, input_ids, attention_mask, temperature)
            logprobs = get_logprobs(
                model, input_ids, attention_mask, temperature=temperature, chunk_size=chunk_size
            )
        assert logprobs.shape == (3, 12) and logprobs.dtype == torch.float32
        torch.testing.assert_close(logprobs[valid], expected[valid], atol=1e-5, rtol=0)
        assert torch.equal(logprobs[~valid], torch.zeros_like(logprobs[~valid]))


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_completion_length_and_mask_select_the_last_tokens(models, arch, chunk_size):
    model = models[arch]
    input_ids, attention_mask = _left_padded_batch(seed=2)
    completion_length = 5
    completion_mask = attention_mask[:, -completion_length:].clone()
    completion_mask[0, 1] = 0  # e.g. a tool-output token inside the completion
    with torch.no_grad():
        expected = _naive_logprobs(model, input_ids, attention_mask, 0.9)[:, -completion_length:]
        logprobs, entropy = get_logprobs(
            model,
            input_ids,
            attention_mask,
            completion_mask=completion_mask,
            temperature=0.9,
            chunk_size=chunk_size,
            completion_length=completion_length,
            return_entropy=True,
        )
        naive_logits = _naive_logits(model, input_ids, attention_mask, 0.9)[:, -completion_length:]
    expected_entropy = -(torch.softmax(naive_logits, -1) * torch.log_softmax(naive_logits, -1)).sum(
        -1
    )
    keep = completion_mask.bool()
    assert logprobs.shape == entropy.shape == (3, completion_length)
    torch.testing.assert_close(logprobs[keep], expected[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy[keep], expected_entropy[keep], atol=1e-5, rtol=0)
    assert torch.equal(logprobs[~keep], torch.zeros_like(logprobs[~keep]))
    assert torch.equal(entropy[~keep], torch.zeros_like(entropy[~keep]))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_left_padded_rows_equal_unpadded_rows(models, arch):
    model = models[arch]
    input_ids, attention_mask = _left_padded_batch(seed=3)
    with torch.no_grad():
        batched = get_logprobs(model, input_ids, attention_mask, temperature=0.8, chunk_size=4)
        for row in range(2):  # rows 0 and 1 are left-padded only
            real = input_ids[row, attention_mask[row].bool()].unsqueeze(0)
            single = get_logprobs(model, real, torch.ones_like(real), temperature=0.8)
            torch.testing.assert_close(
                batched[row, -single.shape[1] :], single[0], atol=1e-5, rtol=0
            )


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_gradients_equal_naive_gradients(arch):
    input_ids, attention_mask = _left_padded_batch(seed=4)
    valid = _valid(attention_mask)
    weights = torch.linspace(-1.0, 2.0, valid.numel()).reshape(valid.shape) * valid

    naive_model = tiny_model(arch, seed=5).train()
    naive_logits = _naive_logits(naive_model, input_ids, attention_mask, 0.7)
    naive_logprobs = torch.log_softmax(naive_logits, -1).gather(-1, input_ids[:, 1:, None])
    naive_entropy = -(torch.softmax(naive_logits, -1) * torch.log_softmax(naive_logits, -1)).sum(-1)
    ((naive_logprobs.squeeze(-1) + 0.1 * naive_entropy) * weights).sum().backward()

    model = tiny_model(arch, seed=5).train()
    logprobs, entropy = get_logprobs(
        model, input_ids, attention_mask, temperature=0.7, chunk_size=3, return_entropy=True
    )
    ((logprobs + 0.1 * entropy) * weights).sum().backward()

    for (name, naive_param), (_, param) in zip(
        naive_model.named_parameters(), model.named_parameters(), strict=True
    ):
        if naive_param.grad is None:
            assert param.grad is None or not param.grad.any(), name
            continue
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, naive_param.grad, atol=1e-5, rtol=1e-4)
    head_grad = model.get_output_embeddings().weight.grad
    assert head_grad is not None and head_grad.abs().sum() > 0


def test_gather_logprobs_and_entropy_gradients_equal_autograd_reference():
    generator = torch.Generator().manual_seed(6)
    logits = (3 * torch.randn(4, 7, 50, generator=generator)).requires_grad_()
    tokens = torch.randint(0, 50, (4, 7), generator=generator)
    weights = torch.randn(4, 7, generator=generator)
    (gather_logprobs(logits, tokens, 1.3, chunk_size=5) * weights).sum().backward()
    chunked_grad = logits.grad.clone()
    logits.grad = None
    reference = torch.log_softmax(logits / 1.3, -1).gather(-1, tokens[..., None]).squeeze(-1)
    (reference * weights).sum().backward()
    torch.testing.assert_close(chunked_grad, logits.grad, atol=1e-6, rtol=1e-5)

    logits.grad = None
    (compute_entropy(logits, chunk_size=4) * weights).sum().backward()
    chunked_grad = logits.grad.clone()
    logits.grad = None
    probs = torch.softmax(logits, -1)
    (-(probs * torch.log_softmax(logits, -1)).sum(-1) * weights).sum().backward()
    torch.testing.assert_close(chunked_grad, logits.grad, atol=1e-6, rtol=1e-5)


def test_fallback_path_for_softcapped_gemma2_equals_naive():
    # Gemma 2 soft-caps its logits after the head, so lm_head(hidden) alone would be wrong:
    # get_logprobs must take the full-forward path and still agree with the naive reference.
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        final_logit_softcapping=2.0,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)  # logits well beyond the cap
    input_ids, attention_mask = _left_padded_batch(seed=7)
    valid = _valid(attention_mask)
    with torch.no_grad():
        expected = _naive_logprobs(model, input_ids, attention_mask, 0.8)
        logprobs = get_logprobs(model, input_ids, attention_mask, temperature=0.8, chunk_size=2)
        tail = get_logprobs(model, input_ids, attention_mask, temperature=0.8, completion_length=4)
        mask = attention_mask.long()
        hidden = model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=(mask.cumsum(-1) - 1).masked_fill(mask == 0, 0),
        )[0]
        uncapped_logits = model.get_output_embeddings()(hidden[:, :-1]) / 0.8
        uncapped = torch.log_softmax(uncapped_logits, -1).gather(-1, input_ids[:, 1:, None])
    torch.testing.assert_close(logprobs[valid], expected[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(tail, logprobs[:, -4:], atol=1e-6, rtol=0)
    # The soft-cap matters: head-only log-probs (the fused path's formula) differ a lot.
    assert (uncapped.squeeze(-1)[valid] - expected[valid]).abs().max() > 0.1


# --- independent NumPy reference and properties ----------------------------------------------


@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 6),
    vocab=st.integers(1, 40),
    temperature=st.floats(0.25, 4.0),
    chunk_size=st.one_of(st.none(), st.integers(1, 8)),
    scale=st.floats(0.0, 20.0),
)
def test_gather_logprobs_and_entropy_match_numpy_loops(
    seed, rows, vocab, temperature, chunk_size, scale
):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((rows, vocab))).astype(np.float32)
    tokens = rng.integers(0, vocab, rows)
    logprobs = gather_logprobs(
        torch.from_numpy(logits), torch.from_numpy(tokens), temperature, chunk_size
    )
    entropy = compute_entropy(torch.from_numpy(logits), temperature, chunk_size)
    for row in range(rows):
        expected_logprob, expected_entropy = _numpy_logprob_and_entropy(
            logits[row], int(tokens[row]), temperature
        )
        assert logprobs[row].item() == pytest.approx(expected_logprob, abs=2e-5)
        assert entropy[row].item() == pytest.approx(expected_entropy, abs=2e-5)
        assert -1e-5 <= entropy[row].item() <= math.log(vocab) + 1e-5


@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 30),
    chunk_size=st.integers(1, 10),
    temperature=st.floats(0.3, 3.0),
)
def test_logprobs_of_every_token_normalise_and_are_chunk_invariant(
    seed, vocab, chunk_size, temperature
):
    generator = torch.Generator().manual_seed(seed)
    logits = 5 * torch.randn(3, vocab, generator=generator)
    every_token = torch.arange(vocab).expand(3, vocab)
    repeated = logits.unsqueeze(1).expand(3, vocab, vocab)
    logprobs = gather_logprobs(repeated, every_token, temperature, chunk_size)
    assert (logprobs <= 1e-6).all()
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(3), atol=1e-5, rtol=0)
    unchunked = gather_logprobs(repeated, every_token, temperature, chunk_size=10_000)
    torch.testing.assert_close(logprobs, unchunked, atol=1e-6, rtol=0)


# --- get_logits and get_reference_logprobs ---------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_get_logits_is_aligned_with_get_logprobs(models, arch):
    model = models[arch]
    input_ids, attention_mask = _left_padded_batch(seed=8)
    with torch.no_grad():
        logits = get_logits(model, input_ids, attention_mask, temperature=0.6)
        tail = get_logits(model, input_ids, attention_mask, temperature=0.6, completion_length=3)
        logprobs = get_logprobs(model, input_ids, attention_mask, temperature=0.6)
        expected_logits = _naive_logits(model, input_ids, attention_mask, 0.6)
    assert logits.shape == (3, 12, VOCAB) and tail.shape == (3, 3, VOCAB)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(tail, logits[:, -3:], atol=1e-6, rtol=0)
    gathered = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    valid = _valid(attention_mask)
    torch.testing.assert_close(gathered[valid], logprobs[valid], atol=1e-5, rtol=0)


def test_get_reference_logprobs_has_no_grad_and_restores_mode():
    model = tiny_model("qwen2", seed=9).train()
    input_ids, attention_mask = _left_padded_batch(seed=9)
    reference = get_reference_logprobs(
        model, input_ids, attention_mask, temperature=0.7, completion_length=6
    )
    assert not reference.requires_grad and reference.grad_fn is None
    assert model.training  # restored
    with torch.no_grad():
        expected = get_logprobs(
            model.eval(), input_ids, attention_mask, temperature=0.7, completion_length=6
        )
    assert torch.equal(reference, expected)
    with pytest.raises(ValueError, match="temperature"):
        get_reference_logprobs(model.train(), input_ids, attention_mask, temperature=0.0)
    assert model.training


def test_default_chunk_size():
    assert default_chunk_size(151_936) == 110
    assert default_chunk_size(512) == 32_768
    assert default_chunk_size(1 << 30) == 1
    with pytest.raises(ValueError, match="vocab_size"):
        default_chunk_size(0)


def test_memory_no_full_vocab_tensor_is_allocated():
    # With a 4,096-token vocabulary and 64-position chunks, no single allocation may approach
    # the [B, T - 1, V] float32 size that a naive log-softmax needs.
    model = tiny_model("qwen2", seed=0, vocab_size=4096, hidden_size=64, num_heads=2)
    input_ids = torch.randint(8, 4096, (4, 128), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    full_bytes = 4 * 127 * 4096 * 4
    with torch.no_grad(), torch.profiler.profile(profile_memory=True) as profile:
        get_logprobs(model, input_ids, attention_mask, chunk_size=64)
    largest = max(event.cpu_memory_usage for event in profile.events())
    assert largest <= 64 * 4096 * 4 * 1.5 < full_bytes / 4
    with torch.no_grad(), torch.profiler.profile(profile_memory=True) as profile:
        _naive_logprobs(model, input_ids, attention_mask, 1.0)
    assert max(event.cpu_memory_usage for event in profile.events()) >= full_bytes


# --- bad input ---------------------------------------------------------------------------------


def test_bad_input_raises_naming_the_argument(models):
    model = models["qwen2"]
    input_ids, attention_mask = _left_padded_batch()
    cases = [
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=2.5), TypeError, "chunk_size"),
        (dict(completion_length=0), ValueError, "completion_length"),
        (dict(completion_length=13), ValueError, "completion_length"),
        (dict(completion_mask=torch.ones(3, 5)), ValueError, "completion_mask"),
        (dict(completion_length=5, completion_mask=torch.ones(3, 12)), ValueError, "completion"),
    ]
    for kwargs, error, name in cases:
        with pytest.raises(error, match=name):
            get_logprobs(model, input_ids, attention_mask, **kwargs)
    with pytest.raises(ValueError, match="input_ids"):
        get_logprobs(model, input_ids[0], attention_mask[0])
    with pytest.raises(ValueError, match="input_ids"):
        get_logprobs(model, input_ids[:, :1], attention_mask[:, :1])
    with pytest.raises(TypeError, match="input_ids"):
        get_logprobs(model, input_ids.float(), attention_mask)
    with pytest.raises(ValueError, match="attention_mask"):
        get_logprobs(model, input_ids, attention_mask[:, 1:])
    with pytest.raises(ValueError, match="vocab_size"):
        get_logprobs(model, input_ids + VOCAB, attention_mask)
    with pytest.raises(ValueError, match="temperature"):
        get_logits(model, input_ids, attention_mask, temperature=0)
    with pytest.raises(ValueError, match="token_ids"):
        gather_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="logits"):
        compute_entropy(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        compute_entropy(torch.zeros(2, 5), chunk_size=-3)
