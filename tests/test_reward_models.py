"""Tests of rlprim.reward_models on real tiny sequence-classification models."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForSequenceClassification

from rlprim.inference import apply_chat_template
from rlprim.reward_models import (
    compute_reward_model_score,
    create_batch_reward_model_fn,
    create_reward_model_fn,
    load_reward_model,
)
from rlprim.reward_models import score_with_reward_model as rp_score
from rlprim.rewards import compute_batch_rewards, weighted_sum
from rlprim.testing import (
    TINY_ARCHS,
    save_tiny_model,
    tiny_model,
    tiny_model_config,
    tiny_reward_model,
    tiny_tokenizer,
)
from rlprim.types import Generation, ModelConfig, Rollout

PROMPTS = [
    "What is 2+2?",
    "Hi",
    "Compute 17 * 3. Think step by step and give the final answer.",
    "Say yes",
    "A",
]
COMPLETIONS = [" 4", " Hello there, how are you?", " 51", "", " no no no no no"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def reward_models():
    return {arch: tiny_reward_model(arch, seed=1) for arch in TINY_ARCHS}


def reward_model_without_pad_id():
    model = tiny_reward_model("llama", seed=2)
    model.config.pad_token_id = None
    return model


def unbatched_scores(model, tokenizer, texts):
    """One forward per text, no padding at all: the independent reference."""
    values = []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            values.append(model(input_ids=ids).logits[0, 0].item())
    return torch.tensor(values)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_batched_scores_equal_unbatched_forwards(reward_models, tokenizer, arch, batch_size):
    model = reward_models[arch]
    scores = compute_reward_model_score(
        model, tokenizer, PROMPTS, COMPLETIONS, batch_size=batch_size
    )
    assert scores.shape == (len(PROMPTS),) and scores.dtype == torch.float32
    expected = unbatched_scores(
        model, tokenizer, [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    )
    assert torch.allclose(scores, expected, atol=1e-5, rtol=0), (scores - expected).abs().max()
    # The scores are not all equal: the test would notice rows read at the wrong token.
    assert scores.std() > 1e-3


@settings(max_examples=15)
@given(
    indices=st.lists(st.integers(0, len(PROMPTS) - 1), min_size=1, max_size=7),
    batch_size=st.integers(1, 4),
)
def test_scores_follow_input_order_for_any_batching(reward_models, tokenizer, indices, batch_size):
    model = reward_models["qwen2"]
    prompts = [PROMPTS[i] for i in indices]
    completions = [COMPLETIONS[i] for i in indices]
    scores = compute_reward_model_score(model, tokenizer, prompts, completions, batch_size)
    reference = compute_reward_model_score(model, tokenizer, PROMPTS, COMPLETIONS, batch_size=1)
    assert torch.allclose(scores, reference[indices], atol=1e-5, rtol=0)


def test_hand_computed_score(tokenizer):
    # gpt2: with ln_f's weight 0 and bias b, every final hidden state is b, so the score is
    # w · b = 0.5*1 + (-2)*0.25 + 3*(-1) = -3.0 whatever the text.
    model = tiny_reward_model("gpt2")
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[:3] = torch.tensor([1.0, 0.25, -1.0])
        model.score.weight.zero_()
        model.score.weight[0, :3] = torch.tensor([0.5, -2.0, 3.0])
    scores = compute_reward_model_score(model, tokenizer, PROMPTS[:3], COMPLETIONS[:3])
    assert scores.tolist() == [-3.0, -3.0, -3.0]


def test_padding_side_of_tokenizer_does_not_matter(reward_models):
    model = reward_models["llama"]
    left = compute_reward_model_score(
        model, tiny_tokenizer(padding_side="left"), PROMPTS, COMPLETIONS, 3
    )
    right = compute_reward_model_score(
        model, tiny_tokenizer(padding_side="right"), PROMPTS, COMPLETIONS, 3
    )
    assert torch.allclose(left, right, atol=1e-6, rtol=0)


def test_template_fn_defines_the_scored_text(reward_models, tokenizer):
    model = reward_models["qwen2"]

    def chat(prompt, completion):
        return apply_chat_template(
            tokenizer,
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
            add_generation_prompt=False,
        )

    scores = compute_reward_model_score(model, tokenizer, PROMPTS, COMPLETIONS, 2, template_fn=chat)
    texts = [chat(p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert texts[0] == "<|bos|><|user|>\nWhat is 2+2?<|eos|>\n<|assistant|>\n 4<|eos|>\n"
    assert torch.allclose(scores, unbatched_scores(model, tokenizer, texts), atol=1e-5, rtol=0)
    plain = compute_reward_model_score(model, tokenizer, PROMPTS, COMPLETIONS, 2)
    assert not torch.allclose(scores, plain)


def test_label_index_selects_a_column(tokenizer):
    config = tiny_model_config("qwen2", num_labels=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config).eval()
    with pytest.raises(ValueError, match="label_index"):
        compute_reward_model_score(model, tokenizer, PROMPTS, COMPLETIONS)
    scores = compute_reward_model_score(model, tokenizer, PROMPTS, COMPLETIONS, 2, label_index=2)
    expected = []
    for p, c in zip(PROMPTS, COMPLETIONS, strict=True):
        ids = torch.tensor([tokenizer(p + c)["input_ids"]])
        with torch.no_grad():
            expected.append(model(input_ids=ids).logits[0, 2].item())
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="label_index"):
        compute_reward_model_score(model, tokenizer, PROMPTS, COMPLETIONS, label_index=3)


def test_reward_fn_and_batch_fn(reward_models, tokenizer):
    model = reward_models["gpt2"]
    reference = compute_reward_model_score(model, tokenizer, PROMPTS, COMPLETIONS, batch_size=1)
    reward_fn = create_reward_model_fn(model, tokenizer, batch_size=8)
    rollouts = [
        Rollout(prompt=p, generation=Generation(text=c))
        for p, c in zip(PROMPTS, COMPLETIONS, strict=True)
    ]
    values = [reward_fn(r) for r in rollouts]
    assert all(isinstance(v, float) for v in values)
    assert values == pytest.approx(reference.tolist(), abs=1e-5)
    # compute_batch_rewards uses reward_fn.batched: one forward pass for the 5 rollouts.
    forwards = []
    handle = model.register_forward_hook(lambda module, args, output: forwards.append(1))
    try:
        batch_rewards = compute_batch_rewards(rollouts, reward_fn)
    finally:
        handle.remove()
    assert len(forwards) == 1
    assert torch.allclose(batch_rewards, reference, atol=1e-5, rtol=0)
    trl_style = create_batch_reward_model_fn(model, tokenizer, batch_size=4)
    trl_values = trl_style(PROMPTS, COMPLETIONS, answer=["unused"] * len(PROMPTS))
    assert isinstance(trl_values, list)
    assert trl_values == pytest.approx(reference.tolist(), abs=1e-5)
    with pytest.raises(TypeError, match="rollout"):
        reward_fn.batched(["not a rollout"])
    with pytest.raises(ValueError, match="batch_size"):
        create_reward_model_fn(model, tokenizer, batch_size=0)


def test_model_mode_restored_and_empty_input(tokenizer):
    model = tiny_reward_model("llama")
    model.train()
    compute_reward_model_score(model, tokenizer, PROMPTS[:2], COMPLETIONS[:2])
    assert model.training
    empty = compute_reward_model_score(model, tokenizer, [], [])
    assert empty.shape == (0,)


def test_bad_input(reward_models, tokenizer):
    model = reward_models["qwen2"]
    with pytest.raises(ValueError, match="same length"):
        compute_reward_model_score(model, tokenizer, PROMPTS, COMPLETIONS[:2])
    with pytest.raises(TypeError, match="prompts"):
        compute_reward_model_score(model, tokenizer, "a prompt", ["x"])
    with pytest.raises(TypeError, match=r"completions\[0\]"):
        compute_reward_model_score(model, tokenizer, ["a"], [None])
    with pytest.raises(ValueError, match="batch_size"):
        compute_reward_model_score(model, tokenizer, PROMPTS, COMPLETIONS, batch_size=0)
    with pytest.raises(ValueError, match=r"prompts\[1\] \+ completions\[1\].*context"):
        compute_reward_model_score(model, tokenizer, ["ok", "1 " * 300], ["", ""])
    no_pad = reward_model_without_pad_id()
    with pytest.raises(ValueError, match="pad_token_id"):
        compute_reward_model_score(no_pad, tokenizer, PROMPTS, COMPLETIONS, batch_size=2)
    # One row per forward needs no pad id.
    single = compute_reward_model_score(no_pad, tokenizer, PROMPTS, COMPLETIONS, batch_size=1)
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert torch.allclose(single, unbatched_scores(no_pad, tokenizer, texts), atol=1e-5, rtol=0)


def test_load_reward_model_from_saved_dir(tmp_path, reward_models, tokenizer):
    path = save_tiny_model(tmp_path / "rm", "gpt2", seed=1, reward_model=True)
    model = load_reward_model(path)
    assert model.config.num_labels == 1
    loaded = compute_reward_model_score(model, tokenizer, PROMPTS, COMPLETIONS, 4)
    original = compute_reward_model_score(reward_models["gpt2"], tokenizer, PROMPTS, COMPLETIONS, 4)
    assert torch.equal(loaded, original)
    half = load_reward_model(ModelConfig(path, dtype="bfloat16"))
    assert next(half.parameters()).dtype == torch.bfloat16


def test_load_reward_model_sets_missing_pad_id():
    calls = []

    def loader(name_or_path, **kwargs):
        calls.append(name_or_path)
        return reward_model_without_pad_id()

    model = load_reward_model("some/reward-model", model_loader=loader)
    assert calls == ["some/reward-model"]
    assert model.config.pad_token_id == 2  # the eos id
    with pytest.raises(ValueError, match="config.dtype"):
        load_reward_model(ModelConfig("x", dtype="int3"), model_loader=loader)


# --------------------------------------------------------------------------- plain modules
# Reward models of seed 004's shape: an nn.Module with forward(input_ids, attention_mask).


class SeedRewardModel(torch.nn.Module):
    """Seed 004's RewardModel: a causal LM trunk, a head on the last position's hidden state."""

    def __init__(self, seed=0):
        super().__init__()
        self.base_model = tiny_model("qwen2", seed=seed)
        generator = torch.Generator().manual_seed(seed + 10)
        self.head = torch.nn.Linear(128, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(1, 128, generator=generator))

    def forward(self, input_ids, attention_mask):
        outputs = self.base_model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )
        return self.head(outputs.hidden_states[-1][:, -1, :]).squeeze(-1)


class BagOfTokens(torch.nn.Module):
    """A K-component reward: masked mean of token embeddings, then a linear map ([B, K])."""

    def __init__(self, vocab=512, components=3):
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.embedding = torch.nn.Parameter(torch.randn(vocab, components, generator=generator))

    def forward(self, input_ids, attention_mask):
        weights = attention_mask.float().unsqueeze(-1)
        return (self.embedding[input_ids] * weights).sum(1) / weights.sum(1)


def test_seed_shaped_reward_model_scores_the_last_token(tokenizer):
    model = SeedRewardModel()
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    expected = []
    for text in texts:  # one unpadded forward per text, written out
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            hidden = model.base_model(input_ids=ids, output_hidden_states=True).hidden_states
            expected.append(float(hidden[-1][0, -1] @ model.head.weight[0] + model.head.bias[0]))
    for batch_size in (1, 2, 8):  # left padding: column -1 is each row's last real token
        scores = compute_reward_model_score(model, tokenizer, PROMPTS, COMPLETIONS, batch_size)
        assert scores.shape == (len(PROMPTS),)
        torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-4, rtol=1e-4)
    # Right padding would make column -1 a pad token for the shorter rows.
    right = compute_reward_model_score(
        model, tokenizer, PROMPTS, COMPLETIONS, 8, padding_side="right"
    )
    assert not torch.allclose(right, torch.tensor(expected), atol=1e-3)


def test_vector_reward_module_gives_k_components(tokenizer):
    model = BagOfTokens()
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    expected = torch.stack(
        [model.embedding.detach()[tokenizer(t)["input_ids"]].mean(0) for t in texts]
    )
    for batch_size in (1, 3, 8):
        scores = compute_reward_model_score(model, tokenizer, PROMPTS, COMPLETIONS, batch_size)
        assert scores.shape == (len(PROMPTS), 3)
        torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-6)
    column = compute_reward_model_score(model, tokenizer, PROMPTS, COMPLETIONS, label_index=2)
    torch.testing.assert_close(column, expected[:, 2], atol=1e-6, rtol=1e-6)

    rollouts = [
        Rollout(p, Generation(c, (), (), None, "stop"), group_id=i)
        for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True))
    ]
    reward_fn = create_reward_model_fn(model, tokenizer, batch_size=2)
    torch.testing.assert_close(torch.tensor(reward_fn.batched(rollouts)), expected)
    torch.testing.assert_close(torch.tensor(reward_fn(rollouts[1])), expected[1])
    weights = [1.0, -2.0, 0.5]
    scored = compute_batch_rewards(rollouts, reward_fn, aggregator=weighted_sum(weights))
    torch.testing.assert_close(scored, expected @ torch.tensor(weights))
    batch_fn = create_batch_reward_model_fn(model, tokenizer)
    torch.testing.assert_close(torch.tensor(batch_fn(PROMPTS, COMPLETIONS)), expected)


def test_seed_shaped_reward_model_in_compute_batch_rewards(tokenizer):
    model = SeedRewardModel(seed=3)
    rollouts = [
        Rollout(p, Generation(c, (), (), None, "stop"))
        for p, c in zip(PROMPTS, COMPLETIONS, strict=True)
    ]
    scored = compute_batch_rewards(rollouts, create_reward_model_fn(model, tokenizer, 2))
    expected = compute_reward_model_score(model, tokenizer, PROMPTS, COMPLETIONS, 1)
    torch.testing.assert_close(scored, expected)


class Returns(torch.nn.Module):
    """A module whose forward returns whatever ``make(input_ids)`` builds."""

    def __init__(self, make):
        super().__init__()
        self.make = make
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        return self.make(input_ids)


@pytest.mark.parametrize(
    "make, got",
    [
        (lambda ids: torch.zeros(ids.shape[0], 2, 1), r"\(2, 2, 1\)"),
        (lambda ids: torch.zeros(ids.shape[0] + 1), r"\(3,\)"),
        (lambda ids: {"logits": torch.zeros(ids.shape[0])}, "dict"),
    ],
)
def test_plain_module_of_another_shape_gets_an_error_naming_the_shape(tokenizer, make, got):
    with pytest.raises(ValueError, match=r"\[B\] \(one reward per row\) or \[B, K\].*" + got):
        compute_reward_model_score(Returns(make), tokenizer, PROMPTS[:2], COMPLETIONS[:2])
    with pytest.raises(TypeError, match="nn.Module"):
        compute_reward_model_score(lambda i, m: i, tokenizer, PROMPTS[:2], COMPLETIONS[:2])
    with pytest.raises(ValueError, match="padding_side"):
        compute_reward_model_score(
            BagOfTokens(), tokenizer, PROMPTS[:2], COMPLETIONS[:2], padding_side="middle"
        )


# --------------------------------------------------------------------------- scorer (seed 003)


def test_scorer_sees_the_padded_batch_and_defines_the_score(reward_models, tokenizer):
    model = reward_models["qwen2"]
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    lengths = torch.tensor([float(len(tokenizer(t)["input_ids"])) for t in texts])

    def token_count(model, input_ids, attention_mask):  # the mask it gets marks real tokens
        return attention_mask.sum(-1).float()

    for batch_size in (1, 2, 8):
        scores = compute_reward_model_score(
            model, tokenizer, PROMPTS, COMPLETIONS, batch_size, scorer=token_count
        )
        torch.testing.assert_close(scores, lengths, rtol=0, atol=0)

    def both(model, input_ids, attention_mask):  # [B, 2]: the model's score and the length
        default = rp_score(model, input_ids, attention_mask)[:, 0]
        return torch.stack([default, attention_mask.sum(-1).float()], dim=-1)

    pair = compute_reward_model_score(model, tokenizer, PROMPTS, COMPLETIONS, 2, scorer=both)
    torch.testing.assert_close(pair[:, 0], unbatched_scores(model, tokenizer, texts),
                               atol=1e-4, rtol=1e-4)
    second = compute_reward_model_score(
        model, tokenizer, PROMPTS, COMPLETIONS, 2, label_index=1, scorer=both
    )
    torch.testing.assert_close(second, lengths, rtol=0, atol=0)
    rollouts = [
        Rollout(p, Generation(c, (), (), None, "stop"))
        for p, c in zip(PROMPTS, COMPLETIONS, strict=True)
    ]
    reward_fn = create_reward_model_fn(model, tokenizer, 3, scorer=token_count)
    assert reward_fn.batched(rollouts) == lengths.tolist()
    batch_fn = create_batch_reward_model_fn(model, tokenizer, scorer=token_count)
    assert batch_fn(PROMPTS, COMPLETIONS) == lengths.tolist()


def test_a_bad_scorer_gets_an_error_naming_it(reward_models, tokenizer):
    model = reward_models["llama"]
    with pytest.raises(ValueError, match=r"scorer must return a tensor of shape \[B\].*\(2, 2, 1\)"):
        compute_reward_model_score(
            model, tokenizer, PROMPTS[:2], COMPLETIONS[:2],
            scorer=lambda m, ids, mask: torch.zeros(ids.shape[0], 2, 1),
        )
    for build in (create_reward_model_fn, create_batch_reward_model_fn):
        with pytest.raises(TypeError, match="scorer must be None or callable"):
            build(model, tokenizer, scorer="logits")
