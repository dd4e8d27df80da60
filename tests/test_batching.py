"""Tests for rlprim.batching: hand-built batches with literal tensors, independent NumPy/loop
references, a text round trip through a real tokenizer, hypothesis properties of the row
operations and of length packing, the micro-batch loss-weight identity, and bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rlprim.batching import (
    batch_to_device,
    concatenate_batches,
    decode_batch,
    microbatch_loss_weights,
    pack_by_length,
    pack_by_length_indices,
    padding_fraction,
    rollouts_to_batch,
    select_batch,
    sequence_lengths,
    shuffle_batch,
    split_minibatches,
    trim_padding,
)
from rlprim.losses import aggregate_loss
from rlprim.testing import tiny_tokenizer
from rlprim.types import Batch, Generation, Rollout

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
PAD = 0


# --------------------------------------------------------------------------- helpers


def make_rollout(
    prompt_ids,
    completion_ids,
    *,
    logprobs=None,
    ref_logprobs=None,
    action_mask=None,
    reward=0.0,
    group_id=0,
    multiturn=False,
) -> Rollout:
    """A rollout built directly from ids; ``multiturn`` stores them in ``completion_ids``."""
    if multiturn:
        generation = Generation(text="", prompt_ids=list(prompt_ids), token_ids=[7], logprobs=[0.0])
        return Rollout(
            prompt="",
            generation=generation,
            rewards=reward,
            group_id=group_id,
            completion_ids=list(completion_ids),
            action_mask=action_mask,
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
        )
    generation = Generation(
        text="", prompt_ids=list(prompt_ids), token_ids=list(completion_ids), logprobs=logprobs
    )
    return Rollout(
        prompt="",
        generation=generation,
        rewards=reward,
        group_id=group_id,
        action_mask=action_mask,
        ref_logprobs=ref_logprobs,
    )


def hand_rollouts() -> list[Rollout]:
    """Three rollouts: two single-turn, one multi-turn with tool tokens (action mask 0)."""
    return [
        make_rollout(
            [5, 6, 7], [9, 10], logprobs=[-0.5, -1.5], ref_logprobs=[-0.25, -1.0], reward=1.0
        ),
        make_rollout(
            [8],
            [11, 12, 13],
            logprobs=[-0.1, -0.2, -0.3],
            ref_logprobs=[-0.4, -0.5, -0.6],
            reward=0,
        ),
        make_rollout(
            [3, 4],
            [14, 15, 16, 17],
            logprobs=[-0.7, 0.0, 0.0, -0.9],
            ref_logprobs=[-0.6, 0.0, 0.0, -0.8],
            action_mask=[1, 0, 0, 1],
            reward=-1.0,
            group_id=1,
            multiturn=True,
        ),
    ]


def random_rollouts(
    rng: np.random.Generator,
    rows: int,
    max_prompt: int = 5,
    max_completion: int = 6,
    group_size: int = 1,
) -> list[Rollout]:
    """Random rollouts (some multi-turn), lengths in [0, max]; rewards are the row index."""
    rollouts = []
    for row in range(rows):
        prompt = rng.integers(3, 99, rng.integers(0, max_prompt + 1)).tolist()
        length = int(rng.integers(0, max_completion + 1))
        completion = rng.integers(0, 99, length).tolist()  # ids may equal the pad id 0
        logprobs = np.round(-rng.random(length) * 4, 3).tolist()
        ref = np.round(-rng.random(length) * 4, 3).tolist()
        multiturn = bool(rng.integers(0, 2))
        mask = rng.integers(0, 2, length).tolist() if multiturn else None
        rollouts.append(
            make_rollout(
                prompt,
                completion,
                logprobs=logprobs,
                ref_logprobs=ref,
                action_mask=mask,
                reward=float(row),
                group_id=row // group_size,
                multiturn=multiturn,
            )
        )
    return rollouts


def reference_batch(rollouts: list[Rollout], pad: int) -> dict[str, np.ndarray]:
    """``rollouts_to_batch`` written as plain loops over positions."""
    prompts = [list(r.generation.prompt_ids) for r in rollouts]
    completions = [
        list(r.completion_ids if r.completion_ids is not None else r.generation.token_ids)
        for r in rollouts
    ]
    tp = max(len(p) for p in prompts)
    tc = max(len(c) for c in completions)
    out = {
        "prompt_ids": np.full((len(rollouts), tp), pad),
        "completion_ids": np.full((len(rollouts), tc), pad),
        "attention_mask": np.zeros((len(rollouts), tp + tc)),
        "completion_mask": np.zeros((len(rollouts), tc)),
        "old_logprobs": np.zeros((len(rollouts), tc)),
        "ref_logprobs": np.zeros((len(rollouts), tc)),
    }
    for b, r in enumerate(rollouts):
        logprobs = r.logprobs if r.logprobs is not None else r.generation.logprobs
        mask = r.action_mask if r.action_mask is not None else [1] * len(completions[b])
        for i, token in enumerate(prompts[b]):
            column = tp - len(prompts[b]) + i
            out["prompt_ids"][b, column] = token
            out["attention_mask"][b, column] = 1
        for i, token in enumerate(completions[b]):
            out["completion_ids"][b, i] = token
            out["attention_mask"][b, tp + i] = 1
            out["completion_mask"][b, i] = mask[i]
            out["old_logprobs"][b, i] = logprobs[i]
            out["ref_logprobs"][b, i] = r.ref_logprobs[i]
    return out


def assert_batch_equal(a: Batch, b: Batch) -> None:
    for field, x, y in zip(Batch._fields, a, b, strict=True):
        assert (x is None) == (y is None), field
        if x is not None:
            assert x.dtype == y.dtype, field
            assert x.shape == y.shape, (field, x.shape, y.shape)
            assert torch.equal(x, y), field


def with_token_field(batch: Batch, values: torch.Tensor) -> Batch:
    """Stores a ``[B, Tc]`` per-token quantity in ``advantages`` so row operations carry it."""
    real = batch.attention_mask[:, batch.prompt_ids.shape[1] :].bool()
    return batch._replace(advantages=torch.where(real, values, torch.zeros_like(values)))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


# --------------------------------------------------------------------------- rollouts_to_batch


def test_rollouts_to_batch_hand_case():
    batch = rollouts_to_batch(hand_rollouts(), pad_token_id=PAD)
    assert batch.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 3, 4]]
    assert batch.completion_ids.tolist() == [[9, 10, 0, 0], [11, 12, 13, 0], [14, 15, 16, 17]]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 1, 1],
    ]
    assert batch.completion_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]
    torch.testing.assert_close(
        batch.old_logprobs,
        torch.tensor([[-0.5, -1.5, 0, 0], [-0.1, -0.2, -0.3, 0], [-0.7, 0, 0, -0.9]]),
    )
    torch.testing.assert_close(
        batch.ref_logprobs,
        torch.tensor([[-0.25, -1.0, 0, 0], [-0.4, -0.5, -0.6, 0], [-0.6, 0, 0, -0.8]]),
    )
    assert batch.rewards.tolist() == [1.0, 0.0, -1.0]
    assert batch.group_ids.tolist() == [0, 0, 1]
    assert batch.prompt_ids.dtype == batch.completion_ids.dtype == torch.long
    assert batch.attention_mask.dtype == batch.group_ids.dtype == torch.long
    assert batch.completion_mask.dtype == batch.old_logprobs.dtype == torch.float32
    assert batch.advantages is None and batch.returns is None and batch.values is None
    assert batch.engine_logprobs is None
    # The model input: prompts end at column Tp - 1, completions start at Tp.
    inputs = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    assert inputs[batch.attention_mask.bool()].tolist() == [
        5, 6, 7, 9, 10, 8, 11, 12, 13, 3, 4, 14, 15, 16, 17
    ]  # fmt: skip


def test_rollouts_to_batch_pad_equal_to_eos_keeps_sampled_eos():
    eos = 2
    rollouts = [make_rollout([5, 6], [9, eos]), make_rollout([7], [eos])]
    batch = rollouts_to_batch(rollouts, pad_token_id=eos)
    assert batch.completion_ids.tolist() == [[9, eos], [eos, eos]]
    assert batch.completion_mask.tolist() == [[1, 1], [1, 0]]  # the sampled EOS trains
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 0]]
    assert batch.prompt_ids.tolist() == [[5, 6], [eos, 7]]


def test_rollouts_to_batch_prefers_rollout_logprobs_over_generation():
    generation = Generation(text="", prompt_ids=[4], token_ids=[9], logprobs=[-9.0])
    rollout = Rollout(
        prompt="",
        generation=generation,
        rewards=1.0,
        completion_ids=[9, 30, 31, 10],
        action_mask=[1, 0, 0, 1],
        logprobs=[-1.0, 0.0, 0.0, -2.0],
    )
    batch = rollouts_to_batch([rollout], pad_token_id=PAD)
    assert batch.completion_ids.tolist() == [[9, 30, 31, 10]]
    assert batch.old_logprobs.tolist() == [[-1.0, 0.0, 0.0, -2.0]]
    assert batch.completion_mask.tolist() == [[1, 0, 0, 1]]
    assert batch.ref_logprobs is None


def test_rollouts_to_batch_generation_logprobs_only_align_with_generation_tokens():
    generation = Generation(text="", prompt_ids=[4], token_ids=[9, 10], logprobs=[-1.0, -2.0])
    single = Rollout(prompt="", generation=generation)
    same = single._replace(completion_ids=[9, 10])
    multiturn = single._replace(completion_ids=[8, 30, 9, 10], action_mask=[1, 0, 1, 1])
    assert rollouts_to_batch([single], pad_token_id=PAD).old_logprobs.tolist() == [[-1.0, -2.0]]
    assert rollouts_to_batch([same], pad_token_id=PAD).old_logprobs.tolist() == [[-1.0, -2.0]]
    # The last turn's log-probs do not cover a multi-turn completion: no old log-probs.
    assert rollouts_to_batch([multiturn], pad_token_id=PAD).old_logprobs is None


@given(st.integers(0, 2**32 - 1), st.integers(1, 8))
def test_rollouts_to_batch_matches_loop_reference(seed, rows):
    rollouts = random_rollouts(np.random.default_rng(seed), rows)
    batch = rollouts_to_batch(rollouts, pad_token_id=PAD)
    expected = reference_batch(rollouts, PAD)
    for field, value in expected.items():
        np.testing.assert_allclose(getattr(batch, field).numpy(), value, rtol=0, atol=1e-6)
    # completion_mask = action mask ∧ not padding: 0 wherever the attention mask is 0.
    tp = batch.prompt_ids.shape[1]
    assert bool((batch.completion_mask <= batch.attention_mask[:, tp:]).all())
    assert batch.rewards.tolist() == [float(r) for r in range(rows)]


def test_rollouts_to_batch_optional_fields_none():
    with_lp = make_rollout([1], [2, 3], logprobs=[-1.0, -1.0], ref_logprobs=[-1.0, -1.0])
    without = make_rollout([1], [2], reward=None)._replace(rewards=None)
    batch = rollouts_to_batch([with_lp, make_rollout([1], [4])], pad_token_id=PAD)
    assert batch.old_logprobs is None  # one rollout has no sampling log-probs
    assert batch.ref_logprobs is None
    unscored = rollouts_to_batch([without, without], pad_token_id=PAD)
    assert unscored.rewards is None
    with pytest.raises(ValueError, match=r"rollouts \[1\] have rewards=None"):
        rollouts_to_batch([with_lp, without], pad_token_id=PAD)


def test_rollouts_to_batch_reward_types():
    rollouts = [
        make_rollout([1], [2], reward=3),
        make_rollout([1], [2], reward=np.float64(0.5)),
        make_rollout([1], [2], reward=torch.tensor(-2.0)),
        make_rollout([1], [2], reward=True),
    ]
    assert rollouts_to_batch(rollouts, pad_token_id=PAD).rewards.tolist() == [3.0, 0.5, -2.0, 1.0]


def test_rollouts_to_batch_advantages_returns_values():
    rollouts = hand_rollouts()
    per_row = rollouts_to_batch(rollouts, pad_token_id=PAD, advantages=[1, 2, 3])
    assert per_row.advantages.dtype == torch.float32
    assert per_row.advantages.tolist() == [1.0, 2.0, 3.0]
    per_token = torch.full((3, 4), 7.0, dtype=torch.float64)
    batch = rollouts_to_batch(
        rollouts, pad_token_id=PAD, advantages=per_token, returns=per_token, values=[0.5] * 3
    )
    expected = [[7, 7, 0, 0], [7, 7, 7, 0], [7, 7, 7, 7]]  # 0 on padding
    assert batch.advantages.tolist() == expected
    assert batch.advantages.dtype == torch.float64
    assert batch.returns.tolist() == expected
    assert batch.values.tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match=r"advantages must have shape \[B\] = \[3\] or"):
        rollouts_to_batch(rollouts, pad_token_id=PAD, advantages=torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"values must have shape .* got \[2\]"):
        rollouts_to_batch(rollouts, pad_token_id=PAD, values=[1.0, 2.0])
    with pytest.raises(TypeError, match="returns must hold real numbers"):
        rollouts_to_batch(rollouts, pad_token_id=PAD, returns=torch.ones(3, dtype=torch.bool))


def test_rollouts_to_batch_pad_id_from_tokenizer(tokenizer):
    rollouts = [make_rollout([5, 6], [9]), make_rollout([7], [9, 10])]
    batch = rollouts_to_batch(rollouts, tokenizer)
    assert batch.prompt_ids.tolist() == [[5, 6], [tokenizer.pad_token_id, 7]]
    assert_batch_equal(batch, rollouts_to_batch(rollouts, pad_token_id=tokenizer.pad_token_id))
    assert_batch_equal(batch, rollouts_to_batch(rollouts, tokenizer, pad_token_id=0))
    with pytest.raises(ValueError, match="disagrees with the tokenizer's pad id 0"):
        rollouts_to_batch(rollouts, tokenizer, pad_token_id=2)
    no_pad = tiny_tokenizer()
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    eos_padded = rollouts_to_batch(rollouts, no_pad)
    assert eos_padded.prompt_ids.tolist() == [[5, 6], [no_pad.eos_token_id, 7]]
    with pytest.raises(ValueError, match="needs a pad id"):
        rollouts_to_batch(rollouts)


def test_rollouts_to_batch_bad_input():
    good = make_rollout([1], [2, 3])
    with pytest.raises(ValueError, match="rollouts must not be empty"):
        rollouts_to_batch([], pad_token_id=PAD)
    with pytest.raises(TypeError, match="sequence of Rollout, got Rollout"):
        rollouts_to_batch(good, pad_token_id=PAD)
    with pytest.raises(TypeError, match=r"rollouts\[1\] must be a Rollout, got dict"):
        rollouts_to_batch([good, {}], pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"rollouts\[0\].rewards is a vector of 2 .*aggregate"):
        rollouts_to_batch([make_rollout([1], [2], reward=[1.0, 0.0])], pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"rewards is a vector \(shape \(2,\)\).*aggregate"):
        rollouts_to_batch([make_rollout([1], [2], reward=torch.ones(2))], pad_token_id=PAD)
    with pytest.raises(TypeError, match="rewards must be a number, got str"):
        rollouts_to_batch([make_rollout([1], [2], reward="1")], pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"action_mask must have one value per completion token"):
        rollouts_to_batch([good._replace(action_mask=[1])], pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"action_mask must contain only 0 and 1, got \[0.5"):
        rollouts_to_batch([good._replace(action_mask=[0.5, 1])], pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"rollouts\[0\].logprobs must have one value per"):
        rollouts_to_batch([good._replace(logprobs=[-1.0])], pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"ref_logprobs must have one value per .* \(2\)"):
        rollouts_to_batch([good._replace(ref_logprobs=[-1.0, -1.0, -1.0])], pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"token_ids must hold token ids >= 0, got -3"):
        rollouts_to_batch([make_rollout([1], [2, -3])], pad_token_id=PAD)
    with pytest.raises(TypeError, match=r"prompt_ids must hold integer token ids"):
        rollouts_to_batch([make_rollout([1.5], [2])], pad_token_id=PAD)
    with pytest.raises(ValueError, match="pad_token_id must be >= 0, got -1"):
        rollouts_to_batch([good], pad_token_id=-1)


# --------------------------------------------------------------------------- round trip


ROUND_TRIP_TEXTS = [
    ("What is 12+30?", " The answer is 42."),
    ("<answer>", "7</answer>"),
    ("Compute 3*4. Answer:", " 12"),
    ("Hello, how are you today?", " Fine: thanks!"),
    ("x", " a much longer completion than the others, with words and 123 digits."),
]


def test_round_trip_decodes_rollout_texts(tokenizer):
    eos = tokenizer.eos_token_id
    rollouts = []
    for group, (prompt, completion) in enumerate(ROUND_TRIP_TEXTS):
        ids = tokenizer.encode(completion) + [eos]  # a sampled EOS, as a generator returns it
        generation = Generation(text=completion, prompt_ids=tokenizer.encode(prompt), token_ids=ids)
        rollouts.append(Rollout(prompt=prompt, generation=generation, group_id=group))
    # The pad id is the EOS id on purpose: padding must come from lengths, not token values.
    batch = rollouts_to_batch(rollouts, pad_token_id=eos)
    decoded = decode_batch(batch, tokenizer, skip_special_tokens=True)
    assert decoded == [(r.prompt, r.generation.text) for r in rollouts]
    with_eos = decode_batch(batch, tokenizer)
    assert [c for _, c in with_eos] == [t + "<|eos|>" for _, t in ROUND_TRIP_TEXTS]
    # Row operations keep the texts.
    shuffled = shuffle_batch(batch, seed=3)
    order = shuffled.group_ids.tolist()
    assert decode_batch(shuffled, tokenizer, True) == [decoded[i] for i in order]
    micro = pack_by_length(batch, max_tokens=64)
    assert sorted(t for m in micro for t in decode_batch(m, tokenizer, True)) == sorted(decoded)


printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)


@given(st.lists(st.tuples(printable, printable), min_size=1, max_size=5))
def test_round_trip_hypothesis(tokenizer, pairs):
    rollouts = [
        Rollout(
            prompt=p,
            generation=Generation(
                text=c, prompt_ids=tokenizer.encode(p), token_ids=tokenizer.encode(c)
            ),
        )
        for p, c in pairs
    ]
    batch = rollouts_to_batch(rollouts, tokenizer)
    assert decode_batch(batch, tokenizer) == pairs


# --------------------------------------------------------------------------- lengths, padding


def test_sequence_lengths_and_padding_fraction_hand_case():
    batch = rollouts_to_batch(hand_rollouts(), pad_token_id=PAD)
    prompt_lengths, completion_lengths = sequence_lengths(batch)
    assert prompt_lengths.tolist() == [3, 1, 2]
    assert completion_lengths.tolist() == [2, 3, 4]
    assert padding_fraction(batch) == pytest.approx(6 / 21)  # 15 real of 3 × 7
    single = trim_padding(select_batch(batch, [2]))
    assert padding_fraction([batch, single]) == pytest.approx(6 / 27)


def test_malformed_padding_is_refused():
    batch = rollouts_to_batch(hand_rollouts(), pad_token_id=PAD)
    right_padded_prompt = batch.attention_mask.clone()
    right_padded_prompt[1, :3] = torch.tensor([1, 0, 0])
    with pytest.raises(ValueError, match="prompt_ids must be left-padded: row 1"):
        sequence_lengths(batch._replace(attention_mask=right_padded_prompt))
    hole = batch.attention_mask.clone()
    hole[2, 4] = 0
    with pytest.raises(ValueError, match="completion_ids must be right-padded: row 2"):
        trim_padding(batch._replace(attention_mask=hole))
    with pytest.raises(ValueError, match=r"batch.attention_mask must have shape \[3, 7\]"):
        select_batch(batch._replace(attention_mask=batch.attention_mask[:, 1:]), [0])
    with pytest.raises(ValueError, match=r"batch.rewards must have shape \[3\]"):
        select_batch(batch._replace(rewards=torch.zeros(2)), [0])
    with pytest.raises(TypeError, match="batch must be an rlprim Batch, got tuple"):
        trim_padding(tuple(batch))


# --------------------------------------------------------------------------- row operations


def test_select_batch_hand_case_and_repeats():
    batch = rollouts_to_batch(hand_rollouts(), pad_token_id=PAD)
    picked = select_batch(batch, [2, 0, 2])
    assert picked.prompt_ids.tolist() == [[0, 3, 4], [5, 6, 7], [0, 3, 4]]
    assert picked.rewards.tolist() == [-1.0, 1.0, -1.0]
    assert picked.completion_ids.shape == (3, 4)  # widths kept
    assert_batch_equal(select_batch(batch, torch.tensor([0, 1, 2])), batch)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 3\) .* got 3"):
        select_batch(batch, [0, 3])
    with pytest.raises(ValueError, match="indices must be a non-empty 1-D sequence"):
        select_batch(batch, [])
    with pytest.raises(TypeError, match="indices must be integers"):
        select_batch(batch, [0.0])


@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.data())
def test_select_batch_matches_row_reference(seed, rows, data):
    batch = rollouts_to_batch(random_rollouts(np.random.default_rng(seed), rows), pad_token_id=PAD)
    indices = data.draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=10))
    picked = select_batch(batch, indices)
    for field, whole, part in zip(Batch._fields, batch, picked, strict=True):
        if whole is None:
            assert part is None
            continue
        for out_row, in_row in enumerate(indices):
            assert torch.equal(part[out_row], whole[in_row]), field


def test_trim_padding_hand_case():
    batch = rollouts_to_batch(hand_rollouts(), pad_token_id=PAD)
    assert trim_padding(batch) is batch  # nothing to drop
    one = trim_padding(select_batch(batch, [1]))
    assert one.prompt_ids.tolist() == [[8]]
    assert one.completion_ids.tolist() == [[11, 12, 13]]
    assert one.attention_mask.tolist() == [[1, 1, 1, 1]]
    assert one.completion_mask.tolist() == [[1, 1, 1]]
    torch.testing.assert_close(one.old_logprobs, torch.tensor([[-0.1, -0.2, -0.3]]))
    torch.testing.assert_close(one.ref_logprobs, torch.tensor([[-0.4, -0.5, -0.6]]))
    two = trim_padding(select_batch(batch, [0, 1]))
    assert two.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert two.completion_ids.tolist() == [[9, 10, 0], [11, 12, 13]]
    assert two.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]


@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.data())
def test_trim_padding_properties(seed, rows, data):
    batch = rollouts_to_batch(random_rollouts(np.random.default_rng(seed), rows), pad_token_id=PAD)
    batch = with_token_field(batch, torch.rand(batch.completion_ids.shape, dtype=torch.float64))
    indices = data.draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=rows))
    trimmed = trim_padding(select_batch(batch, indices))
    # Widths are exactly the longest real prompt and completion among the selected rows.
    prompt_lengths, completion_lengths = sequence_lengths(batch)
    assert trimmed.prompt_ids.shape[1] == max(int(prompt_lengths[i]) for i in indices)
    assert trimmed.completion_ids.shape[1] == max(int(completion_lengths[i]) for i in indices)
    assert_batch_equal(trim_padding(trimmed), trimmed)  # idempotent
    # Every real token, and the per-token field, survives at the same place relative to Tp.
    assert int(trimmed.attention_mask.sum()) == sum(
        int(prompt_lengths[i] + completion_lengths[i]) for i in indices
    )
    rebuilt = rollouts_to_batch(
        [random_rollouts(np.random.default_rng(seed), rows)[i] for i in indices],
        pad_token_id=PAD,
        advantages=trimmed.advantages,
    )
    assert_batch_equal(rebuilt, trimmed)


def test_concatenate_batches_hand_case():
    batch = rollouts_to_batch(hand_rollouts(), pad_token_id=PAD)
    first = trim_padding(select_batch(batch, [0]))  # Tp 3, Tc 2
    second = trim_padding(select_batch(batch, [1]))  # Tp 1, Tc 3
    both = concatenate_batches([first, second], pad_token_id=PAD)
    assert both.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert both.completion_ids.tolist() == [[9, 10, 0], [11, 12, 13]]
    assert both.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert both.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    torch.testing.assert_close(
        both.old_logprobs, torch.tensor([[-0.5, -1.5, 0.0], [-0.1, -0.2, -0.3]])
    )
    assert both.rewards.tolist() == [1.0, 0.0]
    filled = concatenate_batches([first, second], pad_token_id=99)
    assert filled.prompt_ids.tolist() == [[5, 6, 7], [99, 99, 8]]
    assert filled.completion_ids.tolist() == [[9, 10, 99], [11, 12, 13]]
    assert_batch_equal(concatenate_batches([batch]), batch)


def test_concatenate_batches_bad_input():
    batch = rollouts_to_batch(hand_rollouts(), pad_token_id=PAD)
    with pytest.raises(ValueError, match="batches must not be empty"):
        concatenate_batches([])
    with pytest.raises(ValueError, match=r"'ref_logprobs' is None in batches \[1\]"):
        concatenate_batches([batch, batch._replace(ref_logprobs=None)])
    row_adv = batch._replace(advantages=torch.zeros(3))
    token_adv = batch._replace(advantages=torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"'advantages' is \[B\] in some batches and \[B, Tc\]"):
        concatenate_batches([row_adv, token_adv])
    with pytest.raises(TypeError, match="sequence of Batch, got Batch"):
        concatenate_batches(batch)


@given(st.integers(0, 2**32 - 1), st.integers(1, 10), st.integers(1, 4), st.booleans())
def test_concatenate_of_split_is_the_original(seed, rows, size, shuffle):
    batch = rollouts_to_batch(random_rollouts(np.random.default_rng(seed), rows), pad_token_id=PAD)
    batch = with_token_field(batch, torch.rand(batch.completion_ids.shape, dtype=torch.float64))
    if shuffle:
        parts = split_minibatches(batch, size, shuffle_seed=seed)
        perm = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
        expected = trim_padding(select_batch(batch, perm))
    else:
        parts = split_minibatches(batch, size)
        expected = batch
    assert_batch_equal(concatenate_batches(parts, pad_token_id=PAD), expected)


@given(st.integers(0, 2**32 - 1), st.integers(1, 12), st.integers(0, 2**63))
def test_shuffle_is_a_seeded_permutation(seed, rows, shuffle_seed):
    batch = rollouts_to_batch(random_rollouts(np.random.default_rng(seed), rows), pad_token_id=PAD)
    rng_before = torch.get_rng_state()
    shuffled = shuffle_batch(batch, shuffle_seed)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is untouched
    order = shuffled.rewards.long()  # reward = original row index
    assert sorted(order.tolist()) == list(range(rows))
    assert_batch_equal(shuffled, select_batch(batch, order))
    assert_batch_equal(shuffle_batch(batch, shuffle_seed), shuffled)  # deterministic


def test_shuffle_depends_on_the_seed():
    batch = rollouts_to_batch(random_rollouts(np.random.default_rng(0), 20), pad_token_id=PAD)
    orders = {tuple(shuffle_batch(batch, s).rewards.tolist()) for s in range(5)}
    assert len(orders) == 5
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        shuffle_batch(batch, -1)
    with pytest.raises(TypeError, match="seed must be an int, got float"):
        shuffle_batch(batch, 1.0)


# --------------------------------------------------------------------------- minibatches


@given(st.integers(0, 2**32 - 1), st.integers(1, 12), st.integers(1, 5))
def test_split_minibatches_sizes_and_trim(seed, rows, size):
    batch = rollouts_to_batch(random_rollouts(np.random.default_rng(seed), rows), pad_token_id=PAD)
    parts = split_minibatches(batch, size)
    expected_sizes = [size] * (rows // size) + ([rows % size] if rows % size else [])
    assert [p.prompt_ids.shape[0] for p in parts] == expected_sizes
    for part in parts:
        assert_batch_equal(trim_padding(part), part)
    assert [r for p in parts for r in p.rewards.tolist()] == [float(r) for r in range(rows)]


def test_split_minibatches_keep_groups():
    rows, group = 12, 3
    batch = rollouts_to_batch(
        random_rollouts(np.random.default_rng(1), rows, group_size=group), pad_token_id=PAD
    )
    for seed in (None, 0, 7):
        parts = split_minibatches(batch, 6, shuffle_seed=seed, keep_groups=True)
        assert [p.prompt_ids.shape[0] for p in parts] == [6, 6]
        seen = []
        for part in parts:
            ids = part.group_ids.tolist()
            for g in set(ids):
                assert ids.count(g) == group  # whole groups only
            seen += part.rewards.long().tolist()
        assert sorted(seen) == list(range(rows))
    shuffled = split_minibatches(batch, 3, shuffle_seed=5, keep_groups=True)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(5)).tolist()
    assert [int(p.group_ids[0]) for p in shuffled] == perm
    with pytest.raises(ValueError, match="multiple of the group size 3, got size=4"):
        split_minibatches(batch, 4, keep_groups=True)
    uneven = batch._replace(group_ids=torch.tensor([0, 0, 1] + [2] * 9))
    with pytest.raises(ValueError, match=r"groups of one size, got sizes \[1, 2, 9\]"):
        split_minibatches(uneven, 6, keep_groups=True)


def test_split_minibatches_bad_input():
    batch = rollouts_to_batch(hand_rollouts(), pad_token_id=PAD)
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        split_minibatches(batch, 0)
    with pytest.raises(TypeError, match="size must be an int, got float"):
        split_minibatches(batch, 2.0)
    with pytest.raises(ValueError, match="needs batch.group_ids"):
        split_minibatches(batch._replace(group_ids=None), 2, keep_groups=True)


# --------------------------------------------------------------------------- length packing


def test_pack_by_length_indices_hand_case():
    prompts, completions = [2, 2, 2, 2], [10, 1, 9, 2]  # widths 12, 3, 11, 4
    # Fewest micro-batches within 24 positions: {0, 2} (2 × 12) and {1, 3} (2 × 4) = 32.
    assert pack_by_length_indices(prompts, completions, 24, overhead_tokens=math.inf) == [
        [0, 2],
        [1, 3],
    ]
    # λ = 2: 32 + 2·2 = 36 beats three runs (31 + 6) and singletons (30 + 8).
    assert pack_by_length_indices(prompts, completions, 24, overhead_tokens=2) == [[0, 2], [1, 3]]
    # λ = 0.5: singletons, 30 + 4·0.5 = 32, beat 32 + 1 and 31 + 1.5.
    assert pack_by_length_indices(prompts, completions, 24, overhead_tokens=0.5) == [
        [0],
        [2],
        [3],
        [1],
    ]
    # At most 3 rows: two micro-batches; {0, 2} + {3, 1} (32) beats {0, 2, 3} + {1} (39).
    assert pack_by_length_indices(prompts, completions, max_sequences=3) == [[0, 2], [1, 3]]
    assert pack_by_length_indices(prompts, completions, 24, max_sequences=1) == [[0], [2], [3], [1]]
    # Prompts and completions are padded separately: rows (1, 5) and (7, 1) are 6 and 8
    # tokens long, but together they take 2 × (7 + 5) = 24 positions > 20.
    assert pack_by_length_indices([1, 7], [5, 1], 20, overhead_tokens=math.inf) == [[0], [1]]


def brute_force_plan_cost(prompts, completions, max_tokens, max_sequences, overhead):
    """Best (objective, count, area) over every cut of the rows sorted by (-m, -n, index)."""
    order = sorted(range(len(prompts)), key=lambda i: (-completions[i], -prompts[i], i))
    best = None
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        runs, current = [], [order[0]]
        for cut, row in zip(cuts, order[1:], strict=True):
            if cut:
                runs.append(current)
                current = []
            current.append(row)
        runs.append(current)
        area, ok = 0, True
        for run in runs:
            cost = len(run) * (max(prompts[i] for i in run) + max(completions[i] for i in run))
            ok &= max_tokens is None or cost <= max_tokens
            ok &= max_sequences is None or len(run) <= max_sequences
            area += cost
        if ok:
            key = (len(runs), area) if math.isinf(overhead) else (area + overhead * len(runs),)
            best = key if best is None or key < best else best
    return best


@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 9)), min_size=1, max_size=7),
    st.integers(0, 12),
    st.one_of(st.none(), st.integers(1, 4)),
    st.sampled_from([0.0, 1.0, 3.5, 10.0, math.inf]),
)
def test_pack_by_length_indices_is_optimal_and_valid(rows, slack, max_sequences, overhead):
    prompts = [p for p, _ in rows]
    completions = [c for _, c in rows]
    max_tokens = max(p + c for p, c in rows) + slack
    if max_tokens == 0:
        max_tokens = 1
    plan = pack_by_length_indices(prompts, completions, max_tokens, max_sequences, overhead)
    assert sorted(i for run in plan for i in run) == list(range(len(rows)))  # each row once
    area = 0
    for run in plan:
        assert run == sorted(run)
        cost = len(run) * (max(prompts[i] for i in run) + max(completions[i] for i in run))
        assert cost <= max_tokens
        assert max_sequences is None or len(run) <= max_sequences
        area += cost
    key = (len(plan), area) if math.isinf(overhead) else (area + overhead * len(plan),)
    best = brute_force_plan_cost(prompts, completions, max_tokens, max_sequences, overhead)
    assert key[0] == pytest.approx(best[0]) and key[1:] == pytest.approx(best[1:])


@given(st.integers(0, 2**32 - 1), st.integers(1, 16), st.integers(0, 30), st.data())
def test_pack_by_length_properties(seed, rows, slack, data):
    batch = rollouts_to_batch(
        random_rollouts(np.random.default_rng(seed), rows, max_prompt=8, max_completion=20),
        pad_token_id=PAD,
    )
    prompt_lengths, completion_lengths = sequence_lengths(batch)
    max_tokens = int((prompt_lengths + completion_lengths).max()) + slack + 1
    max_sequences = data.draw(st.one_of(st.none(), st.integers(1, 6)))
    micro = pack_by_length(batch, max_tokens, max_sequences)
    plan = pack_by_length_indices(prompt_lengths, completion_lengths, max_tokens, max_sequences)
    assert len(micro) == len(plan)
    for part, rows_of_part in zip(micro, plan, strict=True):
        assert_batch_equal(part, trim_padding(select_batch(batch, rows_of_part)))
        assert part.attention_mask.numel() <= max_tokens
        assert max_sequences is None or part.prompt_ids.shape[0] <= max_sequences
    seen = sorted(int(r) for part in micro for r in part.rewards.tolist())
    assert seen == list(range(rows))  # every row exactly once
    # Never more padding than one batch padded to the longest row.
    assert padding_fraction(micro) <= padding_fraction(batch) + 1e-12


def test_pack_by_length_beats_plain_padding_on_mixed_lengths():
    rng = np.random.default_rng(0)
    rollouts = [
        make_rollout(
            rng.integers(8, 500, rng.integers(16, 65)).tolist(),
            rng.integers(8, 500, rng.integers(8, 513)).tolist(),
        )
        for _ in range(256)
    ]
    batch = rollouts_to_batch(rollouts, pad_token_id=PAD)
    micro = pack_by_length(batch, max_tokens=8192)
    assert all(m.attention_mask.numel() <= 8192 for m in micro)
    assert sum(m.prompt_ids.shape[0] for m in micro) == 256
    plain = padding_fraction(batch)
    packed = padding_fraction(micro)
    assert plain > 0.4  # 8..512 completions padded to ~576 positions
    assert packed <= 0.10 < plain


def test_pack_by_length_bad_input():
    batch = rollouts_to_batch(hand_rollouts(), pad_token_id=PAD)  # widths 5, 4, 6
    with pytest.raises(ValueError, match=r"max_tokens=5 is smaller than row 2, which has 6 tok"):
        pack_by_length(batch, max_tokens=5)
    with pytest.raises(ValueError, match="give max_tokens and/or max_sequences"):
        pack_by_length(batch)
    with pytest.raises(ValueError, match="max_sequences must be >= 1, got 0"):
        pack_by_length(batch, max_sequences=0)
    with pytest.raises(ValueError, match="overhead_tokens must be >= 0, got nan"):
        pack_by_length(batch, max_tokens=64, overhead_tokens=math.nan)
    with pytest.raises(ValueError, match="same size, got 2 and 3"):
        pack_by_length_indices([1, 2], [1, 2, 3], 10)
    with pytest.raises(ValueError, match="no rows to pack"):
        pack_by_length_indices([], [], 10)
    with pytest.raises(ValueError, match="completion_lengths must be >= 0, got -1"):
        pack_by_length_indices([1], [-1], 10)


# --------------------------------------------------------------------------- loss weights


def test_microbatch_loss_weights_hand_case():
    rollouts = [
        make_rollout([1], [5, 6]),
        make_rollout([1], [5, 6], action_mask=[0, 0], multiturn=True),
        make_rollout([1], [5, 6], action_mask=[1, 0], multiturn=True),
    ]
    batch = rollouts_to_batch(rollouts, pad_token_id=PAD)
    micro = [select_batch(batch, [0]), select_batch(batch, [1, 2])]
    assert microbatch_loss_weights(micro, "token-mean") == pytest.approx([2 / 3, 1 / 3])
    assert microbatch_loss_weights(micro, "seq-mean-token-mean") == pytest.approx([1 / 2, 1 / 2])
    assert microbatch_loss_weights(micro, "seq-mean-token-sum") == pytest.approx([1 / 3, 2 / 3])
    assert microbatch_loss_weights(micro, "seq-mean-token-sum-norm") == pytest.approx(
        [1 / 3, 2 / 3]
    )
    # No trainable token anywhere: the loss is 0; the weights fall back to row shares.
    silent = [select_batch(batch, [1]), select_batch(batch, [1, 1])]
    assert microbatch_loss_weights(silent, "token-mean") == pytest.approx([1 / 3, 2 / 3])
    with pytest.raises(ValueError, match="mode must be one of"):
        microbatch_loss_weights(micro, "mean")
    with pytest.raises(ValueError, match="micro_batches must not be empty"):
        microbatch_loss_weights([], "token-mean")


@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 12),
    st.sampled_from(MODES),
    st.sampled_from(["pack", "split"]),
    st.one_of(st.none(), st.integers(1, 50)),
    st.data(),
)
def test_microbatch_weights_make_accumulated_loss_equal_full_loss(
    seed, rows, mode, how, norm_length, data
):
    rng = np.random.default_rng(seed)
    batch = rollouts_to_batch(
        random_rollouts(rng, rows, max_prompt=6, max_completion=12), pad_token_id=PAD
    )
    per_token = torch.from_numpy(rng.normal(size=tuple(batch.completion_ids.shape)))
    batch = with_token_field(batch, per_token)
    if how == "pack":
        prompt_lengths, completion_lengths = sequence_lengths(batch)
        longest = int((prompt_lengths + completion_lengths).max())
        max_tokens = longest + data.draw(st.integers(0, 40)) + 1
        micro = pack_by_length(batch, max_tokens, overhead_tokens=data.draw(st.floats(0, 20)))
    else:
        micro = split_minibatches(batch, data.draw(st.integers(1, 5)), shuffle_seed=seed)
    # Dr. GRPO's constant: the whole batch's (its Tc unless given), in every micro-batch.
    length = batch.completion_ids.shape[1] if norm_length is None else norm_length
    full = aggregate_loss(batch.advantages, batch.completion_mask, mode, max(length, 1))
    weights = microbatch_loss_weights(micro, mode)
    accumulated = sum(
        w * aggregate_loss(m.advantages, m.completion_mask, mode, max(length, 1))
        for w, m in zip(weights, micro, strict=True)
    )
    assert sum(weights) == pytest.approx(1.0)
    assert float(accumulated) == pytest.approx(float(full), rel=1e-9, abs=1e-12)


def test_microbatch_weights_gradient_identity_and_norm_length_pitfall():
    rng = np.random.default_rng(3)
    batch = rollouts_to_batch(
        random_rollouts(rng, 8, max_prompt=4, max_completion=10), pad_token_id=PAD
    )
    theta = torch.from_numpy(rng.normal(size=tuple(batch.completion_ids.shape)))
    batch = with_token_field(batch, theta)
    micro = pack_by_length(batch, max_sequences=3)
    mode, length = "seq-mean-token-sum-norm", batch.completion_ids.shape[1]

    def grads(per_token_loss_of):
        params = batch.advantages.clone().requires_grad_(True)
        per_token_loss_of(params).backward()
        return params.grad

    def full_loss(params):
        return aggregate_loss(params**2, batch.completion_mask, mode, length)

    def accumulated_loss(params):
        total = 0.0
        for w, rows in zip(
            microbatch_loss_weights(micro, mode),
            pack_by_length_indices(*sequence_lengths(batch), max_sequences=3),
            strict=True,
        ):
            part = trim_padding(select_batch(batch._replace(advantages=params), rows))
            total = total + w * aggregate_loss(
                part.advantages**2, part.completion_mask, mode, length
            )
        return total

    torch.testing.assert_close(grads(accumulated_loss), grads(full_loss), rtol=1e-12, atol=1e-12)
    # Using each trimmed micro-batch's own Tc as L (norm_length=None) breaks the identity.
    own_length = sum(
        w * aggregate_loss(m.advantages, m.completion_mask, mode)
        for w, m in zip(microbatch_loss_weights(micro, mode), micro, strict=True)
    )
    assert {m.completion_ids.shape[1] for m in micro} != {length}
    assert float(own_length) != pytest.approx(float(full_loss(batch.advantages)))


# --------------------------------------------------------------------------- devices


def test_batch_to_device():
    batch = rollouts_to_batch(hand_rollouts(), pad_token_id=PAD, advantages=[1.0, 2.0, 3.0])
    assert batch_to_device(batch, "cpu") is batch
    meta = batch_to_device(batch, torch.device("meta"))
    for field, before, after in zip(Batch._fields, batch, meta, strict=True):
        assert (before is None) == (after is None), field
        if before is not None:
            assert after.device.type == "meta" and after.dtype == before.dtype, field
            assert after.shape == before.shape, field
    built = rollouts_to_batch(hand_rollouts(), pad_token_id=PAD, device="meta")
    assert all(x.device.type == "meta" for x in built if x is not None)
    with pytest.raises(ValueError, match="device must be a torch device or its name"):
        batch_to_device(batch, "no-such-device")
