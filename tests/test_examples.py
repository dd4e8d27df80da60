"""The worked examples run: every ``examples/*.py`` script and ``examples/notebook.ipynb``.

Scripts. Each example runs in quick mode (``--quick``; the scripts also read
``RLPRIM_EXAMPLE_QUICK=1``) as a real subprocess of ``sys.executable`` (``distributed_grpo``
as two real processes under ``python -m torch.distributed.run``), offline
(``HF_HUB_OFFLINE=1``), in a temporary working directory, with a timeout. It must exit with 0
and its last line of output must be its summary ``[<name>] done: key=value ...``; the values are
then checked against what the example is meant to show (e.g. that the algorithm switch appears
in the logged statistics, or that the resumed run equals the uninterrupted one).

Notebook. ``examples/notebook.ipynb`` is executed top to bottom with ``nbclient`` on a local
``python3`` kernel running this interpreter (a timeout per cell); an error in any cell fails the
test, and the JSON line printed by the cell tagged ``summary`` is checked.

EXAMPLES.md. Each example has a section with the command that runs it and an excerpt (a
``python`` block marked ``<!-- excerpt: examples/NAME.py -->``). tests/test_docs.py checks that
every excerpt is the exact text of its file and runs the other python blocks.

The child processes get one intra-op thread each (``OMP_NUM_THREADS=1``): the models are tiny,
and on a busy two-core machine more threads only fight each other.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "examples"
SCRIPT_TIMEOUT = 240  # seconds per example; each takes a few seconds of work in quick mode
CELL_TIMEOUT = 180  # seconds per notebook cell
SUMMARY = re.compile(r"^\[(?P<name>[a-z_]+)\] done: (?P<fields>.*)$")


def _fields(text: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in text.split())


def _check_basic_grpo_loop(f: dict[str, str]) -> None:
    assert int(f["iterations"]) == 2
    assert 0.0 <= float(f["reward_first"]) <= 1.0 and 0.0 <= float(f["reward_last"]) <= 1.0


def _check_vector_rewards(f: dict[str, str]) -> None:
    assert f["runs"].split(",") == ["weighted_sum", "worst_case", "pareto"]
    assert int(f["iterations"]) == 2
    # Pareto ranks within a group span [0, 1] whenever the group has more than one front.
    low, high = (float(x) for x in f["pareto_range"].split(".."))
    assert 0.0 <= low <= high <= 1.0


def _check_switch_algorithm(f: dict[str, str]) -> None:
    assert f["algorithms"].split(",") == ["grpo", "grpo", "dapo"]
    assert [float(x) for x in f["kl_coefs"].split(",")] == [0.04, 0.02, 0.0]


def _check_multiturn_tools(f: dict[str, str]) -> None:
    assert int(f["model_tool_calls"]) >= 0
    # The scripted generator calls the calculator once per problem; one call is malformed.
    assert int(f["scripted_calls"]) == 3 and int(f["executed"]) == 3
    assert int(f["errors"]) == 1
    assert int(f["masked_tool_tokens"]) > 0
    assert f["correct"] == "2/3"


def _check_custom_kl_ema(f: dict[str, str]) -> None:
    assert f["kl_fn"] == "huber" and int(f["iterations"]) == 2
    frozen, ema = float(f["distance_frozen"]), float(f["distance_ema"])
    # The EMA reference follows the policy, so it ends closer to it than a frozen one.
    assert 0.0 < ema < frozen


def _check_custom_pipeline(f: dict[str, str]) -> None:
    assert f["resume_exact"] == "True"
    assert int(f["iterations"]) == 2 and int(f["resumed_at"]) == 1
    assert int(f["stats_lines"]) == 2  # one line per iteration across the stop and the resume
    assert int(f["checkpoints_kept"]) == 2


def _check_quick_start_oneliner(f: dict[str, str]) -> None:
    assert int(f["iterations"]) == 2 and int(f["stats_lines"]) == 2
    assert f["files"].split(",") == ["checkpoint", "reward_curve.png", "stats.jsonl"]


def _check_countdown_dapo(f: dict[str, str]) -> None:
    assert int(f["iterations"]) == 2
    # Every iteration re-samples (dynamic sampling) at least once; updates only when informative.
    assert int(f["sampling_rounds"]) >= 2
    assert int(f["updates"]) + int(f["iterations_without_informative_groups"]) == 2


def _check_quickstart(f: dict[str, str]) -> None:
    assert int(f["iterations"]) == 3
    assert 0.0 <= float(f["accuracy_before"]) <= 0.35
    assert 0.0 <= float(f["accuracy_after"]) <= 1.0


def _check_grpo_arithmetic(f: dict[str, str]) -> None:
    assert int(f["iterations"]) == 3 and int(f["records"]) == 3
    assert 0.0 <= float(f["heldout_accuracy"]) <= 1.0


def _check_ppo_arithmetic(f: dict[str, str]) -> None:
    assert int(f["iterations"]) == 2
    assert float(f["value_loss"]) >= 0.0 and float(f["kl"]) >= -1e-6


def _check_distributed_grpo(f: dict[str, str]) -> None:
    assert int(f["world_size"]) == 2 and int(f["iterations"]) == 3
    assert f["prompts_per_rank"] == "4,4"  # 8 global prompts, whole groups per rank
    assert f["weights_identical"] == "True"  # every rank ends with the same weights
    assert int(f["num_sequences"]) == 64  # the global batch's statistics (8 prompts × 8)
    assert f["checkpoint"] == "step_00000003"
    assert 0.0 <= float(f["heldout_accuracy"]) <= 1.0


def _check_remote_reward(f: dict[str, str]) -> None:
    assert int(f["iterations"]) == 3 and f["server"] == "reward"
    assert f["remote_equals_local"] == "True" and int(f["rollouts"]) == 32
    assert 0.0 <= float(f["reward_first"]) <= 1.0 and 0.0 <= float(f["reward_last"]) <= 1.0
    assert float(f["latency_ms"]) > 0.0
    assert f["after_stop"] == "ConnectionError"


def _check_constitutional_ai(f: dict[str, str]) -> None:
    assert int(f["principles"]) == 4 and int(f["prompts"]) == 8 and int(f["sl_pairs"]) == 8
    assert int(f["rl_iterations"]) == 2
    assert 0.0 < float(f["judge_mean"]) < 1.0 and 0.0 <= float(f["win_rate"]) <= 1.0
    # DPO on fixed (original, revised) pairs, greedy everywhere: no sampling luck involved.
    assert float(f["dpo_margin_after"]) > float(f["dpo_margin_before"])


EXAMPLES: dict[str, Callable[[dict[str, str]], None]] = {
    "basic_grpo_loop": _check_basic_grpo_loop,
    "vector_rewards": _check_vector_rewards,
    "switch_algorithm": _check_switch_algorithm,
    "multiturn_tools": _check_multiturn_tools,
    "custom_kl_ema": _check_custom_kl_ema,
    "custom_pipeline": _check_custom_pipeline,
    "quick_start_oneliner": _check_quick_start_oneliner,
    "countdown_dapo": _check_countdown_dapo,
    "quickstart": _check_quickstart,
    "grpo_arithmetic": _check_grpo_arithmetic,
    "ppo_arithmetic": _check_ppo_arithmetic,
    "distributed_grpo": _check_distributed_grpo,
    "remote_reward": _check_remote_reward,
    "constitutional_ai": _check_constitutional_ai,
}
# Launched with torchrun (real processes, gloo on CPU): name -> processes.
TORCHRUN_EXAMPLES = {"distributed_grpo": 2}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _example_command(name: str) -> list[str]:
    script = str(EXAMPLES_DIR / f"{name}.py")
    if name not in TORCHRUN_EXAMPLES:
        return [sys.executable, script, "--quick"]
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(TORCHRUN_EXAMPLES[name]),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        script, "--quick",
    ]


def _child_env(tmp_path: Path) -> dict[str, str]:
    """Offline, one thread, quick mode, and temporary files under ``tmp_path/tmp``."""
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update(
        TMPDIR=str(temp_dir),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="offline",
        MPLBACKEND="Agg",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        RLPRIM_EXAMPLE_QUICK="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def test_every_example_script_is_tested():
    scripts = sorted(p.stem for p in EXAMPLES_DIR.glob("*.py"))
    assert scripts == sorted(EXAMPLES), "add the new example to EXAMPLES in this file"


def _run_example(name: str, tmp_path: Path, *extra: str) -> dict[str, str]:
    """Runs one example in quick mode; returns the fields of its summary line, checked."""
    workdir = tmp_path / "cwd"
    workdir.mkdir(parents=True)
    result = subprocess.run(
        [*_example_command(name), *extra],
        cwd=workdir,
        env=_child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
    )
    output = f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    assert result.returncode == 0, f"{name} exited with {result.returncode}\n{output}"
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines, f"{name} printed nothing\n{output}"
    summary = SUMMARY.match(lines[-1])
    assert summary and summary.group("name") == name, (
        f"{name}: the last line is not its summary '[{name}] done: ...'\n{output}"
    )
    fields = _fields(summary.group("fields"))
    EXAMPLES[name](fields)
    assert list(workdir.iterdir()) == [], f"{name} wrote into the working directory"
    return fields


@pytest.mark.parametrize("name", [n for n in EXAMPLES if n not in TORCHRUN_EXAMPLES])
def test_example_runs_in_quick_mode(name, tmp_path):
    _run_example(name, tmp_path)


def test_distributed_example_under_torchrun_fsdp_equals_ddp(tmp_path):
    # The same 2-rank run with DDP replicas and with FSDP2 shards (arith-tiny has tied
    # embeddings): the same samples, rewards and held-out accuracy.
    ddp = _run_example("distributed_grpo", tmp_path / "ddp")
    fsdp = _run_example("distributed_grpo", tmp_path / "fsdp", "--strategy", "fsdp")
    assert (ddp["strategy"], fsdp["strategy"]) == ("ddp", "fsdp")
    for key in ("reward_first", "reward_last", "heldout_accuracy", "num_sequences"):
        assert ddp[key] == fsdp[key], key


def test_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for key, value in _child_env(tmp_path).items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    # Pin the "python3" kernel to this interpreter: JUPYTER_PATH comes first in the kernelspec
    # search, before a user's own python3 kernel that may point at another environment.
    kernel_dir = tmp_path / "jupyter" / "kernels" / "python3"
    kernel_dir.mkdir(parents=True)
    kernel_spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (rlprim tests)",
        "language": "python",
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(kernel_spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    notebook = nbformat.read(EXAMPLES_DIR / "notebook.ipynb", as_version=4)
    nbformat.validate(notebook)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert errors == []
    [summary_cell] = [c for c in notebook.cells if "summary" in c.metadata.get("tags", [])]
    stdout = "".join(
        o.text for o in summary_cell.outputs if o.output_type == "stream" and o.name == "stdout"
    )
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["iterations"] == summary["records"] == 3  # the quick mode's iterations
    assert summary["rewards_differ"] is True  # the two reward lambdas score differently
    assert summary["figure_axes"] == 3  # reward_mean, kl, entropy
    assert summary["png_bytes"] > 1000
    images = [
        o for c in notebook.cells if c.cell_type == "code" for o in c.outputs
        if o.output_type == "display_data" and "image/png" in o.get("data", {})
    ]
    assert images, "the plot cell displayed no image"


# --------------------------------------------------------------------------- EXAMPLES.md

EXCERPT = re.compile(r"^<!--\s*excerpt:\s*examples/(?P<name>[a-z_]+\.py)\s*-->$")


def _read_examples_md() -> str:
    return (ROOT / "EXAMPLES.md").read_text(encoding="utf-8")


def test_examples_md_has_a_section_and_a_command_per_example():
    text = _read_examples_md()
    for name in EXAMPLES:
        assert f"examples/{name}.py" in text, f"EXAMPLES.md does not mention {name}.py"
        assert f"python examples/{name}.py" in text, f"EXAMPLES.md has no command for {name}"
    assert "examples/notebook.ipynb" in text


def test_every_example_has_an_excerpt_in_examples_md():
    lines = _read_examples_md().splitlines()
    shown = {m.group("name") for m in map(EXCERPT.match, lines) if m}
    assert shown == {f"{name}.py" for name in EXAMPLES}, "every example needs an excerpt"
