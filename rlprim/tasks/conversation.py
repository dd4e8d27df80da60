"""A plain conversation task: multi-turn chat with a scripted (or simulated) user.

After every model turn a user function writes the next user message::

    user_fn(conversation: Conversation) -> str | None        # None ends the conversation

The episode runs on the batched multi-turn machinery of ``rlprim.rollouts``: all live
conversations advance together with one generator call per turn, the model's tokens are kept
exactly as sampled (``action_mask`` 1) and each user message is tokenised as a delta of the chat
template and appended with ``action_mask`` 0, so only the model's words train. Score the result
with any ``reward_fn(rollout)`` (it sees ``rollout.conversation``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlprim.inference import hf_generator
from rlprim.rollouts import create_batch_multiturn_rollouts
from rlprim.types import Conversation, Generation, GenerationConfig, Message, Rollout

__all__ = [
    "create_user_env",
    "create_scripted_user",
    "create_conversation_rollouts",
]


def create_user_env(
    user_fn: Callable[[Conversation], str | None],
) -> Callable[[Conversation], list[Message] | None]:
    """Turns ``user_fn(conversation) -> str | None`` into an ``env_fn`` for multi-turn rollouts.

    Returns:
      ``env_fn(conversation) -> [Message("user", text)]``, or ``None`` when ``user_fn`` returns
      ``None`` (the conversation ends).
    """
    if not callable(user_fn):
        raise TypeError(f"user_fn must be callable, got {type(user_fn).__name__}")

    def env_fn(conversation: Conversation) -> list[Message] | None:
        text = user_fn(conversation)
        if text is None:
            return None
        if not isinstance(text, str):
            raise TypeError(f"user_fn must return a str or None, got {type(text).__name__}")
        return [Message("user", text)]

    return env_fn


def create_scripted_user(
    replies: Sequence[str], skip_assistant_messages: int = 0
) -> Callable[[Conversation], str | None]:
    """A user who answers the model's ``k``-th turn with ``replies[k]`` and then stops.

    ``k`` is read from the conversation, not counted in hidden state:
    ``k = #assistant messages - 1 - skip_assistant_messages`` (set ``skip_assistant_messages``
    to the number of assistant messages already in the initial conversation, e.g. few-shot
    examples). For ``k >= len(replies)`` it returns ``None``, ending the conversation.
    """
    if isinstance(replies, str) or not isinstance(replies, Sequence):
        raise TypeError(f"replies must be a list of str, got {type(replies).__name__}")
    replies = tuple(replies)
    for i, reply in enumerate(replies):
        if not isinstance(reply, str):
            raise TypeError(f"replies[{i}] must be a str, got {type(reply).__name__}")
    if (isinstance(skip_assistant_messages, bool) or not isinstance(skip_assistant_messages, int)
            or skip_assistant_messages < 0):
        raise ValueError(
            f"skip_assistant_messages must be an int >= 0, got {skip_assistant_messages!r}")

    def user_fn(conversation: Conversation) -> str | None:
        turns = sum(m.role == "assistant" for m in conversation.messages)
        k = turns - 1 - skip_assistant_messages
        return replies[k] if 0 <= k < len(replies) else None

    return user_fn


def create_conversation_rollouts(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Any],
    gen_config: GenerationConfig,
    user_fn: Callable[[Conversation], str | None],
    max_turns: int = 4,
    reward_fn: Callable[[Rollout], Any] | None = None,
    generator: Callable[..., list[Generation]] = hf_generator,
    stop_condition: Callable[[Conversation], bool] | None = None,
    ref_model: Any = None,
    kl_estimator: str | Callable[..., torch.Tensor] = "k3",
    template_fn: Callable[[list[dict[str, Any]], bool], str] | None = None,
    group_offset: int = 0,
) -> list[Rollout]:
    """Multi-turn chats with a user function, batched: ``create_batch_multiturn_rollouts`` with
    ``env_fn = create_user_env(user_fn)`` and no tools.

    An episode ends when ``stop_condition`` holds after a model turn (``"stop_condition"``),
    ``user_fn`` returns ``None`` (``"env_done"``), after ``max_turns`` model turns
    (``"max_turns"``) or when the context is full (``"context_length"``).

    Args:
      conversations: the opening conversations (str, ``Conversation``, list of messages or
        ``{"messages": ..., **metadata}``); each is sampled ``gen_config.num_samples`` times.
      user_fn: ``fn(conversation) -> str | None``, the next user message.
      Others: as in ``create_batch_multiturn_rollouts``.

    Returns:
      one ``Rollout`` per episode (user tokens have ``action_mask`` 0).
    """
    return create_batch_multiturn_rollouts(
        model, tokenizer, conversations, gen_config, tool_parser=None,
        stop_condition=stop_condition, max_turns=max_turns, reward_fn=reward_fn,
        generator=generator, env_fn=create_user_env(user_fn), ref_model=ref_model,
        kl_estimator=kl_estimator, template_fn=template_fn, group_offset=group_offset,
    )
