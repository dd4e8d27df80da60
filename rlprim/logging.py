"""Logging and visualisation of training statistics: console lines, JSONL stats files, Weights &
Biases, and plots.

A **logger** is any function ``logger(stats: TrainingStats) -> None``; ``train(..., logger=...)``
calls it once per iteration. Loggers here also accept a plain ``Mapping[str, number]`` (e.g. an
evaluation result) wherever they accept ``TrainingStats``. Combine several with
``combine_loggers``. Nothing here keeps module-level state: files are opened, appended and
closed on every call, and a wandb run is an object the caller owns (and finishes).

Statistics are flattened to a plain dict by ``stats_to_dict``: every ``TrainingStats`` field
except ``extra``, then the ``extra`` metrics at the top level. Non-finite floats (``nan`` means
"not measured") become ``None``, so every stats file is strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from rlprim.protocols import Logger
from rlprim.types import TrainingStats

__all__ = [
    "stats_to_dict",
    "format_stats",
    "log_to_console",
    "log_to_jsonl",
    "create_jsonl_logger",
    "read_stats_jsonl",
    "log_to_wandb",
    "create_wandb_logger",
    "combine_loggers",
    "build_stats_figure",
    "plot_training_stats",
]

"""``logger(stats: TrainingStats) -> None``: record one iteration's statistics."""

STEP_TIME_KEY = "step_time"
"""Pseudo-key of ``format_stats``: ``time_generate + time_reference + time_train`` seconds."""

DEFAULT_CONSOLE_KEYS = (
    "loss",
    "reward_mean",
    "reward_std",
    "kl",
    "entropy",
    "clip_fraction",
    "grad_norm",
    "response_length",
    "skipped_updates",
    STEP_TIME_KEY,
)
_PHASE_TIMES = ("time_generate", "time_reference", "time_train")
_WANDB_HINT = "install it with: pip install 'rlprim[wandb]'"


# --------------------------------------------------------------------------- flattening


def _plain_value(value: Any, name: str) -> Any:
    """A JSON-ready scalar: bool/int/str/None kept, floats with non-finite -> None."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None)  # 0-d torch tensors and numpy scalars
    if callable(item):
        try:
            return _plain_value(item(), name)
        except (ValueError, RuntimeError) as error:
            raise TypeError(f"stats[{name!r}] must be a scalar, got {value!r}") from error
    raise TypeError(
        f"stats[{name!r}] must be a number, bool, str or None, got {type(value).__name__}"
    )


def stats_to_dict(stats: TrainingStats | Mapping[str, Any]) -> dict[str, Any]:
    """Flattens statistics to a JSON-ready dict.

    For ``TrainingStats``: its fields in order (without ``extra``), then each ``extra`` metric
    at the top level; an extra metric whose name clashes with a field is kept as
    ``"extra/<name>"``. A ``Mapping`` is copied as is. Every value becomes a plain Python
    scalar (0-d tensors and numpy scalars via ``.item()``) and non-finite floats become ``None``.

    Example: ``stats_to_dict(TrainingStats(step=3, loss=0.5, extra={"acc": 0.9}))`` ->
    ``{"step": 3, "loss": 0.5, "policy_loss": None, …, "acc": 0.9}``.
    """
    if isinstance(stats, TrainingStats):
        flat: dict[str, Any] = {
            name: _plain_value(value, name)
            for name, value in stats._asdict().items()
            if name != "extra"
        }
        extra = stats.extra or {}
        if not isinstance(extra, Mapping):
            raise TypeError(f"stats.extra must be a Mapping or None, got {type(extra).__name__}")
        for name, value in extra.items():
            if not isinstance(name, str):
                raise TypeError(f"stats.extra keys must be str, got {name!r}")
            key = f"extra/{name}" if name in flat else name
            flat[key] = _plain_value(value, name)
        return flat
    if isinstance(stats, Mapping):
        flat = {}
        for name, value in stats.items():
            if not isinstance(name, str):
                raise TypeError(f"stats keys must be str, got {name!r}")
            flat[name] = _plain_value(value, name)
        return flat
    raise TypeError(f"stats must be a TrainingStats or a Mapping, got {type(stats).__name__}")


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_stats(
    stats: TrainingStats | Mapping[str, Any], keys: Sequence[str] | None = None
) -> str:
    """A compact ``"key=value, …"`` string of the chosen statistics (e.g. a tqdm postfix).

    ``keys`` defaults to ``DEFAULT_CONSOLE_KEYS`` followed by every ``extra`` metric. Keys that
    are absent or not measured (``None`` after ``stats_to_dict``) are left out. Floats use 4
    significant digits. The pseudo-key ``"step_time"`` is
    ``time_generate + time_reference + time_train`` in seconds.

    Example: ``format_stats(TrainingStats(reward_mean=0.25, kl=0.0012), ["reward_mean", "kl"])``
    -> ``"reward_mean=0.25, kl=0.0012"``.
    """
    flat = stats_to_dict(stats)
    if all(name in flat for name in _PHASE_TIMES):
        times = [flat[name] for name in _PHASE_TIMES]
        if all(isinstance(t, (int, float)) for t in times):
            flat.setdefault(STEP_TIME_KEY, float(sum(times)))
    if keys is None:
        field_names = set(TrainingStats._fields)
        keys = [
            *DEFAULT_CONSOLE_KEYS,
            *(k for k in flat if k not in field_names and k != STEP_TIME_KEY),
        ]
    elif isinstance(keys, str) or not isinstance(keys, Sequence):
        raise TypeError(f"keys must be a sequence of str or None, got {keys!r}")
    parts = []
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"keys must contain str, got {key!r}")
        value = flat.get(key)
        if value is not None:
            parts.append(f"{key}={_format_value(value)}")
    return ", ".join(parts)


def log_to_console(
    stats: TrainingStats | Mapping[str, Any],
    keys: Sequence[str] | None = None,
    file: TextIO | None = None,
) -> None:
    """Prints one compact line: ``"step 12 | loss=0.1234, reward_mean=0.5, kl=0.0012, …"``.

    The part after ``|`` is ``format_stats(stats, keys)``. ``file`` defaults to the current
    ``sys.stdout`` (looked up at call time). A logger: ``train(..., logger=log_to_console)``.
    """
    flat_step = stats_to_dict(stats).get("step")
    line = format_stats(stats, keys)
    prefix = f"step {flat_step}" if flat_step is not None else "stats"
    print(
        f"{prefix} | {line}" if line else prefix,
        file=sys.stdout if file is None else file,
        flush=True,
    )


# --------------------------------------------------------------------------- JSONL stats files


def _check_path(path: object, name: str = "path") -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def log_to_jsonl(stats: TrainingStats | Mapping[str, Any], path: str | os.PathLike) -> None:
    """Appends ``stats_to_dict(stats)`` as one JSON line to ``path`` (open, append, close).

    Creates the file and its parent directories when missing. The line is written with a single
    ``write`` call, so a crash leaves at most a last line without its newline (which
    ``read_stats_jsonl`` skips). Values are strict JSON: ``nan`` is written as ``null``.
    """
    path = _check_path(path)
    line = json.dumps(stats_to_dict(stats), allow_nan=False) + "\n"
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)


def create_jsonl_logger(path: str | os.PathLike) -> Logger:
    """Returns ``logger(stats)`` that appends each call's stats to the JSONL file ``path``.

    Each call is ``log_to_jsonl(stats, path)``: one JSON object per line (``stats_to_dict``),
    the file opened, appended and closed every time, so nothing is lost when a run is killed.
    """
    path = _check_path(path)

    def jsonl_logger(stats: TrainingStats | Mapping[str, Any]) -> None:
        log_to_jsonl(stats, path)

    return jsonl_logger


def read_stats_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a stats file written by ``log_to_jsonl``: one dict per line, in order.

    Blank lines are skipped, and so is a final line without its newline that is not valid JSON
    (a write cut short by a crash). Any other invalid line raises ``ValueError`` naming the
    file and its 1-based line number.
    """
    path = _check_path(path)
    with open(path, encoding="utf-8") as handle:
        lines = handle.readlines()
    records = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if line_number == len(lines) and not line.endswith("\n"):
                break  # a torn last write
            raise ValueError(f"{path} line {line_number} is not valid JSON: {error.msg}") from error
        if not isinstance(record, dict):
            raise ValueError(
                f"{path} line {line_number} must be a JSON object, got {type(record).__name__}"
            )
        records.append(record)
    return records


# --------------------------------------------------------------------------- Weights & Biases


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as error:
        raise ImportError(
            f"logging to Weights & Biases needs the 'wandb' package; {_WANDB_HINT}"
        ) from error
    return wandb


def _config_to_dict(config: Any) -> Any:
    """NamedTuples (configs) and mappings to plain nested dicts, for ``wandb.init(config=…)``."""
    if isinstance(config, tuple) and hasattr(config, "_asdict"):
        return {name: _config_to_dict(value) for name, value in config._asdict().items()}
    if isinstance(config, Mapping):
        return {str(name): _config_to_dict(value) for name, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [_config_to_dict(value) for value in config]
    return config


def log_to_wandb(stats: TrainingStats | Mapping[str, Any], run: Any) -> None:
    """Logs ``stats_to_dict(stats)`` to a wandb run, leaving out values that were not measured.

    ``run`` is the object ``wandb.init`` returns (or the one ``create_wandb_logger`` returns).
    The ``step`` statistic is logged as a metric; runs made by ``create_wandb_logger`` plot
    every metric against it (``run.define_metric("*", step_metric="step")``), so logging the
    same step twice (e.g. training then evaluation) is fine.
    """
    if run is None or not callable(getattr(run, "log", None)):
        raise TypeError(f"run must be a wandb run (from wandb.init), got {type(run).__name__}")
    flat = {key: value for key, value in stats_to_dict(stats).items() if value is not None}
    run.log(flat)


def create_wandb_logger(
    project: str = "rlprim",
    run_name: str | None = None,
    config: Any = None,
    mode: str | None = None,
    dir: str | os.PathLike | None = None,
    **init_kwargs: Any,
) -> tuple[Logger, Any]:
    """Starts a wandb run and returns ``(logger, run)``; call ``run.finish()`` when done.

    ``logger(stats)`` is ``log_to_wandb(stats, run)``. The run is an external resource owned by
    the caller (nothing is stored in this module), who can also use it directly
    (``run.summary``, ``run.dir``, artifacts).

    Args:
      project: the wandb project.
      run_name: the run's display name (``None``: wandb picks one).
      config: the run configuration; NamedTuples (``AlgorithmConfig``, ``GenerationConfig`` …)
        and nested mappings of them are converted to plain dicts.
      mode: ``"online"``, ``"offline"`` (no network; sync later with ``wandb sync``) or
        ``"disabled"``; ``None`` follows the ``WANDB_MODE`` environment variable.
      dir: where wandb writes its ``wandb/`` run directory (``None``: the working directory).
      **init_kwargs: passed on to ``wandb.init`` (e.g. ``tags``, ``group``, ``entity``).

    Needs the optional ``wandb`` package (``pip install 'rlprim[wandb]'``).
    """
    if not isinstance(project, str) or not project:
        raise ValueError(f"project must be a non-empty str, got {project!r}")
    if mode is not None and mode not in ("online", "offline", "disabled"):
        raise ValueError(f"mode must be 'online', 'offline', 'disabled' or None, got {mode!r}")
    if dir is not None:
        dir = _check_path(dir, "dir")
        os.makedirs(dir, exist_ok=True)
    wandb = _import_wandb()
    run = wandb.init(
        project=project,
        name=run_name,
        config=_config_to_dict(config) if config is not None else None,
        mode=mode,
        dir=dir,
        **init_kwargs,
    )
    run.define_metric("step")
    run.define_metric("*", step_metric="step")

    def wandb_logger(stats: TrainingStats | Mapping[str, Any]) -> None:
        log_to_wandb(stats, run)

    return wandb_logger, run


def combine_loggers(*loggers: Logger | None) -> Logger:
    """Returns ``logger(stats)`` that calls each given logger in order (``None`` s are skipped).

    Example: ``combine_loggers(log_to_console, create_jsonl_logger("stats.jsonl"),
    wandb_logger if use_wandb else None)``.
    """
    chosen = tuple(logger for logger in loggers if logger is not None)
    for index, logger in enumerate(chosen):
        if not callable(logger):
            raise TypeError(
                f"loggers must be callables or None, got {type(logger).__name__} "
                f"at position {index}"
            )

    def combined_logger(stats: TrainingStats | Mapping[str, Any]) -> None:
        for logger in chosen:
            logger(stats)

    return combined_logger


# --------------------------------------------------------------------------- plots


def _x_values(records: Sequence[Mapping[str, Any]], x: str) -> tuple[list[float], str]:
    if x == "step":
        return [
            float(record["step"]) if record.get("step") is not None else float(index)
            for index, record in enumerate(records)
        ], "step"
    if all(record.get("wall_time") is not None for record in records):
        start = float(records[0]["wall_time"])
        return [float(record["wall_time"]) - start for record in records], "wall time (s)"
    elapsed, total = [], 0.0
    for record in records:
        total += sum(float(record.get(name) or 0.0) for name in _PHASE_TIMES)
        elapsed.append(total)
    return elapsed, "time in generate + reference + train (s)"


def build_stats_figure(
    records: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] = ("reward_mean", "kl"),
    x: str = "step",
    title: str | None = None,
) -> Any:
    """A ``matplotlib.figure.Figure`` with one subplot per metric present in ``records``.

    ``records`` are dicts as ``read_stats_jsonl`` returns. A metric that no record measures is
    skipped (at least one must be present); a metric is drawn through the records that
    measure it (not ``None`` / ``nan``), so one measured every few iterations (a held-out
    evaluation every ``eval_every``) is a connected line with a marker on each measurement. ``x="step"`` plots against the ``step`` statistic. ``x="time"`` plots against
    elapsed seconds: ``wall_time - wall_time[0]`` when every record has a ``wall_time`` key
    (put ``time.time()`` in ``TrainingStats.extra["wall_time"]`` to get it), else the cumulative
    sum of ``time_generate + time_reference + time_train``.

    The figure is built without pyplot (no global figure state, no GUI backend): display it in
    a notebook or save it with ``figure.savefig(path)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(records, Mapping) or not isinstance(records, Sequence):
        raise TypeError(f"records must be a sequence of dicts, got {type(records).__name__}")
    if not records:
        raise ValueError("records must hold at least one stats record, got 0")
    if isinstance(metrics, str) or not isinstance(metrics, Sequence) or not metrics:
        raise ValueError(f"metrics must be a non-empty sequence of names, got {metrics!r}")
    if x not in ("step", "time"):
        raise ValueError(f"x must be 'step' or 'time', got {x!r}")
    present = [name for name in metrics if any(record.get(name) is not None for record in records)]
    if not present:
        available = sorted(
            {key for record in records for key, v in record.items() if v is not None}
        )
        raise ValueError(
            f"none of metrics {list(metrics)} is measured in the records; available: {available}"
        )
    xs, x_label = _x_values(records, x)
    figure = Figure(figsize=(6.4, 2.4 * len(present)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(present), 1, squeeze=False, sharex=True)[:, 0]
    for axis, name in zip(axes, present, strict=True):
        points = [
            (x_value, float(record[name]))
            for x_value, record in zip(xs, records, strict=True)
            if record.get(name) is not None and math.isfinite(float(record[name]))
        ]
        sparse = len(points) < len(records)
        axis.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o" if sparse else ("." if len(points) < 50 else None),
            markersize=4 if sparse else None,
        )
        axis.set_ylabel(name)
        axis.grid(True, alpha=0.3)
    axes[-1].set_xlabel(x_label)
    if title is not None:
        figure.suptitle(title)
    return figure


def plot_training_stats(
    stats_jsonl_path: str | os.PathLike,
    png_path: str | os.PathLike,
    metrics: Sequence[str] = ("reward_mean", "kl"),
    x: str = "step",
    title: str | None = None,
    dpi: int = 100,
) -> str:
    """Plots metrics from a stats JSONL file to a PNG, one subplot per metric; returns its path.

    Reads ``stats_jsonl_path`` with ``read_stats_jsonl`` and draws ``build_stats_figure(records,
    metrics, x, title)`` (missing metrics are skipped; see there for ``x="time"``) with
    matplotlib's Agg renderer, never touching pyplot's global state. The image is
    ``6.4 × 2.4·n`` inches at ``dpi`` for ``n`` plotted metrics.
    """
    records = read_stats_jsonl(stats_jsonl_path)
    png_path = _check_path(png_path, "png_path")
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < 1:
        raise ValueError(f"dpi must be a positive int, got {dpi!r}")
    figure = build_stats_figure(records, metrics, x, title)
    parent = os.path.dirname(png_path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    figure.savefig(png_path, format="png", dpi=dpi)
    return png_path
