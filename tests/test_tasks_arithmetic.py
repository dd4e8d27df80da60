"""Tests for rlprim.tasks.arithmetic: problems, the held-out split, the reward, the evaluation."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rlprim.tasks.arithmetic import (
    ARITH_TINY_SPLIT,
    ARITHMETIC_OPERATORS,
    arithmetic_problem_count,
    arithmetic_reward,
    arithmetic_split,
    create_arithmetic_eval_fn,
    evaluate_arithmetic,
    make_arithmetic_problems,
    parse_leading_integer,
)
from rlprim.testing import tiny_model, tiny_tokenizer
from rlprim.types import Generation, GenerationConfig, Rollout, TrainingState

_PROBLEM = re.compile(r"^(0|[1-9][0-9]*)([-+*])(0|[1-9][0-9]*)=$")


def _reference_answer(prompt: str) -> str:
    """Independent reference: parse the prompt and compute with Python ints."""
    match = _PROBLEM.match(prompt)
    assert match, prompt
    left, op, right = int(match.group(1)), match.group(2), int(match.group(3))
    if op == "+":
        return str(left + right)
    if op == "-":
        return str(left - right)
    return str(left * right)


def _rollout(text: str, answer: object) -> Rollout:
    return Rollout(prompt="1+1=", generation=Generation(text=text), metadata={"answer": answer})


# ------------------------------------------------------------------ problems


def test_problem_count_hand_values():
    assert arithmetic_problem_count() == 10_000
    assert arithmetic_problem_count(1, ("+", "-", "*")) == 300
    assert arithmetic_problem_count(3, ("*",)) == 1_000_000


def test_make_problems_pinned_values():
    # Pinned so the bundled model's split cannot change silently.
    assert make_arithmetic_problems(3, seed=0) == [
        {"prompt": "97+70=", "answer": "167"},
        {"prompt": "36+31=", "answer": "67"},
        {"prompt": "70+59=", "answer": "129"},
    ]


def test_make_problems_enumerates_the_whole_space():
    problems = make_arithmetic_problems(300, digits=1, operators=("+", "-", "*"), seed=5)
    expected = {f"{a}{op}{b}=" for op in "+-*" for a in range(10) for b in range(10)}
    assert {p["prompt"] for p in problems} == expected
    assert len(problems) == 300
    assert {"prompt": "3-7=", "answer": "-4"} in problems
    assert {"prompt": "9*9=", "answer": "81"} in problems


@given(
    st.integers(0, 400),
    st.integers(1, 3),
    st.sets(st.sampled_from(ARITHMETIC_OPERATORS), min_size=1),
    st.integers(-(2**40), 2**40),
)
def test_make_problems_properties(num, digits, operators, seed):
    operators = tuple(sorted(operators))
    num = min(num, arithmetic_problem_count(digits, operators))
    problems = make_arithmetic_problems(num, digits, operators, seed)
    assert len(problems) == num
    assert len({p["prompt"] for p in problems}) == num  # distinct
    for problem in problems:
        match = _PROBLEM.match(problem["prompt"])
        assert match and match.group(2) in operators
        assert int(match.group(1)) < 10**digits and int(match.group(3)) < 10**digits
        assert problem["answer"] == _reference_answer(problem["prompt"])
    assert problems == make_arithmetic_problems(num, digits, operators, seed)


@given(st.integers(0, 300), st.integers(0, 300), st.sampled_from([1, 2, 4]), st.integers(0, 50))
def test_make_problems_draws_are_prefixes_of_one_ordering(a, b, digits, seed):
    # Holds on both sides of the shuffle limit (digits 1-2 shuffle, 4 draws with rejection).
    a, b = sorted(min(n, arithmetic_problem_count(digits)) for n in (a, b))
    assert make_arithmetic_problems(b, digits, ("+",), seed)[:a] == make_arithmetic_problems(
        a, digits, ("+",), seed
    )


def test_arith_tiny_split_held_out_sets_are_nested_and_unseen():
    train, held_out = arithmetic_split(**ARITH_TINY_SPLIT)
    assert (len(train), len(held_out)) == (5000, 500)
    demo_train, demo_held_out = arithmetic_split(2000, 200, seed=ARITH_TINY_SPLIT["seed"])
    assert demo_held_out == held_out[:200]
    assert not {p["prompt"] for p in demo_held_out} & {p["prompt"] for p in train}
    with pytest.raises(TypeError):
        ARITH_TINY_SPLIT["seed"] = 1  # type: ignore[index]


def test_make_problems_seeds_differ_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a = make_arithmetic_problems(50, seed=1)
    b = make_arithmetic_problems(50, seed=2)
    assert a != b
    assert torch.equal(state, torch.random.get_rng_state())


def test_make_problems_errors():
    with pytest.raises(ValueError, match="num must be <= 100"):
        make_arithmetic_problems(101, digits=1)
    with pytest.raises(ValueError, match="operators"):
        make_arithmetic_problems(1, operators=("/",))
    with pytest.raises(ValueError, match="operators"):
        make_arithmetic_problems(1, operators=("+", "+"))
    with pytest.raises(TypeError, match="operators"):
        make_arithmetic_problems(1, operators="+")
    with pytest.raises(ValueError, match="digits"):
        make_arithmetic_problems(1, digits=0)
    with pytest.raises(TypeError, match="seed"):
        make_arithmetic_problems(1, seed="0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num"):
        make_arithmetic_problems(-1)


# ------------------------------------------------------------------ split


@given(st.integers(0, 300), st.integers(0, 300), st.integers(0, 1000))
def test_split_is_disjoint_and_a_prefix_of_the_draw(num_train, num_eval, seed):
    train, held_out = arithmetic_split(num_train, num_eval, digits=2, seed=seed)
    assert len(train) == num_train and len(held_out) == num_eval
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in held_out}
    assert held_out + train == make_arithmetic_problems(num_train + num_eval, seed=seed)


def test_split_errors():
    with pytest.raises(ValueError, match="num must be <= 100"):
        arithmetic_split(60, 41, digits=1)
    with pytest.raises(TypeError, match="num_eval"):
        arithmetic_split(1, 1.5)  # type: ignore[arg-type]


# ------------------------------------------------------------------ reward


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("85", "85"),
        (" 85\n12", "85"),
        ("\t85 and more", "85"),
        ("-7+1", "-7"),
        ("085", "085"),
        ("851", "851"),
        ("+85", None),
        ("x85", None),
        ("", None),
        ("\n85", None),
        ("- 5", None),
    ],
)
def test_parse_leading_integer_hand_cases(text, parsed):
    assert parse_leading_integer(text) == parsed


@given(st.integers(-(10**12), 10**12), st.text(max_size=20))
def test_parse_leading_integer_reads_any_integer_prefix(value, suffix):
    if suffix[:1].isdigit() or (suffix[:1] and not suffix[0].isascii()):
        suffix = "=" + suffix  # reference: the integer ends where a non-digit begins
    assert parse_leading_integer(f"{value}{suffix}") == str(value)


@pytest.mark.parametrize(
    ("text", "answer", "reward"),
    [
        ("85", "85", 1.0),
        ("85", 85, 1.0),
        ("85 ", " 85 ", 1.0),
        ("85\n99", "85", 1.0),
        ("84", "85", 0.0),
        ("851", "85", 0.0),
        ("085", "85", 0.0),
        ("+85", "85", 0.0),
        ("", "85", 0.0),
        ("-44", "-44", 1.0),
        ("44", "-44", 0.0),
    ],
)
def test_arithmetic_reward_hand_cases(text, answer, reward):
    assert arithmetic_reward(_rollout(text, answer)) == reward


def test_arithmetic_reward_errors():
    with pytest.raises(ValueError, match="answer"):
        arithmetic_reward(Rollout(prompt="1+1=", generation=Generation(text="2"), metadata={}))
    with pytest.raises(TypeError, match="rollout"):
        arithmetic_reward("2")  # type: ignore[arg-type]


# ------------------------------------------------------------------ evaluation


def _scripted_generator(answers_by_prompt, seen_configs):
    """A real generator function (the ``generator`` extension point) answering from a table."""

    def generator(model, tokenizer, prompts, config):
        seen_configs.append(config)
        return [Generation(text=answers_by_prompt[p], finish_reason="stop") for p in prompts]

    return generator


def test_evaluate_arithmetic_with_scripted_generator():
    problems = [
        {"prompt": "1+1=", "answer": "2"},
        {"prompt": "2+2=", "answer": "4"},
        {"prompt": "9+9=", "answer": "18"},
        {"prompt": "5+5=", "answer": "10"},
    ]
    answers = {"1+1=": "2", "2+2=": "5", "9+9=": "18\n3+3=6", "5+5=": "100"}
    configs: list[GenerationConfig] = []
    generator = _scripted_generator(answers, configs)
    accuracy = evaluate_arithmetic(None, tiny_tokenizer(), problems, 2, None, generator)
    assert accuracy == 0.5
    [config] = configs
    assert config.do_sample is False and config.num_samples == 1
    assert config.max_new_tokens == 4  # longest answer (2) + 2
    assert config.batch_size == 2
    evaluate_arithmetic(None, tiny_tokenizer(), problems, max_new_tokens=7, generator=generator)
    assert configs[-1].max_new_tokens == 7


def test_evaluate_arithmetic_and_eval_fn_run_a_real_model_through_hf_generator():
    # Exactness against an independent greedy loop is tested on the bundled model
    # (tests/test_bundled_model.py); here the default generator path and the eval_fn wiring.
    model, tokenizer = tiny_model("qwen2", seed=3), tiny_tokenizer()
    problems = make_arithmetic_problems(6, digits=1, seed=0)
    accuracy = evaluate_arithmetic(model, tokenizer, problems, batch_size=4, max_new_tokens=3)
    assert 0.0 <= accuracy <= 1.0 and accuracy * 6 == round(accuracy * 6)
    eval_fn = create_arithmetic_eval_fn(problems, batch_size=4, max_new_tokens=3)
    state = TrainingState(policy=model, tokenizer=tokenizer, optimizer=None)
    assert eval_fn(state) == {"heldout_accuracy": accuracy}


def test_create_arithmetic_eval_fn_uses_generator_and_metric_name():
    problems = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    configs: list[GenerationConfig] = []
    generator = _scripted_generator({"1+1=": "2", "2+2=": "4"}, configs)
    eval_fn = create_arithmetic_eval_fn(problems, generator=generator, metric_name="acc")
    state = TrainingState(policy=object(), tokenizer=tiny_tokenizer(), optimizer=None)
    assert eval_fn(state) == {"acc": 1.0}
    with pytest.raises(ValueError, match="metric_name"):
        create_arithmetic_eval_fn(problems, metric_name="")


def test_evaluate_arithmetic_errors():
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="problems"):
        evaluate_arithmetic(None, tokenizer, [])
    with pytest.raises(ValueError, match=r"problems\[0\]"):
        evaluate_arithmetic(None, tokenizer, [{"prompt": "1+1="}])
    with pytest.raises(TypeError, match="problems"):
        evaluate_arithmetic(None, tokenizer, "1+1=")
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_arithmetic(None, tokenizer, [{"prompt": "1+1=", "answer": "2"}], batch_size=0)
