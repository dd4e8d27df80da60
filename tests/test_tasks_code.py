"""Tests for rlprim.tasks.code: code extraction, the test harness and the sandboxed reward."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlprim.tasks.code import (
    CODE_PROBLEMS,
    CODE_PROMPT,
    build_test_program,
    code_reward,
    create_code_reward,
    extract_code,
    make_code_problems,
    run_unit_tests,
)
from rlprim.types import Generation, Rollout

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-4, 4) == 0", "assert add(2, 2) == 5"]


def _rollout(text: str, tests: list[str]) -> Rollout:
    return Rollout(prompt="p", generation=Generation(text=text), metadata={"tests": tests})


def _plain_python(program: str) -> str:
    """An alternative executor (no sandbox): the ``tool`` extension point."""
    completed = subprocess.run(
        [sys.executable, "-I", "-c", program], capture_output=True, text=True, timeout=30
    )
    return completed.stdout


# ------------------------------------------------------------------ extract_code


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
        ("```py\nx = 1\n```\n```python\ny = 2\n```", "y = 2\n"),
        ("```\nz = 3\n```", "z = 3\n"),
        ("def g(): return 2", "def g(): return 2"),
    ],
)
def test_extract_code(text, expected):
    assert extract_code(text) == expected


# ------------------------------------------------------------------ harness (fast, plain python)


def test_build_test_program_counts_each_test():
    program = build_test_program("def add(a, b):\n    return a + b\n", ADD_TESTS, "MARK")
    output = _plain_python(program)
    assert output.splitlines() == ["MARK pass 0", "MARK pass 1", "MARK fail 2"]


def test_build_test_program_hides_solution_output_and_survives_hostile_quoting():
    code = 'print("MARK pass 2")\n"""\'\'\'\ndef add(a, b):\n    return a - b\n'
    # The solution's print is discarded; a stray triple quote cannot break the harness.
    output = _plain_python(build_test_program(code, ADD_TESTS, "MARK"))
    assert output.splitlines() == ["MARK fail 0", "MARK fail 1", "MARK fail 2"]


def test_build_test_program_errors():
    with pytest.raises(ValueError, match="marker"):
        build_test_program("x = 1", ["assert x"], "two words")
    with pytest.raises(ValueError, match="tests"):
        build_test_program("x = 1", [], "M")
    with pytest.raises(TypeError, match="tests"):
        build_test_program("x = 1", "assert x", "M")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="code"):
        build_test_program(None, ["assert x"], "M")  # type: ignore[arg-type]


@given(st.lists(st.booleans(), min_size=1, max_size=8))
def test_run_unit_tests_counts_match_reference(outcomes):
    # Reference: test i passes iff outcomes[i]; counted by the test itself.
    tests = [f"assert {flag}" for flag in outcomes]
    passed, total = run_unit_tests("", tests, tool=lambda program: _fast_exec(program))
    assert (passed, total) == (sum(outcomes), len(outcomes))


def _fast_exec(program: str) -> str:
    """Runs the harness in this process with stdout captured (pure-Python harness, trusted
    test input only) — keeps the hypothesis test fast."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(compile(program, "<harness>", "exec"), {"__name__": "__main__"})
    return buffer.getvalue()


def test_run_unit_tests_ignores_forged_report_lines_with_another_marker():
    def forging_tool(program: str) -> str:
        return "rlprim-test-0000 pass 0\nrlprim-test-0000 pass 1\n" + _plain_python(program)

    assert run_unit_tests("def add(a, b):\n    return -1\n", ADD_TESTS, tool=forging_tool) == (0, 3)


def test_run_unit_tests_tool_must_return_text():
    with pytest.raises(TypeError, match="str"):
        run_unit_tests("x = 1", ["assert x"], tool=lambda program: 3)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the sandboxed reward


def test_code_reward_passing_failing_and_broken_code():
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    assert code_reward(_rollout(good, ADD_TESTS)) == pytest.approx(2 / 3)
    assert code_reward(_rollout(good, ADD_TESTS[:2])) == 1.0
    assert code_reward(_rollout("def add(a, b) return a", ADD_TESTS)) == 0.0  # syntax error
    assert code_reward(_rollout("import sys\nsys.exit(0)", ADD_TESTS)) == 0.0
    flood = "def add(a, b):\n    print('x' * 100000)\n    return a + b\n"
    assert code_reward(_rollout(flood, ADD_TESTS)) == pytest.approx(2 / 3)


def test_code_reward_hanging_code_times_out_and_keeps_earlier_passes():
    code = "def add(a, b):\n    while a == 2:\n        pass\n    return a + b\n"
    tests = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 0"]
    reward_fn = create_code_reward(timeout=1.0)
    start = time.monotonic()
    assert reward_fn(_rollout(code, tests)) == pytest.approx(1 / 3)
    assert time.monotonic() - start < 10


def test_create_code_reward_custom_extract_fn_and_tool():
    reward_fn = create_code_reward(
        extract_fn=lambda text: text.split("CODE:")[-1], tool=_plain_python
    )
    assert reward_fn(_rollout("CODE:def add(a, b):\n    return a + b", ADD_TESTS)) == (
        pytest.approx(2 / 3)
    )
    with pytest.raises(ValueError, match="tests"):
        reward_fn(Rollout(prompt="p", generation=Generation(text="x"), metadata={}))
    with pytest.raises(TypeError, match="extract_fn"):
        create_code_reward(extract_fn=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tool"):
        create_code_reward(tool="python")  # type: ignore[arg-type]


# ------------------------------------------------------------------ problems


def test_make_code_problems_and_reference_solutions_pass():
    items = make_code_problems()
    assert len(items) == len(CODE_PROBLEMS) == 8
    assert items[0]["prompt"] == CODE_PROMPT.format(description=CODE_PROBLEMS[0][0])
    solutions = [
        "def add(a, b):\n    return a + b",
        "def is_even(n):\n    return n % 2 == 0",
        "def reverse_string(s):\n    return s[::-1]",
        "def factorial(n):\n    return 1 if n == 0 else n * factorial(n - 1)",
        "def count_vowels(s):\n    return sum(c in 'aeiouAEIOU' for c in s)",
        "def is_palindrome(s):\n    return s == s[::-1]",
        "def max_of_list(xs):\n    best = xs[0]\n    for x in xs:\n        best = x if x > best "
        "else best\n    return best",
        "def fizzbuzz(n):\n    return 'FizzBuzz' if n % 15 == 0 else 'Fizz' if n % 3 == 0 else "
        "'Buzz' if n % 5 == 0 else str(n)",
    ]
    for item, solution in zip(items, solutions, strict=True):
        assert run_unit_tests(solution, item["tests"], tool=_plain_python) == (
            len(item["tests"]),
            len(item["tests"]),
        )
    assert run_unit_tests("", items[-1]["tests"], tool=_plain_python) == (0, 4)  # tests can fail
    custom = make_code_problems([("Write f.", ["assert f() == 1"])], prompt_template="{description}")
    assert custom == [{"prompt": "Write f.", "tests": ["assert f() == 1"]}]
    with pytest.raises(ValueError, match="description"):
        make_code_problems(prompt_template="no field")
    with pytest.raises(ValueError, match="pair"):
        make_code_problems([("only description",)])  # type: ignore[list-item]
