"""Tests for rlprim.logging: flattening, console, JSONL files, real wandb (offline), plots."""

from __future__ import annotations

import io
import json
import math
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rlprim.logging import (
    build_stats_figure,
    combine_loggers,
    create_jsonl_logger,
    create_wandb_logger,
    format_stats,
    log_to_console,
    log_to_jsonl,
    log_to_wandb,
    plot_training_stats,
    read_stats_jsonl,
    stats_to_dict,
)
from rlprim.types import AlgorithmConfig, GenerationConfig, TrainingStats

FIELDS = [name for name in TrainingStats._fields if name != "extra"]
FLOAT_FIELDS = [
    name for name, default in TrainingStats._field_defaults.items() if isinstance(default, float)
]

HAND_STATS = TrainingStats(
    step=3,
    loss=0.5,
    kl=float("nan"),
    reward_mean=0.25,
    grad_norm=float("inf"),
    num_tokens=40,
    time_generate=1.5,
    time_reference=0.25,
    time_train=0.75,
    extra={"accuracy": 0.875, "loss": 2.0},
)


def ref_plain(value):
    """JSON-ready value, written independently: non-finite floats are None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- stats_to_dict


def test_stats_to_dict_hand_case():
    flat = stats_to_dict(HAND_STATS)
    assert list(flat)[: len(FIELDS)] == FIELDS
    assert flat["step"] == 3 and flat["loss"] == 0.5 and flat["reward_mean"] == 0.25
    assert flat["kl"] is None and flat["grad_norm"] is None and flat["entropy"] is None
    assert flat["num_tokens"] == 40 and flat["skipped_updates"] == 0
    assert flat["accuracy"] == 0.875
    assert flat["extra/loss"] == 2.0  # clashes with the field `loss`
    assert "extra" not in flat
    assert len(flat) == len(FIELDS) + 2
    json.dumps(flat, allow_nan=False)  # strict JSON


def test_stats_to_dict_converts_tensors_numpy_and_mappings():
    stats = TrainingStats(
        loss=torch.tensor(0.5),
        num_tokens=np.int64(7),
        extra={"a": np.float32(0.25), "b": torch.tensor(float("nan")), "c": True, "d": "x"},
    )
    flat = stats_to_dict(stats)
    assert flat["loss"] == 0.5 and type(flat["loss"]) is float
    assert flat["num_tokens"] == 7 and type(flat["num_tokens"]) is int
    assert flat["a"] == 0.25 and flat["b"] is None and flat["c"] is True and flat["d"] == "x"
    assert stats_to_dict({"acc": 1.0, "bad": float("-inf"), "n": 2}) == {
        "acc": 1.0,
        "bad": None,
        "n": 2,
    }


def test_stats_to_dict_errors():
    with pytest.raises(TypeError, match="stats must be a TrainingStats or a Mapping"):
        stats_to_dict([1.0])
    with pytest.raises(TypeError, match=r"stats\['v'\] must be a scalar"):
        stats_to_dict({"v": torch.ones(2)})
    with pytest.raises(TypeError, match=r"stats\['v'\] must be a number"):
        stats_to_dict({"v": [1.0]})
    with pytest.raises(TypeError, match="extra keys must be str"):
        stats_to_dict(TrainingStats(extra={1: 2.0}))
    with pytest.raises(TypeError, match="stats.extra must be a Mapping"):
        stats_to_dict(TrainingStats(extra=[1.0]))


finite_or_not = st.floats(allow_nan=True, allow_infinity=True)


@given(
    st.fixed_dictionaries({name: finite_or_not for name in FLOAT_FIELDS}),
    st.integers(0, 10**6),
    st.dictionaries(st.text("xyz", min_size=1, max_size=3), finite_or_not, max_size=4),
)
def test_stats_to_dict_matches_reference_and_round_trips_json(floats, step, extra):
    stats = TrainingStats(step=step, extra=extra, **floats)
    expected = {name: ref_plain(getattr(stats, name)) for name in FIELDS}
    expected.update({name: ref_plain(value) for name, value in extra.items()})
    flat = stats_to_dict(stats)
    assert flat == expected
    assert json.loads(json.dumps(flat, allow_nan=False)) == expected


# --------------------------------------------------------------------------- console


def test_format_stats_hand_cases():
    assert format_stats(HAND_STATS, ["reward_mean", "kl", "step_time"]) == (
        "reward_mean=0.25, step_time=2.5"
    )
    assert format_stats(HAND_STATS) == (
        "loss=0.5, reward_mean=0.25, skipped_updates=0, step_time=2.5, accuracy=0.875, extra/loss=2"
    )
    assert format_stats({"x": 1 / 3, "n": 12}, ["n", "x", "missing"]) == "n=12, x=0.3333"
    assert format_stats(TrainingStats(), ["kl"]) == ""
    with pytest.raises(TypeError, match="keys must be a sequence"):
        format_stats(HAND_STATS, "kl")


def test_log_to_console_writes_one_line():
    buffer = io.StringIO()
    log_to_console(HAND_STATS, keys=["loss", "reward_mean", "kl", "accuracy"], file=buffer)
    assert buffer.getvalue() == "step 3 | loss=0.5, reward_mean=0.25, accuracy=0.875\n"
    buffer = io.StringIO()
    log_to_console({"accuracy": 0.5}, file=buffer)
    assert buffer.getvalue() == "stats | accuracy=0.5\n"


def test_log_to_console_defaults_to_the_current_stdout(capsys):
    log_to_console(TrainingStats(step=1, loss=1.25))
    out = capsys.readouterr().out
    assert out == "step 1 | loss=1.25, skipped_updates=0, step_time=0\n"


# --------------------------------------------------------------------------- JSONL files


def test_jsonl_round_trip_and_append(tmp_path):
    path = tmp_path / "runs" / "stats.jsonl"  # the parent directory does not exist yet
    logged = [HAND_STATS._replace(step=k, reward_mean=0.1 * k) for k in range(3)]
    for stats in logged:
        log_to_jsonl(stats, path)
    log_to_jsonl({"eval_accuracy": 0.5, "step": 2}, path)
    records = read_stats_jsonl(path)
    assert records == [stats_to_dict(stats) for stats in logged] + [
        {"eval_accuracy": 0.5, "step": 2}
    ]
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    assert json.loads(lines[0])["kl"] is None and "NaN" not in lines[0]


def test_create_jsonl_logger_appends_each_call(tmp_path):
    path = tmp_path / "s.jsonl"
    logger = create_jsonl_logger(str(path))
    logger(TrainingStats(step=0, loss=1.0))
    logger(TrainingStats(step=1, loss=0.5))
    assert [(r["step"], r["loss"]) for r in read_stats_jsonl(path)] == [(0, 1.0), (1, 0.5)]
    with pytest.raises(TypeError, match="path must be a str"):
        create_jsonl_logger(None)


def test_read_stats_jsonl_skips_a_torn_last_line_only(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"step": 0}\n\n{"step": 1}\n{"step": 2, "lo')
    assert read_stats_jsonl(path) == [{"step": 0}, {"step": 1}]
    path.write_text('{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_stats_jsonl(path)
    path.write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2 must be a JSON object, got list"):
        read_stats_jsonl(path)


# --------------------------------------------------------------------------- combine


def test_combine_loggers_calls_each_in_order_and_skips_none():
    calls = []
    first = combine_loggers(
        lambda s: calls.append(("a", s.step)), None, lambda s: calls.append(("b", s.step))
    )
    first(TrainingStats(step=4))
    first(TrainingStats(step=5))
    assert calls == [("a", 4), ("b", 4), ("a", 5), ("b", 5)]
    combine_loggers()(TrainingStats())  # no loggers: a no-op
    with pytest.raises(TypeError, match="loggers must be callables or None, got int"):
        combine_loggers(print, 3)


def test_combine_loggers_with_real_loggers(tmp_path):
    buffer = io.StringIO()
    path = tmp_path / "s.jsonl"
    logger = combine_loggers(
        lambda s: log_to_console(s, ["loss"], file=buffer), create_jsonl_logger(path)
    )
    logger(TrainingStats(step=2, loss=0.75))
    assert buffer.getvalue() == "step 2 | loss=0.75\n"
    assert read_stats_jsonl(path)[0]["loss"] == 0.75


# --------------------------------------------------------------------------- wandb (real, offline)


def read_wandb_records(path: Path):
    """Parses a ``.wandb`` transaction log: a 7-byte header (``:W&B``, magic, version), then
    LevelDB-log records (7-byte header: crc32c, length, type) in 32 KiB blocks, each payload a
    wandb ``Record`` protobuf (split over blocks as FIRST/MIDDLE/LAST pieces)."""
    from wandb.proto import wandb_internal_pb2

    block = 32768
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pieces = 7, []
    while position < len(data):
        left = block - position % block
        if left < 7:  # block trailer padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:  # zero padding up to the next block
            position += left
            continue
        pieces.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            yield record


def item_key(item):
    return item.key or "/".join(item.nested_key)


@pytest.fixture(scope="module")
def wandb_run_records(tmp_path_factory):
    """One real offline wandb run (wandb.init is slow): log three iterations, finish, parse."""
    root = tmp_path_factory.mktemp("wandb")
    logged = [
        TrainingStats(step=0, loss=1.0, reward_mean=0.0, kl=float("nan"), extra={"acc": 0.5}),
        TrainingStats(step=1, loss=0.5, reward_mean=0.25, kl=0.01, extra={"acc": 0.75}),
        TrainingStats(step=2, loss=0.25, reward_mean=0.5, kl=0.02, extra={"acc": 1.0}),
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        patch.setenv("WANDB_CONSOLE", "off")
        config = {
            "algorithm": AlgorithmConfig(name="grpo", kl_coef=0.04),
            "generation": GenerationConfig(max_new_tokens=16),
            "lr": 1e-5,
        }
        logger, run = create_wandb_logger(
            project="rlprim-test", run_name="unit", config=config, mode="offline", dir=root
        )
        for stats in logged:
            logger(stats)
        log_to_wandb({"step": 2, "eval_accuracy": 0.9}, run)
        run.finish()
    files = sorted(root.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    return wait_for_complete_run(files[0])


def wait_for_complete_run(path: Path, timeout: float = 60.0):
    """The records of a finished run. wandb-core writes the file in the background and
    ``run.finish()`` can return before it is flushed, so wait for the final ``exit`` record."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(read_wandb_records(path))
        except (DecodeError, struct.error):  # caught mid-write
            records = []
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            kinds = [record.WhichOneof("record_type") for record in records]
            raise AssertionError(f"{path} has no exit record after {timeout} s: {kinds}")
        time.sleep(0.1)


def test_wandb_offline_run_writes_the_logged_stats(wandb_run_records):
    history = [
        {item_key(item): json.loads(item.value_json) for item in record.history.item}
        for record in wandb_run_records
        if record.WhichOneof("record_type") == "history"
    ]
    assert len(history) == 4
    for row, (step, loss, reward, kl, acc) in zip(
        history[:3],
        [(0, 1.0, 0.0, None, 0.5), (1, 0.5, 0.25, 0.01, 0.75), (2, 0.25, 0.5, 0.02, 1.0)],
        strict=True,
    ):
        assert row["step"] == step
        assert row["loss"] == loss and row["reward_mean"] == reward and row["acc"] == acc
        assert row.get("kl") == kl  # not measured -> not logged
        assert "policy_loss" not in row  # nan fields are left out
    assert history[3]["eval_accuracy"] == 0.9 and history[3]["step"] == 2


def test_wandb_offline_run_records_config_and_name(wandb_run_records):
    runs = [r.run for r in wandb_run_records if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].display_name == "unit" and runs[0].project == "rlprim-test"
    config = {}
    for run in runs:
        config.update({item_key(i): json.loads(i.value_json) for i in run.config.update})
    for record in wandb_run_records:
        if record.WhichOneof("record_type") == "config":
            config.update({item_key(i): json.loads(i.value_json) for i in record.config.update})
    assert config["lr"] == 1e-5
    assert config["algorithm"]["kl_coef"] == 0.04
    assert config["algorithm"]["name"] == "grpo"
    assert config["generation"]["max_new_tokens"] == 16


def test_wandb_argument_errors(monkeypatch):
    with pytest.raises(TypeError, match="run must be a wandb run"):
        log_to_wandb(TrainingStats(), None)
    with pytest.raises(ValueError, match="mode must be"):
        create_wandb_logger(mode="sometimes")
    with pytest.raises(ValueError, match="project must be a non-empty str"):
        create_wandb_logger(project="")
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ImportError, match=r"pip install 'rlprim\[wandb\]'"):
        create_wandb_logger(mode="offline")


# --------------------------------------------------------------------------- plots


def png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def write_stats(path, records):
    for record in records:
        log_to_jsonl(record, path)
    return path


def make_records(n=5):
    return [
        TrainingStats(
            step=k,
            reward_mean=0.1 * k,
            kl=0.01 * k if k != 2 else float("nan"),
            time_generate=1.0,
            time_train=0.5,
        )
        for k in range(n)
    ]


def test_plot_training_stats_writes_a_png_with_one_panel_per_metric(tmp_path):
    path = write_stats(tmp_path / "s.jsonl", make_records())
    one = plot_training_stats(path, tmp_path / "one.png", metrics=["reward_mean"])
    two = plot_training_stats(path, tmp_path / "plots" / "two.png", metrics=["reward_mean", "kl"])
    three = plot_training_stats(
        path,
        tmp_path / "three.png",
        metrics=["reward_mean", "kl", "missing", "time_train"],
        dpi=50,
    )
    assert one == str(tmp_path / "one.png")
    # Figure size 6.4 x 2.4·n inches at dpi: the height counts the panels.
    assert png_size(Path(one)) == (640, 240)
    assert png_size(Path(two)) == (640, 480)
    assert png_size(Path(three)) == (320, 360)
    assert Path(two).stat().st_size > 1000


def test_build_stats_figure_axes_and_data():
    records = [stats_to_dict(s) for s in make_records()]
    figure = build_stats_figure(records, ["reward_mean", "nope", "kl"])
    assert [axis.get_ylabel() for axis in figure.axes] == ["reward_mean", "kl"]
    line = figure.axes[1].get_lines()[0]
    # Record 2 has no KL: the line goes through the four measured points.
    assert list(line.get_xdata()) == [0, 1, 3, 4]
    assert np.allclose(line.get_ydata(), [0.0, 0.01, 0.03, 0.04])
    assert line.get_marker() == "o"
    assert figure.axes[0].get_lines()[0].get_marker() == "."
    assert figure.axes[1].get_xlabel() == "step"


def test_build_stats_figure_draws_a_sparse_metric_through_its_measurements():
    # A held-out evaluation every 5 iterations, as train(eval_every=5) logs it.
    records = [
        {"step": i, "reward_mean": 0.1 * i, "eval/acc": 0.5 + i / 100 if (i + 1) % 5 == 0 else None}
        for i in range(12)
    ]
    records[9]["eval/acc"] = float("nan")  # a nan measurement is skipped too
    figure = build_stats_figure(records, ["reward_mean", "eval/acc"])
    line = figure.axes[1].get_lines()[0]
    assert list(line.get_xdata()) == [4]
    assert np.allclose(line.get_ydata(), [0.54])
    records[9]["eval/acc"] = 0.59
    line = build_stats_figure(records, ["eval/acc"]).axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [4, 9] and np.allclose(line.get_ydata(), [0.54, 0.59])


def test_build_stats_figure_time_axis():
    records = [stats_to_dict(s) for s in make_records(3)]
    figure = build_stats_figure(records, ["reward_mean"], x="time")
    # No wall_time: cumulative generate + reference + train seconds (1.5 per iteration).
    assert np.allclose(figure.axes[0].get_lines()[0].get_xdata(), [1.5, 3.0, 4.5])
    for record, wall in zip(records, [100.0, 103.0, 110.0], strict=True):
        record["wall_time"] = wall
    figure = build_stats_figure(records, ["reward_mean"], x="time")
    assert np.allclose(figure.axes[0].get_lines()[0].get_xdata(), [0.0, 3.0, 10.0])
    assert figure.axes[0].get_xlabel() == "wall time (s)"


def test_plot_does_not_touch_pyplot_state(tmp_path):
    from matplotlib import pyplot

    before = pyplot.get_fignums()
    path = write_stats(tmp_path / "s.jsonl", make_records())
    plot_training_stats(path, tmp_path / "p.png")
    assert pyplot.get_fignums() == before


def test_plot_errors(tmp_path):
    path = write_stats(tmp_path / "s.jsonl", make_records())
    with pytest.raises(ValueError, match=r"none of metrics \['nope'\].*available: .*reward_mean"):
        plot_training_stats(path, tmp_path / "p.png", metrics=["nope"])
    with pytest.raises(ValueError, match="x must be 'step' or 'time'"):
        plot_training_stats(path, tmp_path / "p.png", x="epoch")
    with pytest.raises(ValueError, match="metrics must be a non-empty sequence"):
        plot_training_stats(path, tmp_path / "p.png", metrics="kl")
    with pytest.raises(ValueError, match="dpi must be a positive int"):
        plot_training_stats(path, tmp_path / "p.png", dpi=0)
    with pytest.raises(ValueError, match="records must hold at least one"):
        build_stats_figure([])
    assert not (tmp_path / "p.png").exists()
