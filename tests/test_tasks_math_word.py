"""Tests for rlprim.tasks.math_word: answer extraction, the numeric fallback, the reward."""

from __future__ import annotations

import importlib.util
import sys
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlprim.tasks.math_word import (
    MATH_PROMPT,
    create_math_answer_reward,
    extract_boxed_answer,
    extract_hash_answer,
    extract_last_number,
    extract_math_answer,
    make_math_prompt_items,
    math_answer_reward,
    math_answers_equal,
    parse_number,
)
from rlprim.types import Generation, Rollout

HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None


def _rollout(text: str, answer: object) -> Rollout:
    return Rollout(prompt="q", generation=Generation(text=text), metadata={"answer": answer})


# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("#### 1,000\nsome trailing text", "1,000"),
        ("a #### 3 then #### 4 ", "4"),
        ("no marker 72", None),
        ("####   ", None),
    ],
)
def test_extract_hash_answer(text, expected):
    assert extract_hash_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is \\boxed{72}.", "72"),
        ("\\boxed{\\frac{1}{2}} and later \\boxed{ 3 }", "3"),
        ("nested \\boxed{\\text{a}{b}}", "\\text{a}{b}"),
        ("\\fbox{5}", "5"),
        ("unclosed \\boxed{12", None),
        ("empty \\boxed{} then nothing", None),
        ("no box", None),
    ],
)
def test_extract_boxed_answer(text, expected):
    assert extract_boxed_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I have 3 apples and 12.5 pears.", "12.5"),
        ("It costs $1,234.50 in total.", "$1,234.50"),
        ("3 apples, 4 pears", "4"),
        ("the change is -7 degrees", "-7"),
        ("ratio 3/4", "3/4"),
        ("no digits", None),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_extract_math_answer_priority():
    assert extract_math_answer("first 5 then \\boxed{7} then 9") == "7"
    assert extract_math_answer("first 5 #### 8\n then 9") == "8"
    assert extract_math_answer("first 5 then 9.") == "9"
    assert extract_math_answer("nothing") is None


# ------------------------------------------------------------------ parse_number (fallback)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("72", Fraction(72)),
        (" 72. ", Fraction(72)),
        ("$18.00", Fraction(18)),
        ("\\$5", Fraction(5)),
        ("1,234,567", Fraction(1234567)),
        ("1,234.5", Fraction(2469, 2)),
        ("-3", Fraction(-3)),
        ("+4", Fraction(4)),
        (".5", Fraction(1, 2)),
        ("0.50", Fraction(1, 2)),
        ("3/4", Fraction(3, 4)),
        ("-3/4", Fraction(-3, 4)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("\\dfrac{10}{4}", Fraction(5, 2)),
        ("-\\frac{1}{2}", Fraction(-1, 2)),
        ("\\frac34", Fraction(3, 4)),
        ("50%", Fraction(50)),
        ("\\text{7}", Fraction(7)),
        ("1{,}000", Fraction(1000)),
    ],
)
def test_parse_number_hand_cases(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    "text", ["", "abc", "1,2", "12,34", "1/0", "3/x", "x^2", "1.2.3", "--3", "1" * 101]
)
def test_parse_number_rejects(text):
    assert parse_number(text) is None


@given(
    st.integers(-(10**9), 10**9),
    st.integers(0, 4),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_parse_number_formats_match_reference(value, decimals, commas, dollar, period):
    # Independent reference formatting: the value scaled by 10**-decimals, written by hand.
    sign = "-" if value < 0 else ""
    digits = str(abs(value)).rjust(decimals + 1, "0")
    whole, fraction = digits[: len(digits) - decimals], digits[len(digits) - decimals :]
    if commas:
        groups = []
        while len(whole) > 3:
            groups.insert(0, whole[-3:])
            whole = whole[:-3]
        whole = ",".join([whole, *groups])
    text = sign + ("$" if dollar else "") + whole + ("." + fraction if decimals else "")
    text += "." if period else ""
    assert parse_number(text) == Fraction(value, 10**decimals)


@given(st.fractions(max_denominator=1000))
def test_parse_number_fractions_match_reference(value):
    text = f"{value.numerator}/{value.denominator}"
    latex = ("-" if value < 0 else "") + f"\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"
    assert parse_number(text) == value
    assert parse_number(latex) == value


# ------------------------------------------------------------------ math_answers_equal


@pytest.mark.parametrize(
    ("predicted", "expected", "equal"),
    [
        ("72", "72", True),
        ("72.0", "72", True),
        ("$72.00.", "72", True),
        ("1,000", "1000", True),
        ("0.5", "\\frac{1}{2}", True),
        ("1/2", "0.5", True),
        ("0.3333", "1/3", False),
        ("73", "72", False),
        ("Paris", " paris ", True),
        ("\\text{yes}", "Yes", True),
        (None, "72", False),
    ],
)
def test_math_answers_equal_fallback(predicted, expected, equal):
    assert math_answers_equal(predicted, expected, use_math_verify=False) is equal


def test_without_math_verify_auto_uses_fallback_and_true_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # `import math_verify` now fails
    assert math_answers_equal("0.5", "1/2") is True
    assert math_answers_equal("3", "4") is False
    with pytest.raises(ImportError, match="math-verify"):
        math_answers_equal("1", "1", use_math_verify=True)
    assert math_answers_equal("\\sqrt{4}", "2") is False  # the fallback reads no LaTeX


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math-verify is in the dev extra")
@pytest.mark.parametrize(
    "predicted, expected, symbolic, fallback",
    [
        ("(x+1)^2", "x^2+2x+1", True, False),
        ("\\sqrt{4}", "2", True, False),
        ("\\{1,2\\}", "\\{2,1\\}", True, False),
        ("$\\frac{1}{2}$", "0.5", True, True),
        ("3", "4", False, False),
        ("Paris", " paris ", True, True),  # math_verify finds nothing: the fallback decides
    ],
)
def test_math_verify_decides_symbolic_equality(predicted, expected, symbolic, fallback):
    assert math_answers_equal(predicted, expected, use_math_verify=True) is symbolic
    assert math_answers_equal(predicted, expected) is symbolic  # auto: installed, so used
    assert math_answers_equal(predicted, expected, use_math_verify=False) is fallback


def test_math_answers_equal_argument_errors():
    with pytest.raises(TypeError, match="expected"):
        math_answers_equal("1", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="predicted"):
        math_answers_equal(1, "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="use_math_verify"):
        math_answers_equal("1", "1", use_math_verify="yes")  # type: ignore[arg-type]


# ------------------------------------------------------------------ rewards


def test_math_answer_reward_hand_cases():
    solution = "She has 3 + 4 = 7 apples.\n#### 7"
    assert math_answer_reward(_rollout("3 and 4 make 7.", solution)) == 1.0
    assert math_answer_reward(_rollout("The answer is \\boxed{7}", "7")) == 1.0
    assert math_answer_reward(_rollout("#### 7.00", 7)) == 1.0
    assert math_answer_reward(_rollout("I think 8", solution)) == 0.0
    assert math_answer_reward(_rollout("no idea", solution)) == 0.0
    with pytest.raises(ValueError, match="answer"):
        math_answer_reward(Rollout(prompt="q", generation=Generation(text="1"), metadata={}))


def test_create_math_answer_reward_options():
    reward_fn = create_math_answer_reward(
        answer_key="gold",
        extract_fn=lambda text: text.split("ANSWER:")[-1],
        use_math_verify=False,
        reward=2.0,
        penalty=-1.0,
    )
    rollout = Rollout(
        prompt="q", generation=Generation(text="12 then ANSWER: 1/4"), metadata={"gold": "0.25"}
    )
    assert reward_fn(rollout) == 2.0
    wrong = rollout._replace(generation=Generation(text="ANSWER: 0.2"))
    assert reward_fn(wrong) == -1.0
    with pytest.raises(TypeError, match="extract_fn"):
        create_math_answer_reward(extract_fn=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="reward"):
        create_math_answer_reward(reward="1")  # type: ignore[arg-type]


def test_make_math_prompt_items():
    records = [
        {"question": "What is 2+2?", "answer": "2+2=4\n#### 4"},
        {"question": "Half of 3?", "answer": "1.5"},
    ]
    items = make_math_prompt_items(records)
    assert items == [
        {"prompt": MATH_PROMPT.format(question="What is 2+2?"), "answer": "4",
         "solution": "2+2=4\n#### 4"},
        {"prompt": MATH_PROMPT.format(question="Half of 3?"), "answer": "1.5", "solution": "1.5"},
    ]
    custom = make_math_prompt_items(
        [{"q": "x?", "a": "#### 9"}], question_key="q", answer_key="a", prompt_template="Q: {question}"
    )
    assert custom == [{"prompt": "Q: x?", "answer": "9", "solution": "#### 9"}]
    with pytest.raises(ValueError, match="question"):
        make_math_prompt_items([{"answer": "1"}])
    with pytest.raises(ValueError, match="prompt_template"):
        make_math_prompt_items(records, prompt_template="no field")
    with pytest.raises(TypeError, match="records"):
        make_math_prompt_items("text")  # type: ignore[arg-type]
