"""Tests for rlprim.tasks.countdown: problems, expression extraction, the exact verifier."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlprim.tasks.countdown import (
    COUNTDOWN_PROMPT,
    MAX_EXPRESSION_CHARS,
    check_countdown_answer,
    countdown_reward,
    create_countdown_reward,
    evaluate_countdown_expression,
    extract_countdown_expression,
    make_countdown_problems,
)
from rlprim.types import Generation, Rollout


def _rollout(text: str, numbers: list[int], target: int) -> Rollout:
    return Rollout(
        prompt="p", generation=Generation(text=text), metadata={"numbers": numbers, "target": target}
    )


# ------------------------------------------------------------------ evaluate_countdown_expression


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("25*3", Fraction(75)),
        ("(50 - 25) * 3", Fraction(75)),
        ("50/3", Fraction(50, 3)),
        ("(1/3)*3", Fraction(1)),
        ("7-25", Fraction(-18)),
        ("((((3))))", Fraction(3)),
    ],
)
def test_evaluate_hand_cases(expression, expected):
    value = evaluate_countdown_expression(expression, [3, 7, 25, 50, 1, 3])
    assert value == expected and isinstance(value, Fraction)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("25*25", "beyond the available numbers"),  # 25 used twice, given once
        ("4+3", "beyond the available numbers"),  # 4 is not given
        ("3**2", "Pow operator"),
        ("3//1", "FloorDiv operator"),
        ("-3+25", "USub operator"),
        ("__import__('os').system('echo hi')", "Call"),
        ("x + 3", "Name"),
        ("3.5 + 1", "non-negative integer"),
        ("True + 3", "non-negative integer"),
        ("'a' * 3", "non-negative integer"),
        ("3 / (25 - 25)", "beyond|division by zero"),
        ("", "empty"),
        ("3 +", "does not parse"),
        ("1" * (MAX_EXPRESSION_CHARS + 1), "characters long"),
    ],
)
def test_evaluate_refuses(expression, message):
    with pytest.raises(ValueError, match=message):
        evaluate_countdown_expression(expression, [3, 7, 25, 50])


def test_evaluate_multiset_allows_repeated_numbers_given_twice():
    assert evaluate_countdown_expression("5*5", [5, 5]) == 25
    with pytest.raises(ValueError, match="beyond"):
        evaluate_countdown_expression("5*5*5", [5, 5])


def test_evaluate_division_by_zero_with_available_numbers():
    with pytest.raises(ValueError, match="division by zero"):
        evaluate_countdown_expression("3/(7-7)", [3, 7, 7])


def test_evaluate_hostile_inputs_are_refused_quickly():
    # Deep nesting within the length limit, a huge product, and a too-long flood.
    deep = "(" * 99 + "1" + ")" * 99
    assert evaluate_countdown_expression(deep, [1]) == 1
    big = "*".join(["99"] * 60)  # 179 characters, 119 nodes, about 10**120, exact
    assert evaluate_countdown_expression(big, [99] * 60) == 99**60
    with pytest.raises(ValueError):
        evaluate_countdown_expression("(" * 5000 + "1" + ")" * 5000, [1])
    with pytest.raises(ValueError):
        evaluate_countdown_expression("1+" * 64 + "1", [1] * 65)  # 129 nodes > 128


def test_evaluate_bad_argument_types():
    with pytest.raises(TypeError, match="expression"):
        evaluate_countdown_expression(3, [3])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="numbers"):
        evaluate_countdown_expression("3", "3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"numbers\[0\]"):
        evaluate_countdown_expression("3", [3.0])  # type: ignore[list-item]


def _random_expression(rng: random.Random, numbers: list[int]) -> tuple[str, Fraction | None]:
    """Independent reference: a random expression over the numbers and its value by recursion
    on the tree (None when a division by zero occurs)."""
    if len(numbers) == 1:
        return str(numbers[0]), Fraction(numbers[0])
    split = rng.randint(1, len(numbers) - 1)
    left_text, left = _random_expression(rng, numbers[:split])
    right_text, right = _random_expression(rng, numbers[split:])
    op = rng.choice("+-*/")
    if left is None or right is None:
        value = None
    elif op == "+":
        value = left + right
    elif op == "-":
        value = left - right
    elif op == "*":
        value = left * right
    else:
        value = None if right == 0 else left / right
    return f"({left_text}{op}{right_text})", value


@given(st.lists(st.integers(0, 60), min_size=1, max_size=6), st.integers(0, 2**32))
def test_evaluate_matches_reference_tree(numbers, seed):
    text, value = _random_expression(random.Random(seed), numbers)
    if value is None:
        with pytest.raises(ValueError, match="division by zero"):
            evaluate_countdown_expression(text, numbers)
    else:
        assert evaluate_countdown_expression(text, numbers) == value
        assert check_countdown_answer(text, numbers, value) is True
        assert check_countdown_answer(text, numbers, value + 1) is False


@given(st.text(max_size=300), st.lists(st.integers(0, 100), max_size=5))
def test_check_never_raises_on_any_text(text, numbers):
    assert check_countdown_answer(text, numbers, 24) in (True, False)


# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<answer>(25*3)</answer>", "(25*3)"),
        ("think <answer>1+2</answer> then <answer> 25*3 </answer>", "25*3"),
        ("so\n25*3 = 75\n", "25*3"),
        ("25*3", "25*3"),
        ("", None),
        ("  \n \n", None),
        ("<answer>= 75</answer>", None),
    ],
)
def test_extract_hand_cases(text, expected):
    assert extract_countdown_expression(text) == expected


# ------------------------------------------------------------------ rewards


def test_countdown_reward_hand_cases():
    numbers, target = [3, 7, 25, 50], 75
    assert countdown_reward(_rollout("<answer>25*3</answer>", numbers, target)) == 1.0
    assert countdown_reward(_rollout("<answer>(50+25)</answer>", numbers, target)) == 1.0
    assert countdown_reward(_rollout("<answer>25*3*1</answer>", numbers, target)) == 0.0  # no 1
    assert countdown_reward(_rollout("<answer>25+25+25</answer>", numbers, target)) == 0.0
    assert countdown_reward(_rollout("<answer>50+7</answer>", numbers, target)) == 0.0
    assert countdown_reward(_rollout("no answer here", numbers, target)) == 0.0
    assert countdown_reward(_rollout("<answer>open('/etc/passwd')</answer>", numbers, 75)) == 0.0


def test_create_countdown_reward_format_credit_and_use_all():
    numbers, target = [3, 7, 25, 50], 75
    reward_fn = create_countdown_reward(correct_reward=1.0, format_reward=0.1)
    assert reward_fn(_rollout("<answer>25*3</answer>", numbers, target)) == 1.0
    assert reward_fn(_rollout("<answer>50+7</answer>", numbers, target)) == 0.1  # wrong value
    assert reward_fn(_rollout("<answer>25*25</answer>", numbers, target)) == 0.1  # reused
    assert reward_fn(_rollout("<answer>3**2</answer>", numbers, target)) == 0.0  # forbidden
    assert reward_fn(_rollout("nothing", numbers, target)) == 0.0
    strict = create_countdown_reward(format_reward=0.1, use_all_numbers=True)
    assert strict(_rollout("<answer>25*3</answer>", numbers, target)) == 0.1  # 7, 50 unused
    assert strict(_rollout("<answer>(50+25)*(7-3)/4</answer>", numbers, 75)) == 0.1  # 4 not given
    assert strict(_rollout("<answer>(50-25)*3+7-7</answer>", [3, 7, 7, 25, 50], 75)) == 1.0


def test_custom_extract_fn_is_used():
    reward_fn = create_countdown_reward(extract_fn=lambda text: text.split("ANSWER:")[-1])
    assert reward_fn(_rollout("work ANSWER: 25*3", [3, 25], 75)) == 1.0
    assert countdown_reward(_rollout("work ANSWER: 25*3", [3, 25], 75)) == 0.0


def test_reward_errors():
    with pytest.raises(ValueError, match="target"):
        countdown_reward(Rollout(prompt="p", generation=Generation(text="1"), metadata={"numbers": [1]}))
    with pytest.raises(TypeError, match="rollout"):
        countdown_reward("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="format_reward"):
        create_countdown_reward(format_reward="0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="extract_fn"):
        create_countdown_reward(extract_fn=3)  # type: ignore[arg-type]


# ------------------------------------------------------------------ problems


def test_make_countdown_problems_are_solvable_and_deterministic():
    problems = make_countdown_problems(50, num_numbers=4, max_number=30, max_target=500, seed=3)
    assert problems == make_countdown_problems(50, 4, 30, 500, seed=3)
    assert problems != make_countdown_problems(50, 4, 30, 500, seed=4)
    for problem in problems:
        assert set(problem) == {"prompt", "numbers", "target", "solution"}
        assert len(problem["numbers"]) == 4
        assert all(1 <= n <= 30 for n in problem["numbers"])
        assert 1 <= problem["target"] <= 500
        assert evaluate_countdown_expression(problem["solution"], problem["numbers"]) == (
            problem["target"]
        )
        assert problem["prompt"] == COUNTDOWN_PROMPT.format(
            numbers=problem["numbers"], target=problem["target"]
        )
        rollout = _rollout(f"<answer>{problem['solution']}</answer>", problem["numbers"],
                           problem["target"])
        assert countdown_reward(rollout) == 1.0


def test_make_countdown_problems_template_and_errors():
    [problem] = make_countdown_problems(1, prompt_template="{numbers}->{target}", seed=0)
    assert problem["prompt"] == f"{problem['numbers']}->{problem['target']}"
    assert make_countdown_problems(0) == []
    with pytest.raises(ValueError, match="num_numbers"):
        make_countdown_problems(1, num_numbers=1)
    with pytest.raises(ValueError, match="prompt_template"):
        make_countdown_problems(1, prompt_template="{question}")
    with pytest.raises(TypeError, match="seed"):
        make_countdown_problems(1, seed=1.5)  # type: ignore[arg-type]
