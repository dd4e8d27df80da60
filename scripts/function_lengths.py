"""List rlprim's functions longer than a limit (default 80 lines), longest first.

    python scripts/function_lengths.py [limit]

``total`` counts the lines from ``def`` (or its first decorator) to the end of the body;
``code`` is ``total`` without the docstring. Reads the source with ``ast``; nothing is imported.
"""

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def function_lengths(package: pathlib.Path) -> list[tuple[int, int, str, str]]:
    """``(total, code, "path:line", name)`` for every function and method in ``package``."""
    rows = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            total = node.end_lineno - start + 1
            first = node.body[0]
            is_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and (
                isinstance(first.value.value, str)
            )
            doc = first.end_lineno - first.lineno + 1 if is_doc else 0
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            rows.append((total, total - doc, where, node.name))
    return sorted(rows, reverse=True)


if __name__ == "__main__":
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else 80
    long = [row for row in function_lengths(ROOT / "rlprim") if row[0] > limit]
    print(f"{'total':>5} {'code':>5}  {'function':40} where")
    for total, code, where, name in long:
        print(f"{total:5d} {code:5d}  {name:40} {where}")
    print(f"{len(long)} functions over {limit} lines")
