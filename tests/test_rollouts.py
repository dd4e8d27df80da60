"""Tests of rlprim.rollouts on real tiny transformers models.

Scripted generators below are real ``Generator``-protocol functions (they return fixed texts
encoded with the real tokenizer): the only way to make an untrained tiny model call tools. The
default ``hf_generator`` path is exercised end to end as well.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rlprim.inference import apply_chat_template, hf_generator
from rlprim.rollouts import (
    FINISH_REASONS,
    DynamicSamplingStats,
    create_batch_multiturn_rollouts,
    create_batch_rollouts,
    create_multiturn_rollout,
    create_rollout,
    execute_and_track_tools,
    filter_groups,
    sample_until_informative,
    tool_call_was_executed,
    track_tool_calls,
)
from rlprim.testing import tiny_model, tiny_tokenizer
from rlprim.tools import calculator, execute_tools, parse_xml_tools
from rlprim.types import Conversation, Generation, GenerationConfig, Message, Rollout, ToolCall

TOOLS = {"calculator": calculator}
EOS = 2  # tiny_tokenizer's eos id, also the chat template's end-of-turn marker


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", seed=0)


@pytest.fixture(scope="module")
def ref_model():
    return tiny_model("qwen2", seed=1)


# =========================================================================== helpers


def encode(tokenizer, text):
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def scripted_generator(reply_fn, log=None, logprob=-0.25, eos=True, with_logprobs=True):
    """A Generator: ``reply_fn(decoded prompt) -> reply text``, encoded with the tokenizer.

    Prompts may be strings or token-id lists; ``log`` (a list) receives each call's prompts.
    """

    def generator(model, tokenizer, prompts, config):
        if log is not None:
            log.append([p if isinstance(p, str) else list(p) for p in prompts])
        out = []
        for prompt in prompts:
            text = prompt if isinstance(prompt, str) else tokenizer.decode(list(prompt))
            prompt_ids = encode(tokenizer, text) if isinstance(prompt, str) else tuple(prompt)
            reply = reply_fn(text)
            ids = encode(tokenizer, reply) + ((EOS,) if eos else ())
            for _ in range(config.num_samples):
                out.append(Generation(
                    text=reply, prompt_ids=prompt_ids, token_ids=ids,
                    logprobs=(logprob,) * len(ids) if with_logprobs else None,
                    finish_reason="stop" if eos else "length"))
        return out

    return generator


def calc_call(expression):
    return f'<tool name="calculator">{{"expression": "{expression}"}}</tool>'


def naive_logprobs(model, prompt_ids, completion_ids, temperature=1.0):
    """log_softmax(model(prompt + completion).logits / T) at the completion tokens (no padding)."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    start = len(prompt_ids)
    rows = logprobs[start - 1 : start - 1 + len(completion_ids)]
    return rows.gather(-1, torch.tensor(list(completion_ids))[:, None]).squeeze(-1).numpy()


def k3_sum(logprobs, ref_logprobs, mask):
    total = 0.0
    for lp, ref, m in zip(logprobs, ref_logprobs, mask, strict=True):
        if m:
            d = lp - ref
            total += math.exp(-d) + d - 1.0
    return total


def mask_runs(mask):
    """``[(value, start, end)]`` runs of equal values."""
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((mask[start], start, i))
            start = i
    return runs


def make_rollout(group_id, reward, tool_calls=()):
    return Rollout(prompt="p", generation=Generation(text="t", token_ids=(5,)), rewards=reward,
                   group_id=group_id, tool_calls=tuple(tool_calls))


# =========================================================================== multi-turn


def test_multiturn_token_ids_are_sampled_ids_plus_tool_deltas(model, tokenizer):
    log = []

    def reply(text):
        return calc_call("6*7") if "<|tool|>" not in text else "<answer>42</answer>"

    rollout = create_multiturn_rollout(
        model, tokenizer, "What is 6*7?", GenerationConfig(max_new_tokens=32),
        generator=scripted_generator(reply, log), tools=TOOLS)

    prompt = encode(tokenizer, "<|bos|><|user|>\nWhat is 6*7?<|eos|>\n<|assistant|>\n")
    turn1 = encode(tokenizer, calc_call("6*7")) + (EOS,)
    # The model sampled the end-of-turn EOS itself, so the delta starts right after it.
    tool = encode(tokenizer, "\n<|tool|>\n42<|eos|>\n<|assistant|>\n")
    turn2 = encode(tokenizer, "<answer>42</answer>") + (EOS,)
    assert rollout.generation.prompt_ids == prompt
    assert rollout.completion_ids == turn1 + tool + turn2
    assert rollout.action_mask == (1,) * len(turn1) + (0,) * len(tool) + (1,) * len(turn2)
    assert rollout.logprobs == (-0.25,) * len(turn1) + (0.0,) * len(tool) + (-0.25,) * len(turn2)
    # Turn 2's prompt is exactly the token sequence so far (no re-tokenisation).
    assert log == [[list(prompt)], [list(prompt + turn1 + tool)]]
    assert rollout.tool_calls == (ToolCall("calculator", {"expression": "6*7"}, "42", None),)
    assert rollout.metadata == {"turns": 2, "finish_reason": "no_tool_call",
                                "tool_calls_executed": 1}
    assert rollout.generation.text == "<answer>42</answer>"
    assert rollout.generation.token_ids == turn2
    messages = rollout.conversation.messages
    assert [m.role for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1].tool_calls == rollout.tool_calls
    assert messages[2] == Message("tool", "42", name="calculator")
    # Independent check: the ids decode to the rendered final conversation (minus the last \n).
    rendered = apply_chat_template(tokenizer, messages, add_generation_prompt=False)
    assert tokenizer.decode(list(prompt + rollout.completion_ids)) == rendered[:-1]


def test_turn_without_eos_gets_the_end_of_turn_marker_as_environment_token(model, tokenizer):
    def reply(text):
        return calc_call("1+1") if "<|tool|>" not in text else "done"

    rollout = create_multiturn_rollout(
        model, tokenizer, "hi", GenerationConfig(max_new_tokens=32),
        generator=scripted_generator(reply, eos=False), tools=TOOLS)
    turn1 = encode(tokenizer, calc_call("1+1"))
    tool = encode(tokenizer, "<|eos|>\n<|tool|>\n2<|eos|>\n<|assistant|>\n")
    assert rollout.completion_ids == turn1 + tool + encode(tokenizer, "done")
    assert rollout.action_mask[len(turn1)] == 0  # the template's EOS is not the model's


def test_multiturn_with_hf_generator_end_to_end(model, tokenizer):
    """Real sampling for three turns; a custom tool_parser makes every turn call the calculator.

    Sampling log-probs must equal a teacher-forced recomputation on the final token sequence:
    that only holds if the stored ids are exactly the ids the model conditioned on.
    """
    def always_calculate(text):
        return [ToolCall("calculator", {"expression": "1+1"})]

    config = GenerationConfig(max_new_tokens=6, temperature=0.8, seed=3)
    rollout = create_multiturn_rollout(
        model, tokenizer, "What is 1+1?", config, tool_parser=always_calculate, tools=TOOLS,
        max_turns=3)
    assert rollout.metadata["turns"] == 3
    assert rollout.metadata["finish_reason"] == "max_turns"
    assert rollout.metadata["tool_calls_executed"] == 2
    mask = rollout.action_mask
    runs = mask_runs(mask)
    assert [value for value, _, _ in runs] == [1, 0, 1, 0, 1]
    ids = rollout.completion_ids
    for value, start, end in runs:
        if value == 0:
            sampled_eos = ids[start - 1] == EOS
            expected = ("" if sampled_eos else "<|eos|>") + "\n<|tool|>\n2<|eos|>\n<|assistant|>\n"
            assert tokenizer.decode(list(ids[start:end])) == expected
    naive = naive_logprobs(model, rollout.generation.prompt_ids, ids, temperature=0.8)
    action = np.array(mask, dtype=bool)
    np.testing.assert_allclose(np.array(rollout.logprobs)[action], naive[action], atol=2e-4)
    assert all(v == 0.0 for v, m in zip(rollout.logprobs, mask, strict=True) if m == 0)
    assert rollout.generation.token_ids == ids[runs[-1][1]:]


def conversation_script(text):
    """Conversation ``q{n}`` calls the calculator n times, then answers."""
    n = int(text.split("<|user|>\nq", 1)[1][0])
    done = text.count("<|tool|>")
    return calc_call(f"{done}+{n}") if done < n else f"<answer>{n}</answer>"


def test_batched_multiturn_equals_each_alone_and_finished_ones_leave(model, tokenizer):
    config = GenerationConfig(max_new_tokens=32, num_samples=2)
    log = []
    conversations = ["q0", "q2", "q1"]
    batched = create_batch_multiturn_rollouts(
        model, tokenizer, conversations, config,
        generator=scripted_generator(conversation_script, log), tools=TOOLS, group_offset=3)
    # One generator call per turn; finished episodes leave: 6 live, then 4, then 2.
    assert [len(call) for call in log] == [6, 4, 2]
    assert [r.group_id for r in batched] == [3, 3, 4, 4, 5, 5]
    assert [r.metadata["turns"] for r in batched] == [1, 1, 3, 3, 2, 2]
    for index, conversation in enumerate(conversations):
        alone = create_multiturn_rollout(
            model, tokenizer, conversation, config,
            generator=scripted_generator(conversation_script), tools=TOOLS)
        for sample in batched[2 * index : 2 * index + 2]:
            assert sample._replace(group_id=0) == alone


def test_batched_multiturn_equals_alone_with_greedy_hf_generator(model, tokenizer):
    """Real greedy decoding; a user env with a different number of replies per conversation."""
    replies = {"a": 1, "b": 4, "c": 2}

    def user_env(conversation):
        wanted = replies[conversation.messages[0].content]
        turns = sum(m.role == "assistant" for m in conversation.messages)
        return [Message("user", f"more {turns}")] if turns <= wanted else None

    config = GenerationConfig(max_new_tokens=5, do_sample=False)
    batched = create_batch_multiturn_rollouts(
        model, tokenizer, list(replies), config, env_fn=user_env, max_turns=4)
    assert [r.metadata["turns"] for r in batched] == [2, 4, 3]
    assert [r.metadata["finish_reason"] for r in batched] == ["env_done", "max_turns", "env_done"]
    for conversation, rollout in zip(replies, batched, strict=True):
        alone = create_multiturn_rollout(
            model, tokenizer, conversation, config, env_fn=user_env, max_turns=4)
        assert alone.completion_ids == rollout.completion_ids
        assert alone.action_mask == rollout.action_mask
        np.testing.assert_allclose(alone.logprobs, rollout.logprobs, atol=1e-4)


def test_an_env_with_batched_is_asked_once_per_turn_for_all_waiting_conversations(
    model, tokenizer
):
    replies = {"a": 1, "b": 4, "c": 2}

    def user_env(conversation):
        wanted = replies[conversation.messages[0].content]
        turns = sum(m.role == "assistant" for m in conversation.messages)
        return [Message("user", f"more {turns}")] if turns <= wanted else None

    requests = []

    def batched(conversations):
        requests.append([c.messages[0].content for c in conversations])
        return [user_env(c) for c in conversations]

    def env_with_batched(conversation):
        raise AssertionError("the per-conversation env must not be called when .batched exists")

    env_with_batched.batched = batched
    config = GenerationConfig(max_new_tokens=5, do_sample=False)
    plain = create_batch_multiturn_rollouts(
        model, tokenizer, list(replies), config, env_fn=user_env, max_turns=4)
    batched_rollouts = create_batch_multiturn_rollouts(
        model, tokenizer, list(replies), config, env_fn=env_with_batched, max_turns=4)
    assert batched_rollouts == plain
    # Turn 1 asks for all three; "a" is done after turn 2, "c" after turn 3; "b" runs to the end.
    assert requests == [["a", "b", "c"], ["a", "b", "c"], ["b", "c"], ["b"]]

    env_with_batched.batched = lambda conversations: [None]  # one answer for several
    with pytest.raises(ValueError, match="returned 1 answers for 3 conversations"):
        create_batch_multiturn_rollouts(
            model, tokenizer, list(replies), config, env_fn=env_with_batched, max_turns=4)
    env_with_batched.batched = lambda conversations: None
    with pytest.raises(TypeError, match="must return a list"):
        create_batch_multiturn_rollouts(
            model, tokenizer, list(replies), config, env_fn=env_with_batched, max_turns=4)


def always_calls(calls_per_turn):
    def reply(text):
        return "".join(calc_call(f"{i}+1") for i in range(calls_per_turn))
    return reply


def test_budget_stops_tool_calls_at_the_limit(model, tokenizer):
    rollout = create_multiturn_rollout(
        model, tokenizer, "q", GenerationConfig(max_new_tokens=64),
        generator=scripted_generator(always_calls(2)), tools=TOOLS, tool_budget=3, max_turns=10)
    results = [(c.result, c.error) for c in rollout.tool_calls]
    assert results == [
        ("1", None), ("2", None),                                # turn 1: budget 3 -> 1
        ("1", None), (None, "tool budget exhausted (budget=1)"),  # turn 2: budget 1 -> 0
        (None, "tool budget exhausted (budget=0)"),               # turn 3: none left: ends
        (None, "tool budget exhausted (budget=0)"),
    ]
    assert rollout.metadata == {"turns": 3, "finish_reason": "budget_exhausted",
                                "tool_calls_executed": 3, "tool_budget_remaining": 0}
    tool_messages = [m.content for m in rollout.conversation.messages if m.role == "tool"]
    assert tool_messages == ["1", "2", "1", "error: tool budget exhausted (budget=1)"]


@given(budget=st.integers(0, 5), calls_per_turn=st.integers(1, 3))
def test_budget_property_executes_exactly_the_budget(model, tokenizer, budget, calls_per_turn):
    rollout = create_multiturn_rollout(
        model, tokenizer, "q", GenerationConfig(max_new_tokens=64),
        generator=scripted_generator(always_calls(calls_per_turn)), tools=TOOLS,
        tool_budget=budget, max_turns=20)
    assert sum(tool_call_was_executed(c) for c in rollout.tool_calls) == budget
    assert rollout.metadata["turns"] == math.ceil(budget / calls_per_turn) + 1
    assert rollout.metadata["finish_reason"] == "budget_exhausted"
    assert len(rollout.tool_calls) == rollout.metadata["turns"] * calls_per_turn


def test_malformed_tool_calls_answer_with_errors_and_the_rollout_continues(model, tokenizer):
    script = [
        '<tool name="calculator">{"expression": "1+</tool>',  # broken JSON
        '<tool name="search">{"query": "x"}</tool>',           # unknown tool
        '<tool name="calculator">{"expr": "1+1"}</tool>',      # wrong argument name
        '<tool name="calculator">{"expression": 7}</tool>',    # wrong argument type
        "<answer>2</answer>",
    ]

    def reply(text):
        return script[text.count("<|tool|>")]

    rollout = create_multiturn_rollout(
        model, tokenizer, "q", GenerationConfig(max_new_tokens=64),
        generator=scripted_generator(reply), tools=TOOLS, max_turns=10, tool_budget=5)
    assert rollout.metadata["turns"] == 5
    assert rollout.metadata["finish_reason"] == "no_tool_call"
    errors = [c.error for c in rollout.tool_calls]
    assert errors[0].startswith("invalid JSON")
    assert errors[1].startswith("unknown tool 'search'")
    assert errors[2].startswith("bad arguments")
    assert errors[3].startswith("tool 'calculator' failed: TypeError")
    # Only the call that reached the tool is charged.
    assert rollout.metadata["tool_calls_executed"] == 1
    assert rollout.metadata["tool_budget_remaining"] == 4
    tool_messages = [m.content for m in rollout.conversation.messages if m.role == "tool"]
    assert [t.startswith("error: ") for t in tool_messages] == [True] * 4


def test_last_turn_calls_are_recorded_but_not_run(model, tokenizer):
    rollout = create_multiturn_rollout(
        model, tokenizer, "q", GenerationConfig(max_new_tokens=64),
        generator=scripted_generator(always_calls(1)), max_turns=2)  # default tools
    assert rollout.metadata["finish_reason"] == "max_turns"
    assert [c.result for c in rollout.tool_calls] == ["1", None]
    assert rollout.tool_calls[1].error.startswith("not executed")
    assert rollout.metadata["tool_calls_executed"] == 1
    # The episode ends on the model's tokens: no environment tokens after the last turn.
    assert rollout.action_mask[-1] == 1


def test_each_turn_gets_its_own_seed_and_a_single_sample_config(model, tokenizer):
    configs = []

    def generator(model_, tokenizer_, prompts, config):
        configs.append(config)
        return scripted_generator(always_calls(1))(model_, tokenizer_, prompts, config)

    config = GenerationConfig(max_new_tokens=32, num_samples=3, seed=5, batch_size=2)
    create_batch_multiturn_rollouts(model, tokenizer, ["q"], config, generator=generator,
                                    tools=TOOLS, max_turns=3)
    seeds = [c.seed for c in configs]
    assert seeds[0] == 5 and len(set(seeds)) == 3
    assert seeds[1] == (5 + 0x9E3779B97F4A7C15) % 2**63
    assert all(c._replace(seed=5) == config._replace(num_samples=1) for c in configs)


def test_multiturn_rollouts_feed_rollouts_to_batch(model, tokenizer):
    from rlprim.batching import rollouts_to_batch

    rollouts = create_batch_multiturn_rollouts(
        model, tokenizer, ["q0", "q2"], GenerationConfig(max_new_tokens=32),
        generator=scripted_generator(conversation_script), tools=TOOLS,
        reward_fn=lambda r: float(r.metadata["turns"]))
    batch = rollouts_to_batch(rollouts, tokenizer)
    for row, rollout in enumerate(rollouts):
        length = len(rollout.completion_ids)
        assert batch.completion_ids[row, :length].tolist() == list(rollout.completion_ids)
        assert batch.completion_mask[row, :length].tolist() == list(rollout.action_mask)
        assert batch.old_logprobs[row, :length].tolist() == list(rollout.logprobs)
        prompt = batch.prompt_ids[row][batch.attention_mask[row, : batch.prompt_ids.shape[1]]
                                       .bool()]
        assert prompt.tolist() == list(rollout.generation.prompt_ids)
    assert batch.rewards.tolist() == [1.0, 3.0]


def test_stop_condition_ends_before_tools_run(model, tokenizer):
    seen = []

    def stop(conversation):
        seen.append(conversation)
        return "<answer>" in conversation.messages[-1].content

    def reply(text):
        return calc_call("1+1") + ("<answer>2</answer>" if "<|tool|>" in text else "")

    rollout = create_multiturn_rollout(
        model, tokenizer, "q", GenerationConfig(max_new_tokens=64),
        generator=scripted_generator(reply), tools=TOOLS, stop_condition=stop)
    assert rollout.metadata["finish_reason"] == "stop_condition"
    assert rollout.metadata["turns"] == 2
    assert len(rollout.tool_calls) == 1  # the second turn's call never ran
    assert isinstance(seen[0], Conversation) and seen[0].messages[-1].role == "assistant"


def test_context_length_ends_the_episode_and_too_long_prompts_raise(tokenizer):
    small = tiny_model("qwen2", max_position_embeddings=80)
    rollout = create_multiturn_rollout(
        small, tokenizer, "q", GenerationConfig(max_new_tokens=20),
        generator=scripted_generator(always_calls(1)), tools=TOOLS, max_turns=10)
    assert rollout.metadata["finish_reason"] == "context_length"
    length = len(rollout.generation.prompt_ids) + len(rollout.completion_ids)
    assert 80 - 20 < length <= 80
    with pytest.raises(ValueError, match="context"):
        create_multiturn_rollout(small, tokenizer, "word " * 70, GenerationConfig(),
                                 generator=scripted_generator(always_calls(1)))


def test_multiturn_reference_kl_over_action_tokens(model, ref_model, tokenizer):
    def reply(text):
        return calc_call("2*3") if "<|tool|>" not in text else "6"

    rollout = create_multiturn_rollout(
        model, tokenizer, "q", GenerationConfig(max_new_tokens=32, temperature=0.5),
        generator=scripted_generator(reply), tools=TOOLS, ref_model=ref_model,
        reward_fn=lambda r: float(len(r.tool_calls)))
    mask = rollout.action_mask
    naive_ref = naive_logprobs(ref_model, rollout.generation.prompt_ids, rollout.completion_ids,
                               temperature=0.5)
    expected_ref = [v if m else 0.0 for v, m in zip(naive_ref, mask, strict=True)]
    np.testing.assert_allclose(rollout.ref_logprobs, expected_ref, atol=1e-5)
    assert rollout.kl_divergence == pytest.approx(
        k3_sum(rollout.logprobs, naive_ref, mask), rel=1e-5)
    assert rollout.rewards == 1.0


def test_tool_executor_and_per_conversation_tools(model, tokenizer):
    received = []

    def executor(calls, tools, budget):
        received.append((sorted(tools), budget))
        return [c._replace(result=f"{tools['calculator'](**c.arguments)}!") for c in calls]

    def reply(text):
        return calc_call("1+2") if "<|tool|>" not in text else "ok"

    tools = [{"calculator": calculator}, {"calculator": lambda expression: "seven"}]
    rollouts = create_batch_multiturn_rollouts(
        model, tokenizer, ["a", "b"], GenerationConfig(max_new_tokens=32),
        generator=scripted_generator(reply), tools=tools, tool_executor=executor, tool_budget=2)
    assert [r.tool_calls[0].result for r in rollouts] == ["3!", "seven!"]
    assert received == [(["calculator"], 2), (["calculator"], 2)]

    def greedy_executor(calls, tools, budget):  # ignores the budget
        return [c._replace(result="x") for c in calls]

    with pytest.raises(ValueError, match="budget"):
        create_multiturn_rollout(
            model, tokenizer, "a", GenerationConfig(max_new_tokens=32),
            generator=scripted_generator(always_calls(3)), tool_executor=greedy_executor,
            tool_budget=2)


def test_template_fn_renders_prompt_and_deltas(model, tokenizer):
    def template(messages, add_generation_prompt):
        text = "".join(f"{m['role'].upper()}: {m['content']}\n" for m in messages)
        return text + ("ASSISTANT:" if add_generation_prompt else "")

    def reply(text):
        return calc_call("2+2") if "TOOL:" not in text else "4"

    rollout = create_multiturn_rollout(
        model, tokenizer, "q", GenerationConfig(max_new_tokens=32),
        generator=scripted_generator(reply), tools=TOOLS, template_fn=template)
    assert rollout.prompt == "USER: q\nASSISTANT:"
    turn1 = encode(tokenizer, calc_call("2+2")) + (EOS,)
    assert rollout.completion_ids[: len(turn1)] == turn1
    delta = rollout.completion_ids[len(turn1) : len(turn1) + rollout.action_mask.count(0)]
    assert tokenizer.decode(list(delta)) == "\nTOOL: 4\nASSISTANT:"

    def not_append_only(messages, add_generation_prompt):
        return f"{len(messages)} messages: " + template(messages, add_generation_prompt)

    with pytest.raises(ValueError, match="append-only"):
        create_multiturn_rollout(
            model, tokenizer, "q", GenerationConfig(max_new_tokens=32),
            generator=scripted_generator(reply), tools=TOOLS, template_fn=not_append_only)


def grouping_template(messages, add_generation_prompt):
    """A ChatML-like template that puts consecutive tool results in one user block (as some
    chat models do), using the tiny tokenizer's special tokens."""
    text = "<|bos|>"
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":
                text += "<|user|>\n"
            text += f"<tool_response>{m['content']}</tool_response>"
            if i + 1 == len(messages) or messages[i + 1]["role"] != "tool":
                text += "<|eos|>\n"
        else:
            text += f"<|{m['role']}|>\n{m['content']}<|eos|>\n"
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def test_grouped_tool_results_form_one_delta(model, tokenizer):
    def reply(text):
        return calc_call("1+1") + calc_call("2+2") if "tool_response" not in text else "ok"

    rollout = create_multiturn_rollout(
        model, tokenizer, "q", GenerationConfig(max_new_tokens=64),
        generator=scripted_generator(reply), tools=TOOLS, template_fn=grouping_template)
    turn1 = encode(tokenizer, calc_call("1+1") + calc_call("2+2")) + (EOS,)
    delta = encode(tokenizer, "\n<|user|>\n<tool_response>2</tool_response><tool_response>4"
                              "</tool_response><|eos|>\n<|assistant|>\n")
    assert rollout.completion_ids == turn1 + delta + encode(tokenizer, "ok") + (EOS,)
    rendered = grouping_template([dict(role=m.role, content=m.content)
                                  for m in rollout.conversation.messages], False)
    ids = rollout.generation.prompt_ids + rollout.completion_ids
    assert tokenizer.decode(list(ids)) == rendered[:-1]


def test_conversation_inputs_and_metadata(model, tokenizer):
    def reply(text):
        return "fine"

    conversations = [
        Conversation((Message("system", "be brief"), Message("user", "hi"))),
        [{"role": "user", "content": "hi"}],
        {"messages": "hi", "answer": 3},
    ]
    rollouts = create_batch_multiturn_rollouts(
        model, tokenizer, conversations, GenerationConfig(max_new_tokens=8),
        generator=scripted_generator(reply))
    assert rollouts[0].prompt == "<|bos|><|system|>\nbe brief<|eos|>\n<|user|>\nhi<|eos|>\n" \
        "<|assistant|>\n"
    assert rollouts[1].prompt == rollouts[2].prompt
    assert rollouts[2].metadata == {"answer": 3, "turns": 1, "finish_reason": "no_tool_call",
                                    "tool_calls_executed": 0}
    assert set(FINISH_REASONS) >= {r.metadata["finish_reason"] for r in rollouts}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"conversations": []}, ValueError, "conversations must not be empty"),
        ({"conversations": "hi"}, TypeError, "conversations must be a list"),
        ({"conversations": [{"prompt": "x"}]}, ValueError, "'messages'"),
        ({"max_turns": 0}, ValueError, "max_turns"),
        ({"tool_budget": -1}, ValueError, "tool_budget"),
        ({"tool_budget": 1.5}, TypeError, "tool_budget"),
        ({"stop_condition": 3}, TypeError, "stop_condition"),
        ({"tools": {"calculator": 3}}, TypeError, "tools"),
        ({"tools": [TOOLS, TOOLS]}, ValueError, "one per conversation"),
        ({"kl_estimator": "k9"}, ValueError, "kl_estimator"),
        ({"gen_config": GenerationConfig(temperature=0.0)}, ValueError, "temperature"),
        ({"gen_config": {"max_new_tokens": 3}}, TypeError, "gen_config"),
    ],
)
def test_multiturn_bad_arguments_raise_before_generating(model, tokenizer, kwargs, error, match):
    log = []
    arguments = {"conversations": ["hi"], "gen_config": GenerationConfig(max_new_tokens=4)}
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        create_batch_multiturn_rollouts(
            model, tokenizer, generator=scripted_generator(lambda t: "x", log), **arguments)
    assert log == []


# =========================================================================== single turn


def test_create_batch_rollouts_groups_order_and_reference_kl(model, ref_model, tokenizer):
    prompts = ["What is 2+2?", {"prompt": "Hello", "answer": "hi"}, "Count to three"]
    config = GenerationConfig(max_new_tokens=6, num_samples=2, temperature=0.7, seed=11)
    calls = []

    def recording_generator(model_, tokenizer_, prompts_, config_):
        calls.append((list(prompts_), config_))
        return hf_generator(model_, tokenizer_, prompts_, config_)

    rollouts = create_batch_rollouts(
        model, tokenizer, prompts, config, ref_model=ref_model, generator=recording_generator,
        group_offset=5)
    texts = [prompts[0], prompts[1]["prompt"], prompts[2]]
    assert calls == [(texts, config)]  # one generator call for every prompt
    assert [r.group_id for r in rollouts] == [5, 5, 6, 6, 7, 7]
    assert [r.prompt for r in rollouts] == [t for t in texts for _ in range(2)]
    assert [r.metadata for r in rollouts] == [None, None, {"answer": "hi"}, {"answer": "hi"},
                                             None, None]
    direct = hf_generator(model, tokenizer, texts, config)  # same seed, same call: same samples
    assert [r.generation for r in rollouts] == direct
    for rollout in rollouts:
        generation = rollout.generation
        naive = naive_logprobs(ref_model, generation.prompt_ids, generation.token_ids, 0.7)
        np.testing.assert_allclose(rollout.ref_logprobs, naive, atol=1e-5)
        mask = [1] * len(generation.token_ids)
        assert rollout.kl_divergence == pytest.approx(
            k3_sum(generation.logprobs, naive, mask), rel=1e-4, abs=1e-6)
        assert rollout.completion_ids is None and rollout.action_mask is None
        assert rollout.tool_calls == () and rollout.rewards is None


@pytest.mark.parametrize("estimator", ["k1", "k2", "low_var", "callable"])
def test_kl_estimator_choices(model, ref_model, tokenizer, estimator):
    config = GenerationConfig(max_new_tokens=4, seed=0)
    kl_fn = (lambda lp, ref: (lp - ref) ** 4) if estimator == "callable" else estimator
    rollout = create_rollout(model, tokenizer, "hello", config, ref_model=ref_model,
                             kl_estimator=kl_fn)
    d = np.array(rollout.generation.logprobs) - np.array(rollout.ref_logprobs)
    expected = {
        "k1": d.sum(),
        "k2": (0.5 * d**2).sum(),
        "low_var": np.clip(np.exp(np.clip(-d, -20, 20)) + d - 1, -10, 10).sum(),
        "callable": (d**4).sum(),
    }[estimator]
    assert rollout.kl_divergence == pytest.approx(float(expected), rel=1e-4, abs=1e-6)


def test_reference_logprobs_use_batched_forwards(model, tokenizer):
    ref = tiny_model("qwen2", seed=2)
    batch_sizes = []
    handle = ref.model.register_forward_hook(
        lambda module, inputs, output: batch_sizes.append(output[0].shape[0]))
    try:
        prompts = ["a", "b", "c"]
        create_batch_rollouts(model, tokenizer, prompts,
                              GenerationConfig(max_new_tokens=3, num_samples=2, seed=0),
                              ref_model=ref)
        assert batch_sizes == [6]
        batch_sizes.clear()
        create_batch_rollouts(model, tokenizer, prompts,
                              GenerationConfig(max_new_tokens=3, num_samples=2, seed=0,
                                               batch_size=2), ref_model=ref)
        assert batch_sizes == [2, 2, 2]
    finally:
        handle.remove()


def test_missing_generator_logprobs_are_recomputed_for_the_kl(model, ref_model, tokenizer):
    generator = scripted_generator(lambda t: "one two", with_logprobs=False)
    rollout = create_rollout(model, tokenizer, "hi", GenerationConfig(max_new_tokens=8),
                             ref_model=ref_model, generator=generator)
    ids = rollout.generation.token_ids
    np.testing.assert_allclose(rollout.logprobs, naive_logprobs(model, encode(tokenizer, "hi"),
                                                                ids), atol=1e-5)
    assert rollout.kl_divergence == pytest.approx(
        k3_sum(rollout.logprobs, rollout.ref_logprobs, [1] * len(ids)), rel=1e-5)


def test_create_rollout_parses_but_does_not_execute_tools(model, tokenizer):
    text = calc_call("1+1") + ' <tool name="x">{bad</tool>'
    rollout = create_rollout(
        model, tokenizer, {"prompt": "q", "answer": 2},
        GenerationConfig(max_new_tokens=8, num_samples=4), tool_parser=parse_xml_tools,
        generator=scripted_generator(lambda t: text))
    assert rollout.group_id == 0 and rollout.metadata == {"answer": 2}
    assert rollout.tool_calls[0] == ToolCall("calculator", {"expression": "1+1"})
    assert rollout.tool_calls[1].error.startswith("invalid JSON")


def test_rewards_scalar_vector_batched_and_errors_name_the_rollout(model, tokenizer):
    generator = scripted_generator(lambda t: t[-2:])
    config = GenerationConfig(max_new_tokens=4)
    prompts = ["a", "bb", "ccc"]
    scored = create_batch_rollouts(model, tokenizer, prompts, config, generator=generator,
                                   reward_fn=lambda r: len(r.prompt) == 2)
    assert [r.rewards for r in scored] == [0.0, 1.0, 0.0]
    vectors = create_batch_rollouts(model, tokenizer, prompts, config, generator=generator,
                                    reward_fn=lambda r: torch.tensor([len(r.prompt), 1.0]))
    assert [r.rewards for r in vectors] == [(1.0, 1.0), (2.0, 1.0), (3.0, 1.0)]

    batches = []

    def reward_fn(rollout):
        raise AssertionError("the batched form must be used")

    reward_fn.batched = lambda rollouts: batches.append(len(rollouts)) or [0.5] * len(rollouts)
    batched = create_batch_rollouts(model, tokenizer, prompts, config, generator=generator,
                                    reward_fn=reward_fn)
    assert batches == [3] and [r.rewards for r in batched] == [0.5] * 3

    with pytest.raises(ValueError, match="rollout 2"):
        create_batch_rollouts(model, tokenizer, prompts, config, generator=generator,
                              reward_fn=lambda r: math.nan if r.prompt == "ccc" else 1.0)
    with pytest.raises(ValueError, match="rollout 1") as info:
        create_batch_rollouts(model, tokenizer, prompts, config, generator=generator,
                              reward_fn=lambda r: 1 / (len(r.prompt) - 2))
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    with pytest.raises(ValueError, match="rollout 0"):
        create_batch_rollouts(model, tokenizer, prompts, config, generator=generator,
                              reward_fn=lambda r: "good")


@pytest.mark.parametrize(
    "prompts, kwargs, error, match",
    [
        ([], {}, ValueError, "prompts must not be empty"),
        ("abc", {}, TypeError, "prompts must be a list"),
        ([3], {}, TypeError, r"prompts\[0\]"),
        ([{"text": "x"}], {}, ValueError, "'prompt'"),
        (["a"], {"group_offset": -1}, ValueError, "group_offset"),
        (["a"], {"reward_fn": 1}, TypeError, "reward_fn"),
        (["a"], {"tool_parser": "xml"}, TypeError, "tool_parser"),
        (["a"], {"kl_estimator": "k4"}, ValueError, "kl_estimator"),
    ],
)
def test_batch_rollouts_bad_arguments_raise_before_generating(
    model, tokenizer, prompts, kwargs, error, match
):
    log = []
    with pytest.raises(error, match=match):
        create_batch_rollouts(model, tokenizer, prompts, GenerationConfig(max_new_tokens=2),
                              generator=scripted_generator(lambda t: "x", log), **kwargs)
    assert log == []


# =========================================================================== tool tracking


CALLS = [
    ToolCall("calculator", {"expression": "1"}, result="1"),
    ToolCall("calculator", {"expression": 1}, error="tool 'calculator' failed: TypeError: x"),
    ToolCall("python", {}, error="tool budget exhausted (budget=0)"),
    ToolCall("", {}, error="invalid JSON: x"),
    ToolCall("search", {}, error="unknown tool 'search'; available tools: calculator"),
    ToolCall("python", {"code": "print(1)"}, result="error: exit status 1"),
]


def test_tool_call_was_executed():
    assert [tool_call_was_executed(c) for c in CALLS] == [True, True, False, False, False, True]
    with pytest.raises(TypeError, match="ToolCall"):
        tool_call_was_executed({"name": "x"})


def test_track_tool_calls_by_hand():
    rollouts = [make_rollout(0, 1.0, CALLS[:3]), make_rollout(0, 0.0), make_rollout(1, 0.0,
                                                                                   CALLS[3:])]
    assert track_tool_calls(rollouts) == {
        "num_rollouts": 3,
        "total_calls": 6,
        "executed_calls": 3,
        "error_calls": 4,
        "calls_per_rollout": [3, 0, 3],
        "executed_per_rollout": [2, 0, 1],
        "mean_calls_per_rollout": 2.0,
        "error_rate": 4 / 6,
        "calls_per_tool": {"calculator": 2, "python": 2, "": 1, "search": 1},
        "errors_per_tool": {"calculator": 1, "python": 1, "": 1, "search": 1},
    }
    empty = track_tool_calls([])
    assert empty["total_calls"] == 0 and empty["mean_calls_per_rollout"] == 0.0
    assert empty["error_rate"] == 0.0
    with pytest.raises(TypeError, match=r"rollouts\[1\]"):
        track_tool_calls([make_rollout(0, 1.0), "x"])


@given(st.lists(st.lists(st.sampled_from(CALLS), max_size=5), max_size=6))
def test_track_tool_calls_matches_a_loop(call_lists):
    rollouts = [make_rollout(i, 0.0, calls) for i, calls in enumerate(call_lists)]
    summary = track_tool_calls(rollouts)
    flat = [c for calls in call_lists for c in calls]
    assert summary["total_calls"] == len(flat)
    assert summary["error_calls"] == len([c for c in flat if c.error])
    assert summary["executed_calls"] == len([c for c in flat if c.result is not None
                                             or (c.error or "").startswith("tool 'calculator'")])
    assert sum(summary["calls_per_tool"].values()) == len(flat)
    assert summary["calls_per_rollout"] == [len(c) for c in call_lists]


def test_execute_and_track_tools():
    text = calc_call("1+1") + calc_call("2*3") + '<tool name="calculator">{oops</tool>' \
        + calc_call("5-1")
    calls, remaining = execute_and_track_tools(text, TOOLS, budget=2)
    assert [(c.result, c.error is not None) for c in calls] == [
        ("2", False), ("6", False), (None, True), (None, True)]
    assert calls[3].error == "tool budget exhausted (budget=2)"
    assert remaining == 0
    calls, remaining = execute_and_track_tools(text, TOOLS)
    assert [c.result for c in calls] == ["2", "6", None, "4"] and remaining is None
    calls, remaining = execute_and_track_tools("no tools here", TOOLS, budget=3)
    assert calls == [] and remaining == 3
    calls, remaining = execute_and_track_tools(
        "x", TOOLS, tool_parser=lambda t: [ToolCall("calculator", {"expression": "9"})],
        budget=1, tool_executor=execute_tools)
    assert calls[0].result == "9" and remaining == 0
    with pytest.raises(ValueError, match="budget"):
        execute_and_track_tools(text, TOOLS, budget=1,
                                tool_executor=lambda cs, tools, budget: [
                                    c._replace(result="x") for c in cs])
    with pytest.raises(TypeError, match="text"):
        execute_and_track_tools(b"x", TOOLS)
    with pytest.raises(ValueError, match="budget"):
        execute_and_track_tools("x", TOOLS, budget=-1)


# =========================================================================== dynamic sampling


def rollouts_from_groups(groups, start=0):
    return [make_rollout(start + g, r) for g, rewards in enumerate(groups) for r in rewards]


def test_filter_groups_by_hand():
    rollouts = rollouts_from_groups([[1.0, 1.0], [0.0, 1.0, 1.0], [0.5], [0.0, 0.0, 0.0],
                                     [2.0, 2.0 + 1e-9]])
    kept = filter_groups(rollouts)
    assert [(r.group_id, r.rewards) for r in kept] == [(1, 0.0), (1, 1.0), (1, 1.0),
                                                       (4, 2.0), (4, 2.0 + 1e-9)]
    assert [r.group_id for r in filter_groups(rollouts, tolerance=1e-6)] == [1, 1, 1]
    by_length = filter_groups(rollouts, metric=lambda r: float(len(r.prompt)))
    assert by_length == []
    assert filter_groups([]) == []


def test_filter_groups_errors():
    with pytest.raises(ValueError, match="consecutive"):
        filter_groups([make_rollout(0, 1.0), make_rollout(1, 0.0), make_rollout(0, 0.0)])
    with pytest.raises(ValueError, match=r"rollouts\[1\] has no reward"):
        filter_groups([make_rollout(0, 1.0), make_rollout(0, None)])
    with pytest.raises(TypeError, match="vector"):
        filter_groups([make_rollout(0, (1.0, 2.0))])
    with pytest.raises(ValueError, match="finite"):
        filter_groups([make_rollout(0, math.inf)])
    with pytest.raises(ValueError, match="metric"):
        filter_groups([make_rollout(0, 1.0)], metric="kl")
    with pytest.raises(ValueError, match="tolerance"):
        filter_groups([make_rollout(0, 1.0)], tolerance=-1.0)


group_lists = st.lists(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=1, max_size=4),
                       max_size=8)


@given(group_lists)
def test_filter_groups_drops_exactly_the_all_equal_groups(groups):
    rollouts = rollouts_from_groups(groups)
    expected = []
    for g, rewards in enumerate(groups):
        if len(set(rewards)) > 1:
            expected.extend((g, r) for r in rewards)
    assert [(r.group_id, r.rewards) for r in filter_groups(rollouts)] == expected


def test_sample_until_informative_reaches_the_target_and_truncates():
    rounds = [
        [[1.0, 1.0], [0.0, 1.0]],                # 1 informative
        [[0.0, 0.0], [0.0, 0.0]],                # 0
        [[1.0, 0.0], [0.5, 1.0], [0.0, 0.5]],    # 3: the target of 3 is passed
        [[1.0, 0.0]],                            # never sampled
    ]
    seen = []

    def sample_fn(round_index):
        seen.append(round_index)
        return rollouts_from_groups(rounds[round_index])  # group ids restart at 0 each round

    rollouts, stats = sample_until_informative(sample_fn, target_groups=3, max_rounds=10)
    assert seen == [0, 1, 2]
    assert stats == DynamicSamplingStats(rounds=3, groups_sampled=7, groups_informative=4,
                                         groups_returned=3, target_reached=True)
    assert [(r.group_id, r.rewards) for r in rollouts] == [
        (0, 0.0), (0, 1.0), (1, 1.0), (1, 0.0), (2, 0.5), (2, 1.0)]


def test_sample_until_informative_stops_at_the_cap():
    rollouts, stats = sample_until_informative(
        lambda r: rollouts_from_groups([[1.0, 1.0], [0.0, 1.0] if r == 1 else [0.0, 0.0]]),
        target_groups=2, max_rounds=3)
    assert stats == DynamicSamplingStats(3, 6, 1, 1, False)
    assert [(r.group_id, r.rewards) for r in rollouts] == [(0, 0.0), (0, 1.0)]
    with pytest.raises(ValueError, match="target_groups"):
        sample_until_informative(lambda r: [], target_groups=0, max_rounds=1)
    with pytest.raises(ValueError, match="max_rounds"):
        sample_until_informative(lambda r: [], target_groups=1, max_rounds=0)
    with pytest.raises(ValueError, match=r"sample_fn\(0\)\[0\] has no reward"):
        sample_until_informative(lambda r: [make_rollout(0, None)], 1, 1)


@given(st.lists(group_lists, min_size=1, max_size=5), st.integers(1, 6), st.integers(1, 5))
def test_sample_until_informative_matches_a_reference(rounds, target, max_rounds):
    def sample_fn(round_index):
        return rollouts_from_groups(rounds[round_index % len(rounds)], start=7)

    rollouts, stats = sample_until_informative(sample_fn, target, max_rounds)
    collected, used = [], 0
    while used < max_rounds and len(collected) < target:
        collected += [g for g in rounds[used % len(rounds)] if len(set(g)) > 1]
        used += 1
    collected = collected[:target]
    assert stats.rounds == used
    assert stats.groups_returned == len(collected)
    assert stats.target_reached == (len(collected) == target)
    assert [(r.group_id, r.rewards) for r in rollouts] == [
        (g, r) for g, rewards in enumerate(collected) for r in rewards]
