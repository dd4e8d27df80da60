"""Rewards: calling reward functions, vector-reward aggregation (weighted, Pareto), normalisation,
relative (rank) rewards, shaping (length penalty, DAPO overlong punishment), reward-function
builders and an adapter for TRL-style batch reward functions.

A reward function scores one rollout::

    reward_fn(rollout: Rollout) -> float | Sequence[float]

A float is a scalar reward; a sequence of ``K`` floats is a vector reward (several objectives),
reduced to a scalar by an aggregator ``aggregator(vectors [B, K]) -> rewards [B]``.

**Batched reward functions.** A reward function may also carry an attribute ``batched``:
``reward_fn.batched(rollouts: Sequence[Rollout]) -> Sequence[float | Sequence[float]]`` (one
entry per rollout, in order). ``compute_batch_rewards`` then calls ``reward_fn.batched`` once
for the whole batch instead of ``reward_fn`` once per rollout (a reward model or a TRL function
scores a batch far faster than one at a time). ``create_batched_reward_fn`` builds such a
function from a batch function, and ``from_trl_reward_fn`` builds one from a TRL-style
``fn(prompts, completions, **kwargs) -> list[float]``. The attribute is set once when the
function is built and never changed: no state hides in it.

Groups are ``group_size`` *consecutive* rows (rows ``[k·G, (k+1)·G)`` are the samples of prompt
``k``), as everywhere in rlprim; ``group_size=None`` treats the whole batch as one group.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from rlprim.checks import check_group_size
from rlprim.types import Rollout

__all__ = [
    "compute_scalar_reward",
    "compute_vector_reward",
    "aggregate_vector_rewards",
    "weighted_sum",
    "pareto_rank",
    "create_pareto_aggregator",
    "compute_batch_rewards",
    "create_batched_reward_fn",
    "from_trl_reward_fn",
    "normalize_rewards",
    "compute_relative_rewards",
    "compute_overlong_penalty",
    "apply_reward_shaping",
    "exact_match_reward",
    "regex_format_reward",
    "length_reward",
]

NORMALIZE_METHODS = ("zscore", "minmax", "rank", "none")
REGEX_MODES = ("fullmatch", "match", "search")
LENGTH_UNITS = ("auto", "tokens", "chars")


# --------------------------------------------------------------------------- input checks


def _short_repr(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_real(value: object, what: str) -> float:
    """A finite Python float from a real number, a bool, or a 0-d tensor / array."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, torch.Tensor) or isinstance(value, np.ndarray):
        complex_valued = (
            value.is_complex() if isinstance(value, torch.Tensor) else np.iscomplexobj(value)
        )
        if value.ndim != 0 or complex_valued:
            raise TypeError(
                f"{what} must be a real number (or a 0-d tensor/array), got a "
                f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        value = value.item()
        if isinstance(value, bool):
            return float(value)
    if not isinstance(value, numbers.Real):
        raise TypeError(
            f"{what} must be a real number (int, float, bool or a 0-d tensor/array), got "
            f"{type(value).__name__} {_short_repr(value)}"
        )
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{what} must be finite, got {result}")
    return result


def _is_vector(value: object) -> bool:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.ndim >= 1
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def _as_vector(value: object, what: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes, bytearray)) or not _is_vector(value):
        raise TypeError(
            f"{what} must be a sequence (list, tuple, 1-D tensor or array) of real numbers, got "
            f"{type(value).__name__} {_short_repr(value)}"
        )
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim != 1:
        raise ValueError(
            f"{what} must be 1-D, got a {type(value).__name__} of shape {tuple(value.shape)}"
        )
    if len(value) == 0:
        raise ValueError(f"{what} must have at least one component, got {_short_repr(value)}")
    return tuple(_as_real(v, f"{what}[{k}]") for k, v in enumerate(value))


def _check_callable(name: str, fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__} {_short_repr(fn)}")


def _check_rollout(rollout: object, what: str) -> None:
    if not isinstance(rollout, Rollout):
        raise TypeError(f"{what} must be a Rollout, got {type(rollout).__name__}")


def _check_number(
    name: str, value: object, *, minimum: float | None = None, strict: bool = False
) -> float:
    """A finite float ``value`` (not a bool), optionally ``>= minimum`` (``> minimum`` if strict)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return value


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {_short_repr(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _as_1d(name: str, x: object) -> torch.Tensor:
    """A 1-D floating tensor from a tensor or a sequence of numbers (ints become float32)."""
    if not isinstance(x, torch.Tensor):
        if isinstance(x, (str, bytes)) or not isinstance(x, (Sequence, np.ndarray)):
            raise TypeError(
                f"{name} must be a 1-D torch.Tensor or a sequence of numbers, got "
                f"{type(x).__name__}"
            )
        try:
            x = torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=torch.float32)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{name} must hold only numbers, got {_short_repr(x)}") from error
    if x.dim() != 1:
        raise ValueError(f"{name} must have shape [B], got shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be a real-valued tensor, got dtype {x.dtype}")
    return x if x.is_floating_point() else x.to(torch.float32)


def _check_finite(name: str, x: torch.Tensor) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        index_text = index[0] if len(index) == 1 else index
        raise ValueError(f"{name} must be finite, got {x[index].item()} at index {index_text}")


def _check_group_size(group_size: object, batch_size: int) -> int:
    """``group_size`` as an int dividing ``batch_size``; ``None`` means one group of the batch."""
    if group_size is None:
        return max(batch_size, 1)
    return check_group_size(_check_int("group_size", group_size, minimum=1), batch_size)


def _as_vectors(vectors: object) -> torch.Tensor:
    """``[B, K]`` floating tensor from a tensor or a list of equal-length sequences."""
    if isinstance(vectors, torch.Tensor):
        if vectors.dim() != 2:
            raise ValueError(f"vectors must have shape [B, K], got shape {tuple(vectors.shape)}")
        if vectors.dtype == torch.bool or vectors.is_complex():
            raise TypeError(f"vectors must be a real-valued tensor, got dtype {vectors.dtype}")
        vectors = vectors if vectors.is_floating_point() else vectors.to(torch.float32)
    else:
        if isinstance(vectors, (str, bytes)) or not isinstance(vectors, (Sequence, np.ndarray)):
            raise TypeError(
                "vectors must be a [B, K] torch.Tensor or a sequence of sequences, got "
                f"{type(vectors).__name__}"
            )
        rows = [_as_vector(row, f"vectors[{i}]") for i, row in enumerate(vectors)]
        for i, row in enumerate(rows):
            if len(row) != len(rows[0]):
                raise ValueError(
                    f"vectors must all have the same length K={len(rows[0])} (that of "
                    f"vectors[0]), got length {len(row)} at vectors[{i}]"
                )
        width = len(rows[0]) if rows else 0
        vectors = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), width)
    if vectors.shape[1] == 0:
        raise ValueError(
            f"vectors must have at least one component, got shape {tuple(vectors.shape)}"
        )
    _check_finite("vectors", vectors)
    return vectors


# --------------------------------------------------------------------------- one rollout


def compute_scalar_reward(rollout: Rollout, reward_fn: Callable[[Rollout], Any]) -> float:
    """Calls ``reward_fn(rollout)`` and checks it returned one finite real number.

    Accepted returns: ``int``, ``float``, NumPy scalars, 0-d tensors / arrays, and ``bool``
    (``True`` → 1.0, ``False`` → 0.0, so a pass/fail check can be used as a reward directly).
    Exceptions raised by ``reward_fn`` propagate unchanged.

    Args:
      rollout: the ``Rollout`` to score.
      reward_fn: ``fn(rollout) -> float``.
    Returns:
      The reward as a Python float.
    Raises:
      TypeError: ``rollout`` is not a ``Rollout``, ``reward_fn`` is not callable, or it returned
        something that is not a real number (a string, ``None``, a sequence…).
      ValueError: it returned NaN or ±inf.
    """
    _check_rollout(rollout, "rollout")
    _check_callable("reward_fn", reward_fn)
    return _as_real(reward_fn(rollout), "reward_fn's return value")


def compute_vector_reward(
    rollout: Rollout, reward_fn: Callable[[Rollout], Any]
) -> tuple[float, ...]:
    """Calls ``reward_fn(rollout)`` and checks it returned ``K ≥ 1`` finite real numbers.

    Accepted returns: a list or tuple of real numbers (bools count as 0/1), a 1-D tensor or a 1-D
    NumPy array. A bare scalar is rejected (use ``compute_scalar_reward``). Exceptions raised by
    ``reward_fn`` propagate unchanged.

    Args:
      rollout: the ``Rollout`` to score.
      reward_fn: ``fn(rollout) -> Sequence[float]``.
    Returns:
      The reward components ``(r_1, …, r_K)`` as a tuple of Python floats.
    Raises:
      TypeError: bad ``rollout`` / ``reward_fn``, or a return that is not a sequence of numbers.
      ValueError: an empty sequence, a tensor that is not 1-D, or a NaN/inf component (named by
        its position).
    """
    _check_rollout(rollout, "rollout")
    _check_callable("reward_fn", reward_fn)
    return _as_vector(reward_fn(rollout), "reward_fn's return value")


# --------------------------------------------------------------------------- aggregation


def aggregate_vector_rewards(
    vectors: torch.Tensor | Sequence[Sequence[float]],
    aggregator: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Reduces vector rewards ``[B, K]`` to scalar rewards ``[B]`` with ``aggregator``.

    ``r_i = aggregator(V)_i`` where row ``V_i`` holds the ``K`` reward components of rollout
    ``i``. Rows may be related (e.g. ``pareto_rank`` compares rows of a group), so the aggregator
    sees the whole batch at once. Built-in aggregators: ``weighted_sum(weights)`` and
    ``create_pareto_aggregator(group_size)``; any ``fn(vectors [B, K]) -> [B]`` works.

    Args:
      vectors: ``[B, K]`` tensor (integer tensors become float32), or a sequence of ``B``
        sequences of ``K`` numbers (becomes a float32 tensor).
      aggregator: ``fn(vectors [B, K]) -> rewards [B]``.
    Returns:
      ``[B]`` tensor returned by the aggregator.
    Raises:
      TypeError / ValueError: malformed or non-finite ``vectors`` (the row is named), ``K = 0``,
        a non-callable aggregator, or an aggregator result that is not a finite ``[B]`` tensor.
    """
    _check_callable("aggregator", aggregator)
    vectors = _as_vectors(vectors)
    rewards = aggregator(vectors)
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"aggregator must return a torch.Tensor, got {type(rewards).__name__}")
    if tuple(rewards.shape) != (vectors.shape[0],):
        raise ValueError(
            f"aggregator must return shape [B] = ({vectors.shape[0]},) for vectors of shape "
            f"{tuple(vectors.shape)}, got shape {tuple(rewards.shape)}"
        )
    _check_finite("aggregator's result", rewards)
    return rewards


def weighted_sum(weights: Sequence[float] | torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Linear scalarisation aggregator: ``r_i = Σ_k w_k · V_ik``.

    The weighting method of multi-objective optimisation (Miettinen 1999, "Nonlinear
    Multiobjective Optimization"). Weights may be any finite reals (negative
    weights turn a component into a cost); they are not renormalised.

    Args:
      weights: ``[K]`` finite weights, ``K ≥ 1``.
    Returns:
      ``aggregator(vectors [B, K]) -> [B]``, computed in the dtype of ``vectors``.
    Raises:
      TypeError / ValueError: ``weights`` empty, not 1-D or not finite; the returned aggregator
        raises ValueError when ``vectors`` is not ``[B, K]`` with the same ``K``.
    """
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().tolist() if weights.dim() == 1 else weights
    weight_values = _as_vector(weights, "weights")

    def aggregator(vectors: torch.Tensor) -> torch.Tensor:
        """``Σ_k w_k · vectors[:, k]`` for ``vectors [B, K]`` with the ``K`` of ``weights``."""
        if not isinstance(vectors, torch.Tensor):
            raise TypeError(f"vectors must be a torch.Tensor, got {type(vectors).__name__}")
        if vectors.dim() != 2 or vectors.shape[1] != len(weight_values):
            raise ValueError(
                f"vectors must have shape [B, K] with K = {len(weight_values)} (the number of "
                f"weights), got shape {tuple(vectors.shape)}"
            )
        vectors = vectors if vectors.is_floating_point() else vectors.to(torch.float32)
        w = torch.tensor(weight_values, dtype=vectors.dtype, device=vectors.device)
        return vectors @ w

    return aggregator


def _pareto_fronts(vectors: torch.Tensor) -> torch.Tensor:
    """Front numbers ``[N, G]`` (1 = non-dominated) of ``N`` groups of ``G`` points in ``K`` dims.

    ``dominates[n, i, j]``: point ``i`` dominates point ``j`` (≥ everywhere, > somewhere). Fronts
    are peeled: the points no remaining point dominates form the next front. Each round removes
    at least one point per non-empty group (a finite partial order has a maximal element), so
    ``G`` rounds suffice.
    """
    left = vectors[:, :, None, :]
    right = vectors[:, None, :, :]
    dominates = (left >= right).all(dim=-1) & (left > right).any(dim=-1)
    fronts = torch.zeros(vectors.shape[:2], dtype=torch.long, device=vectors.device)
    remaining = torch.ones(vectors.shape[:2], dtype=torch.bool, device=vectors.device)
    for front in range(1, vectors.shape[1] + 1):  # at most G fronts
        if not bool(remaining.any()):
            break
        dominated = (dominates & remaining[:, :, None]).any(dim=1)
        current = remaining & ~dominated
        fronts[current] = front
        remaining = remaining & ~current
    return fronts


def pareto_rank(vectors: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Pareto-front reward: non-dominated sorting within each group, mapped to ``[0, 1]``.

    Maximisation: row ``a`` dominates row ``b`` when ``a_k ≥ b_k`` for every component and
    ``a_k > b_k`` for at least one. Within each group, rows are sorted into fronts as in
    NSGA-II (Deb et al. 2002, "A Fast and Elitist Multiobjective Genetic Algorithm: NSGA-II",
    §III-A): front 1 is the set of rows no other row of the group dominates, front 2 is the
    non-dominated set once front 1 is removed, and so on. With ``F`` fronts in the group, a row
    on front ``f`` gets::

        r = (F - f) / (F - 1)        (front 1 → 1.0, last front → 0.0)

    and every row of a group with a single front (including a group of one row, or of identical
    rows) gets 1.0. Identical rows never dominate each other, so they share a front. The reward
    depends only on the order of each component, so it is invariant to strictly increasing
    transformations of each objective. Cost ``O(G² K)`` memory and ``O(F G² K)`` time per group.

    To use it as an aggregator, pass ``create_pareto_aggregator(group_size)`` (or
    ``functools.partial(pareto_rank, group_size=G)``).

    Args:
      vectors: ``[B, K]`` reward components (integer tensors become float32).
      group_size: ``G``, rows per group (consecutive rows); ``None`` ranks the whole batch.
    Returns:
      ``[B]`` rewards in ``[0, 1]``, in the floating dtype of ``vectors``.
    Raises:
      TypeError / ValueError: ``vectors`` not ``[B, K]`` with ``K ≥ 1``, non-finite entries,
        ``group_size`` not a positive int dividing ``B``.
    """
    vectors = _as_vectors(vectors)
    batch_size, num_objectives = vectors.shape
    group_size = _check_group_size(group_size, batch_size)
    if batch_size == 0:
        return vectors.new_zeros(0)
    grouped = vectors.reshape(batch_size // group_size, group_size, num_objectives)
    fronts = _pareto_fronts(grouped).to(vectors.dtype)
    num_fronts = fronts.max(dim=1, keepdim=True).values
    spread = (num_fronts - 1).clamp(min=1)
    rewards = torch.where(num_fronts > 1, (num_fronts - fronts) / spread, torch.ones_like(fronts))
    return rewards.reshape(batch_size)


def create_pareto_aggregator(
    group_size: int | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Returns the aggregator ``fn(vectors [B, K]) -> pareto_rank(vectors, group_size)``.

    See ``pareto_rank`` for the formula (NSGA-II fronts, Deb et al. 2002, mapped to
    ``(F - f)/(F - 1)``). Set ``group_size`` to the number of samples per prompt so rollouts are
    compared only with the other answers to the same prompt.

    Args:
      group_size: rows per group, or ``None`` for the whole batch.
    Returns:
      ``aggregator(vectors [B, K]) -> [B]`` rewards in ``[0, 1]``.
    Raises:
      TypeError / ValueError: ``group_size`` not a positive int (checked now; divisibility is
        checked when the aggregator is called).
    """
    if group_size is not None:
        _check_int("group_size", group_size, minimum=1)

    def aggregator(vectors: torch.Tensor) -> torch.Tensor:
        """``pareto_rank(vectors, group_size)`` with the ``group_size`` given to the factory."""
        return pareto_rank(vectors, group_size=group_size)

    return aggregator


# --------------------------------------------------------------------------- a batch


def _call_reward_fn(rollouts: Sequence[Rollout], reward_fn: Callable[..., Any]) -> list[Any]:
    batched = getattr(reward_fn, "batched", None)
    if batched is None:
        values = []
        for i, rollout in enumerate(rollouts):
            try:
                values.append(reward_fn(rollout))
            except Exception as error:
                raise ValueError(
                    f"reward_fn raised on rollout {i} (prompt {_short_repr(rollout.prompt, 60)}): "
                    f"{type(error).__name__}: {error}"
                ) from error
        return values
    _check_callable("reward_fn.batched", batched)
    try:
        values = batched(rollouts)
    except Exception as error:
        raise ValueError(
            f"reward_fn.batched raised on the batch of {len(rollouts)} rollouts: "
            f"{type(error).__name__}: {error}"
        ) from error
    if isinstance(values, (str, bytes)) or not isinstance(
        values, (Sequence, torch.Tensor, np.ndarray)
    ):
        raise ValueError(
            f"reward_fn.batched must return a sequence of {len(rollouts)} rewards, got "
            f"{type(values).__name__} {_short_repr(values)}"
        )
    if len(values) != len(rollouts):
        raise ValueError(
            f"reward_fn.batched must return one reward per rollout ({len(rollouts)}), got "
            f"{len(values)}: {_short_repr(values)}"
        )
    return list(values)


def _checked_rewards(values: Sequence[Any]) -> tuple[list[Any], bool]:
    """``(rewards, is_vector)``: every value a real number, or every one a vector of one ``K``,
    as ``reward_fn`` returned them for rollouts ``0…B-1`` (``B >= 1``)."""
    is_vector = _is_vector(values[0])
    rewards: list[Any] = []
    for i, value in enumerate(values):
        if _is_vector(value) != is_vector:
            first = "a vector" if is_vector else "a scalar"
            raise ValueError(
                f"reward_fn returned {_short_repr(value)} for rollout {i} but {first} for "
                "rollout 0; every rollout must get the same kind of reward (scalar or vector)"
            )
        try:
            if is_vector:
                reward = _as_vector(value, "reward")
            else:
                reward = _as_real(value, "reward")
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"reward_fn returned an invalid reward for rollout {i}: {_short_repr(value)} "
                f"({error})"
            ) from error
        if is_vector and len(reward) != len(rewards[0] if rewards else reward):
            raise ValueError(
                f"reward_fn returned a vector of length {len(reward)} for rollout {i} "
                f"({_short_repr(value)}) but of length {len(rewards[0])} for rollout 0"
            )
        rewards.append(reward)
    return rewards, is_vector


def compute_batch_rewards(
    rollouts: Sequence[Rollout],
    reward_fn: Callable[[Rollout], Any],
    aggregator: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scores every rollout and returns one scalar reward per rollout, ``[B]`` float32.

    ``r_i = reward_fn(rollouts[i])`` for scalar rewards; for vector rewards
    ``r = aggregator(V)`` with ``V [B, K]`` the stacked components (see
    ``aggregate_vector_rewards``). When ``reward_fn`` has a ``batched`` attribute (see the
    module docstring, ``create_batched_reward_fn``, ``from_trl_reward_fn``), it is called once
    as ``reward_fn.batched(rollouts)`` instead of ``reward_fn`` per rollout. Scalar returns
    follow ``compute_scalar_reward`` (bools count as 0/1); vector returns follow
    ``compute_vector_reward``. All rollouts must return the same kind (scalar or vector of the
    same ``K``). ``aggregator`` is only used for vector rewards (ignored for scalar ones).

    Args:
      rollouts: ``B`` rollouts (a list or tuple of ``Rollout``; may be empty).
      reward_fn: ``fn(rollout) -> float | Sequence[float]``, optionally with ``.batched``.
      aggregator: ``fn(vectors [B, K]) -> [B]``; required when rewards are vectors.
    Returns:
      ``[B]`` float32 rewards (CPU).
    Raises:
      TypeError: ``rollouts`` is a single ``Rollout`` or holds a non-``Rollout`` (index named),
        ``reward_fn`` / ``aggregator`` not callable.
      ValueError: ``reward_fn`` raised (the rollout index and the exception are named and the
        original exception is chained as ``__cause__``), returned NaN/inf, a wrong type, an
        empty vector, mixed scalars and vectors or vectors of different lengths (index and value
        named), vector rewards without an aggregator, or a bad aggregator result.
    """
    if (
        isinstance(rollouts, Rollout)
        or isinstance(rollouts, (str, bytes))
        or not isinstance(rollouts, Sequence)
    ):
        raise TypeError(
            f"rollouts must be a list or tuple of Rollout, got {type(rollouts).__name__}"
        )
    for i, rollout in enumerate(rollouts):
        _check_rollout(rollout, f"rollouts[{i}]")
    _check_callable("reward_fn", reward_fn)
    if aggregator is not None:
        _check_callable("aggregator", aggregator)
    if len(rollouts) == 0:
        return torch.zeros(0, dtype=torch.float32)

    rewards, is_vector = _checked_rewards(_call_reward_fn(rollouts, reward_fn))
    if not is_vector:
        result = torch.tensor(rewards, dtype=torch.float32)
        if not bool(torch.isfinite(result).all()):
            index = int((~torch.isfinite(result)).nonzero()[0, 0])
            raise ValueError(f"reward {rewards[index]} for rollout {index} overflows float32")
        return result
    if aggregator is None:
        raise ValueError(
            f"reward_fn returned vector rewards (K = {len(rewards[0])}, e.g. {rewards[0]} for "
            "rollout 0); pass an aggregator (weighted_sum(weights) or create_pareto_aggregator())"
        )
    vectors = torch.tensor(rewards, dtype=torch.float32)
    return aggregate_vector_rewards(vectors, aggregator).to(torch.float32)


def create_batched_reward_fn(
    batch_fn: Callable[[Sequence[Rollout]], Sequence[Any]],
) -> Callable[[Rollout], Any]:
    """Builds a reward function from a batch function, scored once per batch when possible.

    Returns ``reward_fn`` with ``reward_fn(rollout) = batch_fn([rollout])[0]`` (so it works
    anywhere a per-rollout reward function does) and ``reward_fn.batched = batch_fn``, which
    ``compute_batch_rewards`` calls once for the whole batch:
    ``batch_fn(rollouts) -> [reward_0, …, reward_{B-1}]`` (floats or vectors, one per rollout,
    in order). ``batch_fn`` must score each rollout independently of the others for the two
    paths to agree.

    Args:
      batch_fn: ``fn(rollouts: Sequence[Rollout]) -> Sequence[float | Sequence[float]]``.
    Returns:
      ``reward_fn(rollout) -> float | Sequence[float]`` carrying ``.batched = batch_fn``.
    Raises:
      TypeError: ``batch_fn`` is not callable. The returned function raises ValueError when
        ``batch_fn`` does not return exactly one reward for its one rollout.
    """
    _check_callable("batch_fn", batch_fn)

    def reward_fn(rollout: Rollout) -> Any:
        """Scores one rollout as ``batch_fn([rollout])[0]``; ``.batched`` scores a batch."""
        values = batch_fn([rollout])
        if (
            isinstance(values, (str, bytes))
            or not isinstance(values, (Sequence, torch.Tensor, np.ndarray))
            or len(values) != 1
        ):
            raise ValueError(
                "batch_fn must return a sequence with one reward for a batch of one rollout, "
                f"got {_short_repr(values)}"
            )
        return values[0]

    reward_fn.batched = batch_fn  # type: ignore[attr-defined]
    return reward_fn


def from_trl_reward_fn(
    fn: Callable[..., Sequence[float]],
) -> Callable[[Rollout], Any]:
    """Adapts a TRL-style reward function ``fn(prompts, completions, **kwargs) -> list[float]``.

    For a batch of rollouts ``fn`` is called once (through ``compute_batch_rewards``) as::

        fn(prompts=[r.prompt for r in rollouts],
           completions=[r.generation.text for r in rollouts],
           completion_ids=[list(r.generation.token_ids) for r in rollouts],
           **{key: [r.metadata.get(key) for r in rollouts] for key in metadata keys})

    i.e. positionally ``(prompts, completions)`` and, as keyword arguments, one list per
    metadata key (the union of the rollouts' keys in first-seen order; ``None`` where a rollout
    lacks the key), as TRL passes dataset columns. ``completion_ids`` is added unless a metadata
    key of that name overrides it. Completions are plain text (TRL's "standard" format), so
    ``fn`` should accept ``**kwargs``. ``fn`` returns one float per completion; TRL's ``None``
    ("not applicable") is rejected by ``compute_batch_rewards`` as an invalid reward.

    The result is a ``create_batched_reward_fn`` function: called on a single rollout it calls
    ``fn`` with one-element lists; ``compute_batch_rewards`` calls ``fn`` once per batch.

    Args:
      fn: ``fn(prompts: list[str], completions: list[str], **kwargs) -> list[float]``.
    Returns:
      ``reward_fn(rollout) -> float`` with ``.batched(rollouts) -> list[float]``.
    Raises:
      TypeError: ``fn`` is not callable. At call time, ValueError when a metadata key is
        ``"prompts"`` or ``"completions"`` (it would clash with the positional arguments).
    """
    _check_callable("fn", fn)

    def batch_fn(rollouts: Sequence[Rollout]) -> Sequence[Any]:
        """Calls the TRL function once on the whole batch (see ``from_trl_reward_fn``)."""
        keys: dict[str, None] = {}
        for rollout in rollouts:
            for key in rollout.metadata or {}:
                keys.setdefault(key, None)
        for key in ("prompts", "completions"):
            if key in keys:
                raise ValueError(
                    f"rollout.metadata key {key!r} clashes with the positional argument of the "
                    "TRL reward function; rename it"
                )
        kwargs: dict[str, list[Any]] = {
            "completion_ids": [list(r.generation.token_ids) for r in rollouts]
        }
        for key in keys:
            kwargs[key] = [(r.metadata or {}).get(key) for r in rollouts]
        prompts = [r.prompt for r in rollouts]
        completions = [r.generation.text for r in rollouts]
        return fn(prompts, completions, **kwargs)

    return create_batched_reward_fn(batch_fn)


# --------------------------------------------------------------------------- normalisation


def _average_rank_fraction(grouped: torch.Tensor) -> torch.Tensor:
    """``[N, G]`` → ``(rank - 1) / (G - 1)`` with average (1-based) ranks for ties; 0.5 if G = 1.

    The average rank of ``x_i`` is ``#{j: x_j < x_i} + (#{j: x_j = x_i} + 1) / 2``.
    """
    group_size = grouped.shape[1]
    if group_size == 1:
        return torch.full_like(grouped, 0.5)
    less = (grouped[:, None, :] < grouped[:, :, None]).sum(dim=2)
    equal = (grouped[:, None, :] == grouped[:, :, None]).sum(dim=2)
    rank_minus_one = less.to(grouped.dtype) + (equal.to(grouped.dtype) - 1) / 2
    return rank_minus_one / (group_size - 1)


def compute_relative_rewards(rewards: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Rank of each reward within its group, mapped to ``[0, 1]``.

    With ``rank_i ∈ {1, …, G}`` the average (fractional) rank of ``r_i`` among the ``G`` rewards
    of its group (ties share the mean of the ranks they span, so equal rewards get equal
    values)::

        rel_i = (rank_i - 1) / (G - 1)          (worst → 0, best → 1)

    A group of one gets 0.5 (neither better nor worse than its peers). Each group's values
    average exactly 0.5. Rank-based rewards ignore the scale of the raw rewards, as in
    rank-based fitness shaping (Wierstra et al. 2014, "Natural Evolution Strategies").

    Args:
      rewards: ``[B]`` rewards (integer tensors or sequences become float32).
      group_size: ``G``, consecutive rows per group; ``None`` ranks the whole batch.
    Returns:
      ``[B]`` values in ``[0, 1]``, in the floating dtype of ``rewards``.
    Raises:
      TypeError / ValueError: ``rewards`` not 1-D or not finite (index named), ``group_size``
        not a positive int dividing ``B``.
    """
    rewards = _as_1d("rewards", rewards)
    _check_finite("rewards", rewards)
    group_size = _check_group_size(group_size, rewards.shape[0])
    if rewards.shape[0] == 0:
        return rewards.clone()
    grouped = rewards.reshape(-1, group_size)
    return _average_rank_fraction(grouped).reshape(-1)


def normalize_rewards(
    rewards: torch.Tensor,
    method: str = "zscore",
    group_size: int | None = None,
    eps: float = 1e-8,
    normalizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalises rewards over the batch or within each group of consecutive rows.

    Per group ``g`` (the whole batch when ``group_size`` is ``None``)::

        "zscore":  (r_i - mean_g) / (std_g + ε)     std unbiased (Bessel), as GRPO's outcome
                                                      advantage (Shao et al. 2024, §4.1.2)
        "minmax":  (r_i - min_g) / (max_g - min_g + ε)
        "rank":    compute_relative_rewards(r, group_size)   ((rank - 1)/(G - 1), ties averaged)
        "none":    r_i

    A constant group (including a group of one) gets 0 under "zscore" and "minmax" (exactly:
    rounding in the mean cannot blow up into spurious values) and 0.5 under "rank".
    Statistics are computed in float64 and the result is returned in the dtype of ``rewards``.

    ``normalizer`` (extension point) replaces ``method``: it receives the rewards reshaped to
    ``[num_groups, G]`` (``[1, B]`` without groups) and must return the same shape.

    Args:
      rewards: ``[B]`` rewards (integer tensors or sequences become float32).
      method: one of ``"zscore"``, ``"minmax"``, ``"rank"``, ``"none"``.
      group_size: ``G`` rows per group, or ``None``.
      eps: ``ε ≥ 0`` added to the denominators.
      normalizer: ``fn(grouped [N, G]) -> [N, G]``, or ``None`` to use ``method``.
    Returns:
      ``[B]`` normalised rewards.
    Raises:
      TypeError / ValueError: ``rewards`` not 1-D or not finite (index named), an unknown
        ``method`` (the valid ones are listed), a bad ``group_size`` or ``eps``, a normalizer
        result that is not a finite tensor of the input's shape.
    """
    rewards = _as_1d("rewards", rewards)
    _check_finite("rewards", rewards)
    if normalizer is None and method not in NORMALIZE_METHODS:
        raise ValueError(f"method must be one of {NORMALIZE_METHODS}, got {method!r}")
    eps = _check_number("eps", eps, minimum=0.0)
    batch_size = rewards.shape[0]
    group_size = _check_group_size(group_size, batch_size)
    if normalizer is not None:
        _check_callable("normalizer", normalizer)
    if batch_size == 0:
        return rewards.clone()
    grouped = rewards.reshape(batch_size // group_size, group_size)

    if normalizer is not None:
        result = normalizer(grouped)
        if not isinstance(result, torch.Tensor) or result.shape != grouped.shape:
            shape = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result)
            raise ValueError(
                f"normalizer must return a tensor of shape {tuple(grouped.shape)} "
                f"[num_groups, G], got {shape}"
            )
        _check_finite("normalizer's result", result.reshape(-1))
        return result.reshape(batch_size)
    if method == "none":
        return rewards.clone()
    if method == "rank":
        return _average_rank_fraction(grouped).reshape(batch_size)

    values = grouped.to(torch.float64)
    low = values.min(dim=1, keepdim=True).values
    high = values.max(dim=1, keepdim=True).values
    constant = high == low
    if method == "zscore":
        std = values.std(dim=1, correction=1, keepdim=True) if group_size > 1 else low
        normalized = (values - values.mean(dim=1, keepdim=True)) / (std + eps)
    else:
        normalized = (values - low) / (high - low + eps)
    normalized = torch.where(constant, torch.zeros_like(normalized), normalized)
    return normalized.to(rewards.dtype).reshape(batch_size)


# --------------------------------------------------------------------------- shaping


def _as_lengths(lengths: object) -> torch.Tensor:
    lengths = _as_1d("lengths", lengths)
    _check_finite("lengths", lengths)
    if bool((lengths < 0).any()):
        index = int((lengths < 0).nonzero()[0, 0])
        raise ValueError(f"lengths must be >= 0, got {lengths[index].item()} at index {index}")
    return lengths


def compute_overlong_penalty(
    lengths: torch.Tensor,
    max_response_len: int,
    overlong_buffer_len: int,
    penalty: float = 1.0,
) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, "DAPO", eq. 13), scaled by ``penalty``.

    With ``L_max = max_response_len``, ``L_cache = overlong_buffer_len`` and ``|y|`` the
    completion length in tokens::

        R(y) = 0                                       if |y| ≤ L_max - L_cache
             = ((L_max - L_cache) - |y|) / L_cache · p  if L_max - L_cache < |y| ≤ L_max
             = -p                                       if |y| > L_max

    It falls linearly from 0 to ``-p`` across the last ``L_cache`` tokens before the cap and is
    added to the task reward (see ``apply_reward_shaping``).

    Args:
      lengths: ``[B]`` completion lengths in tokens (``≥ 0``).
      max_response_len: ``L_max ≥ 1``.
      overlong_buffer_len: ``L_cache``, ``1 ≤ L_cache ≤ L_max``.
      penalty: ``p ≥ 0``, the penalty at and beyond ``L_max`` (DAPO uses 1).
    Returns:
      ``[B]`` penalties in ``[-p, 0]``, float (the dtype of ``lengths`` if floating, else
      float32).
    Raises:
      TypeError / ValueError: bad ``lengths`` (negative or non-finite, index named), or
        ``L_max``, ``L_cache``, ``p`` out of range.
    """
    lengths = _as_lengths(lengths)
    max_len = _check_int("max_response_len", max_response_len, minimum=1)
    buffer_len = _check_int("overlong_buffer_len", overlong_buffer_len, minimum=1)
    if buffer_len > max_len:
        raise ValueError(
            f"overlong_buffer_len must be <= max_response_len ({max_len}), got {buffer_len}"
        )
    penalty = _check_number("penalty", penalty, minimum=0.0)
    expected_len = max_len - buffer_len
    soft = (expected_len - lengths) / buffer_len * penalty
    result = torch.where(lengths > max_len, torch.full_like(lengths, -penalty), soft)
    return torch.where(lengths <= expected_len, torch.zeros_like(lengths), result)


def apply_reward_shaping(
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    shaping_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    length_penalty: float = 0.0,
    target_length: float | None = None,
    overlong_buffer_len: int | None = None,
    max_response_len: int | None = None,
    overlong_penalty: float = 1.0,
) -> torch.Tensor:
    """Adds length-based shaping terms to sequence rewards.

    With ``λ = length_penalty`` and ``|y_i| = lengths[i]``::

        r'_i = r_i - λ · |y_i|                      (target_length is None)
        r'_i = r_i - λ · ||y_i| - target_length|    (target_length given)
               + compute_overlong_penalty(|y_i|, L_max, L_cache, overlong_penalty)
                                                    (when overlong_buffer_len is given)

    The last term is DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) with
    ``L_max = max_response_len`` and ``L_cache = overlong_buffer_len``. With the defaults
    (``λ = 0``, no buffer) rewards come back unchanged (a copy).

    ``shaping_fn`` (extension point) *replaces* the built-in shaping: when given, the result is
    ``shaping_fn(rewards, lengths)`` (a ``[B]`` tensor) and the other shaping arguments are
    ignored.

    Args:
      rewards: ``[B]`` rewards.
      lengths: ``[B]`` completion lengths in tokens (``≥ 0``).
      shaping_fn: ``fn(rewards [B], lengths [B]) -> [B]``, or ``None``.
      length_penalty: ``λ ≥ 0`` per token (of length, or of distance from ``target_length``).
      target_length: ``≥ 0``, or ``None`` to penalise the raw length.
      overlong_buffer_len: ``L_cache``, or ``None`` to disable overlong shaping.
      max_response_len: ``L_max``; required when ``overlong_buffer_len`` is given.
      overlong_penalty: ``p ≥ 0``, the overlong penalty at ``L_max``.
    Returns:
      ``[B]`` shaped rewards, in the floating dtype of ``rewards``.
    Raises:
      TypeError / ValueError: shapes that are not ``[B]`` or differ, non-finite rewards,
        negative lengths, out-of-range arguments, ``overlong_buffer_len`` without
        ``max_response_len``, a ``shaping_fn`` result that is not a finite ``[B]`` tensor.
    """
    rewards = _as_1d("rewards", rewards)
    _check_finite("rewards", rewards)
    lengths = _as_lengths(lengths)
    if lengths.shape != rewards.shape:
        raise ValueError(
            f"lengths must have the shape of rewards {tuple(rewards.shape)}, got "
            f"{tuple(lengths.shape)}"
        )
    if shaping_fn is not None:
        _check_callable("shaping_fn", shaping_fn)
        shaped = shaping_fn(rewards, lengths)
        if not isinstance(shaped, torch.Tensor) or shaped.shape != rewards.shape:
            shape = tuple(shaped.shape) if isinstance(shaped, torch.Tensor) else type(shaped)
            raise ValueError(
                f"shaping_fn must return a tensor of shape {tuple(rewards.shape)}, got {shape}"
            )
        _check_finite("shaping_fn's result", shaped)
        return shaped

    length_penalty = _check_number("length_penalty", length_penalty, minimum=0.0)
    if target_length is not None:
        target_length = _check_number("target_length", target_length, minimum=0.0)
    if overlong_buffer_len is not None and max_response_len is None:
        raise ValueError(
            f"max_response_len is required with overlong_buffer_len={overlong_buffer_len}, got None"
        )
    lengths = lengths.to(device=rewards.device, dtype=torch.float64)
    shaped = rewards.to(torch.float64)
    if length_penalty:
        excess = lengths if target_length is None else (lengths - target_length).abs()
        shaped = shaped - length_penalty * excess
    if overlong_buffer_len is not None:
        shaped = shaped + compute_overlong_penalty(
            lengths, max_response_len, overlong_buffer_len, overlong_penalty
        )
    return shaped.to(rewards.dtype)


# --------------------------------------------------------------------------- builders


def _answer_getter(answer: str | Callable[[Rollout], Any]) -> Callable[[Rollout], Any]:
    if callable(answer):
        return answer
    if not isinstance(answer, str):
        raise TypeError(
            "answer must be a metadata key (str) or a function fn(rollout) -> answer, got "
            f"{type(answer).__name__}"
        )

    def from_metadata(rollout: Rollout) -> Any:
        metadata = rollout.metadata or {}
        if answer not in metadata:
            raise ValueError(
                f"rollout.metadata has no key {answer!r} holding the expected answer; keys: "
                f"{sorted(map(str, metadata))}"
            )
        return metadata[answer]

    return from_metadata


def exact_match_reward(
    answer: str | Callable[[Rollout], Any] = "answer",
    *,
    extract_fn: Callable[[str], str | None] | None = None,
    normalize_fn: Callable[[str], str] | None = None,
    reward: float = 1.0,
    penalty: float = 0.0,
) -> Callable[[Rollout], float]:
    """Builds ``reward_fn(rollout)``: ``reward`` if the completion's answer equals the expected
    one, else ``penalty``.

    ::

        predicted = normalize_fn(extract_fn(rollout.generation.text))
        expected  = normalize_fn(str(answer_value))
        reward_fn(rollout) = reward if predicted == expected else penalty

    The binary verifiable-answer reward of RLVR (Lambert et al. 2024, "Tülu 3") and of
    DeepSeek-R1's accuracy reward (Guo et al. 2025). ``answer_value`` is ``rollout.metadata[answer]`` when
    ``answer`` is a key, or ``answer(rollout)`` when it is a function. When ``answer_value`` is
    a list, tuple or set, matching any element counts. When ``extract_fn`` returns ``None`` (no
    answer found) the result is ``penalty``.

    Args:
      answer: metadata key of the expected answer (default ``"answer"``), or
        ``fn(rollout) -> expected answer``.
      extract_fn: ``fn(completion_text) -> str | None`` picking the answer out of the
        completion; ``None`` uses the whole text.
      normalize_fn: ``fn(str) -> str`` applied to both sides; ``None`` means ``str.strip``.
      reward / penalty: the values for a match / a mismatch (finite).
    Returns:
      ``reward_fn(rollout) -> float``.
    Raises:
      TypeError / ValueError: bad arguments. The returned function raises ValueError when the
        metadata key is missing (the available keys are listed).
    """
    get_answer = _answer_getter(answer)
    if extract_fn is not None:
        _check_callable("extract_fn", extract_fn)
    normalize = str.strip if normalize_fn is None else normalize_fn
    _check_callable("normalize_fn", normalize)
    reward = _check_number("reward", reward)
    penalty = _check_number("penalty", penalty)

    def reward_fn(rollout: Rollout) -> float:
        """``reward`` if the extracted, normalised completion equals the expected answer."""
        expected = get_answer(rollout)
        candidates = expected if isinstance(expected, (list, tuple, set, frozenset)) else [expected]
        text = rollout.generation.text
        predicted = text if extract_fn is None else extract_fn(text)
        if predicted is None:
            return penalty
        predicted = normalize(str(predicted))
        return reward if any(predicted == normalize(str(c)) for c in candidates) else penalty

    return reward_fn


def regex_format_reward(
    pattern: str | re.Pattern[str],
    reward: float = 1.0,
    penalty: float = 0.0,
    *,
    mode: str = "fullmatch",
    flags: int = re.DOTALL,
) -> Callable[[Rollout], float]:
    """Builds ``reward_fn(rollout)``: ``reward`` if the completion text has the required format,
    else ``penalty``.

    ::

        reward_fn(rollout) = reward if re.<mode>(pattern, rollout.generation.text) else penalty

    ``mode="fullmatch"`` (default) requires the *whole* completion to match, ``"match"`` a match
    at its start, ``"search"`` a match anywhere. The text is not stripped (allow surrounding
    whitespace in the pattern with ``\\s*``). ``flags`` defaults to ``re.DOTALL`` so ``.``
    spans lines; they are ignored for an already compiled pattern. The format reward of
    DeepSeek-R1 (Guo et al. 2025, §2.2.2), e.g. ``r"<think>.*?</think>\\s*<answer>.*?</answer>"``.

    Args:
      pattern: a regular expression (str or compiled).
      reward / penalty: the values for a match / no match (finite).
      mode: ``"fullmatch"``, ``"match"`` or ``"search"``.
      flags: ``re`` flags for a string pattern.
    Returns:
      ``reward_fn(rollout) -> float``.
    Raises:
      TypeError / ValueError: a pattern that does not compile (the pattern and the error are
        named), an unknown ``mode``, non-finite ``reward`` / ``penalty``.
    """
    if mode not in REGEX_MODES:
        raise ValueError(f"mode must be one of {REGEX_MODES}, got {mode!r}")
    if isinstance(pattern, re.Pattern):
        compiled = pattern
    elif isinstance(pattern, str):
        try:
            compiled = re.compile(pattern, flags)
        except re.error as error:
            raise ValueError(
                f"pattern {pattern!r} is not a valid regular expression: {error}"
            ) from error
    else:
        raise TypeError(f"pattern must be a str or re.Pattern, got {type(pattern).__name__}")
    reward = _check_number("reward", reward)
    penalty = _check_number("penalty", penalty)
    matcher = getattr(compiled, mode)

    def reward_fn(rollout: Rollout) -> float:
        """``reward`` if the completion text matches the pattern (in the builder's mode)."""
        return reward if matcher(rollout.generation.text) is not None else penalty

    return reward_fn


def _completion_length(rollout: Rollout, unit: str) -> int:
    has_tokens = rollout.completion_ids is not None or len(rollout.generation.token_ids) > 0
    if unit == "chars" or (unit == "auto" and not has_tokens):
        return len(rollout.generation.text)
    if rollout.completion_ids is None:
        return len(rollout.generation.token_ids)
    if rollout.action_mask is None:
        return len(rollout.completion_ids)
    return int(sum(1 for m in rollout.action_mask if m))


def length_reward(
    target_length: float, scale: float = 1.0, *, unit: str = "auto"
) -> Callable[[Rollout], float]:
    """Builds ``reward_fn(rollout) = -| n - target_length | / scale``: 0 at the target length,
    falling linearly on both sides.

    ``n`` is the completion length: with ``unit="tokens"``, the model-produced tokens
    (``sum(action_mask)`` over ``rollout.completion_ids`` for multi-turn rollouts, else
    ``len(rollout.generation.token_ids)``); with ``unit="chars"``, ``len(generation.text)``;
    ``unit="auto"`` counts tokens when the rollout has token ids and characters otherwise. A
    linear length-deviation penalty in the spirit of L1 (Aggarwal & Welleck 2025, "L1:
    Controlling How Long a Reasoning Model Thinks", eq. 1), without the correctness term.

    Args:
      target_length: the preferred length (``≥ 0``).
      scale: ``> 0``, length units per unit of reward.
      unit: ``"auto"``, ``"tokens"`` or ``"chars"``.
    Returns:
      ``reward_fn(rollout) -> float`` (``≤ 0``).
    Raises:
      TypeError / ValueError: negative ``target_length``, ``scale ≤ 0``, unknown ``unit``.
    """
    target_length = _check_number("target_length", target_length, minimum=0.0)
    scale = _check_number("scale", scale, minimum=0.0, strict=True)
    if unit not in LENGTH_UNITS:
        raise ValueError(f"unit must be one of {LENGTH_UNITS}, got {unit!r}")

    def reward_fn(rollout: Rollout) -> float:
        """``-|n - target_length| / scale`` with ``n`` the completion length."""
        return -abs(_completion_length(rollout, unit) - target_length) / scale

    return reward_fn
