"""Tool calls: parsing them out of model text, executing them safely, and two built-in tools.

A tool is a plain function ``tool(**arguments) -> str``; a tool set is a mapping from names to
tools. The flow of one tool-using turn (Toolformer, Schick et al. 2023; the function-calling
formats of Hermes / Qwen chat models):

    calls = extract_tool_calls(text, parser=parse_xml_tools)   # -> list[ToolCall]
    calls = execute_tools(calls, tools, budget=4)              # each gets .result or .error
    # feed each call's result or error back to the model as a tool message

Nothing here raises on what the *model* wrote: unparseable markup, unknown tools, wrong
arguments, a tool that raises or a program that runs forever all come back as an ``error`` (or
an ``"error: ..."`` result) the model can read and react to. Bad input from the *programmer*
(a non-string text, a malformed tool mapping, a negative budget) raises TypeError / ValueError.

Parsers (a ``tool_parser`` is ``parser(text) -> list[ToolCall]``):
  * ``parse_xml_tools``: ``<tool name="calculator">{"expression": "2+3"}</tool>``.
  * ``parse_json_tools``: ``{"name": ..., "arguments": {...}}`` objects or lists of them, bare,
    inside ```` ```json ```` fences or inside Hermes / Qwen ``<tool_call>...</tool_call>`` tags.

Built-in tools (``DEFAULT_TOOLS``):
  * ``calculator(expression)``: arithmetic only, evaluated from the ``ast`` with bounded sizes.
  * ``python``: ``create_python_tool()``, which runs a program in a separate process isolated
    by bubblewrap (namespaces, read-only root, private tmpfs) plus resource limits and an
    audit-hook guard (see ``python_tool`` for what is and is not contained).
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import os
import random
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from rlprim.types import ToolCall

try:  # POSIX only; python_tool says so when it is missing.
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

__all__ = [
    "parse_xml_tools",
    "parse_json_tools",
    "extract_tool_calls",
    "execute_tools",
    "calculator",
    "python_tool",
    "create_python_tool",
    "DEFAULT_TOOLS",
]


# =========================================================================== parsing

_XML_OPEN = re.compile(r"<tool\b([^<>]*)>")
_XML_CLOSE = re.compile(r"</tool\s*>")
_XML_NAME = re.compile(r"""\bname\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'<>/]+))""")
_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_FENCE_BLOCK = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\r?\n(.*?)```", re.DOTALL)
# The start of a bare JSON tool call: an object whose first key is "name" or "function",
# possibly as the first element of a list.
_BARE_CALL_START = re.compile(r'(?:\[\s*)?\{\s*"(?:name|function)"\s*:')
_NAME_IN_BROKEN_JSON = re.compile(r'"name"\s*:\s*"([^"\\]{1,100})"')
# Bare-JSON scanning tries at most this many candidate positions (each try is linear in the text).
_MAX_BARE_CANDIDATES = 64
_JSON_TYPE_NAMES = MappingProxyType(
    {dict: "object", list: "array", str: "string", int: "number", float: "number",
     bool: "boolean", type(None): "null"}
)


def _json_type(value: object) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return text


def _decode_json(source: str) -> tuple[Any, str | None]:
    """``(value, None)`` or ``(None, error message)``; never raises on any string."""
    try:
        return json.loads(source), None
    except RecursionError:
        return None, "invalid JSON: nested too deeply"
    except ValueError as exc:  # json.JSONDecodeError and the int-digits limit
        return None, f"invalid JSON: {exc}"


def _arguments_or_error(raw: Any) -> tuple[dict[str, Any], str | None]:
    if raw is None:
        return {}, None
    if isinstance(raw, str):  # OpenAI style: the arguments object serialised as a string
        raw, error = _decode_json(raw) if raw.strip() else ({}, None)
        if error is not None:
            return {}, f"arguments string is not valid JSON ({error})"
    if not isinstance(raw, dict):
        return {}, f"arguments must be a JSON object, got a JSON {_json_type(raw)}"
    return raw, None


def parse_xml_tools(text: str) -> list[ToolCall]:
    """Parses ``<tool name="NAME">{JSON arguments}</tool>`` tool calls, in order of appearance.

    Grammar (whitespace-tolerant, the body may span lines)::

        <tool name="calculator">{"expression": "2 + 3"}</tool>
        <tool name='python'>{"code": "print(1)"}</tool>
        <tool name=search></tool>                      # empty body: no arguments

    The name attribute may use double, single or no quotes; other attributes are ignored. The
    body is a JSON object of keyword arguments (empty body = ``{}``). A call the model got wrong
    still yields a ``ToolCall`` whose ``error`` tells it what was wrong, so it gets feedback:
    invalid JSON, a body that is not an object, a missing name, or a ``<tool>`` never closed by
    ``</tool>``. Markup nested inside a call's body belongs to that call. Text without calls
    gives ``[]``. Runs in time linear in ``len(text)`` and never raises on any string.

    Args:
      text: the model's output.

    Returns:
      ``list[ToolCall]`` with ``arguments`` a dict (``{}`` on error) and ``result=None``.
    """
    text = _check_text(text)
    calls: list[ToolCall] = []
    position = 0
    close: re.Match[str] | None = None
    no_more_close = False
    while True:
        opening = _XML_OPEN.search(text, position)
        if opening is None:
            break
        name_match = _XML_NAME.search(opening.group(1))
        name = next((g for g in name_match.groups() if g is not None), "") if name_match else ""
        name = name.strip()
        if not no_more_close and (close is None or close.start() < opening.end()):
            close = _XML_CLOSE.search(text, opening.end())
            no_more_close = close is None
        if no_more_close or close is None:
            calls.append(ToolCall(name, {}, error="unclosed <tool> tag: expected </tool>"))
            position = opening.end()
            continue
        body = text[opening.end() : close.start()].strip()
        position = close.end()
        if not name:
            calls.append(ToolCall("", {}, error='tool call without a name: use <tool name="...">'))
            continue
        value, error = _decode_json(body) if body else ({}, None)
        if error is None and not isinstance(value, dict):
            error = f"arguments must be a JSON object, got a JSON {_json_type(value)}"
        calls.append(ToolCall(name, value, error=None) if error is None
                     else ToolCall(name, {}, error=error))
    return calls


def _call_from_value(value: Any, strict: bool) -> list[ToolCall]:
    """Turns a decoded JSON value into calls. Non-strict contexts ignore values without a name."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("function"), dict):
            item = item["function"]  # OpenAI style {"type": "function", "function": {...}}
        if not isinstance(item, dict):
            if strict:
                calls.append(ToolCall("", {}, error="a tool call must be a JSON object with "
                                      f"'name' and 'arguments', got a JSON {_json_type(item)}"))
            continue
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            if strict or "name" in item:
                calls.append(ToolCall("", {}, error="a tool call needs a non-empty string 'name'"))
            continue
        raw_arguments = item["arguments"] if "arguments" in item else item.get("parameters")
        arguments, error = _arguments_or_error(raw_arguments)
        calls.append(ToolCall(name.strip(), arguments, error=error))
    return calls


def _broken_call(source: str, error: str) -> ToolCall:
    name = _NAME_IN_BROKEN_JSON.search(source[:1000])  # a window keeps this O(1) per call
    return ToolCall(name.group(1).strip() if name else "", {}, error=error)


def parse_json_tools(text: str) -> list[ToolCall]:
    """Parses JSON tool calls as common chat models emit them, in order of appearance.

    A call is an object ``{"name": NAME, "arguments": {...}}`` (``"parameters"`` is accepted
    for ``"arguments"``, the arguments may be a JSON-encoded string as in the OpenAI format, and
    ``{"type": "function", "function": {...}}`` is unwrapped); a JSON list holds several calls.
    Where it is looked for, first match wins:

      1. Hermes / Qwen tags ``<tool_call>{...}</tool_call>`` (a last tag left unclosed runs to
         the end of the text). Every tag is a call: broken JSON or a missing name is an error call.
      2. Otherwise fenced blocks ```` ```json ... ``` ```` (or unlabelled fences): objects with a
         ``name`` are calls; broken JSON that mentions ``"name"`` is an error call; other JSON
         data is not a call.
      3. Otherwise bare JSON in the text that starts like a call (``{"name":`` or
         ``[{"name":``), e.g. the whole message or after a prefix such as ``[TOOL_CALLS]``;
         at most 64 candidates are tried, so the time stays linear-bounded on adversarial text.

    Malformed calls yield a ``ToolCall`` with ``error`` set (``name`` recovered when possible).
    Never raises on any string.

    Args:
      text: the model's output.

    Returns:
      ``list[ToolCall]`` with ``arguments`` a dict (``{}`` on error) and ``result=None``.
    """
    text = _check_text(text)
    blocks = _HERMES_BLOCK.findall(text)
    if blocks:
        calls: list[ToolCall] = []
        for block in blocks:
            value, error = _decode_json(block.strip())
            calls.extend(_call_from_value(value, strict=True) if error is None
                         else [_broken_call(block, error)])
        return calls
    fences = [b for b in _FENCE_BLOCK.findall(text) if b.lstrip()[:1] in ("{", "[")]
    if fences:
        calls = []
        for block in fences:
            value, error = _decode_json(block.strip())
            if error is None:
                calls.extend(_call_from_value(value, strict=False))
            elif '"name"' in block:
                calls.append(_broken_call(block, error))
        return calls
    calls = []
    decoder = json.JSONDecoder()
    position = 0
    for _ in range(_MAX_BARE_CANDIDATES):
        start = _BARE_CALL_START.search(text, position)
        if start is None:
            break
        try:
            value, end = decoder.raw_decode(text, start.start())
        except RecursionError:
            calls.append(_broken_call(text[start.start():], "invalid JSON: nested too deeply"))
            position = start.end()
            continue
        except ValueError as exc:
            calls.append(_broken_call(text[start.start():], f"invalid JSON: {exc}"))
            position = start.end()
            continue
        calls.extend(_call_from_value(value, strict=False))
        position = end
    return calls


def extract_tool_calls(
    text: str, parser: Callable[[str], Sequence[ToolCall]] = parse_xml_tools
) -> list[ToolCall]:
    """Extracts the tool calls in ``text`` with ``parser`` (the ``tool_parser`` extension point).

    A parser is any function ``parser(text: str) -> Sequence[ToolCall]``; the built-in ones are
    ``parse_xml_tools`` (default) and ``parse_json_tools``. Calls the model got wrong come back
    with ``error`` set instead of raising; an exception raised by a user-supplied parser is a bug
    in that parser and propagates.

    Args:
      text: the model's output.
      parser: the tool-call parser.

    Returns:
      ``list[ToolCall]`` in order of appearance (``[]`` when there are none).
    """
    text = _check_text(text)
    if not callable(parser):
        raise TypeError(f"parser must be callable, got {type(parser).__name__}")
    calls = list(parser(text))
    for call in calls:
        if not isinstance(call, ToolCall):
            raise TypeError(f"parser must return ToolCall items, got {type(call).__name__}")
    return calls


# =========================================================================== execution


def _check_tools(tools: object) -> Mapping[str, Callable[..., Any]]:
    if not isinstance(tools, Mapping):
        raise TypeError(f"tools must be a mapping of name -> function, got {type(tools).__name__}")
    for name, tool in tools.items():
        if not isinstance(name, str):
            raise TypeError(f"tools keys must be str, got {type(name).__name__} {name!r}")
        if not callable(tool):
            raise TypeError(f"tools[{name!r}] must be callable, got {type(tool).__name__}")
    return tools


def _signature_error(tool: Callable[..., Any], arguments: Mapping[str, Any]) -> str | None:
    try:
        signature = inspect.signature(tool)
    except (TypeError, ValueError):  # some builtins have no signature: let the call decide
        return None
    try:
        signature.bind(**arguments)
    except TypeError as exc:
        expected = ", ".join(signature.parameters)
        return f"bad arguments: {exc} (the tool takes: {expected or 'no arguments'})"
    return None


def execute_tools(
    tool_calls: Sequence[ToolCall],
    tools: Mapping[str, Callable[..., str]],
    budget: int | None = None,
) -> list[ToolCall]:
    """Executes tool calls in order and returns them with ``result`` or ``error`` filled in.

    For each call, the first rule that applies decides (``n`` = calls executed so far):

      1. it already carries an ``error`` (a parse error): returned unchanged, not executed and
         not counted against the budget;
      2. ``budget is not None and n >= budget``: error ``"tool budget exhausted (budget=N)"``;
      3. ``name`` not in ``tools``: error naming the tool and listing the known ones;
      4. ``arguments`` not a mapping with str keys, or keywords the tool's signature does not
         accept: error naming the parameters it takes (not executed, not counted);
      5. otherwise the tool runs and counts (``n += 1``): ``result = tool(**arguments)``
         (converted with ``str`` when it is not a str); an ``Exception`` it raises (a wrong
         argument type, ``ValueError`` from the calculator…) becomes the error
         ``"tool 'NAME' failed: ExceptionType: message"``.

    So at most ``budget`` tools run, which is what a self-verification task charges for.
    Tools run in this process and enforce their own time limits (``python_tool`` has a wall-clock
    timeout, ``calculator`` is bounded by construction); a tool that hangs hangs the caller.
    Every keyword a tool accepts is chosen by the model: expose only functions whose every
    parameter is safe for the model to set (``create_python_tool`` returns one that takes only
    ``code``).

    Args:
      tool_calls: the calls, e.g. from ``extract_tool_calls``.
      tools: name -> tool function (``DEFAULT_TOOLS`` has ``calculator`` and ``python``).
      budget: the maximum number of calls to execute, ``None`` for no limit.

    Returns:
      ``list[ToolCall]``, same length and order; exactly one of ``result`` / ``error`` is set.
    """
    if isinstance(tool_calls, (str, bytes)) or not isinstance(tool_calls, Sequence):
        raise TypeError(f"tool_calls must be a sequence of ToolCall, got {type(tool_calls).__name__}")
    for call in tool_calls:
        if not isinstance(call, ToolCall):
            raise TypeError(f"tool_calls items must be ToolCall, got {type(call).__name__}")
    tools = _check_tools(tools)
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise TypeError(f"budget must be an int or None, got {type(budget).__name__}")
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")

    executed = 0
    out: list[ToolCall] = []
    for call in tool_calls:
        if call.error is not None:
            out.append(call)
            continue
        if budget is not None and executed >= budget:
            out.append(call._replace(result=None, error=f"tool budget exhausted (budget={budget})"))
            continue
        tool = tools.get(call.name)
        if tool is None:
            known = ", ".join(sorted(tools)) or "none"
            out.append(call._replace(result=None,
                                     error=f"unknown tool {call.name!r}; available tools: {known}"))
            continue
        arguments = call.arguments
        if not isinstance(arguments, Mapping) or not all(isinstance(k, str) for k in arguments):
            out.append(call._replace(result=None, error="arguments must be an object with string "
                                     f"keys, got {type(arguments).__name__}"))
            continue
        error = _signature_error(tool, arguments)
        if error is not None:
            out.append(call._replace(result=None, error=error))
            continue
        executed += 1
        try:
            result = tool(**arguments)
        except Exception as exc:  # the model's call failed; the rollout goes on
            out.append(call._replace(
                result=None, error=f"tool {call.name!r} failed: {type(exc).__name__}: {exc}"))
            continue
        out.append(call._replace(result=result if isinstance(result, str) else str(result),
                                 error=None))
    return out


# =========================================================================== calculator

_CALC_MAX_CHARS = 200
_CALC_MAX_NODES = 256
_CALC_MAX_DEPTH = 128
_CALC_MAX_ABS = 10**100
_CALC_MAX_LOG10 = 100.0
_CALC_BINARY = MappingProxyType({
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
})
_CALC_UNARY = MappingProxyType({ast.UAdd: operator.pos, ast.USub: operator.neg})
_CALC_ALLOWED = "only int/float numbers, + - * / // % **, unary + -, and parentheses"


def _calc_refuse(node: ast.AST) -> ValueError:
    kind = type(node).__name__
    if isinstance(node, ast.Name):
        return ValueError(f"names are not allowed (got {node.id!r}); {_CALC_ALLOWED}")
    if isinstance(node, ast.Attribute):
        return ValueError(f"attribute access is not allowed; {_CALC_ALLOWED}")
    if isinstance(node, ast.Call):
        return ValueError(f"function calls are not allowed; {_CALC_ALLOWED}")
    if isinstance(node, ast.Constant):
        return ValueError(f"{type(node.value).__name__} literals are not allowed; {_CALC_ALLOWED}")
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        kind = type(node.op).__name__
    return ValueError(f"{kind} is not allowed; {_CALC_ALLOWED}")


def _calc_checked(value: int | float) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"result out of range (|x| > 1e{_CALC_MAX_LOG10:g})")
    if isinstance(value, complex):
        raise ValueError("complex results are not supported")
    if abs(value) > _CALC_MAX_ABS:
        raise ValueError(f"result out of range (|x| > 1e{_CALC_MAX_LOG10:g})")
    return value


def _calc_power(base: int | float, exponent: int | float) -> int | float:
    if base == 0 and exponent < 0:
        raise ValueError("division by zero (0 raised to a negative power)")
    if base < 0 and isinstance(exponent, float) and not exponent.is_integer():
        raise ValueError("complex results are not supported (negative base, fractional power)")
    # Bound |base ** exponent| = 10 ** (exponent * log10|base|) before computing it.
    if base != 0 and exponent * math.log10(abs(base)) > _CALC_MAX_LOG10 + 1e-9:
        raise ValueError(f"result out of range (|x| > 1e{_CALC_MAX_LOG10:g})")
    return base**exponent


def _calc_divide(left: int | float, right: int | float) -> int | float:
    if right == 0:
        raise ValueError("division by zero")
    if isinstance(left, int) and isinstance(right, int) and left % right == 0:
        return left // right  # exact: 6/3 is 2, also for ints beyond float precision
    return left / right


def _calc_eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        return _calc_checked(node.value)
    if isinstance(node, ast.UnaryOp):
        return _CALC_UNARY[type(node.op)](_calc_eval(node.operand))
    assert isinstance(node, ast.BinOp)  # the only other node _calc_validate lets through
    left, right = _calc_eval(node.left), _calc_eval(node.right)
    op = type(node.op)
    try:
        if op is ast.Pow:
            value = _calc_power(left, right)
        elif op is ast.Div:
            value = _calc_divide(left, right)
        else:
            value = _CALC_BINARY[op](left, right)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except OverflowError:
        raise ValueError(f"result out of range (|x| > 1e{_CALC_MAX_LOG10:g})") from None
    return _calc_checked(value)


def _calc_validate(tree: ast.Expression) -> None:
    """Refuses anything but numbers and arithmetic, and bounds size and depth (iteratively)."""
    stack = [(tree.body, 1)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > _CALC_MAX_NODES or depth > _CALC_MAX_DEPTH:
            raise ValueError(f"expression too complex (more than {_CALC_MAX_NODES} nodes or "
                             f"nesting deeper than {_CALC_MAX_DEPTH})")
        if isinstance(node, ast.Constant):
            if type(node.value) not in (int, float):  # bool, complex, str, bytes, None, ...
                raise _calc_refuse(node)
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _CALC_UNARY:
            stack.append((node.operand, depth + 1))
        elif isinstance(node, ast.BinOp) and (type(node.op) in _CALC_BINARY
                                              or type(node.op) in (ast.Pow, ast.Div)):
            stack.append((node.right, depth + 1))
            stack.append((node.left, depth + 1))
        else:
            raise _calc_refuse(node)


def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression safely and returns the result as text.

    The calculator tool of Toolformer (Schick et al. 2023), for models that call it with
    ``{"expression": ...}``.

    Grammar: int and float literals, binary ``+ - * / // % **``, unary ``+ -`` and parentheses,
    with Python's precedence (``**`` is right-associative, ``-2**2 == -4``). Anything else —
    names, attributes, calls, subscripts, strings, comparisons, bit operations, lambdas,
    comprehensions — raises ``ValueError``. The expression is parsed with ``ast.parse`` and
    walked; nothing is ever passed to ``eval``.

    Arithmetic follows Python, except ``/`` of two ints that divide exactly gives an int
    (``6/3`` → ``"2"``, ``7/2`` → ``"3.5"``). Results print with ``str`` for ints and ``repr``
    (shortest round-trip) for floats: ``"5"``, ``"2.5"``, ``"0.1"``, ``"2.0"`` (``4.0/2``).

    Resource bounds, so hostile input is refused in microseconds: at most 200 characters,
    256 AST nodes and nesting depth 128; every literal and every intermediate value satisfies
    ``|x| <= 1e100`` (and is finite); ``a ** b`` is refused *before* computing it when
    ``b * log10|a| > 100``, so ``9**9**9`` or ``(10**50)**10`` never allocate a huge int.
    Division or modulo by zero, ``0 ** -1`` and complex results raise ``ValueError``.

    Args:
      expression: e.g. ``"(2 + 3) * 4 / 8"``.

    Returns:
      The value as a string, e.g. ``"2.5"``.

    Raises:
      TypeError: ``expression`` is not a str.
      ValueError: anything refused (the message says why; ``execute_tools`` passes it on).
    """
    if not isinstance(expression, str):
        raise TypeError(f"expression must be a str, got {type(expression).__name__}")
    if len(expression) > _CALC_MAX_CHARS:
        raise ValueError(f"expression too long ({len(expression)} characters, at most "
                         f"{_CALC_MAX_CHARS})")
    if not expression.strip():
        raise ValueError("empty expression")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        detail = exc.msg if isinstance(exc, SyntaxError) else str(exc) or type(exc).__name__
        raise ValueError(f"invalid expression: {detail}") from None
    _calc_validate(tree)
    value = _calc_eval(tree.body)
    return str(value) if isinstance(value, int) else repr(value)


# =========================================================================== python tool

_SETUP_FAILED_EXIT = 120
_MEMORY_EXIT = 121
_DRAIN_SECONDS = 1.0
_SANDBOX_UIDS = (2_000_000_000, 2_100_000_000)  # unprivileged uids unlikely to be in use
_SANDBOX_ENV = MappingProxyType({
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
})
_ISOLATIONS = ("bwrap", "rlimits")
# Inside bubblewrap: the working directory (a private tmpfs) and the top-level system
# directories the sandbox sees, read-only (or as the same symlinks, on merged-/usr systems).
_BWRAP_WORKDIR = "/sandbox"
_BWRAP_SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc")
_BWRAP_CANDIDATES = ("/usr/bin/bwrap", "/bin/bwrap", "/usr/local/bin/bwrap")
# The child's bootstrap (limits, privilege drop, audit guard, then main.py), a module of its
# own; its source is passed with ``-c`` because rlprim itself is not mounted in the sandbox.
_CHILD_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
_FALLBACK_HINT = (
    "pass isolation='rlimits' to run with resource limits and the audit guard only (weaker: no "
    "mount, pid or network isolation, and no uid drop unless root)"
)
_INSTALL_BWRAP = (
    "install it (Debian/Ubuntu: `sudo apt-get install bubblewrap`; Fedora: `sudo dnf install "
    "bubblewrap`; Arch: `sudo pacman -S bubblewrap`; `make setup` installs it when run as "
    "root), or " + _FALLBACK_HINT
)

# Runs as root, becomes the sandbox uid and kills every process of that uid except itself.
_KILLER = r'''
import os, sys
uid = int(sys.argv[1])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
try:
    os.kill(-1, 9)
except ProcessLookupError:
    pass
'''


class _SandboxConfig(NamedTuple):
    timeout: float
    memory_mb: int
    cpu_seconds: int
    max_output_chars: int
    max_file_mb: int
    max_disk_mb: int
    max_processes: int
    site_packages: bool
    preload_modules: tuple[str, ...]
    audit_guard: bool
    drop_privileges: bool
    isolation: str


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _sandbox_config(
    timeout: float, memory_mb: int, cpu_seconds: int | None, max_output_chars: int,
    max_file_mb: int, max_disk_mb: int, max_processes: int, site_packages: bool,
    preload_modules: Sequence[str], audit_guard: bool, drop_privileges: bool, isolation: str,
) -> _SandboxConfig:
    if resource is None:
        raise RuntimeError("python_tool needs a POSIX system (the resource module is missing)")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, got {type(timeout).__name__}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a finite number > 0, got {timeout}")
    _positive_int("memory_mb", memory_mb, 32)
    if cpu_seconds is None:
        cpu_seconds = math.ceil(timeout) + 1  # wall-clock timeout fires first for one thread
    _positive_int("cpu_seconds", cpu_seconds)
    _positive_int("max_output_chars", max_output_chars, 0)
    _positive_int("max_file_mb", max_file_mb, 0)
    _positive_int("max_disk_mb", max_disk_mb, 1)
    _positive_int("max_processes", max_processes)
    if isinstance(preload_modules, str) or not all(isinstance(m, str) for m in preload_modules):
        raise TypeError(f"preload_modules must be a sequence of module names, got {preload_modules!r}")
    for flag_name, flag in (("site_packages", site_packages), ("audit_guard", audit_guard),
                            ("drop_privileges", drop_privileges)):
        if not isinstance(flag, bool):
            raise TypeError(f"{flag_name} must be a bool, got {type(flag).__name__}")
    if not isinstance(isolation, str):
        raise TypeError(f"isolation must be a str, got {type(isolation).__name__}")
    if isolation not in _ISOLATIONS:
        raise ValueError(f"isolation must be one of {', '.join(map(repr, _ISOLATIONS))}, "
                         f"got {isolation!r}")
    return _SandboxConfig(float(timeout), memory_mb, cpu_seconds, max_output_chars, max_file_mb,
                          max_disk_mb, max_processes, site_packages, tuple(preload_modules),
                          audit_guard, drop_privileges, isolation)


def _find_bwrap() -> str | None:
    """The bubblewrap executable: on PATH, else in the usual places; ``None`` if missing."""
    found = shutil.which("bwrap")
    if found is not None:
        return found
    return next((c for c in _BWRAP_CANDIDATES if os.access(c, os.X_OK)), None)


def _check_isolation(config: _SandboxConfig) -> None:
    """Refuses ``isolation="bwrap"`` without bubblewrap; warns for the weaker fallback."""
    if config.isolation == "bwrap" and _find_bwrap() is None:
        raise RuntimeError("python_tool: bubblewrap (the `bwrap` program) is not installed, "
                           "and it is this tool's isolation layer; " + _INSTALL_BWRAP + ".")
    if config.isolation == "rlimits":
        warnings.warn("python_tool: isolation='rlimits' runs the program with resource limits "
                      "and the audit guard only, without bubblewrap's mount, pid and network "
                      "isolation (and, when not root, as your own user)",
                      RuntimeWarning, stacklevel=3)


def _read_sysctl(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _userns_problems() -> list[str]:
    """The kernel settings that forbid unprivileged user namespaces here (best effort)."""
    problems = []
    if _read_sysctl("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        problems.append("kernel.unprivileged_userns_clone = 0 (set it to 1)")
    if _read_sysctl("/proc/sys/user/max_user_namespaces") == "0":
        problems.append("user.max_user_namespaces = 0 (set it to a positive number)")
    if _read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        problems.append("kernel.apparmor_restrict_unprivileged_userns = 1 (Ubuntu 23.10+: set it "
                        "to 0, or give bwrap an AppArmor profile that allows user namespaces)")
    return problems


def _bwrap_failure(message: str, as_root: bool) -> RuntimeError:
    """The error for a bubblewrap that could not set the sandbox up (before the program ran)."""
    text = f"python_tool: bubblewrap could not set up the sandbox ({message.strip()[:500]})."
    if not as_root:
        problems = _userns_problems()
        text += (" Run by a user other than root, bwrap needs unprivileged user namespaces, "
                 + ("which this kernel forbids: " + "; ".join(problems) if problems else
                    "which this machine may forbid (the sysctls kernel.unprivileged_userns_clone, "
                    "user.max_user_namespaces, kernel.apparmor_restrict_unprivileged_userns, or "
                    "a container's seccomp profile)") + ".")
    return RuntimeError(text + " Alternatively run as root, or " + _FALLBACK_HINT + ".")


def _uid_in_use(uid: int) -> bool:
    """Whether a user account or a running process has this uid (best effort, Linux /proc)."""
    try:
        import pwd

        pwd.getpwuid(uid)
        return True
    except (ImportError, KeyError):
        pass
    try:
        entries = os.listdir("/proc")
    except OSError:
        return False
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as handle:
                    for line in handle:
                        if line.startswith("Uid:"):
                            if uid in (int(x) for x in line.split()[1:]):
                                return True
                            break
            except (OSError, ValueError):
                continue
    return False


def _pick_sandbox_uid() -> int | None:
    """A random unprivileged uid, mapped in this user namespace and not in use, or ``None``."""
    low, high = _SANDBOX_UIDS
    try:
        with open("/proc/self/uid_map") as handle:
            ranges = [tuple(int(x) for x in line.split()) for line in handle if line.strip()]
    except OSError:  # not Linux: assume the usual full uid space
        ranges = [(0, 0, 2**32 - 1)]
    if not any(inside <= low and high <= inside + count for inside, _, count in ranges):
        # A restricted namespace (e.g. rootless containers): the upper half of its widest range.
        usable = [(max(inside, 10_000), inside + count - 2) for inside, _, count in ranges]
        usable = [(a, b) for a, b in usable if b - a >= 1000]
        if not usable:
            return None
        a, b = max(usable, key=lambda r: r[1] - r[0])
        low, high = (a + b) // 2, b
    chooser = random.SystemRandom()  # OS entropy; no global RNG state is touched
    for _ in range(16):
        uid = chooser.randrange(low, high)
        if uid != 65534 and not _uid_in_use(uid):
            return uid
    return None


def _has_exited(process: subprocess.Popen) -> bool:
    """Whether the child exited, without reaping it (its pid stays reserved for killpg)."""
    if hasattr(os, "waitid"):
        try:
            return os.waitid(os.P_PID, process.pid,
                             os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True
    return process.poll() is not None  # pragma: no cover - platforms without waitid


def _kill_sandbox(process: subprocess.Popen, uid: int | None) -> None:
    """Kills the child's process group and, with a sandbox uid, every process of that uid."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None:  # catches processes that left the group with setsid()
        subprocess.run([sys.executable, "-I", "-S", "-c", _KILLER, str(uid)],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env={}, timeout=30, check=False)


def _remove_tree(path: str) -> None:
    def make_writable_and_retry(function: Callable[[str], Any], failed: str, _info: Any) -> None:
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            os.chmod(failed, 0o700)
            function(failed)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)


def _collect_output(
    process: subprocess.Popen, timeout: float, cap_bytes: int, uid: int | None
) -> tuple[bytes, bytes, bool, bool]:
    """Reads stdout/stderr until the child exits (then kills leftovers) or the timeout hits.

    Returns ``(stdout, stderr, timed_out, truncated)``; at most ``cap_bytes`` of each stream
    are kept, the rest is read and dropped so the child never blocks on a full pipe.
    """
    deadline = time.monotonic() + timeout
    kept = {process.stdout: bytearray(), process.stderr: bytearray()}
    truncated = timed_out = finished = False
    drain_deadline = math.inf
    with selectors.DefaultSelector() as selector:
        for stream in kept:
            selector.register(stream, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            if not finished and (_has_exited(process) or now >= deadline):
                timed_out = not _has_exited(process)
                finished = True
                _kill_sandbox(process, uid)
                drain_deadline = time.monotonic() + _DRAIN_SECONDS
            if finished and (not selector.get_map() or now >= drain_deadline):
                break
            if not selector.get_map():
                time.sleep(min(0.01, max(deadline - now, 0.0)))
                continue
            wait = min(0.05, max((drain_deadline if finished else deadline) - now, 0.0))
            for key, _ in selector.select(wait):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffer = kept[key.fileobj]
                room = cap_bytes - len(buffer)
                if len(chunk) > room:
                    truncated = True
                if room > 0:
                    buffer += chunk[:room]
    return bytes(kept[process.stdout]), bytes(kept[process.stderr]), timed_out, truncated


def _describe_status(returncode: int, timed_out: bool, config: _SandboxConfig) -> str | None:
    if timed_out:
        return f"error: timeout after {config.timeout:g}s (process killed)"
    if returncode == 0:
        return None
    if returncode == _MEMORY_EXIT:
        return f"error: memory limit exceeded ({config.memory_mb} MB)"
    if returncode == _SETUP_FAILED_EXIT:
        return "error: the sandbox could not be set up"
    if config.isolation == "bwrap" and 128 < returncode < 128 + 65:
        returncode = 128 - returncode  # bwrap reports death by signal N as exit status 128 + N
    if returncode == -signal.SIGXCPU:
        return f"error: CPU time limit exceeded ({config.cpu_seconds}s)"
    if returncode == -signal.SIGKILL:
        return "error: killed (CPU time or memory limit)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"error: killed by signal {name}"
    return f"error: exit status {returncode}"


def _format_result(stdout: bytes, stderr: bytes, returncode: int, timed_out: bool,
                   truncated: bool, config: _SandboxConfig) -> str:
    output = stdout.decode("utf-8", "replace")
    error_text = stderr.decode("utf-8", "replace")
    if output and error_text and not output.endswith("\n"):
        output += "\n"
    output += error_text
    if truncated or len(output) > config.max_output_chars:
        output = (output[: config.max_output_chars]
                  + f"\n[output truncated to {config.max_output_chars} characters]")
    status = _describe_status(returncode, timed_out, config)
    if status is None:
        return output
    return status + ("\n" + output if output else "")


def _child_config(config: _SandboxConfig, uid: int | None, max_processes: int | None,
                  unshare_net: bool, ready_fd: int | None, close_fds: Sequence[int] = ()) -> str:
    """The JSON settings ``rlprim._sandbox_child`` reads (its docstring lists them)."""
    return json.dumps({
        "uid": uid,
        "memory_bytes": config.memory_mb * 2**20,
        "cpu_seconds": config.cpu_seconds,
        "file_bytes": config.max_file_mb * 2**20,
        "max_processes": max_processes,
        "unshare_net": unshare_net,
        "preload": list(config.preload_modules),
        "audit_guard": config.audit_guard,
        "ready_fd": ready_fd,
        "close_fds": list(close_fds),
        "setup_exit": _SETUP_FAILED_EXIT,
        "memory_exit": _MEMORY_EXIT,
    })


def _python_argv(config: _SandboxConfig, child_config: str) -> list[str]:
    with open(_CHILD_FILE, encoding="utf-8") as handle:
        child_source = handle.read()
    argv = [sys.executable, "-I", "-B", "-u", "-X", "utf8"]
    if not config.site_packages:
        argv.append("-S")
    return argv + ["-c", child_source, child_config]


def _python_mounts(site_packages: bool) -> list[tuple[str, str]]:
    """``(source, destination)`` directories of the Python installation to mount read-only."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(sys.executable)}
    if site_packages:
        import site

        paths.update(site.getsitepackages())
    mounts = set()
    for path in paths:
        if not (isinstance(path, str) and os.path.isabs(path) and os.path.isdir(path)):
            continue
        real = os.path.realpath(path)
        for destination in {real, os.path.abspath(path)}:
            top = destination.strip("/").split("/")[0]
            if top not in _BWRAP_SYSTEM_DIRS:  # those are mounted whole
                mounts.add((real, destination))
    return sorted(mounts, key=lambda mount: (mount[1].count("/"), mount[1]))


def _ancestors(path: str) -> list[str]:
    """``/a/b/c`` -> ``["/a", "/a/b", "/a/b/c"]``."""
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts)) if parts[0]]


def _bwrap_argv(bwrap: str, config: _SandboxConfig, code_fd: int, as_root: bool,
                capabilities: bool, seccomp_fd: int | None) -> list[str]:
    """bubblewrap's arguments: namespaces, an empty environment, the read-only system and
    Python, private tmpfs for /tmp, /dev/shm and the working directory, main.py in it."""
    size = str(config.max_disk_mb * 2**20)
    argv = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--hostname", "sandbox", "--die-with-parent",
            "--new-session", "--clearenv"]
    if as_root:
        # No user namespace: bwrap would map the program to the host's root. Instead all
        # capabilities go, but for the two the child needs to drop to a fresh uid.
        argv += ["--cap-drop", "ALL"]
        if capabilities:
            argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--disable-userns"]
    for name, value in dict(_SANDBOX_ENV, HOME=_BWRAP_WORKDIR, TMPDIR=_BWRAP_WORKDIR).items():
        argv += ["--setenv", name, value]
    for name in _BWRAP_SYSTEM_DIRS:
        path = "/" + name
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    # The private tmpfs mounts come before Python's: a Python (or venv) under /tmp must stay
    # visible on top of the empty /tmp, not be hidden by it.
    for path, mode in (("/dev/shm", "1777"), ("/tmp", "1777"), (_BWRAP_WORKDIR, "0777")):
        argv += ["--size", size, "--perms", mode, "--tmpfs", path]
    mounts = _python_mounts(config.site_packages)
    parents = {os.path.dirname(destination) for _, destination in mounts}
    ancestors = {a for p in parents for a in _ancestors(p)}
    for directory in sorted(ancestors, key=lambda path: (path.count("/"), path)):
        # Traversable by any uid (a Python under /root, mode 0700, stays reachable).
        argv += ["--perms", "0755", "--dir", directory]
    for source, destination in mounts:
        argv += ["--ro-bind", source, destination]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    argv += ["--perms", "0644", "--file", str(code_fd), _BWRAP_WORKDIR + "/main.py",
             "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", _BWRAP_WORKDIR, "--"]
    return argv


# The seccomp filter bwrap installs before the program: no new user namespaces (unshare and
# clone with CLONE_NEWUSER; clone3, whose flags a filter cannot read, answers ENOSYS so that
# libc falls back to clone), and none of the kernel interfaces that container runtimes commonly
# refuse (bpf, userfaultfd, perf_event_open, the key rings, io_uring). Syscall numbers per
# architecture (x86-64, aarch64); elsewhere no filter is installed.
_SECCOMP_ARCHES = MappingProxyType({
    "x86_64": (0xC000003E, {"unshare": 272, "clone": 56, "clone3": 435, "bpf": 321,
                            "userfaultfd": 323, "perf_event_open": 298, "keyctl": 250,
                            "add_key": 248, "request_key": 249, "io_uring_setup": 425}),
    "aarch64": (0xC00000B7, {"unshare": 97, "clone": 220, "clone3": 435, "bpf": 280,
                             "userfaultfd": 282, "perf_event_open": 241, "keyctl": 219,
                             "add_key": 217, "request_key": 218, "io_uring_setup": 425}),
})
_CLONE_NEWUSER = 0x10000000


def _seccomp_filter(machine: str) -> bytes | None:
    """The classic-BPF program (``struct sock_filter[]``) for bwrap ``--seccomp``, or None."""
    if machine not in _SECCOMP_ARCHES:
        return None
    arch, numbers = _SECCOMP_ARCHES[machine]
    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|..|K
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    # (code, jump-if-true label, jump-if-false label, k); labels resolve to relative offsets.
    program: list[tuple[int, str | None, str | None, int]] = [
        (load, None, None, 4), (jeq, None, "enosys", arch), (load, None, None, 0)]
    if machine == "x86_64":  # x32 system calls (bit 30) would bypass the numbers below
        program.append((jge, "enosys", None, 0x40000000))
    for name in ("bpf", "userfaultfd", "perf_event_open", "keyctl", "add_key", "request_key",
                 "io_uring_setup"):
        program.append((jeq, "eperm", None, numbers[name]))
    program += [(jeq, "flags", None, numbers["unshare"]), (jeq, "flags", None, numbers["clone"]),
                (jeq, "enosys", None, numbers["clone3"]), (ret, None, None, allow)]
    labels = {"flags": len(program)}
    program += [(load, None, None, 16), (jset, "eperm", None, _CLONE_NEWUSER),
                (ret, None, None, allow)]
    labels["eperm"] = len(program)
    program.append((ret, None, None, eperm))
    labels["enosys"] = len(program)
    program.append((ret, None, None, enosys))
    encoded = bytearray()
    for index, (code, if_true, if_false, k) in enumerate(program):
        offsets = [0 if label is None else labels[label] - index - 1
                   for label in (if_true, if_false)]
        encoded += struct.pack("=HBBI", code, offsets[0], offsets[1], k)
    return bytes(encoded)


def _memory_fd(data: bytes, name: str) -> int:
    """An fd at offset 0 of a file holding ``data`` that exists nowhere on disk."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(name, 0)
    else:  # pragma: no cover - Linux always has memfd_create
        fd, path = tempfile.mkstemp(prefix=name)
        os.unlink(path)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _code_fd(code: str) -> int:
    return _memory_fd(code.encode("utf-8", "surrogatepass"), "rlprim-main.py")


def _was_ready(ready_fd: int) -> bool:
    """Whether the child wrote its one readiness byte (read without blocking)."""
    os.set_blocking(ready_fd, False)
    try:
        return os.read(ready_fd, 1) == b"1"
    except BlockingIOError:
        return False


def _run_in_bwrap(code: str, config: _SandboxConfig) -> str:
    bwrap = _find_bwrap()
    if bwrap is None:
        raise RuntimeError("python_tool: bubblewrap (the `bwrap` program) is not installed, "
                           "and it is this tool's isolation layer; " + _INSTALL_BWRAP + ".")
    as_root = os.geteuid() == 0
    uid = None
    if as_root and config.drop_privileges:
        uid = _pick_sandbox_uid()
        if uid is None:
            return "error: no unprivileged uid available for the sandbox (drop_privileges=True)"
    # RLIMIT_NPROC counts per user (and user namespace): it bounds the program when that is a
    # fresh uid, or a fresh user namespace (not root); the kernel exempts the host's root.
    max_processes = config.max_processes if (uid is not None or not as_root) else None
    code_fd = _code_fd(code)
    seccomp = _seccomp_filter(os.uname().machine)
    seccomp_fd = None if seccomp is None else _memory_fd(seccomp, "rlprim-seccomp")
    inherited = [fd for fd in (code_fd, seccomp_fd) if fd is not None]
    ready_read, ready_write = os.pipe()
    try:
        child = _child_config(config, uid, max_processes, False, ready_write, inherited)
        argv = (_bwrap_argv(bwrap, config, code_fd, as_root, uid is not None, seccomp_fd)
                + _python_argv(config, child))
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd="/", env={}, start_new_session=True, close_fds=True,
            pass_fds=(*inherited, ready_write),
        )
        os.close(ready_write)
        ready_write = -1
        try:
            cap_bytes = 4 * config.max_output_chars + 4096
            # Killing bwrap kills its pid namespace, so no process of the program survives.
            stdout, stderr, timed_out, truncated = _collect_output(
                process, config.timeout, cap_bytes, None)
        except BaseException:
            _kill_sandbox(process, None)
            raise
        finally:
            process.stdout.close()
            process.stderr.close()
            process.wait()
        ready = _was_ready(ready_read)
    finally:
        for fd in (*inherited, ready_read, ready_write):
            if fd >= 0:
                os.close(fd)
    if not ready and not timed_out and stderr.startswith(b"bwrap: "):
        raise _bwrap_failure(stderr.decode("utf-8", "replace"), as_root)
    return _format_result(stdout, stderr, process.returncode, timed_out, truncated, config)


def _run_with_rlimits(code: str, config: _SandboxConfig) -> str:
    uid = None
    if config.drop_privileges and os.geteuid() == 0:
        uid = _pick_sandbox_uid()
        if uid is None:
            return "error: no unprivileged uid available for the sandbox (drop_privileges=True)"
    root = os.path.realpath(tempfile.mkdtemp(prefix="rlprim-python-"))
    try:
        with open(os.path.join(root, "main.py"), "w", encoding="utf-8",
                  errors="surrogatepass") as handle:
            handle.write(code)
        if uid is not None:
            os.chown(root, uid, uid)
        child = _child_config(config, uid, config.max_processes if uid is not None else None,
                              uid is not None, None)
        env = dict(_SANDBOX_ENV, HOME=root, TMPDIR=root)
        process = subprocess.Popen(
            _python_argv(config, child), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=root, env=env, start_new_session=True, close_fds=True,
        )
        try:
            cap_bytes = 4 * config.max_output_chars + 4096
            stdout, stderr, timed_out, truncated = _collect_output(
                process, config.timeout, cap_bytes, uid)
        except BaseException:  # e.g. KeyboardInterrupt here: leave nothing running
            _kill_sandbox(process, uid)
            raise
        finally:
            process.stdout.close()
            process.stderr.close()
            process.wait()
    finally:
        _remove_tree(root)
    return _format_result(stdout, stderr, process.returncode, timed_out, truncated, config)


def _run_sandboxed(code: str, config: _SandboxConfig) -> str:
    if config.isolation == "bwrap":
        return _run_in_bwrap(code, config)
    return _run_with_rlimits(code, config)


def python_tool(
    code: str,
    timeout: float = 5.0,
    memory_mb: int = 256,
    cpu_seconds: int | None = None,
    max_output_chars: int = 2000,
    max_file_mb: int = 16,
    max_disk_mb: int = 64,
    max_processes: int = 16,
    site_packages: bool = False,
    preload_modules: Sequence[str] = (),
    audit_guard: bool = True,
    drop_privileges: bool = True,
    isolation: str = "bwrap",
) -> str:
    """Runs a Python program in a sandbox isolated by the operating system; returns its output.

    The tool of code-interpreter RL (e.g. ToRL, Li et al. 2025; ReTool, Feng et al. 2025). The
    program runs as ``sys.executable -I -B -u [-S] -c BOOTSTRAP`` (Linux), where BOOTSTRAP is
    ``rlprim/_sandbox_child.py``, in layers:

      1. **bubblewrap** (``isolation="bwrap"``, the default; the ``bwrap`` program the
         Flatpak sandbox uses): new mount, pid, network, ipc, uts (and cgroup) namespaces; a
         root file system that holds only ``/usr``, ``/etc``, the ``/bin``/``/lib*`` links
         and the Python installation, all read-only (no ``/home``, ``/root``, ``/var``,
         ``/run``, ``/sys``, ``/work``…); a fresh ``/proc`` that shows only the sandbox's own
         processes; a minimal read-only ``/dev``; private tmpfs mounts of ``max_disk_mb`` MiB
         each for ``/tmp``, ``/dev/shm`` and the working directory ``/sandbox``, which holds
         ``main.py`` (nothing of the program touches the host's disk); an empty environment
         but for PATH, HOME/TMPDIR, a UTF-8 locale and ``*_NUM_THREADS=1``; no network
         interface but a down loopback; ``--new-session`` (no terminal to inject input into)
         and ``--die-with-parent``. Killing bwrap kills the whole pid namespace, so nothing
         the program started outlives the call.
      2. **Identity.** As root (and ``drop_privileges``), bwrap runs without a user namespace
         (one would map the program to the host's root), keeps only CAP_SETUID/CAP_SETGID,
         and the child drops to a fresh random unprivileged uid/gid around 2e9 with no
         groups, losing every capability. As another user, bwrap makes a user namespace
         (the kernel must allow unprivileged ones; the error says which setting forbids
         them) in which the program keeps your uid, without capabilities, unable to nest
         user namespaces. ``PR_SET_NO_NEW_PRIVS`` either way: setuid programs gain nothing.
         A seccomp filter (x86-64 and aarch64) refuses new user namespaces (``unshare`` /
         ``clone`` with CLONE_NEWUSER; ``clone3`` answers ENOSYS so libc falls back to
         ``clone``), ``bpf``, ``userfaultfd``, ``perf_event_open``, the key rings and
         ``io_uring``.
      3. **Kernel limits** (``setrlimit``, hard = soft): ``RLIMIT_AS = memory_mb`` MiB,
         ``RLIMIT_CPU = cpu_seconds``, ``RLIMIT_FSIZE = max_file_mb`` MiB per file, 64 open
         files, no core dumps, ``RLIMIT_NPROC = max_processes`` processes *and threads*
         (counted per user, so it applies to the fresh uid as root and to the fresh user
         namespace otherwise).
      4. **Audit guard** (``audit_guard``; a ``sys.addaudithook`` hook, which cannot be removed
         once installed; everything it uses is bound at install time), the second layer,
         refusing with ``PermissionError``: writing, creating, deleting, renaming or
         chmod-ing outside the working directory (lexical check of the absolute path; no
         symlinks or hard links; no relative paths with ``..``, since audit events do not
         report ``dir_fd``); opening a directory outside it; reading outside the working
         directory and the Python installation (``/proc`` only for a few ``/proc/self``
         files); ``fork``, ``exec*``, ``system``, ``posix_spawn``, ``subprocess``; ``kill``;
         sockets; ``ctypes``; ``gc`` object walking. Libraries that import ctypes (e.g. sympy)
         work only when listed in ``preload_modules``, imported before limits and guard.
      5. **Time.** A wall-clock ``timeout`` kills bwrap, hence every process of the sandbox.

    Without bubblewrap the call raises RuntimeError saying how to install it. The fallback
    ``isolation="rlimits"`` (a RuntimeWarning says it is weaker) runs the same child directly,
    in a temporary directory on the host: layers 3-5 only, plus, as root, the uid drop and a
    network namespace, and a kill of every process of the sandbox uid at the end. Not root,
    the program then runs as you, can read what you can, use the network, and a process
    that calls ``setsid`` survives the group kill.

    Output: stdout then stderr (a traceback without the sandbox's own frames on an
    exception), cut to ``max_output_chars`` characters plus a ``[output truncated ...]`` marker
    (the rest is read and dropped, so a flood of output costs no memory). Failures come back
    as text starting with ``"error: "`` followed by the output so far: ``"error: timeout
    after 5s (process killed)"``, ``"error: memory limit exceeded (256 MB)"``, ``"error: CPU
    time limit exceeded (6s)"``, ``"error: exit status 1"`` (the program raised; the traceback
    follows), ``"error: killed by signal SIGSEGV"`` (under bwrap an exit status 129-192 reads
    as a signal). It never raises because of the program.

    Threat model, honestly: under bwrap, the boundary is the kernel's namespaces, mounts,
    capabilities, rlimits and the small seccomp filter (the attack surface of an unprivileged
    process, minus the interfaces the filter refuses). Memory is
    bounded per process (``RLIMIT_AS`` × ``max_processes``) plus the tmpfs sizes, not by a
    cgroup. The hostile corpus in ``tests/test_tools_sandbox.py`` is what was tried.
    Overhead: bubblewrap adds little time to a call here (median ratio 0.95-1.13, at most
    +35 ms, against the fallback, ``benchmarks/bench_sandbox.py``); a call costs what starting Python
    costs, about 0.2-0.4 s, more with ``site_packages`` and heavy imports.

    Args:
      code: the program text.
      timeout: wall-clock seconds before the sandbox is killed.
      memory_mb: address-space limit in MiB per process (at least 32; Python needs about 30).
      cpu_seconds: CPU-time limit in seconds; ``None`` means ``ceil(timeout) + 1`` so that the
        wall-clock timeout fires first for a single thread.
      max_output_chars: characters of output returned.
      max_file_mb: largest file the program may write, MiB.
      max_disk_mb: size of each private tmpfs (working directory, /tmp, /dev/shm) under bwrap,
        MiB; memory of the host while the call runs, freed after.
      max_processes: processes and threads the program may have (where RLIMIT_NPROC applies,
        see layer 3).
      site_packages: make the installed packages of this interpreter importable (drops
        ``-S``; packages installed in editable mode outside the installation are not mounted).
      preload_modules: modules imported before the limits, the drop and the guard.
      audit_guard: install the audit-hook guard.
      drop_privileges: when root, run as a fresh unprivileged uid (if the user namespace maps
        none, the call returns an error instead of running); ``False`` keeps uid 0 (without
        capabilities under bwrap, and without RLIMIT_NPROC, which the kernel does not apply
        to root).
      isolation: ``"bwrap"`` (bubblewrap, required) or ``"rlimits"`` (the weaker fallback
        above, with a RuntimeWarning).

    Returns:
      The program's output, or an ``"error: ..."`` text as above.

    Raises:
      RuntimeError: ``isolation="bwrap"`` and bubblewrap is missing or cannot create its
        namespaces here (the message says how to fix it).
    """
    config = _sandbox_config(timeout, memory_mb, cpu_seconds, max_output_chars, max_file_mb,
                             max_disk_mb, max_processes, site_packages, preload_modules,
                             audit_guard, drop_privileges, isolation)
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    _check_isolation(config)
    return _run_sandboxed(code, config)


def _python_tool_with(config: _SandboxConfig) -> Callable[[str], str]:
    def python(code: str) -> str:
        """Runs ``code`` (a Python program) in a sandboxed process; returns its printed output.

        Use ``print`` to see values. Errors come back as text starting with ``"error: "``.
        """
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        if config.isolation == "bwrap" and _find_bwrap() is None:
            _check_isolation(config)  # raises, saying how to install bubblewrap
        return _run_sandboxed(code, config)

    return python


def create_python_tool(
    timeout: float = 5.0,
    memory_mb: int = 256,
    cpu_seconds: int | None = None,
    max_output_chars: int = 2000,
    max_file_mb: int = 16,
    max_disk_mb: int = 64,
    max_processes: int = 16,
    site_packages: bool = False,
    preload_modules: Sequence[str] = (),
    audit_guard: bool = True,
    drop_privileges: bool = True,
    isolation: str = "bwrap",
) -> Callable[[str], str]:
    """Returns a ``python(code) -> str`` tool with the given limits fixed (see ``python_tool``).

    Use this, not ``python_tool`` itself, in a tool mapping: the model chooses every keyword a
    tool accepts, and this tool accepts only ``code``, so it cannot raise its own limits.
    The settings are validated here, once, and so is the isolation: without bubblewrap this
    raises RuntimeError (saying how to install it) unless ``isolation="rlimits"``, which warns.

    Example: ``tools = {"python": create_python_tool(timeout=2.0, memory_mb=128)}``.

    Returns:
      ``python(code: str) -> str``.
    """
    config = _sandbox_config(timeout, memory_mb, cpu_seconds, max_output_chars, max_file_mb,
                             max_disk_mb, max_processes, site_packages, preload_modules,
                             audit_guard, drop_privileges, isolation)
    _check_isolation(config)
    return _python_tool_with(config)


DEFAULT_TOOLS: Mapping[str, Callable[..., str]] = MappingProxyType({
    "calculator": calculator,
    # Built without the bubblewrap check, so importing rlprim works without it; a call checks.
    "python": _python_tool_with(_sandbox_config(5.0, 256, None, 2000, 16, 64, 16, False, (),
                                                True, True, "bwrap")),
}) if resource is not None else MappingProxyType({"calculator": calculator})
"""The built-in tools: ``calculator`` and ``python`` (``create_python_tool()`` defaults)."""
