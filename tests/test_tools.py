"""Tests for rlprim.tools: parsers, execute_tools, the calculator and the sandboxed python tool.

Hostile inputs each get their own test. Sandbox tests use short timeouts; tests of the layers
that only exist when running as root (uid drop, RLIMIT_NPROC) are skipped otherwise.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from rlprim.tools import (
    DEFAULT_TOOLS,
    calculator,
    create_python_tool,
    execute_tools,
    extract_tool_calls,
    parse_json_tools,
    parse_xml_tools,
    python_tool,
)
from rlprim.types import ToolCall

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
HAS_PROC = os.path.isdir("/proc/self")
root_only = pytest.mark.skipif(not IS_ROOT, reason="uid drop and RLIMIT_NPROC apply as root")
needs_proc = pytest.mark.skipif(not HAS_PROC, reason="process checks read /proc")


# =========================================================================== helpers


def _live_processes(uid: int | None = None, pgid: int | None = None) -> list[int]:
    """Pids of non-zombie processes with real uid ``uid`` or process group ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
            with open(f"/proc/{entry}/status") as handle:
                status = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        state, process_group = fields[0], int(fields[2])
        real_uid = int(next(line for line in status.splitlines()
                            if line.startswith("Uid:")).split()[1])
        if state in ("Z", "X"):
            continue
        if (uid is not None and real_uid == uid) or (pgid is not None and process_group == pgid):
            found.append(int(entry))
    return found


def _assert_no_processes_left(uid: int | None = None, pgid: int | None = None) -> None:
    deadline = time.monotonic() + 3.0  # SIGKILL delivery is asynchronous
    while _live_processes(uid, pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live_processes(uid, pgid) == []


def _first_line_ints(output: str) -> list[int]:
    for line in output.splitlines():
        parts = line.split()
        if parts and all(p.isdigit() for p in parts):
            return [int(p) for p in parts]
    raise AssertionError(f"no line of integers in {output!r}")


def _unique_tmp_path() -> str:
    return os.path.join("/tmp", f"rlprim-escape-{uuid.uuid4().hex}")


# =========================================================================== parse_xml_tools


def test_parse_xml_tools_hand_cases():
    text = (
        'I will compute. <tool name="calculator">{"expression": "2+3"}</tool> then\n'
        "<tool name='python'>\n  {\"code\": \"print(1)\"}\n</tool >"
        "<tool name=search></tool> done"
    )
    assert parse_xml_tools(text) == [
        ToolCall("calculator", {"expression": "2+3"}),
        ToolCall("python", {"code": "print(1)"}),
        ToolCall("search", {}),
    ]
    assert parse_xml_tools("no tools here, <b>bold</b>") == []
    assert parse_xml_tools("") == []


def test_parse_xml_tools_broken_json_is_an_error_call():
    (call,) = parse_xml_tools('<tool name="calculator">{"expression": "2+3"</tool>')
    assert call.name == "calculator" and call.arguments == {} and call.result is None
    assert call.error.startswith("invalid JSON")


@pytest.mark.parametrize("body, kind", [("[1, 2]", "array"), ("3", "number"), ('"x"', "string"),
                                        ("null", "null")])
def test_parse_xml_tools_arguments_must_be_an_object(body, kind):
    (call,) = parse_xml_tools(f'<tool name="calculator">{body}</tool>')
    assert call.error == f"arguments must be a JSON object, got a JSON {kind}"


def test_parse_xml_tools_unclosed_tag_and_missing_name_are_errors():
    calls = parse_xml_tools('<tool>{"a": 1}</tool> <tool name="calc">{"expression": "1"}')
    assert [c.name for c in calls] == ["", "calc"]
    assert "without a name" in calls[0].error
    assert calls[1].error == "unclosed <tool> tag: expected </tool>"


def test_parse_xml_tools_is_linear_on_many_unclosed_tags():
    text = '<tool name="a">' * 20_000
    start = time.perf_counter()
    calls = parse_xml_tools(text)
    assert time.perf_counter() - start < 2.0
    assert len(calls) == 20_000 and all(c.error.startswith("unclosed") for c in calls)


# =========================================================================== parse_json_tools


def test_parse_json_tools_formats():
    bare = '{"name": "calculator", "arguments": {"expression": "1+1"}}'
    assert parse_json_tools(bare) == [ToolCall("calculator", {"expression": "1+1"})]
    listed = ('[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, '
              '{"name": "b", "parameters": {"y": 2}}]')
    assert parse_json_tools(listed) == [ToolCall("a", {"x": 1}), ToolCall("b", {"y": 2})]
    fenced = 'Sure:\n```json\n{"name": "python", "arguments": {"code": "print(2)"}}\n```\n'
    assert parse_json_tools(fenced) == [ToolCall("python", {"code": "print(2)"})]
    hermes = ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
              '<tool_call>{"name": "b", "arguments": "{\\"k\\": [1]}"}</tool_call>')
    assert parse_json_tools(hermes) == [ToolCall("a", {}), ToolCall("b", {"k": [1]})]
    openai = '{"type": "function", "function": {"name": "f", "arguments": "{\\"q\\": 3}"}}'
    assert parse_json_tools(openai) == [ToolCall("f", {"q": 3})]


def test_parse_json_tools_broken_json_recovers_the_name():
    (call,) = parse_json_tools('<tool_call>{"name": "calculator", "arguments": {</tool_call>')
    assert call.name == "calculator" and call.error.startswith("invalid JSON")
    (call,) = parse_json_tools('{"name": "calc", "arguments": {"expression": ')
    assert call.name == "calc" and call.error.startswith("invalid JSON")


def test_parse_json_tools_malformed_calls_are_errors():
    calls = parse_json_tools('<tool_call>[1, {"arguments": {}}, {"name": "f", "arguments": 5}]'
                             "</tool_call>")
    assert [c.name for c in calls] == ["", "", "f"]
    assert "got a JSON number" in calls[0].error
    assert "non-empty string 'name'" in calls[1].error
    assert calls[2].error == "arguments must be a JSON object, got a JSON number"
    (call,) = parse_json_tools('{"name": "f", "arguments": "not json"}')
    assert call.error.startswith("arguments string is not valid JSON")


def test_parse_json_tools_ignores_json_that_is_not_a_call():
    assert parse_json_tools('The data is {"a": 1} and [1, 2].') == []
    assert parse_json_tools('```json\n{"result": 42}\n```') == []
    assert parse_json_tools("```python\nprint({'name': 1})\n```") == []


def test_parse_json_tools_deep_nesting_does_not_crash():
    (call,) = parse_json_tools("<tool_call>" + "[" * 100_000 + "</tool_call>")
    assert call.error is not None
    (call,) = parse_json_tools('{"name": "f", "arguments": ' + "[" * 100_000)
    assert call.name == "f" and call.error is not None


_MARKUP = st.sampled_from([
    '<tool name="calculator">', "<tool name='x'>", "<tool>", "</tool>", "</tool >",
    "<tool_call>", "</tool_call>", "```json\n", "```", "{", "}", "[", "]", '"name"', ":",
    '"arguments"', '"x"', ",", "1", "null", '{"name": "f", "arguments": {}}', "\\", '"', "\n",
])


@given(st.text(max_size=300))
def test_parsers_never_raise_on_arbitrary_text(text):
    for parser in (parse_xml_tools, parse_json_tools):
        calls = parser(text)
        assert isinstance(calls, list)
        for call in calls:
            assert isinstance(call, ToolCall) and isinstance(call.name, str)
            assert isinstance(call.arguments, dict) and call.result is None
            assert call.error is None or (isinstance(call.error, str) and call.arguments == {})


@given(st.lists(st.one_of(_MARKUP, st.text(max_size=5)), max_size=40))
def test_parsers_never_raise_on_text_built_from_markup(pieces):
    text = "".join(pieces)
    for parser in (parse_xml_tools, parse_json_tools):
        for call in parser(text):
            assert isinstance(call, ToolCall) and isinstance(call.arguments, dict)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=10)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8,
)
_ARGUMENTS = st.dictionaries(st.text(max_size=8), _JSON_VALUES, max_size=4)
_NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)


@given(st.text(max_size=40), _NAMES, _ARGUMENTS, st.text(max_size=40))
def test_parse_xml_tools_round_trips_a_call_in_any_surrounding_text(prefix, name, args, suffix):
    body = json.dumps(args)
    assume("<tool" not in prefix + suffix and "</tool" not in body)
    calls = parse_xml_tools(f'{prefix}<tool name="{name}">{body}</tool>{suffix}')
    assert calls == [ToolCall(name, args)]


@given(st.text(max_size=40), _NAMES, _ARGUMENTS, st.text(max_size=40))
def test_parse_json_tools_round_trips_a_hermes_call(prefix, name, args, suffix):
    body = json.dumps({"name": name, "arguments": args})
    assume("<tool_call>" not in prefix + suffix + body and "</tool_call>" not in body)
    calls = parse_json_tools(f"{prefix}<tool_call>{body}</tool_call>{suffix}")
    assert calls == [ToolCall(name, args)]


# =========================================================================== extract_tool_calls


def test_extract_tool_calls_uses_the_given_parser():
    text = '<tool name="a">{}</tool> {"name": "b", "arguments": {}}'
    assert extract_tool_calls(text) == [ToolCall("a", {})]
    assert extract_tool_calls(text, parser=parse_json_tools) == [ToolCall("b", {})]
    upper = extract_tool_calls("CALL x", parser=lambda t: [ToolCall(t.split()[1], {})])
    assert upper == [ToolCall("x", {})]


def test_extract_tool_calls_rejects_bad_input():
    with pytest.raises(TypeError, match="text must be a str"):
        extract_tool_calls(b"<tool name='a'></tool>")
    with pytest.raises(TypeError, match="parser must be callable"):
        extract_tool_calls("x", parser="xml")
    with pytest.raises(TypeError, match="ToolCall items"):
        extract_tool_calls("x", parser=lambda t: [("a", {})])


# =========================================================================== execute_tools


def _add(a: int, b: int) -> str:
    return str(a + b)


def test_execute_tools_hand_case_keeps_order():
    calls = [ToolCall("calculator", {"expression": "6*7"}), ToolCall("add", {"a": 1, "b": 2}),
             ToolCall("calculator", {"expression": "7/2"})]
    out = execute_tools(calls, {"calculator": calculator, "add": _add})
    assert [(c.name, c.result, c.error) for c in out] == [
        ("calculator", "42", None), ("add", "3", None), ("calculator", "3.5", None)]
    assert [c.arguments for c in out] == [c.arguments for c in calls]


def test_execute_tools_unknown_tool_lists_known_tools():
    (call,) = execute_tools([ToolCall("rm_rf", {})], {"calculator": calculator, "add": _add})
    assert call.result is None
    assert call.error == "unknown tool 'rm_rf'; available tools: add, calculator"


def test_execute_tools_wrong_argument_names_and_types_are_errors():
    wrong_name, wrong_type, not_a_mapping = execute_tools(
        [ToolCall("calculator", {"expr": "1+1"}), ToolCall("calculator", {"expression": 5}),
         ToolCall("calculator", ["1+1"])],
        {"calculator": calculator},
    )
    assert wrong_name.error.startswith("bad arguments:") and "expression" in wrong_name.error
    assert wrong_type.error == ("tool 'calculator' failed: TypeError: expression must be a str, "
                                "got int")
    assert not_a_mapping.error.startswith("arguments must be an object")


def test_execute_tools_a_raising_tool_becomes_an_error_and_later_calls_run():
    def explode() -> str:
        raise RuntimeError("boom")

    out = execute_tools([ToolCall("explode", {}), ToolCall("add", {"a": 2, "b": 2})],
                        {"explode": explode, "add": _add})
    assert out[0].error == "tool 'explode' failed: RuntimeError: boom" and out[0].result is None
    assert out[1].result == "4" and out[1].error is None


def test_execute_tools_passes_parse_errors_through_without_counting_them():
    ran = []

    def record(x: int) -> str:
        ran.append(x)
        return "ok"

    broken = ToolCall("record", {}, error="invalid JSON: ...")
    out = execute_tools([broken, ToolCall("record", {"x": 1})], {"record": record}, budget=1)
    assert out[0] is broken
    assert out[1].result == "ok" and ran == [1]


def test_execute_tools_budget_stops_calls_at_the_limit():
    ran = []

    def record(x: int) -> str:
        ran.append(x)
        return str(x)

    calls = [ToolCall("record", {"x": i}) for i in range(5)]
    out = execute_tools(calls, {"record": record}, budget=2)
    assert ran == [0, 1]
    assert [c.result for c in out] == ["0", "1", None, None, None]
    assert [c.error for c in out[2:]] == ["tool budget exhausted (budget=2)"] * 3
    out = execute_tools(calls, {"record": record}, budget=0)
    assert ran == [0, 1] and all(c.error == "tool budget exhausted (budget=0)" for c in out)


_CALL_KINDS = st.lists(st.sampled_from(["ok", "unknown", "parse_error", "raises"]), max_size=12)


@given(_CALL_KINDS, st.one_of(st.none(), st.integers(0, 12)))
def test_execute_tools_budget_matches_a_reference_loop(kinds, budget):
    ran = []

    def ok(i: int) -> str:
        ran.append(i)
        return str(i)

    def raises(i: int) -> str:
        ran.append(i)
        raise ValueError("no")

    calls = [ToolCall("nope", {"i": i}) if k == "unknown"
             else ToolCall("ok", {}, error="parse") if k == "parse_error"
             else ToolCall(k, {"i": i}) for i, k in enumerate(kinds)]
    out = execute_tools(calls, {"ok": ok, "raises": raises}, budget=budget)

    expected_ran, expected_errors, executed = [], [], 0
    for i, kind in enumerate(kinds):
        if kind == "parse_error":
            expected_errors.append("parse")
        elif budget is not None and executed >= budget:
            expected_errors.append(f"tool budget exhausted (budget={budget})")
        elif kind == "unknown":
            expected_errors.append("unknown tool 'nope'; available tools: ok, raises")
        else:
            executed += 1
            expected_ran.append(i)
            expected_errors.append(None if kind == "ok" else
                                   "tool 'raises' failed: ValueError: no")
    assert ran == expected_ran
    assert [c.error for c in out] == expected_errors
    assert all((c.result is None) != (c.error is None) for c in out)


def test_execute_tools_rejects_bad_input():
    with pytest.raises(ValueError, match="budget must be >= 0, got -1"):
        execute_tools([], {}, budget=-1)
    with pytest.raises(TypeError, match="budget must be an int"):
        execute_tools([], {}, budget=1.5)
    with pytest.raises(TypeError, match="budget must be an int"):
        execute_tools([], {}, budget=True)
    with pytest.raises(TypeError, match="tools must be a mapping"):
        execute_tools([], [calculator])
    with pytest.raises(TypeError, match=r"tools\['x'\] must be callable"):
        execute_tools([], {"x": 3})
    with pytest.raises(TypeError, match="items must be ToolCall"):
        execute_tools([("calculator", {})], {"calculator": calculator})


def test_malformed_tool_call_text_end_to_end_gives_error_results():
    text = ('<tool name="calculator">{"expression": </tool>'
            '<tool name="shell">{"cmd": "rm -rf /"}</tool>'
            '<tool name="calculator">{"expression": ["1", "+", "1"]}</tool>'
            '<tool name="calculator">{"expression": "__import__(\'os\')"}</tool>'
            '<tool name="calculator">{"expression": "1+1"}</tool>')
    out = execute_tools(extract_tool_calls(text), DEFAULT_TOOLS)
    assert out[0].error.startswith("invalid JSON")
    assert out[1].error.startswith("unknown tool 'shell'; available tools: calculator, python")
    assert out[2].error.startswith("tool 'calculator' failed: TypeError")
    assert out[3].error.startswith("tool 'calculator' failed: ValueError")
    assert out[4].result == "2" and out[4].error is None


# =========================================================================== calculator


@pytest.mark.parametrize("expression, expected", [
    ("2+3", "5"), ("7/2", "3.5"), ("6/3", "2"), ("-6/4", "-1.5"), ("2**10", "1024"),
    ("-2**2", "-4"), ("2**3**2", "512"), ("(1+2)*3", "9"), ("7//2", "3"), ("-7//2", "-4"),
    ("7%3", "1"), ("-7%3", "2"), ("0.1+0.2", "0.30000000000000004"), ("2**-1", "0.5"),
    ("4.0/2", "2.0"), ("+-3", "-3"), ("1e3", "1000.0"), ("  2 +\t2 ", "4"), ("7.5//2", "3.0"),
    ("10**100", "1" + "0" * 100), ("(((((((((((7)))))))))))", "7"), ("2**0.5", "1.4142135623730951"),
    ("(10**30 + 1) / 1", "1000000000000000000000000000001"), ("(-8)**2.0", "64.0"),
])
def test_calculator_hand_cases(expression, expected):
    assert calculator(expression) == expected


def test_calculator_refuses_import_and_system_call():
    with pytest.raises(ValueError, match="function calls are not allowed"):
        calculator("__import__('os').system('id')")


def test_calculator_refuses_attribute_access():
    with pytest.raises(ValueError, match="attribute access is not allowed"):
        calculator("(1).__class__")


def test_calculator_refuses_names():
    with pytest.raises(ValueError, match="names are not allowed"):
        calculator("x + 1")


def test_calculator_refuses_calls():
    with pytest.raises(ValueError, match="function calls are not allowed"):
        calculator("abs(-1)")


@pytest.mark.parametrize("expression", [
    "(1, 2)[0]", "'a' * 3", "b'a'", "[1, 2]", "{1: 2}", "[x for x in (1,)]", "lambda: 1",
    "1 < 2", "1 and 2", "not 1", "~1", "1 << 100", "1 | 2", "1 & 2", "1 ^ 2", "1 if 1 else 2",
    "True + 1", "None", "1j", "...", "(x := 1)", "f'{1}'", "1 @ 2",
])
def test_calculator_refuses_everything_but_arithmetic(expression):
    with pytest.raises(ValueError, match="not allowed"):
        calculator(expression)


@pytest.mark.parametrize("expression", ["9**9**9", "9**9**9**9", "10**101", "2**333",
                                        "(10**50)**10", "1.0000001**1e100", "(0.5)**-1000"])
def test_calculator_refuses_huge_powers_fast(expression):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="out of range"):
        calculator(expression)
    assert time.perf_counter() - start < 0.1
    assert calculator("2**332").startswith("8749002899132047697490008908470")


def test_calculator_refuses_huge_products():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="out of range"):
        calculator("10**50 * 10**50 * 10**50 * 10**50")
    with pytest.raises(ValueError, match="out of range"):
        calculator("99999999999999999999999999999999999999999999999999" * 3)
    with pytest.raises(ValueError, match="out of range"):
        calculator("1e300 * 1e300")
    with pytest.raises(ValueError, match="out of range"):
        calculator("1e999")
    assert time.perf_counter() - start < 0.1


def test_calculator_refuses_deep_nesting_fast():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="too long"):
        calculator("(" * 1000 + "1" + ")" * 1000)
    with pytest.raises(ValueError, match="too complex"):
        calculator("-" * 150 + "1")
    assert time.perf_counter() - start < 0.1
    assert calculator("(" * 99 + "1" + ")" * 99) == "1"
    assert calculator("-" * 100 + "1") == "1"


def test_calculator_refuses_long_expressions():
    assert calculator("+".join(["1"] * 100)) == "100"  # 199 characters
    with pytest.raises(ValueError, match="too long"):
        calculator("+".join(["1"] * 101))
    with pytest.raises(ValueError, match="too long"):
        calculator("1" * 100_000)


@pytest.mark.parametrize("expression", ["1/0", "1//0", "1%0", "0**-1", "1.0/0.0", "5 % 0.0"])
def test_calculator_division_by_zero(expression):
    with pytest.raises(ValueError, match="division by zero"):
        calculator(expression)


@pytest.mark.parametrize("expression", ["(-8)**0.5", "(-1)**(1/3)"])
def test_calculator_refuses_complex_results(expression):
    with pytest.raises(ValueError, match="complex"):
        calculator(expression)


@pytest.mark.parametrize("expression", ["", "   ", "1 +", "(1", "1 2", "1\x00", "1;2", "\n"])
def test_calculator_invalid_syntax(expression):
    with pytest.raises(ValueError):
        calculator(expression)


def test_calculator_rejects_non_strings():
    with pytest.raises(TypeError, match="expression must be a str, got int"):
        calculator(5)


def _int_tree(depth: int) -> st.SearchStrategy:
    leaf = st.integers(-60, 60)
    if depth == 0:
        return leaf
    sub = _int_tree(depth - 1)
    return st.one_of(
        leaf,
        st.tuples(st.sampled_from(["+", "-", "*", "//", "%"]), sub, sub),
        st.tuples(st.just("**"), sub, st.integers(0, 4)),
    )


def _render(tree) -> str:
    if isinstance(tree, tuple):
        op, left, right = tree
        return f"({_render(left)} {op} {_render(right)})"
    return f"({tree!r})" if tree < 0 or (isinstance(tree, float) and math.copysign(1, tree) < 0) \
        else repr(tree)


def _reference_int(tree) -> int:
    """Python-int arithmetic with the calculator's rule |every value| <= 1e100."""
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    x, y = _reference_int(left), _reference_int(right)
    if op in ("//", "%") and y == 0:
        raise ZeroDivisionError
    value = {"+": lambda: x + y, "-": lambda: x - y, "*": lambda: x * y,
             "//": lambda: x // y, "%": lambda: x % y, "**": lambda: x**y}[op]()
    if abs(value) > 10**100:
        raise OverflowError
    return value


@given(_int_tree(4))
def test_calculator_matches_python_int_reference(tree):
    expression = _render(tree)
    assume(len(expression) <= 200)
    try:
        expected = _reference_int(tree)
    except (ZeroDivisionError, OverflowError):
        with pytest.raises(ValueError):
            calculator(expression)
        return
    assert calculator(expression) == str(expected)


def _float_tree(depth: int) -> st.SearchStrategy:
    leaf = st.one_of(st.integers(-50, 50),
                     st.floats(-100, 100, allow_nan=False, allow_infinity=False))
    if depth == 0:
        return leaf
    sub = _float_tree(depth - 1)
    return st.one_of(leaf, st.tuples(st.sampled_from(["+", "-", "*", "/"]), sub, sub))


def _reference_float(tree) -> np.float64:
    if not isinstance(tree, tuple):
        return np.float64(tree)
    op, left, right = tree
    x, y = _reference_float(left), _reference_float(right)
    if op == "/" and y == 0:
        raise ZeroDivisionError
    with np.errstate(all="ignore"):
        value = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide}[op](x, y)
    if not np.isfinite(value) or abs(value) > 1e100:
        raise OverflowError
    return value


@given(_float_tree(3))
def test_calculator_matches_numpy_float64_reference(tree):
    expression = _render(tree)
    assume(len(expression) <= 200)
    try:
        expected = float(_reference_float(tree))
    except (ZeroDivisionError, OverflowError):
        with pytest.raises(ValueError):
            calculator(expression)
        return
    assert math.isclose(float(calculator(expression)), expected, rel_tol=1e-12, abs_tol=0.0)


@given(st.text(max_size=250))
def test_calculator_only_ever_raises_value_error_and_is_fast(text):
    start = time.perf_counter()
    try:
        result = calculator(text)
    except ValueError:
        pass
    else:
        assert isinstance(result, str) and result
        float(result)
    assert time.perf_counter() - start < 0.1


# =========================================================================== python_tool


def test_python_tool_returns_stdout():
    assert python_tool("print(6 * 7)\nprint('ok')") == "42\nok\n"


def test_python_tool_stdlib_and_working_directory_files():
    code = ("import json, math, fractions\n"
            "open('data.txt', 'w').write('hello')\n"
            "print(open('data.txt').read(), math.factorial(5), fractions.Fraction(1, 3))\n")
    assert python_tool(code) == "hello 120 1/3\n"


def test_python_tool_exception_returns_traceback_without_sandbox_frames():
    result = python_tool("x = 1\n1 / 0\n")
    assert result.startswith("error: exit status 1\n")
    assert 'File "main.py", line 2' in result and "ZeroDivisionError: division by zero" in result
    assert "<string>" not in result


def test_python_tool_syntax_error():
    result = python_tool("def f(:\n")
    assert result.startswith("error: exit status 1") and "SyntaxError" in result


def test_python_tool_stdin_is_closed():
    assert "EOFError" in python_tool("input()")


def test_python_tool_infinite_loop_times_out():
    start = time.monotonic()
    result = python_tool("while True:\n    pass\n", timeout=1.0)
    assert time.monotonic() - start < 1.0 + 2.0
    assert result.startswith("error: timeout after 1s")


def test_python_tool_sleeping_forever_times_out():
    start = time.monotonic()
    result = python_tool("print('started', flush=True)\nimport time\ntime.sleep(1000)\n",
                         timeout=1.0)
    assert time.monotonic() - start < 1.0 + 2.0
    assert result == "error: timeout after 1s (process killed)\nstarted\n"


def test_python_tool_cpu_limit():
    start = time.monotonic()
    result = python_tool("while True:\n    pass\n", timeout=20.0, cpu_seconds=1)
    assert result.startswith("error: CPU time limit exceeded (1s)")
    assert time.monotonic() - start < 15.0


@needs_proc
def test_python_tool_fork_bomb_is_refused_and_leaves_no_process():
    code = "import os\nprint(os.getuid(), os.getpgid(0), flush=True)\nwhile True:\n    os.fork()\n"
    start = time.monotonic()
    result = python_tool(code, timeout=5.0)
    assert time.monotonic() - start < 5.0
    assert result.startswith("error: exit status 1") and "os.fork is not allowed" in result
    uid, pgid = _first_line_ints(result)
    _assert_no_processes_left(uid=uid if uid != os.getuid() else None, pgid=pgid)
    assert subprocess.run([sys.executable, "-c", "pass"], timeout=30).returncode == 0


@root_only
@needs_proc
def test_python_tool_fork_bomb_without_the_guard_is_stopped_by_rlimit_nproc():
    code = "import os\nprint(os.getuid(), flush=True)\nwhile True:\n    os.fork()\n"
    start = time.monotonic()
    result = python_tool(code, timeout=5.0, max_processes=8, audit_guard=False)
    assert time.monotonic() - start < 5.0
    assert result.startswith("error: exit status 1")
    assert "BlockingIOError" in result or "Resource temporarily unavailable" in result
    (uid,) = _first_line_ints(result)
    assert uid != 0
    _assert_no_processes_left(uid=uid)
    assert subprocess.run([sys.executable, "-c", "pass"], timeout=30).returncode == 0


@root_only
@needs_proc
def test_python_tool_kills_processes_that_escape_the_process_group():
    code = ("import os, time\nprint(os.getuid(), flush=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        time.sleep(60)\n    os._exit(0)\nprint('main done')\n")
    start = time.monotonic()
    result = python_tool(code, timeout=10.0, audit_guard=False)
    assert time.monotonic() - start < 5.0  # not the timeout: leftovers die when main ends
    assert result.endswith("main done\n")
    (uid,) = _first_line_ints(result)
    _assert_no_processes_left(uid=uid)


def test_python_tool_huge_allocation_hits_the_memory_limit():
    result = python_tool("x = bytearray(10 * 2**30)\nprint('allocated')\n", memory_mb=128)
    assert result.startswith("error: memory limit exceeded (128 MB)")
    assert "allocated" not in result


_ESCAPES = {
    "open": "open(TARGET, 'w').write('x')",
    "pathlib": "import pathlib\npathlib.Path(TARGET).write_text('x')",
    "chdir_then_relative": "import os\nos.chdir('/tmp')\nopen(os.path.basename(TARGET), 'w')",
    "dotdot": "import os\nopen('../' + os.path.basename(TARGET), 'w')",
    "dir_fd": ("import os\nfd = os.open('/tmp', os.O_RDONLY)\n"
               "os.open(os.path.basename(TARGET), os.O_WRONLY | os.O_CREAT, dir_fd=fd)"),
    "symlink": "import os\nos.symlink(TARGET, 'link')\nopen('link', 'w').write('x')",
    "rename": "import os\nopen('a', 'w').write('x')\nos.rename('a', TARGET)",
    "proc_self_cwd": "open('/proc/self/cwd/../' + TARGET.split('/')[-1], 'w')",
    "hard_link": "import os\nopen('a', 'w')\nos.link('a', TARGET)",
    # A directory fd of the working directory plus a relative path that climbs out of it
    # while the cwd is deeper (audit events do not report dir_fd).
    "dir_fd_inside": ("import os\nos.makedirs('a/b')\nfd = os.open(os.environ['HOME'], os.O_RDONLY)\n"
                      "os.chdir('a/b')\n"
                      "os.open('../' + os.path.basename(TARGET), os.O_WRONLY | os.O_CREAT, dir_fd=fd)"),
}


@pytest.mark.parametrize("variant", sorted(_ESCAPES))
def test_python_tool_cannot_write_outside_its_directory(variant):
    target = _unique_tmp_path()
    code = f"TARGET = {target!r}\n" + _ESCAPES[variant] + "\nprint('escaped')\n"
    try:
        result = python_tool(code)
        assert result.startswith("error: exit status 1")
        assert "PermissionError: python_tool sandbox:" in result
        assert "escaped" not in result.replace("rlprim-escape", "")
        assert not os.path.exists(target)
    finally:
        if os.path.lexists(target):
            os.remove(target)


@root_only
def test_python_tool_uid_drop_alone_blocks_writes_to_root_owned_dirs(tmp_path):
    os.chmod(tmp_path, 0o755)  # traversable and readable, writable by root only
    target = tmp_path / "written-by-sandbox"
    with pytest.warns(RuntimeWarning, match="isolation='rlimits'"):
        result = python_tool(f"open({str(target)!r}, 'w').write('x')\n", audit_guard=False,
                             isolation="rlimits")
    assert "PermissionError: [Errno 13] Permission denied" in result
    assert not target.exists()


def test_python_tool_bwrap_alone_hides_the_host_file_system(tmp_path):
    os.chmod(tmp_path, 0o777)  # writable by anyone: only the mount namespace keeps it out
    target = tmp_path / "written-by-sandbox"
    result = python_tool(f"open({str(target)!r}, 'w').write('x')\n", audit_guard=False)
    assert "FileNotFoundError: [Errno 2] No such file or directory" in result
    assert not target.exists()
    result = python_tool("import os\nprint(sorted(os.listdir('/')))\n", audit_guard=False)
    visible = set(json.loads(result.replace("'", '"')))
    assert {"usr", "etc", "proc", "dev", "tmp", "sandbox"} <= visible
    assert not visible & {"home", "var", "run", "sys", "srv", "mnt", "boot"}


def test_python_tool_working_directory_is_a_private_tmpfs():
    result = python_tool("import os\nopen('f', 'w').write('x')\nprint(os.getcwd())\n"
                         "print(open('/proc/self/mountinfo').read())", audit_guard=False,
                         max_output_chars=100_000)
    cwd, mounts = result.split("\n", 1)
    assert cwd == "/sandbox" and not os.path.exists("/sandbox/f")
    (line,) = [m for m in mounts.splitlines() if m.split()[4:5] == ["/sandbox"]]
    assert " rw," in line and " - tmpfs " in line


def test_python_tool_rlimits_working_directory_is_removed():
    with pytest.warns(RuntimeWarning):
        result = python_tool("import os\nopen('f', 'w').write('x')\nprint(os.getcwd())\n",
                             isolation="rlimits")
    directory = result.strip()
    assert os.path.basename(directory).startswith("rlprim-python-")
    assert not os.path.exists(directory)


def test_python_tool_does_not_see_the_environment(monkeypatch):
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("RLPRIM_TEST_SECRET", secret)
    result = python_tool("import os\nprint(sorted(os.environ.items()))\n")
    assert secret not in result and "RLPRIM_TEST_SECRET" not in result
    assert "'PATH'" in result  # the minimal environment is there


def test_python_tool_cannot_read_the_parent_environment_through_proc(monkeypatch):
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("RLPRIM_TEST_SECRET", secret)
    result = python_tool("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())\n")
    assert secret not in result and "is not allowed" in result


@root_only
def test_python_tool_uid_drop_alone_hides_the_parent_environment(monkeypatch):
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("RLPRIM_TEST_SECRET", secret)
    result = python_tool("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())\n",
                         audit_guard=False)
    assert secret not in result and "Permission denied" in result


@pytest.mark.parametrize("code, refused", [
    ("import os\nos.system('id')", "os.system is not allowed"),
    ("import os\nos.execv('/bin/sh', ['sh'])", "os.exec is not allowed"),
    ("import os, signal\nos.kill(os.getppid(), signal.SIGTERM)", "os.kill is not allowed"),
    ("import socket\nsocket.socket()", "socket.__new__ is not allowed"),
    ("import ctypes", "importing ctypes is not allowed"),
    ("print(open('/etc/hostname').read())", "reading '/etc/hostname' is not allowed"),
    ("import os\nprint(os.listdir('/'))", "listing '/' is not allowed"),
    ("import gc\ngc.get_objects()", "gc.get_objects is not allowed"),
])
def test_python_tool_guard_refuses_escape_primitives(code, refused):
    result = python_tool(code)
    assert result.startswith("error: exit status 1") and refused in result


def test_python_tool_truncates_output():
    result = python_tool("print('x' * 10_000)", max_output_chars=100)
    assert result == "x" * 100 + "\n[output truncated to 100 characters]"


def test_python_tool_huge_output_is_read_and_dropped():
    start = time.monotonic()
    result = python_tool("import sys\nfor _ in range(64):\n    sys.stdout.write('y' * 2**20)\n",
                         max_output_chars=10)
    assert result == "y" * 10 + "\n[output truncated to 10 characters]"
    assert time.monotonic() - start < 10.0


def test_python_tool_file_size_limit():
    result = python_tool("open('big', 'wb').write(b'0' * (2 * 2**20))\n", max_file_mb=1)
    assert result.startswith("error: exit status 1") and "File too large" in result


def test_python_tool_imports_the_standard_library():
    code = ("import signal, struct, datetime, typing, dataclasses, csv, hashlib, textwrap\n"
            "print(int(signal.SIGTERM), struct.calcsize('<i'), hashlib.sha256(b'').hexdigest()[:8])\n")
    assert python_tool(code) == "15 4 e3b0c442\n"


def test_python_tool_site_packages():
    result = python_tool("import numpy as np\nprint(int(np.arange(10).sum()))\n",
                         site_packages=True, timeout=20.0)
    assert result == "45\n"
    assert "ModuleNotFoundError" in python_tool("import numpy")


def test_python_tool_preload_modules_are_imported_before_the_program():
    code = "import sys\nprint('wave' in sys.modules)\n"
    assert python_tool(code, preload_modules=("wave",)) == "True\n"
    assert python_tool(code) == "False\n"


def test_python_tool_directory_trees_inside_the_working_directory():
    code = ("import os, shutil, tempfile\n"
            "os.makedirs('a/b/c')\nopen('a/b/c/f', 'w').write('x')\nshutil.rmtree('a')\n"
            "with tempfile.TemporaryDirectory() as d:\n    open(os.path.join(d, 'x'), 'w')\n"
            "print(os.listdir('.'))\n")
    assert python_tool(code) == "['main.py']\n"


def test_python_tool_without_privilege_drop_still_runs_and_times_out():
    assert python_tool("print('hi')", drop_privileges=False) == "hi\n"
    start = time.monotonic()
    result = python_tool("while True: pass", timeout=1.0, drop_privileges=False)
    assert result.startswith("error: timeout after 1s") and time.monotonic() - start < 3.0


def test_python_tool_rejects_bad_settings():
    with pytest.raises(TypeError, match="code must be a str"):
        python_tool(b"print(1)")
    with pytest.raises(ValueError, match="timeout must be a finite number > 0"):
        python_tool("pass", timeout=0)
    with pytest.raises(ValueError, match="memory_mb must be >= 32"):
        python_tool("pass", memory_mb=8)
    with pytest.raises(TypeError, match="cpu_seconds must be an int"):
        python_tool("pass", cpu_seconds=1.5)
    with pytest.raises(TypeError, match="preload_modules"):
        python_tool("pass", preload_modules="numpy")
    with pytest.raises(ValueError, match="isolation must be one of 'bwrap', 'rlimits', got 'none'"):
        create_python_tool(isolation="none")
    with pytest.raises(TypeError, match="isolation must be a str, got NoneType"):
        python_tool("pass", isolation=None)
    with pytest.raises(ValueError, match="max_disk_mb must be >= 1, got 0"):
        create_python_tool(max_disk_mb=0)


def test_create_python_tool_fixes_the_limits_for_the_model():
    tool = create_python_tool(timeout=1.0, max_output_chars=5)
    assert list(inspect.signature(tool).parameters) == ["code"]
    assert tool("print(123456789)") == "12345\n[output truncated to 5 characters]"
    (call,) = execute_tools([ToolCall("python", {"code": "print(1)", "timeout": 1e9})],
                            {"python": tool})
    assert call.error.startswith("bad arguments:") and call.result is None
    with pytest.raises(ValueError, match="max_output_chars must be >= 0"):
        create_python_tool(max_output_chars=-1)


def test_default_tools_are_read_only_and_work_through_execute_tools():
    assert sorted(DEFAULT_TOOLS) == ["calculator", "python"]
    with pytest.raises(TypeError):
        DEFAULT_TOOLS["shell"] = print  # type: ignore[index]
    calls = extract_tool_calls('<tool name="python">{"code": "print(2 ** 5)"}</tool>'
                               '<tool name="calculator">{"expression": "2 ** 5"}</tool>')
    out = execute_tools(calls, DEFAULT_TOOLS, budget=2)
    assert [c.result for c in out] == ["32\n", "32"]


# ------------------------------------------------------------- where bubblewrap cannot run
# Each runs a Python inside an outer bubblewrap that changes one thing about the machine.

_WITHOUT_BWRAP = '''
import warnings
import rlprim
from rlprim.tools import DEFAULT_TOOLS, create_python_tool, python_tool
for attempt in (lambda: create_python_tool(), lambda: python_tool("print(1)"),
                lambda: DEFAULT_TOOLS["python"]("print(1)")):
    try:
        attempt()
        print("ran")
    except RuntimeError as error:
        print("refused:", error)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    print("fallback:", python_tool("print(6 * 7)", isolation="rlimits").strip(),
          [str(w.message)[:40] for w in caught])
'''


def _in_outer_bwrap(extra: list[str], program: str, uid: int | None = None) -> str:
    argv = ["bwrap", "--unshare-user", "--disable-userns", "--ro-bind", "/", "/", "--proc",
            "/proc", "--dev", "/dev", "--tmpfs", "/tmp", *extra]
    # A venv or checkout under /tmp (a CI clone there) stays visible on top of the empty /tmp.
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in sorted({sys.prefix, repository}):
        if path.startswith("/tmp/"):
            argv += ["--ro-bind", path, path]
    if uid is not None:
        argv += ["--uid", str(uid), "--gid", str(uid)]
    result = subprocess.run([*argv, "--", sys.executable, "-c", program], capture_output=True,
                            text=True, timeout=300, cwd="/",
                            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                 "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_without_bubblewrap_the_tool_refuses_and_says_how_to_install_it(tmp_path):
    empty = tmp_path / "not-bwrap"
    empty.write_text("")  # mode 0644: not executable, so no bwrap is found
    hidden = [a for p in {"/usr/bin/bwrap", "/bin/bwrap", "/usr/local/bin/bwrap",
                          shutil.which("bwrap")} if p and os.path.exists(p)
              for a in ("--ro-bind", str(empty), p)]
    lines = _in_outer_bwrap(hidden, _WITHOUT_BWRAP, uid=1000).splitlines()
    assert len(lines) == 4, lines
    for line in lines[:3]:  # creation, a direct call, and the default tool when called
        assert line.startswith("refused: python_tool: bubblewrap (the `bwrap` program) is not "
                               "installed")
        assert "sudo apt-get install bubblewrap" in line and "isolation='rlimits'" in line
    warning = "python_tool: isolation='rlimits' runs the program"[:40]
    assert lines[3] == f"fallback: 42 {[warning]}"


def test_when_user_namespaces_are_forbidden_the_error_explains_it():
    # Inside an outer sandbox made with --disable-userns, as uid 1000, bwrap cannot create the
    # user namespace it needs: the kernel refuses, as it does with the sysctls that forbid them.
    program = ("from rlprim.tools import python_tool\ntry:\n    python_tool('print(1)')\n"
               "except RuntimeError as error:\n    print(error)\n")
    output = _in_outer_bwrap([], program, uid=1000)
    assert output.startswith("python_tool: bubblewrap could not set up the sandbox (bwrap: ")
    assert "Run by a user other than root, bwrap needs unprivileged user namespaces" in output
    assert "isolation='rlimits'" in output
