#!/usr/bin/env python
"""Render the API reference of ARCHITECTURE.md from the code, or check that it is current.

The section of ``ARCHITECTURE.md`` between ``<!-- api-reference:start -->`` and
``<!-- api-reference:end -->`` lists every public name, module by module in the order of the
flat public face (the ``__all__`` of ``rlprim/__init__.py``), then ``rlprim.testing`` and the
modules re-exported by ``rlprim.tasks``. Each entry is the name's signature — parameter types
left out, defaults kept, return type kept with ``torch.`` dropped — and the summary (first
paragraph) of its docstring. NamedTuples show their fields, protocols the call a replacement
must accept, constants their value or keys.

Usage::

    python scripts/gen_api_reference.py            # rewrite the section in place
    python scripts/gen_api_reference.py --check    # exit 1 when the section is out of date
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import inspect
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATH = ROOT / "ARCHITECTURE.md"
START = "<!-- api-reference:start -->"
END = "<!-- api-reference:end -->"
EXTRA_MODULES = ("rlprim.testing",)  # then the modules behind rlprim.tasks
MAX_DEFAULT_CHARS = 40
MAX_CONSTANT_CHARS = 120
# Prefixes that add length but no information to an annotation.
_ANNOTATION_PREFIXES = ("torch.", "collections.abc.", "typing.")


# ------------------------------------------------------------------------------- module order


def flat_face_modules(init_path: Path = ROOT / "rlprim" / "__init__.py") -> list[str]:
    """Module names in the order their ``__all__`` s are spliced into ``rlprim.__all__``."""
    tree = ast.parse(init_path.read_text(encoding="utf-8"))
    aliases: dict[str, str] = {}
    order: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "rlprim":
            for name in node.names:
                aliases[name.asname or name.name] = f"rlprim.{name.name}"
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            for element in node.value.elts:  # type: ignore[attr-defined]
                value = element.value if isinstance(element, ast.Starred) else element
                if isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name):
                    order.append(aliases[value.value.id])
    if not order:
        raise SystemExit(f"no `__all__ = [*_module.__all__, ...]` found in {init_path}")
    return order


def task_modules() -> list[str]:
    """The modules whose names ``rlprim.tasks`` re-exports, in the order of its ``__all__``."""
    tasks = importlib.import_module("rlprim.tasks")
    submodules = [
        value
        for value in vars(tasks).values()
        if inspect.ismodule(value) and value.__name__.startswith("rlprim.tasks.")
    ]
    order: list[str] = []
    for name in tasks.__all__:
        for module in submodules:
            if name in getattr(module, "__all__", ()) and module.__name__ not in order:
                order.append(module.__name__)
    return order


# ------------------------------------------------------------------------------- rendering


def _one_line(text: str) -> str:
    return " ".join(text.split())


def summary(doc: str | None) -> str:
    """The first paragraph of a docstring on one line, with RST ``code`` as Markdown `code`."""
    if not doc:
        return ""
    paragraph = _one_line(inspect.cleandoc(doc).split("\n\n", 1)[0])
    if paragraph.endswith("::"):  # an RST literal block (a formula) follows in the docstring
        paragraph = paragraph[:-2] + "."
    return paragraph.replace("``", "`")


def shorten_annotation(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    for prefix in _ANNOTATION_PREFIXES:
        text = text.replace(prefix, "")
    return text


class _Shown(str):
    """A default value rendered by ``inspect.Signature`` as the text it holds."""

    def __repr__(self) -> str:
        return str(self)


def _named_constant(value: Any, namespaces: list[dict[str, Any]]) -> str | None:
    for namespace in namespaces:
        for name, candidate in namespace.items():
            if not name.isupper():
                continue
            if candidate is value or (
                isinstance(value, str) and isinstance(candidate, str) and candidate == value
            ):
                return name
    return None


def render_default(value: Any, namespaces: list[dict[str, Any]]) -> str:
    """Functions by name, long values by the constant that holds them, else a short repr."""
    if callable(value) and hasattr(value, "__name__") and not isinstance(value, type):
        return value.__name__
    text = repr(value)
    if len(text) <= MAX_DEFAULT_CHARS:
        return text
    constant = _named_constant(value, namespaces)
    if constant is not None:
        return constant
    return text[: MAX_DEFAULT_CHARS - 1] + "…"


def render_signature(
    name: str, function: Any, namespaces: list[dict[str, Any]], drop_self: bool = False
) -> str:
    signature = inspect.signature(function)
    parameters = list(signature.parameters.values())
    if drop_self and parameters and parameters[0].name == "self":
        parameters = parameters[1:]
    shown = []
    for parameter in parameters:
        parameter = parameter.replace(annotation=inspect.Parameter.empty)
        if parameter.default is not inspect.Parameter.empty:
            parameter = parameter.replace(
                default=_Shown(render_default(parameter.default, namespaces))
            )
        shown.append(parameter)
    text = name + str(
        signature.replace(parameters=shown, return_annotation=inspect.Signature.empty)
    )
    if signature.return_annotation is not inspect.Signature.empty:
        text += " -> " + shorten_annotation(signature.return_annotation)
    return text


def _is_protocol(obj: Any) -> bool:
    return isinstance(obj, type) and bool(getattr(obj, "_is_protocol", False))


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")


def render_constant(name: str, value: Any) -> tuple[str, str]:
    if isinstance(value, Mapping):
        keys = ", ".join(f"`{k}`" for k in value)
        return f"`{name}`", f"read-only mapping with keys {keys}." if isinstance(
            value, types.MappingProxyType
        ) else f"mapping with keys {keys}."
    if isinstance(value, (types.UnionType, type(Any))) or type(value).__module__ == "typing":
        return f"`{name} = {shorten_annotation(value)}`", "type alias."
    text = repr(value)
    if len(text) <= MAX_CONSTANT_CHARS:
        return f"`{name} = {text}`", ""
    if isinstance(value, str):
        return f"`{name}: str`", ""
    return f"`{name}`", f"{type(value).__name__} of {len(value)} items."


def render_entry(name: str, obj: Any, namespaces: list[dict[str, Any]]) -> str:
    if _is_protocol(obj):
        call = render_signature("fn", obj.__call__, namespaces, drop_self=True)
        head, doc = f"`{name}`: `{call}`", summary(obj.__doc__)
    elif _is_namedtuple(obj):
        head, doc = f"`{render_signature(name, obj, namespaces)}`", summary(obj.__doc__)
    elif callable(obj) and not isinstance(obj, type):  # functions, also cached or wrapped
        head, doc = f"`{render_signature(name, obj, namespaces)}`", summary(obj.__doc__)
    else:
        head, doc = render_constant(name, obj)
    return f"- {head}" + (f"\n  — {doc}" if doc else "")


def render_module(module_name: str, flat: dict[str, Any]) -> str:
    module = importlib.import_module(module_name)
    namespaces = [
        {n: getattr(module, n) for n in getattr(module, "__all__", ())},
        flat,
        vars(module),
    ]
    lines = [f"### `{module_name}`", ""]
    about = summary(module.__doc__)
    if about:
        lines += [about, ""]
    for name in module.__all__:
        lines.append(render_entry(name, getattr(module, name), namespaces))
    return "\n".join(lines)


def render_reference() -> str:
    """The whole generated section, markers excluded."""
    rlprim = importlib.import_module("rlprim")
    flat = {n: getattr(rlprim, n) for n in rlprim.__all__}
    modules = flat_face_modules() + list(EXTRA_MODULES) + task_modules()
    parts = [
        "<!-- Generated by scripts/gen_api_reference.py from the code's docstrings: do not edit "
        "by hand; run `python scripts/gen_api_reference.py` after changing a public name. -->",
    ]
    parts += [render_module(name, flat) for name in modules]
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------- the file


def split_document(text: str, path: Path) -> tuple[str, str, str]:
    """``(before, section, after)`` around the markers (markers kept in before / after)."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{path}: expected exactly one {START} followed by one {END}")
    head, rest = text.split(START, 1)
    section, tail = rest.split(END, 1)
    return head + START, section, END + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the section is stale")
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH, help="the Markdown file")
    args = parser.parse_args(argv)

    text = args.path.read_text(encoding="utf-8")
    before, section, after = split_document(text, args.path)
    fresh = "\n" + render_reference() + "\n"
    if args.check:
        if section == fresh:
            return 0
        diff = difflib.unified_diff(
            section.splitlines(), fresh.splitlines(), "in the file", "from the code", lineterm=""
        )
        print(f"{args.path}: the API reference is out of date; run "
              f"`python scripts/gen_api_reference.py`.", file=sys.stderr)
        print("\n".join(list(diff)[:80]), file=sys.stderr)
        return 1
    if section != fresh:
        args.path.write_text(before + fresh + after, encoding="utf-8")
        print(f"{args.path}: API reference updated.")
    else:
        print(f"{args.path}: API reference already current.")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
