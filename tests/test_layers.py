"""Imports run one way: types ← math ← model/tools ← data ← loop ← tasks and demo ← face.

Every module of ``rlprim`` sits on one layer (ARCHITECTURE.md, "Layers"); a module may import
its own layer and those below, never one above. The imports are read with ``ast`` (nothing is
run), at every depth — a function-level lazy import counts like one at the top of the file.
"""

import ast
import pathlib
import sys
import textwrap

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "rlprim"

LAYER_NAMES = ("types", "math", "model and tools", "data", "loop", "tasks and demo", "face")
LAYERS = {
    "types": 0, "protocols": 0,
    "advantages": 1, "kl": 1, "losses": 1, "rewards": 1, "algorithms": 1, "checks": 1,
    "logprobs": 2, "inference": 2, "critic": 2, "reward_models": 2, "tools": 2,
    "model_wrappers": 2, "testing": 2, "_sandbox_child": 2,
    "rollouts": 3, "batching": 3, "data": 3, "vllm_engine": 3, "constitutional": 3,
    "training": 4, "checkpoint": 4, "logging": 4, "distributed": 4, "serialization": 4,
    "remote": 4,
    "tasks": 5, "demo": 5, "quick_start": 5,
    "__init__": 6,
}



def module_of(path: pathlib.Path) -> str:
    """The layer-table name of a source file: ``tasks`` for the whole tasks package."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return "tasks" if parts[0] == "tasks" else parts[0]


def imported_modules(source: str, package: tuple[str, ...]) -> list[tuple[int, str]]:
    """``(line, top-level rlprim module)`` for every import of rlprim in ``source``, at any depth.

    ``package`` is the dotted package of the file (``("rlprim",)`` or ``("rlprim", "tasks")``)
    so relative imports resolve. ``import rlprim`` and ``from rlprim import x`` where ``x`` is
    not a module both name the public face (``__init__``).
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            dotted = [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            base += node.module.split(".") if node.module else []
            if base == ["rlprim"] or base == ["rlprim", "tasks"]:
                dotted = [base + [alias.name] for alias in node.names]
            else:
                dotted = [base]
        else:
            continue
        for parts in dotted:
            if parts[0] != "rlprim":
                continue
            name = parts[1] if len(parts) > 1 else "__init__"
            found.append((node.lineno, name if name in LAYERS else "__init__"))
    return found


def layer_violations() -> list[tuple[str, str, str]]:
    """``(file:line, importer, imported)`` for every import of a module on a higher layer."""
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_of(path)
        package = ("rlprim", "tasks") if importer == "tasks" else ("rlprim",)
        for line, imported in imported_modules(path.read_text(), package):
            if imported != importer and LAYERS[imported] > LAYERS[importer]:
                where = f"{path.relative_to(PACKAGE.parent)}:{line}"
                violations.append((where, importer, imported))
    return violations


def test_every_module_sits_on_a_layer():
    unplaced = sorted({module_of(p) for p in PACKAGE.rglob("*.py")} - set(LAYERS))
    assert unplaced == [], f"add these modules to LAYERS (and ARCHITECTURE.md): {unplaced}"


def test_no_module_imports_from_a_layer_above():
    violations = layer_violations()
    for where, importer, imported in violations:
        print(
            f"{where}: {importer} ({LAYER_NAMES[LAYERS[importer]]}) imports {imported} "
            f"({LAYER_NAMES[LAYERS[imported]]})"
        )
    assert violations == []


def test_layer_table_matches_architecture_md():
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    section = text[text.index("### Layers") :]
    section = section[: section.index("\n## ")]
    missing = [m for m in LAYERS if m != "__init__" and f"`{m}`" not in section]
    assert missing == []


@pytest.mark.parametrize(
    ("source", "package", "expected"),
    [
        ("import torch\nfrom rlprim.types import Batch", ("rlprim",), [(2, "types")]),
        ("def f():\n    from rlprim.training import train\n", ("rlprim",), [(2, "training")]),
        ("import rlprim.distributed as d", ("rlprim",), [(1, "distributed")]),
        ("from rlprim import inference, logprobs", ("rlprim",), [(1, "inference"), (1, "logprobs")]),
        ("import rlprim", ("rlprim",), [(1, "__init__")]),
        ("from rlprim import Batch", ("rlprim",), [(1, "__init__")]),
        ("from .kl import kl_k1\nfrom . import losses", ("rlprim",), [(1, "kl"), (2, "losses")]),
        ("from .. import rollouts", ("rlprim", "tasks"), [(1, "rollouts")]),
        ("from . import countdown", ("rlprim", "tasks"), [(1, "tasks")]),
        ("from rlprim.tasks.arithmetic import arithmetic_split", ("rlprim",), [(1, "tasks")]),
        ("class A:\n  def f(self):\n    import rlprim.logging\n", ("rlprim",), [(3, "logging")]),
        ("import rlprimx\nfrom torch import nn", ("rlprim",), []),
    ],
)
def test_imports_are_read_at_every_depth_and_form(source, package, expected):
    assert sorted(imported_modules(textwrap.dedent(source), package)) == sorted(expected)


def test_a_lazy_upward_import_is_a_violation(tmp_path, monkeypatch):
    fake = tmp_path / "rlprim"
    fake.mkdir()
    (fake / "kl.py").write_text("def f():\n    from rlprim.rollouts import create_rollout\n")
    (fake / "rollouts.py").write_text("from rlprim.kl import kl_k1\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert layer_violations() == [("rlprim/kl.py:2", "kl", "rollouts")]
