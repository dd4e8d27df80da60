"""The arithmetic task: ``"47+38="`` → ``"85"``, the task of the bundled model ``rlprim/arith-tiny``.

A problem is a prompt item ``{"prompt": "47+38=", "answer": "85"}``: two operands with at most
``digits`` digits each (uniform over ``[0, 10**digits)``, no leading zeros), one operator from
``operators`` (``"+"``, ``"-"``, ``"*"``), no spaces, ending with ``"="``. The answer is the
exact integer result in decimal (``"-44"`` for ``"3-47="``). Rollouts built from these items
carry ``"answer"`` in ``Rollout.metadata`` (``rlprim.data.prompt_metadata``), where
``arithmetic_reward`` reads it.

Problems are drawn *without replacement* from the ``len(operators) * 10**(2 * digits)`` possible
ones, so a list holds no duplicate, and ``arithmetic_split`` gives a training set and a held-out
set that share no problem: held-out accuracy measures what the model generalises, not what it
memorised. Everything is a pure function of its arguments (``random.Random(seed)``, never the
global RNG).

Answer format (``parse_leading_integer``): the completion's first line (the text up to the first
newline; EOS is already stripped from ``Generation.text``), after optional spaces or tabs, must
begin with an optional ``-`` and a run of digits; that run is the model's answer and must equal
the expected answer *as a string* (``"85"`` is right; ``"085"``, ``"+85"`` and ``"851"`` are
wrong; ``"85 and more"`` counts as ``"85"``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from rlprim.inference import batch_generate, hf_generator
from rlprim.types import GenerationConfig, Rollout

__all__ = [
    "ARITHMETIC_OPERATORS",
    "ARITH_TINY_SPLIT",
    "arithmetic_problem_count",
    "make_arithmetic_problems",
    "arithmetic_split",
    "parse_leading_integer",
    "arithmetic_reward",
    "evaluate_arithmetic",
    "create_arithmetic_eval_fn",
]

ARITHMETIC_OPERATORS = ("+", "-", "*")
# The split the bundled model rlprim/arith-tiny was trained on (train half) and evaluated on.
ARITH_TINY_SPLIT = MappingProxyType(
    {"num_train": 5000, "num_eval": 500, "digits": 2, "operators": ("+",), "seed": 0}
)
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_LEADING_INTEGER = re.compile(r"[ \t]*(-?[0-9]+)")
# Larger operands make exact string answers unwieldy for small models; this bounds the space.
_MAX_DIGITS = 9
# Problem spaces up to this size are shuffled whole (2-digit problems, all operators: 3e4).
_SHUFFLE_LIMIT = 2**17


def _check_digits_operators(digits: object, operators: object) -> tuple[int, tuple[str, ...]]:
    if isinstance(digits, bool) or not isinstance(digits, int):
        raise TypeError(f"digits must be an int, got {type(digits).__name__}")
    if not 1 <= digits <= _MAX_DIGITS:
        raise ValueError(f"digits must be in [1, {_MAX_DIGITS}], got {digits}")
    if isinstance(operators, str) or not isinstance(operators, Sequence):
        raise TypeError(
            f"operators must be a sequence of operator strings such as ('+', '-'), got "
            f"{operators!r}"
        )
    operators = tuple(operators)
    if not operators:
        raise ValueError("operators must hold at least one operator, got an empty sequence")
    for op in operators:
        if op not in ARITHMETIC_OPERATORS:
            raise ValueError(f"operators must be drawn from {ARITHMETIC_OPERATORS}, got {op!r}")
    if len(set(operators)) != len(operators):
        raise ValueError(f"operators must not repeat, got {operators!r}")
    return digits, operators


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def arithmetic_problem_count(digits: int = 2, operators: Sequence[str] = ("+",)) -> int:
    """The number of distinct problems: ``len(operators) * (10**digits)**2``.

    Example: ``arithmetic_problem_count(2, ("+",)) == 10_000`` (``0+0=`` … ``99+99=``).
    """
    digits, operators = _check_digits_operators(digits, operators)
    return len(operators) * 10 ** (2 * digits)


def _problem(index: int, digits: int, operators: tuple[str, ...]) -> dict[str, str]:
    """Problem number ``index`` in the order (operator, left operand, right operand)."""
    size = 10**digits
    op_index, rest = divmod(index, size * size)
    left, right = divmod(rest, size)
    op = operators[op_index]
    return {"prompt": f"{left}{op}{right}=", "answer": str(_APPLY[op](left, right))}


def _draw_distinct(count: int, space: int, seed: int) -> list[int]:
    """The first ``count`` of a seeded random ordering of ``[0, space)``.

    Spaces up to ``_SHUFFLE_LIMIT`` are shuffled whole; larger ones are drawn with rejection of
    repeats (cost ``O(count)``). Either way the ordering depends only on ``(space, seed)``, so
    the first ``k`` numbers are the same for every ``count ≥ k``.
    """
    rng = random.Random(seed)
    if space <= _SHUFFLE_LIMIT:
        order = list(range(space))
        rng.shuffle(order)
        return order[:count]
    seen: set[int] = set()
    drawn: list[int] = []
    while len(drawn) < count:
        index = rng.randrange(space)
        if index not in seen:
            seen.add(index)
            drawn.append(index)
    return drawn


def make_arithmetic_problems(
    num: int,
    digits: int = 2,
    operators: Sequence[str] = ("+",),
    seed: int = 0,
) -> list[dict[str, str]]:
    """``num`` distinct random arithmetic problems as prompt items.

    Each item is ``{"prompt": f"{a}{op}{b}=", "answer": str(a op b)}`` with ``a, b`` uniform
    over ``[0, 10**digits)`` and ``op`` uniform over ``operators``; the ``num`` problems are
    drawn without replacement from all ``arithmetic_problem_count(digits, operators)`` of them
    with ``random.Random(seed)`` (the global RNG is not used). The draw is a prefix of one
    seeded ordering of all problems: the first ``k`` problems are the same for every
    ``num ≥ k`` (same ``digits``, ``operators``, ``seed``).

    Example: ``make_arithmetic_problems(2, seed=0)`` →
    ``[{"prompt": "63+11=", "answer": "74"}, {"prompt": "68+90=", "answer": "158"}]``.

    Args:
      num: how many problems (``0 ≤ num ≤`` the number of distinct problems).
      digits: the most digits per operand, 1 to 9.
      operators: a non-empty subset of ``("+", "-", "*")``; ``"-"`` may give negative answers.
      seed: any int; the same arguments give the same list.

    Returns:
      a list of ``num`` dicts with ``"prompt"`` and ``"answer"`` (both ``str``).
    """
    num = _check_count("num", num, 0)
    digits, operators = _check_digits_operators(digits, operators)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    space = len(operators) * 10 ** (2 * digits)
    if num > space:
        raise ValueError(
            f"num must be <= {space}, the number of distinct problems with digits={digits} and "
            f"operators={operators!r}; got {num}"
        )
    return [_problem(i, digits, operators) for i in _draw_distinct(num, space, seed)]


def arithmetic_split(
    num_train: int,
    num_eval: int,
    digits: int = 2,
    operators: Sequence[str] = ("+",),
    seed: int = 0,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A training set and a disjoint held-out set of arithmetic problems.

    Draws ``num_eval + num_train`` distinct problems with
    ``make_arithmetic_problems(num_eval + num_train, digits, operators, seed)``; the first
    ``num_eval`` are held out, the rest train. No prompt is in both sets, and held-out sets of
    different sizes are nested: with the same ``digits``, ``operators`` and ``seed``, the
    held-out set of ``num_eval = 200`` is the first 200 of the held-out set of ``num_eval =
    500``. The bundled model ``rlprim/arith-tiny`` was trained on the training half of
    ``arithmetic_split(**ARITH_TINY_SPLIT)``, so any held-out set with ``num_eval ≤ 500`` and
    those settings holds only problems it never saw.

    Args:
      num_train: training problems (``≥ 0``).
      num_eval: held-out problems (``≥ 0``).
      digits, operators, seed: as in ``make_arithmetic_problems``.

    Returns:
      ``(train, held_out)``, two lists of ``{"prompt", "answer"}`` dicts.
    """
    num_train = _check_count("num_train", num_train, 0)
    num_eval = _check_count("num_eval", num_eval, 0)
    problems = make_arithmetic_problems(num_eval + num_train, digits, operators, seed)
    return problems[num_eval:], problems[:num_eval]


def parse_leading_integer(text: str) -> str | None:
    """The integer a completion starts with, as written, or ``None``.

    Looks only at the first line of ``text`` (up to the first ``"\\n"``), skips leading spaces
    and tabs and returns the longest ``-?[0-9]+`` prefix that follows. Examples: ``"85"`` →
    ``"85"``; ``" 85\\n12"`` → ``"85"``; ``"-7+1"`` → ``"-7"``; ``"085"`` → ``"085"``;
    ``"x85"``, ``""`` and ``"\\n85"`` → ``None``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    match = _LEADING_INTEGER.match(text.split("\n", 1)[0])
    return match.group(1) if match else None


def _expected_answer(rollout: Rollout) -> str:
    metadata = rollout.metadata or {}
    if "answer" not in metadata:
        raise ValueError(
            "rollout.metadata has no key 'answer' holding the expected result; keys: "
            f"{sorted(map(str, metadata))} (build rollouts from arithmetic prompt items)"
        )
    return str(metadata["answer"]).strip()


def arithmetic_reward(rollout: Rollout) -> float:
    """Exact-answer reward: 1.0 if the completion's leading integer is the answer, else 0.0.

    ::

        r = 1.0  if parse_leading_integer(rollout.generation.text) == rollout.metadata["answer"]
        r = 0.0  otherwise (wrong number, no number, leading zeros, a "+" sign)

    The binary verifiable reward of RLVR (Lambert et al. 2024, "Tülu 3"). A ``reward_fn`` for
    ``rlprim.rewards.compute_batch_rewards`` and the training loop.

    Raises:
      TypeError: ``rollout`` is not a ``Rollout``.
      ValueError: ``rollout.metadata`` has no ``"answer"`` (the keys present are listed).
    """
    if not isinstance(rollout, Rollout):
        raise TypeError(f"rollout must be a Rollout, got {type(rollout).__name__}")
    expected = _expected_answer(rollout)
    return 1.0 if parse_leading_integer(rollout.generation.text) == expected else 0.0


def _check_problems(problems: object) -> list[Mapping[str, Any]]:
    if isinstance(problems, (str, Mapping)) or not isinstance(problems, Sequence):
        raise TypeError(
            f"problems must be a list of {{'prompt', 'answer'}} dicts, got {type(problems).__name__}"
        )
    if not problems:
        raise ValueError("problems must hold at least one problem, got an empty sequence")
    for i, problem in enumerate(problems):
        if not isinstance(problem, Mapping) or "prompt" not in problem or "answer" not in problem:
            raise ValueError(
                f"problems[{i}] must be a mapping with 'prompt' and 'answer', got {problem!r}"
            )
        if not isinstance(problem["prompt"], str):
            raise TypeError(
                f"problems[{i}]['prompt'] must be a str, got {type(problem['prompt']).__name__}"
            )
    return list(problems)


def evaluate_arithmetic(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Mapping[str, Any]],
    batch_size: int = 256,
    max_new_tokens: int | None = None,
    generator: Callable[..., Any] = hf_generator,
) -> float:
    """Greedy accuracy on ``problems``: the fraction answered exactly right.

    ::

        accuracy = (1 / N) Σ_i [ parse_leading_integer(greedy_completion(prompt_i)) == answer_i ]

    Completions come from ``rlprim.inference.batch_generate`` with
    ``GenerationConfig(do_sample=False, num_samples=1, batch_size=batch_size,
    max_new_tokens=max_new_tokens)``; the answer check is ``arithmetic_reward``'s.

    Args:
      model: the policy (any model ``generator`` accepts).
      tokenizer: its tokenizer.
      problems: ``N ≥ 1`` items with ``"prompt"`` and ``"answer"`` (e.g. the held-out half of
        ``arithmetic_split``).
      batch_size: prompts per generate call.
      max_new_tokens: ``None`` uses the longest answer plus 2 (room for EOS and one token more,
        so an answer that does not stop is seen to run on).
      generator: ``generator(model, tokenizer, prompts, config) -> list[Generation]``, default
        ``hf_generator``.

    Returns:
      the accuracy, a float in ``[0, 1]``.
    """
    problems = _check_problems(problems)
    batch_size = _check_count("batch_size", batch_size, 1)
    answers = [str(p["answer"]).strip() for p in problems]
    if max_new_tokens is None:
        max_new_tokens = max(len(a) for a in answers) + 2
    max_new_tokens = _check_count("max_new_tokens", max_new_tokens, 1)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_samples=1, batch_size=batch_size
    )
    prompts = [p["prompt"] for p in problems]
    generations = batch_generate(model, tokenizer, prompts, config, generator=generator)
    correct = sum(
        parse_leading_integer(g.text) == a for g, a in zip(generations, answers, strict=True)
    )
    return correct / len(problems)


def create_arithmetic_eval_fn(
    problems: Sequence[Mapping[str, Any]],
    batch_size: int = 256,
    max_new_tokens: int | None = None,
    generator: Callable[..., Any] = hf_generator,
    metric_name: str = "heldout_accuracy",
) -> Callable[[Any], dict[str, float]]:
    """Returns ``eval_fn(state) -> {metric_name: accuracy}`` for the training loop's ``eval_fn``.

    The accuracy is ``evaluate_arithmetic(policy, state.tokenizer, problems, ...)`` with
    ``policy = state.policy`` (its ``.module`` when wrapped in DDP). The problems are copied
    at creation.
    """
    frozen = tuple(_check_problems(problems))
    batch_size = _check_count("batch_size", batch_size, 1)
    if max_new_tokens is not None:
        max_new_tokens = _check_count("max_new_tokens", max_new_tokens, 1)
    if not isinstance(metric_name, str) or not metric_name:
        raise ValueError(f"metric_name must be a non-empty str, got {metric_name!r}")

    def eval_fn(state: Any) -> dict[str, float]:
        """Greedy held-out accuracy of ``state.policy``."""
        policy = state.policy
        if type(policy).__name__ == "DistributedDataParallel":
            policy = policy.module
        accuracy = evaluate_arithmetic(
            policy, state.tokenizer, frozen, batch_size, max_new_tokens, generator
        )
        return {metric_name: accuracy}

    return eval_fn
