"""Tests of rlprim.inference on real tiny transformers models (qwen2, llama, gpt2)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlprim import inference
from rlprim.inference import (
    apply_chat_template,
    batch_generate,
    generate,
    generate_conversation_turn,
    generate_with_logprobs,
    hf_generator,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from rlprim.testing import TINY_ARCHS, save_tiny_model, tiny_model, tiny_tokenizer
from rlprim.types import Conversation, Generation, GenerationConfig, Message, ModelConfig, ToolCall

PROMPTS = ("What is 12 + 7?", "Hello", "Compute 3*4. Think step by step, then answer.")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch) for arch in TINY_ARCHS}


def naive_logprobs(model, prompt_ids, token_ids, temperature):
    """log_softmax(model(prompt + completion).logits / T) gathered at the completion tokens."""
    ids = torch.tensor([list(prompt_ids) + list(token_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    start = len(prompt_ids)
    rows = logprobs[start - 1 : start - 1 + len(token_ids)]
    return rows.gather(-1, torch.tensor(token_ids)[:, None]).squeeze(-1)


def encode(tokenizer, text):
    return tuple(tokenizer(text)["input_ids"])


def greedy_reference(model, tokenizer, prompt, max_new_tokens):
    """transformers' own greedy decoding of one unpadded prompt, up to and including EOS."""
    ids = torch.tensor([encode(tokenizer, prompt)])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    tokens = out[0, ids.shape[1] :].tolist()
    eos = tokenizer.eos_token_id
    return tuple(tokens[: tokens.index(eos) + 1] if eos in tokens else tokens)


# ---------------------------------------------------------------------------------------------
# Order, counts, log-probs
# ---------------------------------------------------------------------------------------------


def test_returns_prompts_times_samples_in_group_order(models, tokenizer):
    config = GenerationConfig(max_new_tokens=4, num_samples=3, seed=0)
    generations = batch_generate(models["qwen2"], tokenizer, list(PROMPTS), config)
    assert len(generations) == 9
    for i, prompt in enumerate(PROMPTS):
        for j in range(3):
            assert generations[i * 3 + j].prompt_ids == encode(tokenizer, prompt)
    # Samples of one group are different draws, not copies.
    assert len({g.token_ids for g in generations[:3]}) > 1


def test_uniform_model_logprobs_are_minus_log_vocab(tokenizer):
    # Hand-computed: with the head zeroed every logit is 0, so every token has probability
    # 1/V = 1/512 under softmax(0 / T) for any T; top-k=5 must NOT give log(1/5).
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    config = GenerationConfig(max_new_tokens=5, temperature=0.7, top_k=5, num_samples=2, seed=3)
    generations = batch_generate(model, tokenizer, ["Hi there"], config)
    for generation in generations:
        assert len(generation.logprobs) == 5
        for value in generation.logprobs:
            assert value == pytest.approx(-6.238324625, abs=1e-6)  # -log(512)
        assert generation.finish_reason in ("length", "stop")


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("top_p,top_k", [(1.0, 0), (0.8, 20)])
def test_logprobs_equal_naive_recomputation(models, tokenizer, arch, temperature, top_p, top_k):
    model = models[arch]
    config = GenerationConfig(
        max_new_tokens=6,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        num_samples=2,
        seed=11,
    )
    generations = batch_generate(model, tokenizer, list(PROMPTS), config)
    for generation in generations:
        assert len(generation.logprobs) == len(generation.token_ids) > 0
        expected = naive_logprobs(model, generation.prompt_ids, generation.token_ids, temperature)
        got = torch.tensor(generation.logprobs)
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_logprobs_equal_get_logprobs(models, tokenizer, arch):
    logprobs_module = pytest.importorskip("rlprim.logprobs")
    model = models[arch]
    config = GenerationConfig(max_new_tokens=5, temperature=0.7, num_samples=2, seed=5)
    for generation in batch_generate(model, tokenizer, list(PROMPTS), config):
        ids = torch.tensor([list(generation.prompt_ids) + list(generation.token_ids)])
        with torch.no_grad():
            expected = logprobs_module.get_logprobs(
                model,
                ids,
                torch.ones_like(ids),
                temperature=0.7,
                completion_length=len(generation.token_ids),
            )[0]
        got = torch.tensor(generation.logprobs)
        assert torch.allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_equals_transformers_greedy(models, tokenizer, arch):
    model = models[arch]
    config = GenerationConfig(max_new_tokens=8, do_sample=False, temperature=0.5)
    generations = batch_generate(model, tokenizer, list(PROMPTS), config)
    for prompt, generation in zip(PROMPTS, generations, strict=True):
        assert generation.token_ids == greedy_reference(model, tokenizer, prompt, 8)
        # Greedy log-probs are still taken under softmax(z / T).
        expected = naive_logprobs(model, generation.prompt_ids, generation.token_ids, 0.5)
        assert torch.allclose(torch.tensor(generation.logprobs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_left_padded_batch_equals_unbatched(models, tokenizer, arch):
    model = models[arch]
    config = GenerationConfig(max_new_tokens=6, do_sample=False)
    together = batch_generate(model, tokenizer, list(PROMPTS), config)
    for prompt, batched in zip(PROMPTS, together, strict=True):
        alone = batch_generate(model, tokenizer, [prompt], config)[0]
        assert batched.token_ids == alone.token_ids
        assert batched.text == alone.text
        assert max(abs(a - b) for a, b in zip(batched.logprobs, alone.logprobs, strict=True)) < 1e-5


def test_batch_size_splits_into_calls_with_same_greedy_result(models, tokenizer):
    model = models["gpt2"]
    config = GenerationConfig(max_new_tokens=5, do_sample=False, num_samples=2)
    whole = batch_generate(model, tokenizer, list(PROMPTS), config)
    split = batch_generate(model, tokenizer, list(PROMPTS), config._replace(batch_size=1))
    assert [g.token_ids for g in whole] == [g.token_ids for g in split]
    assert [g.prompt_ids for g in whole] == [g.prompt_ids for g in split]


def test_model_generation_config_does_not_change_sampling(tokenizer):
    clean = tiny_model("qwen2")
    tweaked = tiny_model("qwen2")
    tweaked.generation_config.repetition_penalty = 3.0
    tweaked.generation_config.top_k = 1
    tweaked.generation_config.temperature = 0.05
    tweaked.generation_config.no_repeat_ngram_size = 1
    config = GenerationConfig(max_new_tokens=8, num_samples=3, seed=8)
    expected = batch_generate(clean, tokenizer, list(PROMPTS), config)
    assert batch_generate(tweaked, tokenizer, list(PROMPTS), config) == expected


# ---------------------------------------------------------------------------------------------
# Seeds and RNG
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_samples_different_seed_different(models, tokenizer):
    model = models["qwen2"]
    config = GenerationConfig(max_new_tokens=8, num_samples=2, seed=123)
    first = batch_generate(model, tokenizer, list(PROMPTS), config)
    second = batch_generate(model, tokenizer, list(PROMPTS), config)
    other = batch_generate(model, tokenizer, list(PROMPTS), config._replace(seed=124))
    assert first == second
    assert [g.token_ids for g in first] != [g.token_ids for g in other]


def test_seeded_generation_leaves_global_rng_untouched(models, tokenizer):
    torch.manual_seed(2024)
    expected_next = torch.rand(4)
    torch.manual_seed(2024)
    state = torch.get_rng_state()
    config = GenerationConfig(max_new_tokens=4, num_samples=2, seed=7)
    batch_generate(models["llama"], tokenizer, list(PROMPTS), config)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(4), expected_next)


def test_unseeded_generation_follows_global_rng(models, tokenizer):
    config = GenerationConfig(max_new_tokens=6, num_samples=2)
    torch.manual_seed(99)
    first = batch_generate(models["qwen2"], tokenizer, list(PROMPTS), config)
    torch.manual_seed(99)
    second = batch_generate(models["qwen2"], tokenizer, list(PROMPTS), config)
    assert first == second


# ---------------------------------------------------------------------------------------------
# Stopping
# ---------------------------------------------------------------------------------------------


def test_stop_string_ends_generation(models, tokenizer):
    model = models["qwen2"]
    config = GenerationConfig(max_new_tokens=16, do_sample=False)
    full = batch_generate(model, tokenizer, [PROMPTS[0]], config)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 16
    # A stop string taken from the middle of the free-running output.
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    assert len(stop) == 2
    stopped = batch_generate(model, tokenizer, [PROMPTS[0]], config._replace(stop=[stop]))[0]
    assert stopped.finish_reason == "stop"
    end = full.text.index(stop) + len(stop)
    assert stopped.text == full.text[:end]
    assert stopped.text.endswith(stop)
    n = len(stopped.token_ids)
    assert 0 < n < 16
    assert stopped.token_ids == full.token_ids[:n]
    # token_ids run exactly through the token that completes the stop string.
    assert stop in tokenizer.decode(stopped.token_ids, skip_special_tokens=True)
    assert stop not in tokenizer.decode(stopped.token_ids[:-1], skip_special_tokens=True)
    assert stopped.logprobs == pytest.approx(full.logprobs[:n], abs=1e-5)


def test_stop_strings_per_sample_in_a_sampled_batch(models, tokenizer):
    model = models["llama"]
    stops = ["e", "3"]
    config = GenerationConfig(max_new_tokens=12, num_samples=4, seed=1, stop=stops)
    generations = batch_generate(model, tokenizer, list(PROMPTS), config)
    reasons = {g.finish_reason for g in generations}
    assert reasons == {"stop", "length"}  # the seed gives both kinds of rows
    for generation in generations:
        decoded = tokenizer.decode(generation.token_ids, skip_special_tokens=True)
        assert len(generation.logprobs) == len(generation.token_ids)
        if generation.finish_reason == "stop" and generation.token_ids[-1] != 2:
            assert any(generation.text.endswith(s) for s in stops)
            assert not any(
                s in tokenizer.decode(generation.token_ids[:-1], skip_special_tokens=True)
                for s in stops
            )
        else:
            assert not any(s in decoded for s in stops)
            assert generation.text == decoded


def test_special_token_stop_string_ends_generation(tokenizer):
    # A stop string that is a special token never shows in the decoded text; the row must still
    # end at it (not run on with padding). Swapping two rows of the head makes greedy decoding
    # emit "<|user|>" where it emitted the 3rd token.
    model = tiny_model("llama")
    config = GenerationConfig(max_new_tokens=8, do_sample=False)
    free = batch_generate(model, tokenizer, [PROMPTS[0]], config)[0]
    special = tokenizer.convert_tokens_to_ids("<|user|>")
    third = free.token_ids[2]
    with torch.no_grad():
        model.lm_head.weight[[third, special]] = model.lm_head.weight[[special, third]]
    stopped = batch_generate(model, tokenizer, [PROMPTS[0]], config._replace(stop=["<|user|>"]))
    assert stopped[0].token_ids == free.token_ids[:2] + (special,)
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].text == tokenizer.decode(free.token_ids[:2])
    assert len(stopped[0].logprobs) == 3


@pytest.mark.parametrize(
    "stop,length,text",
    [
        (["</answer>"], 8, "The answer is 4</answer>"),
        (["</ans"], 7, "The answer is 4</ans"),  # the 7th token "answer" overhangs the stop
        (["more", " is"], 3, "The answer is"),  # the earliest-completed stop string wins
    ],
)
def test_cut_at_stop_finds_the_shortest_prefix(tokenizer, stop, length, text):
    ids = tokenizer("The answer is 4</answer> and more")["input_ids"]
    assert len(ids) == 13
    assert inference._cut_at_stop(tokenizer, ids, tokenizer.decode(ids), stop) == (length, text)


def test_unmatched_stop_string_finishes_by_length(models, tokenizer):
    config = GenerationConfig(max_new_tokens=5, do_sample=False, stop=["\u00a7never\u00a7"])
    generation = batch_generate(models["gpt2"], tokenizer, [PROMPTS[1]], config)[0]
    assert generation.finish_reason == "length"
    assert len(generation.token_ids) == 5


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_eos_ends_each_row_and_is_kept(tokenizer, pad_is_eos):
    model = tiny_model("qwen2")
    config = GenerationConfig(max_new_tokens=10, do_sample=False)
    free = batch_generate(model, tokenizer, list(PROMPTS), config)
    # Declare a token an EOS that the free-running rows produce at different first steps, so
    # rows of one batch stop at different times (transformers pads the finished ones).
    rows = [g.token_ids for g in free]
    marker = min(
        t
        for t in {t for row in rows for t in row}
        if len({row.index(t) for row in rows if t in row}) >= 2
    )
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, marker]
    tok = tiny_tokenizer()
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    stopped = batch_generate(model, tok, list(PROMPTS), config)
    for before, after in zip(free, stopped, strict=True):
        ids = before.token_ids
        if marker in ids:
            cut = ids.index(marker) + 1
            assert after.token_ids == ids[:cut]
            assert after.finish_reason == "stop"
        else:
            assert after.token_ids == ids
            assert after.finish_reason == "length"
        assert len(after.logprobs) == len(after.token_ids)
        assert after.logprobs == pytest.approx(before.logprobs[: len(after.token_ids)], abs=1e-5)
    cut_lengths = {len(g.token_ids) for g in stopped if g.finish_reason == "stop"}
    assert len(cut_lengths) >= 2 and max(cut_lengths) < 10


# ---------------------------------------------------------------------------------------------
# Property: shapes and invariants for any small configuration
# ---------------------------------------------------------------------------------------------


@settings(max_examples=12)
@given(
    num_prompts=st.integers(1, 3),
    num_samples=st.integers(1, 3),
    max_new_tokens=st.integers(1, 3),
    temperature=st.floats(0.3, 2.0),
    top_k=st.integers(0, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_generation_invariants(
    models, tokenizer, num_prompts, num_samples, max_new_tokens, temperature, top_k, seed
):
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        num_samples=num_samples,
        seed=seed,
    )
    prompts = list(PROMPTS[:num_prompts])
    generations = batch_generate(models["gpt2"], tokenizer, prompts, config)
    assert len(generations) == num_prompts * num_samples
    for index, generation in enumerate(generations):
        assert generation.prompt_ids == encode(tokenizer, prompts[index // num_samples])
        assert 1 <= len(generation.token_ids) <= max_new_tokens
        assert len(generation.logprobs) == len(generation.token_ids)
        assert all(value <= 0.0 and math.isfinite(value) for value in generation.logprobs)
        assert generation.finish_reason in ("stop", "length")
        if generation.finish_reason == "length":
            assert len(generation.token_ids) == max_new_tokens
        assert generation.text == tokenizer.decode(generation.token_ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# generate, generate_with_logprobs, custom generators, model mode
# ---------------------------------------------------------------------------------------------


def test_generate_returns_one_generation_ignoring_num_samples(models, tokenizer):
    config = GenerationConfig(max_new_tokens=4, num_samples=5, do_sample=False)
    generation = generate(models["qwen2"], tokenizer, PROMPTS[0], config)
    assert isinstance(generation, Generation)
    assert (
        generation
        == batch_generate(models["qwen2"], tokenizer, [PROMPTS[0]], config._replace(num_samples=1))[
            0
        ]
    )


def _without_logprobs(model, tokenizer, prompts, config):
    return [g._replace(logprobs=None) for g in hf_generator(model, tokenizer, prompts, config)]


def test_generate_with_logprobs_fills_missing_logprobs(models, tokenizer):
    pytest.importorskip("rlprim.logprobs")
    model = models["llama"]
    config = GenerationConfig(max_new_tokens=6, temperature=0.7, seed=4)
    generation = generate_with_logprobs(
        model, tokenizer, PROMPTS[2], config, generator=_without_logprobs
    )
    reference = generate(model, tokenizer, PROMPTS[2], config)
    assert generation.token_ids == reference.token_ids
    assert generation.logprobs == pytest.approx(reference.logprobs, abs=1e-5)


def test_generate_with_logprobs_uses_logprob_extractor(models, tokenizer):
    calls = []

    def extractor(model, input_ids, attention_mask, *, temperature, completion_length):
        calls.append((input_ids.shape, temperature, completion_length))
        return torch.full((input_ids.shape[0], completion_length), -1.5)

    config = GenerationConfig(max_new_tokens=3, do_sample=False, temperature=0.9)
    generation = generate_with_logprobs(
        models["qwen2"],
        tokenizer,
        PROMPTS[1],
        config,
        generator=_without_logprobs,
        logprob_extractor=extractor,
    )
    n_prompt, n_new = len(generation.prompt_ids), len(generation.token_ids)
    assert calls == [(torch.Size([1, n_prompt + n_new]), 0.9, n_new)]
    assert generation.logprobs == (-1.5,) * n_new
    # A generator that already returns log-probs is trusted: the extractor is not called.
    generate_with_logprobs(
        models["qwen2"], tokenizer, PROMPTS[1], config, logprob_extractor=extractor
    )
    assert len(calls) == 1


def test_custom_generator_receives_validated_arguments(tokenizer):
    seen = []

    def echo_generator(model, tok, prompts, config):
        seen.append((model, tuple(prompts), config.num_samples))
        return [
            Generation(
                text=p.upper(), prompt_ids=(), token_ids=(), logprobs=(), finish_reason="stop"
            )
            for p in prompts
            for _ in range(config.num_samples)
        ]

    config = GenerationConfig(num_samples=2)
    result = batch_generate("engine", tokenizer, ["ab", "cd"], config, generator=echo_generator)
    assert [g.text for g in result] == ["AB", "AB", "CD", "CD"]
    assert seen == [("engine", ("ab", "cd"), 2)]
    with pytest.raises(ValueError, match="generator returned 1 generations"):
        batch_generate(
            "engine", tokenizer, ["ab"], config, generator=lambda m, t, p, c: [result[0]]
        )


def test_model_mode_is_restored(tokenizer):
    model = tiny_model("gpt2")
    model.train()
    batch_generate(model, tokenizer, ["Hi"], GenerationConfig(max_new_tokens=2, seed=0))
    assert model.training
    model.eval()
    batch_generate(model, tokenizer, ["Hi"], GenerationConfig(max_new_tokens=2, seed=0))
    assert not model.training


# ---------------------------------------------------------------------------------------------
# Chat templates and conversations
# ---------------------------------------------------------------------------------------------


def test_chat_template_with_and_without_generation_prompt(tokenizer):
    conversation = Conversation(
        (Message("system", "Be brief."), Message("user", "2+2?"), Message("assistant", "4"))
    )
    assert apply_chat_template(tokenizer, conversation, add_generation_prompt=False) == (
        "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\n2+2?<|eos|>\n<|assistant|>\n4<|eos|>\n"
    )
    as_dicts = [{"role": "user", "content": "hi"}]
    assert apply_chat_template(tokenizer, as_dicts) == "<|bos|><|user|>\nhi<|eos|>\n<|assistant|>\n"
    assert apply_chat_template(tokenizer, [Message("user", "hi")], add_generation_prompt=False) == (
        "<|bos|><|user|>\nhi<|eos|>\n"
    )


def test_chat_template_fn_and_message_conversion(tokenizer):
    received = []

    def template_fn(messages, add_generation_prompt):
        received.append((messages, add_generation_prompt))
        return "|".join(f"{m['role']}:{m['content']}" for m in messages) + (
            "|assistant:" if add_generation_prompt else ""
        )

    call = ToolCall(name="calculator", arguments={"expression": "1+1"})
    conversation = [
        Message("assistant", "", tool_calls=(call,)),
        Message("tool", "2", name="calculator"),
    ]
    text = apply_chat_template(tokenizer, conversation, template_fn=template_fn)
    assert text == "assistant:|tool:2|assistant:"
    messages, flag = received[0]
    assert flag is True
    assert messages[0]["tool_calls"] == [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "1+1"}}}
    ]
    assert messages[1] == {"role": "tool", "content": "2", "name": "calculator"}


def test_chat_template_errors(tokenizer):
    with pytest.raises(ValueError, match="conversation"):
        apply_chat_template(tokenizer, [])
    with pytest.raises(TypeError, match="conversation"):
        apply_chat_template(tokenizer, "hello")
    with pytest.raises(ValueError, match=r"conversation\[0\]"):
        apply_chat_template(tokenizer, [{"content": "no role"}])
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        apply_chat_template(bare, [Message("user", "hi")])


def test_generate_conversation_turn_appends_assistant_message(models, tokenizer):
    conversation = Conversation((Message("user", "What is 2+2?"),))
    config = GenerationConfig(max_new_tokens=6, do_sample=False)
    new_conversation, generation = generate_conversation_turn(
        models["qwen2"], tokenizer, conversation, config
    )
    assert conversation.messages == (Message("user", "What is 2+2?"),)
    assert new_conversation.messages[:-1] == conversation.messages
    assert new_conversation.messages[-1] == Message("assistant", generation.text)
    rendered = "<|bos|><|user|>\nWhat is 2+2?<|eos|>\n<|assistant|>\n"
    # The template's BOS is not doubled by tokenisation.
    assert generation.prompt_ids == tuple(tokenizer(rendered)["input_ids"])
    assert generation.prompt_ids.count(tokenizer.bos_token_id) == 1
    assert generation == generate(models["qwen2"], tokenizer, rendered, config)
    # Dict messages come back as Message records.
    from_dicts, _ = generate_conversation_turn(
        models["qwen2"], tokenizer, [{"role": "user", "content": "What is 2+2?"}], config
    )
    assert from_dicts == new_conversation


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts,config,error,match",
    [
        ([], GenerationConfig(), ValueError, "prompts"),
        ("a single string", GenerationConfig(), TypeError, "prompts"),
        (["ok", 3], GenerationConfig(), TypeError, r"prompts\[1\]"),
        (["ok"], GenerationConfig(num_samples=0), ValueError, "num_samples"),
        (["ok"], GenerationConfig(temperature=0.0), ValueError, "temperature"),
        (["ok"], GenerationConfig(temperature=-1.0), ValueError, "temperature"),
        (["ok"], GenerationConfig(temperature=0.0, do_sample=False), ValueError, "temperature"),
        (["ok"], GenerationConfig(max_new_tokens=0), ValueError, "max_new_tokens"),
        (["ok"], GenerationConfig(top_p=0.0), ValueError, "top_p"),
        (["ok"], GenerationConfig(top_k=-1), ValueError, "top_k"),
        (["ok"], GenerationConfig(batch_size=0), ValueError, "batch_size"),
        (["ok"], GenerationConfig(stop="</a>"), TypeError, "stop"),
        (["ok"], GenerationConfig(stop=[""]), ValueError, "stop"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(models, tokenizer, prompts, config, error, match):
    for fn in (batch_generate, hf_generator):
        with pytest.raises(error, match=match):
            fn(models["qwen2"], tokenizer, prompts, config)


def test_too_long_prompt_raises(models, tokenizer):
    long_prompt = "1 " * 300  # 600 tokens > the 512-token context
    assert len(encode(tokenizer, long_prompt)) > 512
    with pytest.raises(ValueError, match=r"prompts\[1\].*context"):
        batch_generate(models["qwen2"], tokenizer, ["ok", long_prompt], GenerationConfig())
    fits_alone = "1 " * 240  # 480 tokens + 64 new tokens > 512
    with pytest.raises(ValueError, match="max_new_tokens"):
        batch_generate(
            models["llama"], tokenizer, [fits_alone], GenerationConfig(max_new_tokens=64)
        )


def test_tokenizer_without_pad_and_eos_raises(models):
    bare = tiny_tokenizer()
    bare.pad_token = None
    bare.eos_token = None
    with pytest.raises(ValueError, match="tokenizer"):
        batch_generate(models["qwen2"], bare, ["hi"], GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer("unused-name", tokenizer_loader=lambda name, **kw: bare)


def test_tokenizer_without_pad_pads_with_eos(models):
    no_pad = tiny_tokenizer()
    no_pad.pad_token = None
    config = GenerationConfig(max_new_tokens=4, do_sample=False)
    with_pad = batch_generate(models["qwen2"], tiny_tokenizer(), list(PROMPTS), config)
    assert batch_generate(models["qwen2"], no_pad, list(PROMPTS), config) == with_pad


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_load_model_and_tokenizer_from_saved_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = save_tiny_model(tmp_path / "tiny", "llama", seed=3)
    model = load_model(path)
    tok = load_tokenizer(ModelConfig(path))
    original = tiny_model("llama", seed=3)
    ids = torch.tensor([tiny_tokenizer()("Hello world")["input_ids"]])
    assert tok("Hello world")["input_ids"] == ids[0].tolist()
    assert tok.padding_side == "left" and tok.pad_token_id == 0
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    config = GenerationConfig(max_new_tokens=5, do_sample=False)
    assert batch_generate(model, tok, ["Hi"], config) == batch_generate(
        original, tiny_tokenizer(), ["Hi"], config
    )
    half = load_model(ModelConfig(path, dtype="bfloat16"))
    assert next(half.parameters()).dtype == torch.bfloat16
    assert load_tokenizer(path, padding_side="right").padding_side == "right"


def test_load_model_uses_model_loader_and_config_fields():
    calls = []

    def loader(name_or_path, **kwargs):
        calls.append((name_or_path, kwargs))
        return torch.nn.Linear(2, 2)

    config = ModelConfig("some/model", dtype="float16", revision="v1", attn_implementation="eager")
    model = load_model(config, model_loader=loader)
    assert isinstance(model, torch.nn.Linear)
    assert calls == [
        (
            "some/model",
            {
                "dtype": torch.float16,
                "trust_remote_code": False,
                "revision": "v1",
                "attn_implementation": "eager",
            },
        )
    ]


def test_load_model_bad_config():
    with pytest.raises(ValueError, match="config.dtype"):
        load_model(ModelConfig("x", dtype="float8"), model_loader=lambda *a, **k: None)
    with pytest.raises(ValueError, match="config.device"):
        load_model(ModelConfig("x", device="gpu?"), model_loader=lambda *a, **k: None)
    with pytest.raises(TypeError, match="config"):
        load_model(3)
    with pytest.raises(ValueError, match="padding_side"):
        load_tokenizer("x", padding_side="middle")


def test_load_model_lora_without_peft_explains_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails
    config = ModelConfig("x", lora={"r": 4, "target_modules": ["q_proj"]})
    with pytest.raises(ImportError, match=r"pip install rlprim\[peft\]"):
        load_model(config, model_loader=lambda name, **kw: tiny_model("qwen2"))


def test_load_model_lora_trains_only_the_adapters():
    pytest.importorskip("peft", reason="peft is in the dev extra")
    config = ModelConfig("x", lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    base = tiny_model("qwen2")
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = load_model(config, model_loader=lambda name, **kw: base)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # An optimizer step on a real loss moves the adapters only.
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=ids, labels=ids).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    optimizer.step()
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    for name, value in frozen.items():
        # peft keeps a wrapped layer's weight as `<layer>.base_layer.weight`.
        merged = [n for n in after if n.replace(".base_layer", "").endswith("." + name)
                  and "lora_" not in n]
        assert len(merged) == 1 and torch.equal(after[merged[0]].detach(), value), name


def test_resolve_model_path(tmp_path, monkeypatch):
    assert resolve_model_path("rlprim/not-bundled") == "rlprim/not-bundled"
    assert resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    monkeypatch.setattr(inference, "_ASSETS_DIR", tmp_path)
    (tmp_path / "arith-tiny").mkdir()
    assert resolve_model_path("rlprim/arith-tiny") == str(tmp_path / "arith-tiny")
    with pytest.raises(TypeError, match="name"):
        resolve_model_path(None)


def test_token_id_prompts_equal_text_prompts():
    from rlprim.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen2", seed=0)
    config = GenerationConfig(max_new_tokens=5, num_samples=2, seed=7)
    texts = ["12+3=", "hello world"]
    by_text = hf_generator(model, tok, texts, config)
    ids = [list(g.prompt_ids) for g in by_text[::2]]
    by_ids = hf_generator(model, tok, ids, config)
    assert [g.token_ids for g in by_ids] == [g.token_ids for g in by_text]
    assert [g.logprobs for g in by_ids] == [g.logprobs for g in by_text]
    assert [list(g.prompt_ids) for g in by_ids[::2]] == ids
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        hf_generator(model, tok, ["a", [1, -2]], config)
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        hf_generator(model, tok, [[]], config)
