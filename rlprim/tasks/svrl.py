"""Self-verification RL (SVRL): the model may check its work with verification tools, and every
check costs part of a budget.

The episode (a multi-turn rollout, ``rlprim.rollouts.create_batch_multiturn_rollouts``)::

    system: rules, the tools, the budget  →  user: the problem
    assistant: <tool name="check_answer">{"answer": "42"}</tool>     (costs 1; at most B runs)
    tool: incorrect
    assistant: ... <answer>41</answer>                               (ends the episode)

``execute_tools``'s budget refuses calls beyond ``B`` with an error message, so at most ``B``
tools run per episode, and the reward trades task quality against the checks used::

    R = quality(rollout) - cost_per_call · n_executed

where ``n_executed`` counts the tool calls that actually ran (``tool_call_was_executed``:
malformed, unknown or refused calls are free). A linear cost is the simplest tool-efficiency
reward; OTC (Wang et al. 2025, "Acting Less is Reasoning More") studies non-linear variants.

``create_svrl_task`` bundles conversations, per-problem tools, the stop condition and the reward;
``create_svrl_rollouts`` runs it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from rlprim.inference import hf_generator
from rlprim.rollouts import create_batch_multiturn_rollouts, tool_call_was_executed
from rlprim.tools import calculator, parse_xml_tools
from rlprim.types import Conversation, Generation, GenerationConfig, Message, Rollout

__all__ = [
    "SVRL_SYSTEM_PROMPT",
    "answers_match",
    "extract_final_answer",
    "final_answer",
    "answer_given",
    "exact_answer_quality",
    "svrl_reward",
    "create_answer_checker",
    "create_svrl_tools",
    "create_svrl_conversation",
    "SVRLTask",
    "create_svrl_task",
    "create_svrl_rollouts",
]

SVRL_SYSTEM_PROMPT = (
    "Solve the problem. You may verify your work with tools; each tool call costs 1 and you "
    "have a budget of {budget}. Call a tool as <tool name=\"NAME\">{{JSON arguments}}</tool>. "
    "Tools: {tools}. Give your final answer as <answer>...</answer>."
)
"""The system prompt of ``create_svrl_conversation``; ``{budget}`` and ``{tools}`` are filled."""

_TOOL_USAGE = {
    "check_answer": 'check_answer {"answer": "..."} says whether an answer is correct',
    "calculator": 'calculator {"expression": "..."} evaluates arithmetic',
}
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _normalise(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).lower()


def answers_match(answer: str | None, reference: Any) -> bool:
    """Whether ``answer`` equals ``reference`` after normalisation.

    Both are compared as text after trimming, dropping a trailing period, collapsing whitespace
    and lower-casing; when both are plain numbers they are compared as numbers
    (``"5" == "5.0"``, relative tolerance 1e-9). ``None`` (no answer) matches nothing.
    """
    if answer is None:
        return False
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str or None, got {type(answer).__name__}")
    left, right = _normalise(answer), _normalise(str(reference))
    if _NUMBER.fullmatch(left) and _NUMBER.fullmatch(right):
        a, b = float(left), float(right)
        return math.isclose(a, b, rel_tol=1e-9)
    return left == right


def extract_final_answer(text: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` in ``text`` (stripped), or ``None``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


def _assistant_texts(rollout: Rollout) -> list[str]:
    if rollout.conversation is not None:
        return [m.content for m in rollout.conversation.messages if m.role == "assistant"]
    return [rollout.generation.text]


def final_answer(rollout: Rollout) -> str | None:
    """The last ``<answer>`` the model gave in the rollout (any assistant turn), or ``None``."""
    if not isinstance(rollout, Rollout):
        raise TypeError(f"rollout must be a Rollout, got {type(rollout).__name__}")
    for text in reversed(_assistant_texts(rollout)):
        answer = extract_final_answer(text)
        if answer is not None:
            return answer
    return None


def answer_given(conversation: Conversation) -> bool:
    """A ``stop_condition``: true once the last assistant message holds an ``<answer>``."""
    if not isinstance(conversation, Conversation):
        raise TypeError(f"conversation must be a Conversation, got {type(conversation).__name__}")
    for message in reversed(conversation.messages):
        if message.role == "assistant":
            return extract_final_answer(message.content) is not None
    return False


def exact_answer_quality(rollout: Rollout) -> float:
    """1.0 when ``final_answer(rollout)`` matches ``rollout.metadata["answer"]``, else 0.0."""
    if not isinstance(rollout, Rollout):
        raise TypeError(f"rollout must be a Rollout, got {type(rollout).__name__}")
    if not rollout.metadata or "answer" not in rollout.metadata:
        raise ValueError("rollout.metadata must hold the reference 'answer' (give conversations "
                         "as {'messages': ..., 'answer': ...})")
    return float(answers_match(final_answer(rollout), rollout.metadata["answer"]))


def svrl_reward(
    quality_fn: Callable[[Rollout], float], cost_per_call: float
) -> Callable[[Rollout], float]:
    """The SVRL reward: task quality minus the cost of the verification calls that ran.

        R(rollout) = quality_fn(rollout) - cost_per_call · n_executed,
        n_executed = #{c in rollout.tool_calls : tool_call_was_executed(c)}

    Calls that never ran (parse errors, unknown tools, calls refused by the budget or after the
    last turn) cost nothing: the budget caps ``n_executed`` at the tool budget ``B``, so
    ``R >= quality - cost_per_call · B``.

    Args:
      quality_fn: ``fn(rollout) -> float``, e.g. ``exact_answer_quality``.
      cost_per_call: ``c >= 0``, the price of one executed tool call.

    Returns:
      ``reward_fn(rollout) -> float``.
    """
    if not callable(quality_fn):
        raise TypeError(f"quality_fn must be callable, got {type(quality_fn).__name__}")
    if isinstance(cost_per_call, bool) or not isinstance(cost_per_call, (int, float)):
        raise TypeError(f"cost_per_call must be a number, got {type(cost_per_call).__name__}")
    if not math.isfinite(cost_per_call) or cost_per_call < 0:
        raise ValueError(f"cost_per_call must be finite and >= 0, got {cost_per_call}")
    cost = float(cost_per_call)

    def reward_fn(rollout: Rollout) -> float:
        if not isinstance(rollout, Rollout):
            raise TypeError(f"rollout must be a Rollout, got {type(rollout).__name__}")
        quality = quality_fn(rollout)
        if isinstance(quality, bool):
            quality = float(quality)
        if not isinstance(quality, (int, float)) or not math.isfinite(quality):
            raise ValueError(f"quality_fn must return a finite number, got {quality!r}")
        executed = sum(tool_call_was_executed(call) for call in rollout.tool_calls)
        return float(quality) - cost * executed

    return reward_fn


def create_answer_checker(
    reference: Any, match_fn: Callable[[str, Any], bool] = answers_match
) -> Callable[[str], str]:
    """A verification tool for one problem: ``check_answer(answer) -> "correct" | "incorrect"``.

    Args:
      reference: the problem's reference answer (kept in the closure, never shown).
      match_fn: ``fn(answer, reference) -> bool`` (default ``answers_match``).
    """
    if not callable(match_fn):
        raise TypeError(f"match_fn must be callable, got {type(match_fn).__name__}")

    def check_answer(answer: str) -> str:
        """Says whether ``answer`` is the correct answer to the problem."""
        if not isinstance(answer, str):
            raise TypeError(f"answer must be a string, got {type(answer).__name__}")
        return "correct" if match_fn(answer, reference) else "incorrect"

    return check_answer


def create_svrl_tools(
    reference: Any, include_calculator: bool = True,
    match_fn: Callable[[str, Any], bool] = answers_match,
) -> dict[str, Callable[..., str]]:
    """The verification tools of one problem: ``check_answer`` (and ``calculator``)."""
    tools: dict[str, Callable[..., str]] = {
        "check_answer": create_answer_checker(reference, match_fn)}
    if include_calculator:
        tools["calculator"] = calculator
    return tools


def create_svrl_conversation(
    problem: str,
    tool_budget: int,
    tool_names: Sequence[str] = ("check_answer", "calculator"),
    system_prompt: str = SVRL_SYSTEM_PROMPT,
) -> Conversation:
    """``Conversation(system: system_prompt with budget and tools filled, user: problem)``."""
    if not isinstance(problem, str):
        raise TypeError(f"problem must be a str, got {type(problem).__name__}")
    if isinstance(tool_budget, bool) or not isinstance(tool_budget, int) or tool_budget < 0:
        raise ValueError(f"tool_budget must be an int >= 0, got {tool_budget!r}")
    usage = "; ".join(_TOOL_USAGE.get(name, name) for name in tool_names)
    system = system_prompt.format(budget=tool_budget, tools=usage)
    return Conversation((Message("system", system), Message("user", problem)))


class SVRLTask(NamedTuple):
    """Everything ``create_batch_multiturn_rollouts`` needs for an SVRL batch.

    Fields:
      conversations: ``{"messages": Conversation, "answer": reference}`` per problem.
      tools: one tool set per problem (its ``check_answer`` knows that problem's answer).
      tool_budget: tool executions allowed per episode.
      stop_condition: ends an episode once an answer is given (``answer_given``).
      reward_fn: ``svrl_reward(quality_fn, cost_per_call)``.
    """

    conversations: Sequence[Mapping[str, Any]]
    tools: Sequence[Mapping[str, Callable[..., str]]]
    tool_budget: int
    stop_condition: Callable[[Conversation], bool]
    reward_fn: Callable[[Rollout], float]


def create_svrl_task(
    problems: Sequence[str],
    answers: Sequence[Any],
    tool_budget: int = 2,
    cost_per_call: float = 0.1,
    quality_fn: Callable[[Rollout], float] = exact_answer_quality,
    include_calculator: bool = True,
    system_prompt: str = SVRL_SYSTEM_PROMPT,
) -> SVRLTask:
    """Builds an ``SVRLTask``: prompts stating the budget, per-problem verification tools, the
    answer stop condition and ``R = quality - cost_per_call · n_executed``."""
    if isinstance(problems, str) or not isinstance(problems, Sequence):
        raise TypeError(f"problems must be a list of str, got {type(problems).__name__}")
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise TypeError(f"answers must be a list, got {type(answers).__name__}")
    if len(problems) != len(answers):
        raise ValueError(f"problems ({len(problems)}) and answers ({len(answers)}) must have the "
                         "same length")
    tools = [create_svrl_tools(a, include_calculator) for a in answers]
    conversations = [
        {"messages": create_svrl_conversation(p, tool_budget, tuple(t), system_prompt),
         "answer": a}
        for p, a, t in zip(problems, answers, tools, strict=True)
    ]
    return SVRLTask(
        conversations=conversations,
        tools=tools,
        tool_budget=tool_budget,
        stop_condition=answer_given,
        reward_fn=svrl_reward(quality_fn, cost_per_call),
    )


def create_svrl_rollouts(
    model: Any,
    tokenizer: Any,
    task: SVRLTask,
    gen_config: GenerationConfig,
    max_turns: int = 4,
    generator: Callable[..., list[Generation]] = hf_generator,
    **kwargs: Any,
) -> list[Rollout]:
    """Runs ``task`` with ``create_batch_multiturn_rollouts`` (XML tool calls, the task's tools,
    budget, stop condition and reward); ``kwargs`` go through (``ref_model``, ``group_offset``…).
    """
    if not isinstance(task, SVRLTask):
        raise TypeError(f"task must be an SVRLTask, got {type(task).__name__}")
    return create_batch_multiturn_rollouts(
        model, tokenizer, task.conversations, gen_config, tool_parser=parse_xml_tools,
        stop_condition=task.stop_condition, max_turns=max_turns, reward_fn=task.reward_fn,
        tool_budget=task.tool_budget, generator=generator, tools=task.tools, **kwargs,
    )
