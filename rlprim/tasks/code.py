"""The code task: write a small Python function, rewarded by the fraction of unit tests it passes.

A problem is a prompt item ``{"prompt": ..., "tests": ["assert add(1, 2) == 3", ...]}``: each
test is a snippet of Python (usually one ``assert``) that passes when it runs without raising.
``code_reward`` takes the code out of the completion (``extract_code``), runs it and every test
in **one** sandboxed process (``rlprim.tools.python_tool``: separate process, timeout, memory
limit, no network, privilege drop when root) and returns ``passed / total`` — the unit-test
reward of code RL (e.g. CodeRL, Le et al. 2022; the pass-rate reward of DeepSeek-Coder /
AceCoder-style RLVR).

Inside that process a small harness executes the solution, then each test in turn in the
solution's namespace, each in its own ``try``; the solution's own output is discarded, so it
cannot push the harness's report out of the captured output. The harness prints one line per
test, prefixed with a random per-call marker, and the count is read back from those lines. A
test that hangs uses up the process's ``timeout``: the tests reported before it still count,
it and the rest count as failed. A solution that fails to load (syntax error, exception at
import time) passes only the tests that do not need it (normally none).

Honest limits: solution and tests share one interpreter, so a solution written *to subvert the
harness* (patching builtins, objects whose ``==`` is always true, reading the marker from the
program file) can inflate its reward. That is reward hacking, not an escape from the sandbox;
inspect high-reward samples, and use a stricter external judge for adversarial settings.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rlprim.tools import python_tool
from rlprim.types import Rollout

__all__ = [
    "CODE_PROMPT",
    "CODE_PROBLEMS",
    "make_code_problems",
    "extract_code",
    "build_test_program",
    "run_unit_tests",
    "code_reward",
    "create_code_reward",
]

CODE_PROMPT = (
    "{description}\nWrite the Python function in a ```python code block. Do not print anything."
)

# (description, tests): small self-contained exercises for examples and tests.
CODE_PROBLEMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Write a function `add(a, b)` that returns the sum of two numbers.",
        ("assert add(1, 2) == 3", "assert add(-4, 4) == 0", "assert add(2.5, 0.5) == 3.0"),
    ),
    (
        "Write a function `is_even(n)` that returns True if the integer n is even, else False.",
        ("assert is_even(4) is True", "assert is_even(7) is False", "assert is_even(0) is True"),
    ),
    (
        "Write a function `reverse_string(s)` that returns the string s reversed.",
        (
            "assert reverse_string('abc') == 'cba'",
            "assert reverse_string('') == ''",
            "assert reverse_string('a b') == 'b a'",
        ),
    ),
    (
        "Write a function `factorial(n)` that returns n! for an integer n >= 0.",
        ("assert factorial(0) == 1", "assert factorial(5) == 120", "assert factorial(10) == 3628800"),
    ),
    (
        "Write a function `count_vowels(s)` that returns how many of the letters a, e, i, o, u "
        "(either case) the string s contains.",
        (
            "assert count_vowels('hello') == 2",
            "assert count_vowels('xyz') == 0",
            "assert count_vowels('AEIOU aeiou') == 10",
        ),
    ),
    (
        "Write a function `is_palindrome(s)` that returns True if the string s reads the same "
        "forwards and backwards, else False.",
        (
            "assert is_palindrome('racecar') is True",
            "assert is_palindrome('ab') is False",
            "assert is_palindrome('') is True",
        ),
    ),
    (
        "Write a function `max_of_list(xs)` that returns the largest element of a non-empty "
        "list without using the built-in max.",
        (
            "assert max_of_list([3, 1, 2]) == 3",
            "assert max_of_list([-5, -2, -9]) == -2",
            "assert max_of_list([7]) == 7",
        ),
    ),
    (
        "Write a function `fizzbuzz(n)` that returns 'FizzBuzz' if n is divisible by 15, "
        "'Fizz' if by 3, 'Buzz' if by 5, else str(n).",
        (
            "assert fizzbuzz(15) == 'FizzBuzz'",
            "assert fizzbuzz(9) == 'Fizz'",
            "assert fizzbuzz(10) == 'Buzz'",
            "assert fizzbuzz(7) == '7'",
        ),
    ),
)

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\r?\n(.*?)```", re.DOTALL)
_REPORT = re.compile(r"^(\S+) (pass|fail) (\d+)$", re.MULTILINE)

# The harness run after the solution; {marker}, {source} and {tests} are filled in with repr().
_HARNESS = """\
import sys as _rlprim_sys
import types as _rlprim_types

_rlprim_out, _rlprim_err = _rlprim_sys.stdout, _rlprim_sys.stderr
_rlprim_sink = _rlprim_types.SimpleNamespace(write=len, flush=lambda: None)
_rlprim_namespace = {{"__name__": "solution", "__builtins__": __builtins__}}


def _rlprim_run(source, filename):
    _rlprim_sys.stdout = _rlprim_sys.stderr = _rlprim_sink
    try:
        exec(compile(source, filename, "exec"), _rlprim_namespace)
        return True
    except BaseException:
        return False
    finally:
        _rlprim_sys.stdout, _rlprim_sys.stderr = _rlprim_out, _rlprim_err


_rlprim_run({source}, "<solution>")
for _rlprim_index, _rlprim_test in enumerate({tests}):
    _rlprim_ok = _rlprim_run(_rlprim_test, "<test %d>" % _rlprim_index)
    print({marker}, "pass" if _rlprim_ok else "fail", _rlprim_index, file=_rlprim_out, flush=True)
"""


def _check_tests(tests: object) -> list[str]:
    if isinstance(tests, (str, bytes)) or not isinstance(tests, Sequence):
        raise TypeError(
            f"tests must be a list of Python snippets such as ['assert f(1) == 2'], got "
            f"{type(tests).__name__}"
        )
    if not tests:
        raise ValueError("tests must hold at least one test, got an empty sequence")
    for i, test in enumerate(tests):
        if not isinstance(test, str):
            raise TypeError(f"tests[{i}] must be a str, got {type(test).__name__}")
    return list(tests)


def make_code_problems(
    problems: Sequence[tuple[str, Sequence[str]]] = CODE_PROBLEMS,
    prompt_template: str = CODE_PROMPT,
) -> list[dict[str, Any]]:
    """Prompt items ``{"prompt", "tests"}`` from ``(description, tests)`` pairs.

    ``prompt = prompt_template.format(description=description)``; ``tests`` is the list of
    test snippets. The default problems are ``CODE_PROBLEMS`` (eight small exercises).
    """
    if not isinstance(prompt_template, str) or "{description}" not in prompt_template:
        raise ValueError(
            f"prompt_template must be a str containing '{{description}}', got {prompt_template!r}"
        )
    items = []
    for i, problem in enumerate(problems):
        if not isinstance(problem, (tuple, list)) or len(problem) != 2:
            raise ValueError(f"problems[{i}] must be a (description, tests) pair, got {problem!r}")
        description, tests = problem
        if not isinstance(description, str):
            raise TypeError(f"problems[{i}][0] must be a str, got {type(description).__name__}")
        items.append(
            {
                "prompt": prompt_template.format(description=description),
                "tests": _check_tests(tests),
            }
        )
    return items


def extract_code(text: str) -> str:
    """The code in a completion: the last fenced block (```` ```python ```` or bare
    ```` ``` ````), else the whole text.

    ``"Here:\\n```python\\ndef f():\\n    return 1\\n```"`` → ``"def f():\\n    return 1\\n"``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def build_test_program(code: str, tests: Sequence[str], marker: str) -> str:
    """The program that runs ``code`` and then each test, reporting one line per test.

    The solution and each test are executed with ``exec`` in one namespace, each in its own
    ``try`` (any exception, including ``SystemExit``, is a failure), with their stdout and
    stderr discarded. After test ``i`` the program prints ``f"{marker} pass {i}"`` or
    ``f"{marker} fail {i}"`` to the real stdout. The source texts are embedded with ``repr``,
    so no quoting in them can break out of the harness.

    Args:
      code: the solution source.
      tests: the test snippets.
      marker: a token without whitespace that prefixes report lines.

    Returns:
      the program text, for ``rlprim.tools.python_tool``.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    tests = _check_tests(tests)
    if not isinstance(marker, str) or not marker or any(c.isspace() for c in marker):
        raise ValueError(f"marker must be a non-empty str without whitespace, got {marker!r}")
    return _HARNESS.format(source=repr(code), tests=repr(tests), marker=repr(marker))


def run_unit_tests(
    code: str,
    tests: Sequence[str],
    timeout: float = 5.0,
    memory_mb: int = 256,
    tool: Callable[..., str] | None = None,
) -> tuple[int, int]:
    """Runs ``code`` and ``tests`` in one sandboxed process and counts the passing tests.

    ::

        passed = #{ i : test i ran without raising, after the solution was executed }

    Args:
      code: the solution source.
      tests: ``N ≥ 1`` test snippets.
      timeout: wall-clock seconds for the whole run (solution and all tests).
      memory_mb: address-space limit of the process.
      tool: ``tool(program) -> output`` replacing the sandbox; ``None`` runs
        ``python_tool(program, timeout=timeout, memory_mb=memory_mb)``.

    Returns:
      ``(passed, N)``.
    """
    tests = _check_tests(tests)
    marker = "rlprim-test-" + secrets.token_hex(8)
    program = build_test_program(code, tests, marker)
    if tool is None:
        output = python_tool(program, timeout=timeout, memory_mb=memory_mb)
    else:
        if not callable(tool):
            raise TypeError(f"tool must be callable, got {type(tool).__name__}")
        output = tool(program)
    if not isinstance(output, str):
        raise TypeError(f"the tool must return a str, returned {type(output).__name__}")
    verdicts: dict[int, str] = {}
    for prefix, verdict, index in _REPORT.findall(output):
        if prefix == marker and int(index) < len(tests):
            verdicts.setdefault(int(index), verdict)
    return sum(v == "pass" for v in verdicts.values()), len(tests)


def create_code_reward(
    timeout: float = 5.0,
    memory_mb: int = 256,
    extract_fn: Callable[[str], str] = extract_code,
    tool: Callable[..., str] | None = None,
) -> Callable[[Rollout], float]:
    """Builds ``reward_fn(rollout) -> passed / total`` for the code task.

    ::

        code = extract_fn(rollout.generation.text)
        r = run_unit_tests(code, rollout.metadata["tests"], timeout, memory_mb, tool)
            passed / total                          ∈ [0, 1]

    Args:
      timeout / memory_mb: limits of the sandboxed run, per rollout.
      extract_fn: ``fn(completion_text) -> code``; default ``extract_code``.
      tool: see ``run_unit_tests``.

    Returns:
      ``reward_fn(rollout)``; it raises ValueError when ``rollout.metadata`` has no ``"tests"``.
    """
    if not callable(extract_fn):
        raise TypeError(f"extract_fn must be callable, got {type(extract_fn).__name__}")
    if tool is not None and not callable(tool):
        raise TypeError(f"tool must be callable, got {type(tool).__name__}")

    def reward_fn(rollout: Rollout) -> float:
        """Fraction of ``rollout.metadata["tests"]`` the completion's code passes."""
        if not isinstance(rollout, Rollout):
            raise TypeError(f"rollout must be a Rollout, got {type(rollout).__name__}")
        metadata: Mapping[str, Any] = rollout.metadata or {}
        if "tests" not in metadata:
            raise ValueError(
                "rollout.metadata has no key 'tests' (a list of test snippets); keys: "
                f"{sorted(map(str, metadata))}"
            )
        code = extract_fn(rollout.generation.text)
        passed, total = run_unit_tests(code, metadata["tests"], timeout, memory_mb, tool)
        return passed / total

    return reward_fn


def code_reward(rollout: Rollout) -> float:
    """``create_code_reward()``'s reward: the fraction of ``rollout.metadata["tests"]`` that the
    completion's code passes, run in the sandboxed python tool with a 5 s timeout."""
    return create_code_reward()(rollout)
