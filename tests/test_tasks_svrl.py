"""Tests of rlprim.tasks.svrl: self-verification with a tool budget, on a real tiny model."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlprim.rollouts import tool_call_was_executed
from rlprim.tasks.svrl import (
    SVRL_SYSTEM_PROMPT,
    SVRLTask,
    answer_given,
    answers_match,
    create_answer_checker,
    create_svrl_conversation,
    create_svrl_rollouts,
    create_svrl_task,
    create_svrl_tools,
    exact_answer_quality,
    extract_final_answer,
    final_answer,
    svrl_reward,
)
from rlprim.testing import tiny_model, tiny_tokenizer
from rlprim.tools import calculator
from rlprim.types import Conversation, Generation, GenerationConfig, Message, Rollout, ToolCall


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", seed=0)


def rollout_with(calls=(), text="", metadata=None, conversation=None):
    return Rollout(prompt="p", generation=Generation(text=text), tool_calls=tuple(calls),
                   metadata=metadata, conversation=conversation)


EXECUTED = ToolCall("check_answer", {"answer": "4"}, result="incorrect")
FAILED = ToolCall("calculator", {"expression": 1}, error="tool 'calculator' failed: TypeError: x")
REFUSED = ToolCall("check_answer", {"answer": "5"}, error="tool budget exhausted (budget=0)")
MALFORMED = ToolCall("", {}, error="invalid JSON: x")


def test_svrl_reward_by_hand():
    reward_fn = svrl_reward(lambda r: 1.0, cost_per_call=0.1)
    # Two calls ran (a result and a tool failure); refused and malformed calls are free.
    assert reward_fn(rollout_with([EXECUTED, FAILED, REFUSED, MALFORMED])) == pytest.approx(0.8)
    assert reward_fn(rollout_with()) == 1.0
    assert svrl_reward(lambda r: True, 0.25)(rollout_with([EXECUTED] * 3)) == 0.25
    assert svrl_reward(lambda r: 0.0, 0)(rollout_with([EXECUTED])) == 0.0


@given(st.floats(-5, 5), st.floats(0, 2), st.lists(st.sampled_from(
    [EXECUTED, FAILED, REFUSED, MALFORMED]), max_size=8))
def test_svrl_reward_matches_the_formula(quality, cost, calls):
    executed = sum(c.result is not None or c.error.startswith("tool 'calculator' failed")
                   for c in calls)
    reward = svrl_reward(lambda r: quality, cost)(rollout_with(calls))
    assert reward == pytest.approx(quality - cost * executed, abs=1e-12)


def test_svrl_reward_errors():
    with pytest.raises(TypeError, match="quality_fn"):
        svrl_reward(1.0, 0.1)
    with pytest.raises(ValueError, match="cost_per_call"):
        svrl_reward(lambda r: 1.0, -0.1)
    with pytest.raises(ValueError, match="cost_per_call"):
        svrl_reward(lambda r: 1.0, math.nan)
    with pytest.raises(ValueError, match="finite"):
        svrl_reward(lambda r: math.inf, 0.1)(rollout_with())
    with pytest.raises(ValueError, match="finite"):
        svrl_reward(lambda r: "good", 0.1)(rollout_with())


@pytest.mark.parametrize(
    "answer, reference, expected",
    [("42", 42, True), (" 42. ", "42", True), ("42.0", 42, True), ("4.2e1", "42", True),
     ("41", 42, False), ("Paris", "paris", True), ("new  york", "New York", True),
     (None, 42, False), ("", 42, False), ("1/2", "0.5", False)],
)
def test_answers_match(answer, reference, expected):
    assert answers_match(answer, reference) is expected


def test_answer_extraction_and_stop_condition():
    assert extract_final_answer("so <answer> 7 </answer> no <answer>8</answer>") == "8"
    assert extract_final_answer("no answer") is None
    conversation = Conversation((Message("user", "q"), Message("assistant", "<answer>3</answer>"),
                                 Message("tool", "x"), Message("assistant", "thinking")))
    assert final_answer(rollout_with(conversation=conversation)) == "3"
    assert final_answer(rollout_with(text="<answer>5</answer>")) == "5"
    assert not answer_given(conversation)
    assert answer_given(Conversation(conversation.messages[:2]))
    assert not answer_given(Conversation((Message("user", "<answer>1</answer>"),)))
    rollout = rollout_with(text="<answer>5</answer>", metadata={"answer": 5})
    assert exact_answer_quality(rollout) == 1.0
    assert exact_answer_quality(rollout._replace(metadata={"answer": 6})) == 0.0
    with pytest.raises(ValueError, match="answer"):
        exact_answer_quality(rollout._replace(metadata=None))


def test_verification_tools():
    check = create_answer_checker(12)
    assert check(answer="12") == "correct" and check(answer="13") == "incorrect"
    with pytest.raises(TypeError):
        check(answer=12)
    tools = create_svrl_tools("x", include_calculator=True)
    assert sorted(tools) == ["calculator", "check_answer"] and tools["calculator"] is calculator
    assert sorted(create_svrl_tools("x", include_calculator=False)) == ["check_answer"]
    custom = create_answer_checker("abc", match_fn=lambda a, ref: a.startswith(ref))
    assert custom("abcdef") == "correct"


def test_svrl_conversation_states_budget_and_tools():
    conversation = create_svrl_conversation("What is 2+2?", tool_budget=3)
    system, user = conversation.messages
    assert system.role == "system" and user == Message("user", "What is 2+2?")
    assert "budget of 3" in system.content and "check_answer" in system.content
    assert system.content.startswith(SVRL_SYSTEM_PROMPT.split("{")[0])
    with pytest.raises(ValueError, match="tool_budget"):
        create_svrl_conversation("q", tool_budget=-1)


def check_call(answer):
    return f'<tool name="check_answer">{{"answer": "{answer}"}}</tool>'


def svrl_script(text):
    """Problem 'A' checks 41 (incorrect), checks 42 (correct), answers 42.
    Problem 'B' checks twice in one turn with a budget of 1, then keeps checking."""
    checks = text.count("<|tool|>")
    if "Problem A" in text:
        return [check_call(41), check_call(42), "<answer>42</answer>"][checks]
    return check_call(1) + check_call(2)


def scripted(reply_fn):
    def generator(model, tokenizer, prompts, config):
        out = []
        for prompt in prompts:
            reply = reply_fn(tokenizer.decode(list(prompt)))
            ids = tuple(tokenizer(reply, add_special_tokens=False)["input_ids"]) + (2,)
            out.append(Generation(reply, tuple(prompt), ids, (-1.0,) * len(ids), "stop"))
        return out
    return generator


def test_svrl_episode_rewards_by_hand(model, tokenizer):
    task = create_svrl_task(["Problem A"], [42], tool_budget=2, cost_per_call=0.1)
    assert isinstance(task, SVRLTask) and task.tool_budget == 2
    rollout_a = create_svrl_rollouts(model, tokenizer, task, GenerationConfig(max_new_tokens=64),
                                     generator=scripted(svrl_script))[0]
    assert [c.result for c in rollout_a.tool_calls] == ["incorrect", "correct"]
    assert rollout_a.metadata["finish_reason"] == "stop_condition"
    assert rollout_a.rewards == pytest.approx(1.0 - 2 * 0.1)

    task_b = create_svrl_task(["Problem B"], [7], tool_budget=1, cost_per_call=0.25)
    rollout_b = create_svrl_rollouts(model, tokenizer, task_b, GenerationConfig(max_new_tokens=64),
                                     generator=scripted(svrl_script), max_turns=5)[0]
    # Turn 1: one check runs, the second is refused by the budget; turn 2: no budget -> ends.
    assert [(c.result, c.error) for c in rollout_b.tool_calls] == [
        ("incorrect", None), (None, "tool budget exhausted (budget=1)"),
        (None, "tool budget exhausted (budget=0)"), (None, "tool budget exhausted (budget=0)")]
    assert rollout_b.metadata["finish_reason"] == "budget_exhausted"
    assert sum(map(tool_call_was_executed, rollout_b.tool_calls)) == 1
    assert rollout_b.rewards == pytest.approx(0.0 - 0.25)


def test_svrl_tools_are_per_problem(model, tokenizer):
    task = create_svrl_task(["Problem A", "Problem A"], [42, 41], tool_budget=2)
    rollouts = create_svrl_rollouts(model, tokenizer, task, GenerationConfig(max_new_tokens=64),
                                    generator=scripted(svrl_script))
    assert [c.result for c in rollouts[0].tool_calls] == ["incorrect", "correct"]
    assert [c.result for c in rollouts[1].tool_calls] == ["correct", "incorrect"]
    assert [r.metadata["answer"] for r in rollouts] == [42, 41]
    assert rollouts[0].rewards == pytest.approx(0.8) and rollouts[1].rewards == pytest.approx(-0.2)


def test_svrl_with_hf_generator_end_to_end(model, tokenizer):
    task = create_svrl_task(["What is 2+2?", "What is 3*3?"], [4, 9], tool_budget=1)
    rollouts = create_svrl_rollouts(model, tokenizer, task,
                                    GenerationConfig(max_new_tokens=6, num_samples=2, seed=0))
    assert [r.group_id for r in rollouts] == [0, 0, 1, 1]
    for rollout in rollouts:
        assert rollout.metadata["finish_reason"] in ("no_tool_call", "stop_condition")
        expected = exact_answer_quality(rollout) - 0.1 * rollout.metadata["tool_calls_executed"]
        assert rollout.rewards == pytest.approx(expected)
        assert rollout.conversation.messages[0].role == "system"


def test_svrl_task_errors():
    with pytest.raises(ValueError, match="same length"):
        create_svrl_task(["a", "b"], [1])
    with pytest.raises(TypeError, match="problems"):
        create_svrl_task("a", [1])
    with pytest.raises(TypeError, match="task"):
        create_svrl_rollouts(None, None, {"conversations": []}, GenerationConfig())
