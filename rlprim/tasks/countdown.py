"""The countdown task: reach a target number from given numbers with ``+ - * /``.

A problem is a prompt item ``{"prompt": ..., "numbers": [3, 7, 25, 50], "target": 75,
"solution": "(25*3)"}``: combine some of the ``numbers``, each *at most once*, with ``+``,
``-``, ``*``, ``/`` and parentheses into an expression whose value is exactly ``target``
(the numbers game of the TV show "Des chiffres et des lettres" / "Countdown", a common RL
reasoning task since TinyZero, Pan et al. 2025). Every generated problem is solvable: the
target is computed from a random expression over a random subset of the numbers, kept as
``"solution"``.

The verifier never runs model text: the expression is parsed with ``ast.parse`` and walked,
allowing only non-negative integer literals, the four binary operators and parentheses, and
evaluated with exact rational arithmetic (``fractions.Fraction``), so ``(1/3)*3`` is exactly
``1`` and ``8/3`` is not ``2.67``. Text longer than ``MAX_EXPRESSION_CHARS`` is refused before
parsing, which bounds the work on hostile input.

Answer format (``extract_countdown_expression``): the content of the last
``<answer>...</answer>`` in the completion if there is one, else its last non-empty line; a
trailing ``= value`` is ignored (``"25*3 = 75"`` → ``"25*3"``).
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from rlprim.types import Rollout

__all__ = [
    "COUNTDOWN_PROMPT",
    "MAX_EXPRESSION_CHARS",
    "make_countdown_problems",
    "extract_countdown_expression",
    "evaluate_countdown_expression",
    "check_countdown_answer",
    "countdown_reward",
    "create_countdown_reward",
]

COUNTDOWN_PROMPT = (
    "Using the numbers {numbers}, make {target}. You may use + - * / and parentheses, and each "
    "number at most once. Give the expression inside <answer></answer>, e.g. "
    "<answer>(1+2)*3</answer>."
)
MAX_EXPRESSION_CHARS = 200
_MAX_NODES = 128
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _random_solution(
    numbers: Sequence[int], rng: random.Random, max_target: int
) -> tuple[str, int] | None:
    """A random expression over a random subset (≥ 2) of ``numbers`` whose value is an int in
    ``[1, max_target]``, with positive integer intermediate values; ``None`` if none was drawn.
    """
    chosen = rng.sample(list(numbers), rng.randint(2, len(numbers)))
    text, value = str(chosen[0]), chosen[0]
    for number in chosen[1:]:
        ops = ["+", "*"]
        if value != number:
            ops.append("-")
        larger, smaller = max(value, number), min(value, number)
        if smaller > 1 and larger % smaller == 0:
            ops.append("/")
        op = rng.choice(ops)
        left, right = (text, str(number)) if value >= number else (str(number), text)
        if op == "+":
            value = value + number
        elif op == "*":
            value = value * number
        elif op == "-":
            value = larger - smaller
        else:
            value = larger // smaller
        if op in "+*" and rng.random() < 0.5:
            left, right = right, left
        text = f"({left}{op}{right})"
    if not 1 <= value <= max_target:
        return None
    return text, value


def make_countdown_problems(
    num: int,
    num_numbers: int = 4,
    max_number: int = 50,
    max_target: int = 1000,
    seed: int = 0,
    prompt_template: str = COUNTDOWN_PROMPT,
) -> list[dict[str, Any]]:
    """``num`` random, solvable countdown problems as prompt items.

    For each problem: ``num_numbers`` integers uniform in ``[1, max_number]``; a random subset
    of at least two of them, in random order, folded left to right with random operators into
    an expression whose intermediate values stay positive integers (``-`` takes the larger
    minus the smaller, ``/`` only when it divides exactly); its value is the ``target`` (drawn
    again until it lies in ``[1, max_target]``). Uses ``random.Random(seed)`` only.

    Args:
      num: how many problems (``≥ 0``).
      num_numbers: numbers per problem (``≥ 2``).
      max_number: the largest number (``≥ 1``).
      max_target: the largest target (``≥ 1``).
      seed: any int; the same arguments give the same problems.
      prompt_template: a ``str.format`` template with ``{numbers}`` (rendered like
        ``[3, 7, 25, 50]``) and ``{target}``.

    Returns:
      a list of dicts ``{"prompt": str, "numbers": list[int], "target": int, "solution": str}``
      (the solution is one fully parenthesised expression reaching the target).
    """
    num = _check_int("num", num, 0)
    num_numbers = _check_int("num_numbers", num_numbers, 2)
    max_number = _check_int("max_number", max_number, 1)
    max_target = _check_int("max_target", max_target, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(prompt_template, str):
        raise TypeError(f"prompt_template must be a str, got {type(prompt_template).__name__}")
    try:
        prompt_template.format(numbers=[1, 2], target=3)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"prompt_template must be a str.format template using only {{numbers}} and "
            f"{{target}}, got {prompt_template!r} ({error!r})"
        ) from error
    rng = random.Random(seed)
    problems = []
    while len(problems) < num:
        numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
        drawn = _random_solution(numbers, rng, max_target)
        if drawn is None:
            continue
        solution, target = drawn
        problems.append(
            {
                "prompt": prompt_template.format(numbers=numbers, target=target),
                "numbers": numbers,
                "target": target,
                "solution": solution,
            }
        )
    return problems


def extract_countdown_expression(text: str) -> str | None:
    """The expression a completion proposes, or ``None`` when there is none.

    The content of the last ``<answer>...</answer>`` if the text has one, else the last
    non-empty line; then anything from the first ``=`` on is dropped and the rest stripped.
    Examples: ``"think...<answer>(25*3)</answer>"`` → ``"(25*3)"``; ``"so\\n25*3 = 75"`` →
    ``"25*3"``; ``""`` → ``None``. The result is not checked here.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        candidate = tagged[-1]
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            return None
        candidate = lines[-1]
    candidate = candidate.split("=", 1)[0].strip()
    return candidate or None


def _walk(node: ast.AST, used: list[int], budget: list[int]) -> Fraction:
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"expression has more than {_MAX_NODES} parts")
    if isinstance(node, ast.Constant):
        if type(node.value) is not int or node.value < 0:
            raise ValueError(f"only non-negative integer numbers are allowed, got {node.value!r}")
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left = _walk(node.left, used, budget)
        right = _walk(node.right, used, budget)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if right == 0:
            raise ValueError("division by zero")
        return left / right
    kind = type(node.op).__name__ if isinstance(node, (ast.BinOp, ast.UnaryOp)) else None
    what = f"the {kind} operator" if kind else type(node).__name__
    raise ValueError(f"{what} is not allowed: only numbers, + - * / and parentheses")


def _parse_and_evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """``(exact value, integer literals in order)`` of an expression; ValueError if refused."""
    if not isinstance(expression, str):
        raise TypeError(f"expression must be a str, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(
            f"expression is {len(expression)} characters long, at most {MAX_EXPRESSION_CHARS}"
        )
    if not expression.strip():
        raise ValueError("expression is empty")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise ValueError(f"expression does not parse: {error}") from None
    used: list[int] = []
    try:
        value = _walk(tree.body, used, [_MAX_NODES])
    except RecursionError:
        raise ValueError("expression is nested too deeply") from None
    return value, used


def _check_numbers(numbers: object) -> list[int]:
    if isinstance(numbers, (str, bytes)) or not isinstance(numbers, Sequence):
        raise TypeError(f"numbers must be a sequence of ints, got {type(numbers).__name__}")
    for i, number in enumerate(numbers):
        if isinstance(number, bool) or not isinstance(number, int):
            raise TypeError(f"numbers[{i}] must be an int, got {type(number).__name__}")
    return list(numbers)


def _overused(used: Sequence[int], numbers: Sequence[int]) -> list[int]:
    return sorted((Counter(used) - Counter(numbers)).elements())


def evaluate_countdown_expression(expression: str, numbers: Sequence[int]) -> Fraction:
    """The exact value of a countdown expression that uses ``numbers`` at most once each.

    ::

        value = expression evaluated over ℚ          (fractions.Fraction, no rounding)
        valid ⇔ grammar ok ∧ Counter(literals used) ≤ Counter(numbers)

    Grammar: non-negative integer literals, binary ``+ - * /``, parentheses; no unary minus,
    no ``**``, ``//``, ``%``, names or calls. Parsed with ``ast.parse`` (never ``eval``);
    more than ``MAX_EXPRESSION_CHARS`` characters or 128 AST nodes is refused before any work
    on them.

    Args:
      expression: e.g. ``"(25*3)"``.
      numbers: the allowed numbers, a multiset (``[5, 5]`` allows two fives).

    Returns:
      the value as a ``Fraction``.

    Raises:
      TypeError: ``expression`` is not a str or ``numbers`` is not a sequence of ints.
      ValueError: anything invalid (syntax, a forbidden construct, a number not available or
        used too often, division by zero, too long); the message says which.
    """
    numbers = _check_numbers(numbers)
    value, used = _parse_and_evaluate(expression)
    overused = _overused(used, numbers)
    if overused:
        raise ValueError(
            f"expression uses {overused} beyond the available numbers {numbers} (each number "
            "at most once)"
        )
    return value


def check_countdown_answer(expression: str | None, numbers: Sequence[int], target: int) -> bool:
    """Whether ``expression`` is a valid countdown answer reaching ``target`` exactly.

    ``True`` iff ``evaluate_countdown_expression(expression, numbers) == target``; ``False`` for
    ``None``, invalid expressions and wrong values (never raises on the expression's content).
    """
    if expression is None:
        return False
    try:
        return evaluate_countdown_expression(expression, numbers) == target
    except ValueError:
        return False


def _problem_fields(rollout: Rollout) -> tuple[list[int], int]:
    if not isinstance(rollout, Rollout):
        raise TypeError(f"rollout must be a Rollout, got {type(rollout).__name__}")
    metadata: Mapping[str, Any] = rollout.metadata or {}
    missing = [key for key in ("numbers", "target") if key not in metadata]
    if missing:
        raise ValueError(
            f"rollout.metadata lacks {missing}; countdown rewards need 'numbers' and 'target' "
            f"(keys present: {sorted(map(str, metadata))})"
        )
    return list(metadata["numbers"]), metadata["target"]


def create_countdown_reward(
    correct_reward: float = 1.0,
    format_reward: float = 0.0,
    use_all_numbers: bool = False,
    extract_fn: Callable[[str], str | None] = extract_countdown_expression,
) -> Callable[[Rollout], float]:
    """Builds the countdown verifier ``reward_fn(rollout) -> float``.

    ::

        e = extract_fn(rollout.generation.text)
        r = correct_reward   if e is valid and evaluates to metadata["target"]
                             (and, with use_all_numbers, uses every number exactly once)
          = format_reward    if e parses as an allowed expression but is not a correct answer
                             (wrong value, numbers not available, numbers left unused)
          = 0.0              otherwise (no expression, forbidden syntax, division by zero)

    ``format_reward`` is the partial credit for a well-formed answer (TinyZero, Pan et al.
    2025, uses 0.1); the default 0.0 gives the plain binary verifier.

    Args:
      correct_reward / format_reward: the two reward levels.
      use_all_numbers: require every given number to be used exactly once.
      extract_fn: ``fn(completion_text) -> expression | None``.

    Returns:
      ``reward_fn(rollout)``, reading ``rollout.metadata["numbers"]`` and ``["target"]``
      (it raises ValueError naming the missing keys).
    """
    for name, value in (("correct_reward", correct_reward), ("format_reward", format_reward)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not isinstance(use_all_numbers, bool):
        raise TypeError(f"use_all_numbers must be a bool, got {type(use_all_numbers).__name__}")
    if not callable(extract_fn):
        raise TypeError(f"extract_fn must be callable, got {type(extract_fn).__name__}")
    correct_reward, format_reward = float(correct_reward), float(format_reward)

    def reward_fn(rollout: Rollout) -> float:
        """The countdown verifier reward of one rollout."""
        numbers, target = _problem_fields(rollout)
        expression = extract_fn(rollout.generation.text)
        if expression is None:
            return 0.0
        try:
            value, used = _parse_and_evaluate(expression)
        except ValueError:
            return 0.0
        if _overused(used, numbers) or value != target:
            return format_reward
        if use_all_numbers and sorted(used) != sorted(numbers):
            return format_reward
        return correct_reward

    return reward_fn


def countdown_reward(rollout: Rollout) -> float:
    """The binary countdown verifier: 1.0 for a valid expression reaching the target, else 0.0.

    ::

        r = 1.0 if check_countdown_answer(extract_countdown_expression(text), numbers, target)
        r = 0.0 otherwise

    The same as ``create_countdown_reward()`` with its defaults (each number at most once, no
    format credit). Reads ``rollout.metadata["numbers"]`` and ``["target"]``.
    """
    numbers, target = _problem_fields(rollout)
    expression = extract_countdown_expression(rollout.generation.text)
    return 1.0 if check_countdown_answer(expression, numbers, target) else 0.0
