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
  * ``python``: ``create_python_tool()``, which runs a program in a separate, resource-limited
    process (see ``python_tool`` for what is and is not contained).
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
import subprocess
import sys
import tempfile
import time
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

# Runs in the child (``python -I -c``) before the user's program: resource limits, privilege
# drop, audit guard, then the program from main.py. Everything the guard relies on is bound
# to local names when it is installed, so user code rebinding builtins or os.* cannot change it.
_BOOTSTRAP = r"""
import json, os, posixpath, resource, stat, sys, traceback
_config = json.loads(sys.argv[1])
sys.argv = ["main.py"]


def _fail(message):
    os.write(2, ("sandbox setup failed: " + message + "\n").encode())
    os._exit(_config["setup_exit"])


def _limit(which, value, hard=None):
    hard = value if hard is None else hard
    current_hard = resource.getrlimit(which)[1]
    if current_hard != resource.RLIM_INFINITY:
        value, hard = min(value, current_hard), min(hard, current_hard)
    resource.setrlimit(which, (value, hard))


def _keep_import_paths_reachable(directory_fds):
    # The sandbox uid may not be able to traverse to the interpreter (e.g. a Python installed
    # under /root, mode 0700). A directory fd opened before the drop stays usable through
    # /proc/self/fd/N, which the kernel resolves without re-checking the parent directories.
    aliases = {}
    for entry, fd in directory_fds.items():
        if os.access(entry, os.R_OK | os.X_OK):
            os.close(fd)
        else:
            aliases[entry] = "/proc/self/fd/%d" % fd

    def alias(path):
        for entry, replacement in aliases.items():
            if path == entry or path.startswith(entry + "/"):
                return replacement + path[len(entry):]
        return path

    sys.path[:] = [alias(p) if isinstance(p, str) else p for p in sys.path]
    for module in list(sys.modules.values()):
        search = getattr(module, "__path__", None)
        if isinstance(search, list):
            search[:] = [alias(p) if isinstance(p, str) else p for p in search]


def _setup(config):
    try:  # best effort: no network (when root) and no privilege gain through exec (setuid bits)
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if os.geteuid() == 0:
            libc.unshare(0x40000000)  # CLONE_NEWNET: a network namespace with no interfaces up
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    except Exception:
        pass
    for name in config["preload"]:
        try:
            __import__(name)
        except Exception:
            pass
    for name in ("ctypes", "ctypes._endian", "_ctypes", "_posixsubprocess"):
        sys.modules.pop(name, None)  # re-importing them meets the guard
    uid = config["uid"]
    directory_fds = {}
    try:
        _limit(resource.RLIMIT_AS, config["memory_bytes"])
        _limit(resource.RLIMIT_CPU, config["cpu_seconds"], config["cpu_seconds"] + 1)
        _limit(resource.RLIMIT_FSIZE, config["file_bytes"])
        _limit(resource.RLIMIT_NOFILE, 64)
        _limit(resource.RLIMIT_CORE, 0)
        if uid is not None:
            for entry in sys.path:
                if isinstance(entry, str) and posixpath.isabs(entry) and posixpath.isdir(entry):
                    directory_fds[entry] = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
            _limit(resource.RLIMIT_NPROC, config["max_processes"])
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            if os.getuid() != uid or os.geteuid() != uid or os.getegid() != uid:
                _fail("could not drop privileges")
            _keep_import_paths_reachable(directory_fds)
    except (OSError, ValueError) as exc:
        _fail(repr(exc))
    if config["audit_guard"]:
        _install_guard(os.getcwd())


def _install_guard(root):
    _str, _bytes, _int, _type = str, bytes, int, type
    _fspath, _getcwd, _stat, _isdir = os.fspath, os.getcwd, os.stat, stat.S_ISDIR
    _PermissionError, _ImportError, _OSError = PermissionError, ImportError, OSError
    _decode, _startswith, _split, _join = _bytes.decode, _str.startswith, _str.split, _str.join
    _getitem, _whole = _str.__getitem__, slice(None)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    readable = {root}
    for entry in [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path]:
        if isinstance(entry, str) and posixpath.isabs(entry):
            readable.add(posixpath.normpath(entry))
    readable = tuple(sorted(readable))
    readable_files = frozenset([
        "/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/etc/localtime",
        "/proc/cpuinfo", "/proc/meminfo", "/proc/self/stat", "/proc/self/statm",
        "/proc/self/status", "/proc/self/limits",
    ])
    refused = frozenset([
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "os.symlink",
        "os.link", "gc.get_referrers", "gc.get_referents", "gc.get_objects", "os.startfile",
    ])
    path_writes = frozenset([
        "os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.utime",
        "os.truncate", "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags", "os.lchmod",
    ])
    refused_prefixes = ("ctypes.", "socket.")
    refused_imports = frozenset(["ctypes", "_ctypes", "_posixsubprocess"])

    def absolute(event, path):
        # The lexical absolute path. Audit events do not report dir_fd, so a relative path may
        # be relative to a directory fd instead of the cwd: refusing ".." in relative paths
        # keeps such a path inside the directory it is relative to.
        kind = _type(path)
        if kind is not _str and kind is not _bytes:
            path = _fspath(path)
            kind = _type(path)
        path = _decode(path, "utf-8", "surrogateescape") if kind is not _str else _getitem(path, _whole)
        relative = not _startswith(path, "/")
        if relative:
            path = _getcwd() + "/" + path
        parts = []
        for part in _split(path, "/"):
            if part == "" or part == ".":
                continue
            if part == "..":
                if relative:
                    deny(event + " a relative path with '..'")
                if parts:
                    parts.pop()
                continue
            parts.append(part)
        return "/" + _join("/", parts)

    def under(path, prefixes):
        for prefix in prefixes:
            if path == prefix or _startswith(path, prefix if prefix == "/" else prefix + "/"):
                return True
        return False

    def deny(what, why=""):
        raise _PermissionError("python_tool sandbox: " + what + " is not allowed" + why)

    def check_write(event, path):
        if _type(path) is _int:
            if event == "os.truncate":
                return
            deny(event + " on a file descriptor")
        full = absolute(event, path)
        if not under(full, (root,)):
            deny(event + " " + repr(full), " (outside the working directory)")

    def check_read(event, path):
        full = absolute(event, path)
        if under(full, (root,)):
            return
        if full not in readable_files and not under(full, readable):
            deny(event + " " + repr(full), " (only the working directory and the Python "
                 "installation are readable)")
        if event == "reading":
            try:
                is_dir = _isdir(_stat(full).st_mode)
            except _OSError:
                return
            if is_dir:  # a directory fd outside would allow *at() calls relative to it
                deny("opening the directory " + repr(full))

    def hook(event, args):
        if event == "open":
            path, flags = args[0], args[2]
            if _type(path) is _int:
                return
            if flags is not None and flags & write_flags:
                check_write("writing", path)
            else:
                check_read("reading", path)
        elif event in refused or _startswith(event, refused_prefixes):
            deny(event)
        elif event in path_writes:
            check_write(event, args[0])
        elif event == "os.rename":
            check_write(event, args[0])
            check_write(event, args[1])
        elif event == "os.listdir" or event == "os.scandir":
            path = args[0]
            if _type(path) is not _int:
                check_read("listing", "." if path is None else path)
        elif event == "import":
            name = args[0]
            if _type(name) is _str and (name in refused_imports or _startswith(name, "ctypes.")):
                raise _ImportError("python_tool sandbox: importing " + name + " is not allowed")

    sys.addaudithook(hook)


def _run(config):
    try:
        with open("main.py", "rb") as handle:
            source = handle.read()
        code = compile(source, "main.py", "exec", dont_inherit=True)
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit:
        raise
    except MemoryError:
        os.write(2, b"MemoryError\n")
        os._exit(config["memory_exit"])
    except BaseException as exc:
        report = traceback.TracebackException(type(exc), exc, exc.__traceback__)
        for part in report.format(chain=True):
            if '  File "<string>"' not in part:  # the sandbox's own frames
                sys.stderr.write(part)
        sys.stderr.flush()
        os._exit(1)


_setup(_config)
_run(_config)
"""

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
    max_processes: int
    site_packages: bool
    preload_modules: tuple[str, ...]
    audit_guard: bool
    drop_privileges: bool


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _sandbox_config(
    timeout: float, memory_mb: int, cpu_seconds: int | None, max_output_chars: int,
    max_file_mb: int, max_processes: int, site_packages: bool,
    preload_modules: Sequence[str], audit_guard: bool, drop_privileges: bool,
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
    _positive_int("max_processes", max_processes)
    if isinstance(preload_modules, str) or not all(isinstance(m, str) for m in preload_modules):
        raise TypeError(f"preload_modules must be a sequence of module names, got {preload_modules!r}")
    for flag_name, flag in (("site_packages", site_packages), ("audit_guard", audit_guard),
                            ("drop_privileges", drop_privileges)):
        if not isinstance(flag, bool):
            raise TypeError(f"{flag_name} must be a bool, got {type(flag).__name__}")
    return _SandboxConfig(float(timeout), memory_mb, cpu_seconds, max_output_chars, max_file_mb,
                          max_processes, site_packages, tuple(preload_modules), audit_guard,
                          drop_privileges)


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


def _run_sandboxed(code: str, config: _SandboxConfig) -> str:
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
        child_config = {
            "uid": uid,
            "memory_bytes": config.memory_mb * 2**20,
            "cpu_seconds": config.cpu_seconds,
            "file_bytes": config.max_file_mb * 2**20,
            "max_processes": config.max_processes,
            "preload": list(config.preload_modules),
            "audit_guard": config.audit_guard,
            "setup_exit": _SETUP_FAILED_EXIT,
            "memory_exit": _MEMORY_EXIT,
        }
        argv = [sys.executable, "-I", "-B", "-u", "-X", "utf8"]
        if not config.site_packages:
            argv.append("-S")
        argv += ["-c", _BOOTSTRAP, json.dumps(child_config)]
        env = dict(_SANDBOX_ENV, HOME=root, TMPDIR=root)
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=root, env=env, start_new_session=True, close_fds=True,
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

    output = stdout.decode("utf-8", "replace")
    error_text = stderr.decode("utf-8", "replace")
    if output and error_text and not output.endswith("\n"):
        output += "\n"
    output += error_text
    if truncated or len(output) > config.max_output_chars:
        output = (output[: config.max_output_chars]
                  + f"\n[output truncated to {config.max_output_chars} characters]")
    status = _describe_status(process.returncode, timed_out, config)
    if status is None:
        return output
    return status + ("\n" + output if output else "")


def python_tool(
    code: str,
    timeout: float = 5.0,
    memory_mb: int = 256,
    cpu_seconds: int | None = None,
    max_output_chars: int = 2000,
    max_file_mb: int = 16,
    max_processes: int = 16,
    site_packages: bool = False,
    preload_modules: Sequence[str] = (),
    audit_guard: bool = True,
    drop_privileges: bool = True,
) -> str:
    """Runs a Python program in a separate, resource-limited process and returns its output.

    The tool of code-interpreter RL (e.g. ToRL, Li et al. 2025; ReTool, Feng et al. 2025). The
    program runs as ``sys.executable -I -B -u [-S] -c BOOTSTRAP`` (POSIX only), in layers:

      1. **Process.** A new session (own process group); stdin is ``/dev/null``; a fresh
         temporary working directory, deleted afterwards, holds the program as ``main.py``;
         the environment is *not* inherited — only PATH, HOME/TMPDIR (the working directory),
         a UTF-8 locale and ``*_NUM_THREADS=1``; ``-I`` ignores PYTHON* variables, the user
         site and the script directory; ``-S`` (unless ``site_packages``) leaves the standard
         library only.
      2. **Kernel limits** (``setrlimit``, hard = soft so the program cannot raise them):
         ``RLIMIT_AS = memory_mb`` MiB, ``RLIMIT_CPU = cpu_seconds``, ``RLIMIT_FSIZE =
         max_file_mb`` MiB per file, 64 open files, no core dumps; ``PR_SET_NO_NEW_PRIVS``
         (setuid programs gain nothing).
      3. **Privilege drop** (when this process is root and ``drop_privileges``): a fresh
         random unprivileged uid/gid around 2e9 with no supplementary groups and
         ``RLIMIT_NPROC = max_processes`` (processes *and* threads of that uid). The kernel
         exempts root from RLIMIT_NPROC, so only after the drop does a fork bomb stop at the
         limit; the drop also denies writes to anything not world-writable, reads of private
         files (including other processes' ``/proc/PID/environ``) and signals to other users'
         processes. A new network namespace is created too (best effort: no network). Import
         directories the sandbox uid cannot traverse to (an interpreter under ``/root``) stay
         importable through directory fds opened before the drop (``/proc/self/fd/N`` paths).
      4. **Audit guard** (``audit_guard``; a ``sys.addaudithook`` hook, which cannot be removed
         once installed; everything it uses is bound at install time) refusing with
         ``PermissionError``: writing, creating, deleting, renaming or chmod-ing outside the
         working directory (lexical check of the absolute path; creating symlinks and hard
         links is refused, so none can point outside; relative paths with ``..`` are refused
         because audit events do not report ``dir_fd``); opening a directory outside it;
         reading outside the working directory and the Python installation (``/proc`` only for
         a few ``/proc/self`` files); ``fork``, ``exec*``, ``system``, ``posix_spawn``,
         ``subprocess``; ``kill``; sockets; ``ctypes``; ``gc`` object walking. Libraries that
         import ctypes (e.g. sympy) work only when listed in ``preload_modules``, which are
         imported before limits, drop and guard.
      5. **Cleanup.** A wall-clock ``timeout`` kills the process group and every process of
         the sandbox uid (also those that left the group with ``setsid``); when the program
         ends, whatever it left running is killed the same way.

    Output: stdout then stderr (a traceback without the sandbox's own frames on an
    exception), cut to ``max_output_chars`` characters plus a ``[output truncated ...]`` marker
    (the rest is read and dropped, so a flood of output costs no memory). Failures come back
    as text starting with ``"error: "`` followed by the output so far: ``"error: timeout
    after 5s (process killed)"``, ``"error: memory limit exceeded (256 MB)"``, ``"error: CPU
    time limit exceeded (6s)"``, ``"error: exit status 1"`` (the program raised; the traceback
    follows), ``"error: killed by signal SIGSEGV"``. It never raises because of the program.

    Threat model, honestly: this contains accidents and naive hostile code — infinite loops,
    fork bombs, huge allocations or outputs, stray writes, reading secrets from the
    environment, network calls. It is *not* a security boundary against a determined attacker:
    CPython documents that audit hooks can be bypassed (e.g. by code that corrupts interpreter
    memory, or a path object whose ``__fspath__`` changes between the check and the use), and
    then only layers 1-3 and 5 remain. Not running as root there is no uid drop: the program
    could then write wherever your user can, read your files and ``/proc``, use the network,
    and a process that calls ``setsid`` survives the group kill. Never limited: total disk use
    by many files. For untrusted code at scale, run this inside a container or a dedicated
    sandbox (gVisor, nsjail, firejail). Overhead: about 0.1-0.3 s per call.

    Args:
      code: the program text.
      timeout: wall-clock seconds before the process group is killed.
      memory_mb: address-space limit in MiB (at least 32; Python itself needs about 30).
      cpu_seconds: CPU-time limit in seconds; ``None`` means ``ceil(timeout) + 1`` so that the
        wall-clock timeout fires first for a single thread.
      max_output_chars: characters of output returned.
      max_file_mb: largest file the program may write, MiB.
      max_processes: processes and threads the sandbox uid may have (after a privilege drop).
      site_packages: make installed packages importable (drops ``-S``).
      preload_modules: modules imported before the limits, the drop and the guard.
      audit_guard: install the audit-hook guard.
      drop_privileges: when root, run as a fresh unprivileged uid (if the user namespace maps
        none, the call returns an error instead of running); ``False`` keeps root, and then
        only the guard stands between the program and the machine.

    Returns:
      The program's output, or an ``"error: ..."`` text as above.
    """
    config = _sandbox_config(timeout, memory_mb, cpu_seconds, max_output_chars, max_file_mb,
                             max_processes, site_packages, preload_modules, audit_guard,
                             drop_privileges)
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    return _run_sandboxed(code, config)


def create_python_tool(
    timeout: float = 5.0,
    memory_mb: int = 256,
    cpu_seconds: int | None = None,
    max_output_chars: int = 2000,
    max_file_mb: int = 16,
    max_processes: int = 16,
    site_packages: bool = False,
    preload_modules: Sequence[str] = (),
    audit_guard: bool = True,
    drop_privileges: bool = True,
) -> Callable[[str], str]:
    """Returns a ``python(code) -> str`` tool with the given limits fixed (see ``python_tool``).

    Use this, not ``python_tool`` itself, in a tool mapping: the model chooses every keyword a
    tool accepts, and this tool accepts only ``code``, so it cannot raise its own limits.
    The settings are validated here, once.

    Example: ``tools = {"python": create_python_tool(timeout=2.0, memory_mb=128)}``.

    Returns:
      ``python(code: str) -> str``.
    """
    config = _sandbox_config(timeout, memory_mb, cpu_seconds, max_output_chars, max_file_mb,
                             max_processes, site_packages, preload_modules, audit_guard,
                             drop_privileges)

    def python(code: str) -> str:
        """Runs ``code`` (a Python program) in a sandboxed process; returns its printed output.

        Use ``print`` to see values. Errors come back as text starting with ``"error: "``.
        """
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        return _run_sandboxed(code, config)

    return python


DEFAULT_TOOLS: Mapping[str, Callable[..., str]] = MappingProxyType(
    {"calculator": calculator, "python": create_python_tool()}
) if resource is not None else MappingProxyType({"calculator": calculator})
"""The built-in tools: ``calculator`` and ``python`` (``create_python_tool()`` defaults)."""
