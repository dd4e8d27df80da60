"""Tests of rlprim.tasks.conversation: multi-turn chat with a scripted user, on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlprim.tasks.conversation import (
    create_conversation_rollouts,
    create_scripted_user,
    create_user_env,
)
from rlprim.testing import tiny_model, tiny_tokenizer
from rlprim.types import Conversation, Generation, GenerationConfig, Message

EOS = 2


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", seed=0)


def encode(tokenizer, text):
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def conversation_of(*roles):
    return Conversation(tuple(Message(role, f"m{i}") for i, role in enumerate(roles)))


def test_scripted_user_reads_the_turn_from_the_conversation():
    user = create_scripted_user(["first", "second"])
    assert user(conversation_of("user", "assistant")) == "first"
    assert user(conversation_of("user", "assistant", "user", "assistant")) == "second"
    assert user(conversation_of("user", "assistant", "user", "assistant", "user",
                                "assistant")) is None
    assert user(conversation_of("user")) is None
    few_shot = create_scripted_user(["reply"], skip_assistant_messages=1)
    assert few_shot(conversation_of("user", "assistant", "user", "assistant")) == "reply"
    assert few_shot(conversation_of("user", "assistant")) is None
    with pytest.raises(TypeError, match="replies"):
        create_scripted_user("abc")
    with pytest.raises(TypeError, match=r"replies\[1\]"):
        create_scripted_user(["a", 2])
    with pytest.raises(ValueError, match="skip_assistant_messages"):
        create_scripted_user(["a"], skip_assistant_messages=-1)


def test_user_env_wraps_user_fn():
    env = create_user_env(lambda c: None if len(c.messages) > 2 else "more")
    assert env(conversation_of("user", "assistant")) == [Message("user", "more")]
    assert env(conversation_of("user", "assistant", "user")) is None
    with pytest.raises(TypeError, match="user_fn must return"):
        create_user_env(lambda c: 3)(conversation_of("user"))
    with pytest.raises(TypeError, match="user_fn"):
        create_user_env("hello")


def scripted_model_turns(model, tokenizer, prompts, config):
    """A Generator whose reply is 'answer N' for the N-th assistant turn (token-id prompts)."""
    out = []
    for prompt in prompts:
        turn = tokenizer.decode(list(prompt)).count("<|assistant|>")
        text = f"answer {turn}"
        ids = encode(tokenizer, text) + (EOS,)
        out.append(Generation(text, tuple(prompt), ids, (-0.5,) * len(ids), "stop"))
    return out


def test_user_messages_are_appended_as_masked_deltas(model, tokenizer):
    rollout = create_conversation_rollouts(
        model, tokenizer, ["hello"], GenerationConfig(max_new_tokens=16),
        user_fn=create_scripted_user(["how are you?", "bye"]), max_turns=5,
        generator=scripted_model_turns)[0]
    turn = [encode(tokenizer, f"answer {k}") + (EOS,) for k in (1, 2, 3)]
    user = [encode(tokenizer, f"\n<|user|>\n{text}<|eos|>\n<|assistant|>\n")
            for text in ("how are you?", "bye")]
    assert rollout.completion_ids == turn[0] + user[0] + turn[1] + user[1] + turn[2]
    expected_mask = []
    for ids, value in ((turn[0], 1), (user[0], 0), (turn[1], 1), (user[1], 0), (turn[2], 1)):
        expected_mask += [value] * len(ids)
    assert list(rollout.action_mask) == expected_mask
    assert [v for v in rollout.logprobs if v != 0.0] == [-0.5] * sum(expected_mask)
    assert [(m.role, m.content) for m in rollout.conversation.messages] == [
        ("user", "hello"), ("assistant", "answer 1"), ("user", "how are you?"),
        ("assistant", "answer 2"), ("user", "bye"), ("assistant", "answer 3")]
    assert rollout.metadata == {"turns": 3, "finish_reason": "env_done", "tool_calls_executed": 0}
    assert rollout.tool_calls == ()


def test_conversation_ends_at_max_turns_and_stop_condition(model, tokenizer):
    endless = create_scripted_user(["again"] * 10)
    rollout = create_conversation_rollouts(
        model, tokenizer, ["hi"], GenerationConfig(max_new_tokens=16), user_fn=endless,
        max_turns=2, generator=scripted_model_turns)[0]
    assert rollout.metadata["finish_reason"] == "max_turns" and rollout.metadata["turns"] == 2
    stopped = create_conversation_rollouts(
        model, tokenizer, ["hi"], GenerationConfig(max_new_tokens=16), user_fn=endless,
        max_turns=5, generator=scripted_model_turns,
        stop_condition=lambda c: c.messages[-1].content == "answer 3")[0]
    assert stopped.metadata["finish_reason"] == "stop_condition"
    assert stopped.metadata["turns"] == 3


def test_conversation_with_hf_generator_and_rewards(model, tokenizer):
    """Real sampling: log-probs at action tokens equal a teacher-forced recomputation."""
    def user_fn(conversation):
        turns = sum(m.role == "assistant" for m in conversation.messages)
        limit = 2 if conversation.messages[0].content == "short" else 3
        return f"tell me more ({turns})" if turns < limit else None

    config = GenerationConfig(max_new_tokens=5, num_samples=2, seed=4, temperature=1.3)
    rollouts = create_conversation_rollouts(
        model, tokenizer, ["short", {"messages": "long", "topic": "x"}], config, user_fn,
        reward_fn=lambda r: float(r.metadata["turns"]), group_offset=2)
    assert [r.group_id for r in rollouts] == [2, 2, 3, 3]
    assert [r.rewards for r in rollouts] == [2.0, 2.0, 3.0, 3.0]
    assert rollouts[2].metadata["topic"] == "x"
    for rollout in rollouts:
        ids = list(rollout.generation.prompt_ids) + list(rollout.completion_ids)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0] / 1.3
        logprobs = torch.log_softmax(logits, -1)
        start = len(rollout.generation.prompt_ids)
        naive = [float(logprobs[start + t - 1, token])
                 for t, token in enumerate(rollout.completion_ids)]
        mask = np.array(rollout.action_mask, dtype=bool)
        np.testing.assert_allclose(np.array(rollout.logprobs)[mask], np.array(naive)[mask],
                                   atol=2e-4)
        user_turns = [m.content for m in rollout.conversation.messages if m.role == "user"][1:]
        masked_text = tokenizer.decode([t for t, m in zip(rollout.completion_ids,
                                                          rollout.action_mask, strict=True)
                                        if m == 0])
        for text in user_turns:
            assert f"<|user|>\n{text}<|eos|>\n<|assistant|>\n" in masked_text
