"""The training loop: one optimizer update, the five phases of an iteration, and the loop.

``training_step`` makes one optimizer update from a ``Batch``. One iteration is five public
phases, each a function with a NamedTuple result that a user may call, reorder or replace::

    sample_and_score → reference_and_kl → values_and_advantages → update_policy → refresh_reference
      SampleResult      ReferenceResult     AdvantageResult         UpdateResult    TrainingState

``training_iteration`` is their composition; ``train`` repeats iterations with logging,
evaluation and checkpoints (``quick_start_training``, the one-liner, lives in
``rlprim.quick_start``). Data parallelism is an argument, ``data_parallel`` (a
``DataParallel`` of collectives; ``None`` picks ``current_data_parallel()``): the phases never
branch on whether they run distributed.

State: ``TrainingState`` carries the models and the optimizer. As everywhere in rlprim the
functions return a new ``TrainingState``; the one exception to purity is that the policy's
(and critic's) weights and the optimizer's state are updated in place, as PyTorch does.
The policy stays in eval mode throughout (no dropout), so log-probs at sampling and training
time are computed by the same function.
"""

from __future__ import annotations

import inspect
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from rlprim.algorithms import (
    ALGORITHMS,
    compute_advantages_by_algorithm,
    compute_loss_by_algorithm,
    create_algorithm_config,
    get_algorithm,
    requires_reference_model,
    validate_algorithm_config,
)
from rlprim.batching import (
    microbatch_loss_totals,
    microbatch_loss_weights,
    pack_by_length,
    rollouts_to_batch,
    select_batch,
    trim_padding,
)
from rlprim.critic import create_value_model, get_values
from rlprim.distributed import DataParallel, current_data_parallel, unwrap_model
from rlprim.inference import hf_generator
from rlprim.kl import (
    _frozen_reference,
    compute_per_token_kl,
    create_reference_model,
    update_reference_model,
)
from rlprim.logprobs import get_logprobs, get_reference_logprobs
from rlprim.rewards import apply_reward_shaping, compute_batch_rewards
from rlprim.rollouts import create_batch_rollouts, sample_until_informative
from rlprim.types import (
    AlgorithmConfig,
    Batch,
    GenerationConfig,
    Schedule,
    TrainingState,
    TrainingStats,
)

__all__ = [
    "create_training_state",
    "default_optimizer_step",
    "training_step",
    "SampleResult",
    "ReferenceResult",
    "AdvantageResult",
    "UpdateResult",
    "sample_and_score",
    "reference_and_kl",
    "values_and_advantages",
    "update_policy",
    "refresh_reference",
    "training_iteration",
    "train",
    "resolve_schedule",
]


# --------------------------------------------------------------------------------------------
# State.
# --------------------------------------------------------------------------------------------


def create_training_state(
    policy: torch.nn.Module,
    tokenizer: Any,
    algorithm_config: AlgorithmConfig | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    learning_rate: float = 1e-5,
    ref_model: torch.nn.Module | None = None,
    value_model: torch.nn.Module | None = None,
    scheduler: Any = None,
    registry: Mapping[str, Any] = ALGORITHMS,
    ref_model_fn: Callable[[torch.nn.Module], torch.nn.Module] = create_reference_model,
) -> TrainingState:
    """A ``TrainingState`` ready for ``train``: reference and critic built when needed.

    The reference model is ``ref_model_fn(policy)`` (default ``create_reference_model``, a
    frozen copy of the policy), frozen, when the algorithm needs one
    (``requires_reference_model``: β > 0 or DPO) and none is given; the
    critic is ``create_value_model(policy)`` when the algorithm trains one. The default
    optimizer is AdamW over the policy's (and critic's) trainable parameters.

    Args:
      policy: the causal LM to train.
      tokenizer: its tokenizer.
      algorithm_config: the configuration (default ``create_algorithm_config("grpo")``).
      optimizer: a ready optimizer, or ``None`` for ``AdamW(lr=learning_rate)``.
      learning_rate: AdamW's learning rate when ``optimizer`` is ``None``.
      ref_model: a reference model to use instead of a copy of the policy.
      value_model: a critic to use instead of ``create_value_model(policy)``.
      scheduler: an optional learning-rate scheduler stepped after each update.
      registry: where to look the algorithm up.
      ref_model_fn: ``fn(policy) -> ref_model`` (seed 003's ``ref_model_fn``), e.g. a loader
        of a separate SFT checkpoint; its result must share no storage with the policy.
    Returns:
      ``TrainingState(step=0, iteration=0, kl_coef=config.kl_coef, loader_state={"position": 0})``.
    """
    config = algorithm_config or create_algorithm_config("grpo", registry=registry)
    validate_algorithm_config(config)
    algorithm = get_algorithm(config.name, registry)
    if not callable(ref_model_fn):
        raise TypeError(
            f"ref_model_fn must be callable as fn(policy) -> ref_model, got "
            f"{type(ref_model_fn).__name__}"
        )
    if ref_model is None and requires_reference_model(config, registry):
        ref_model = _frozen_reference(ref_model_fn(policy), policy, "ref_model_fn")
    if value_model is None and algorithm.needs_value:
        value_model = create_value_model(policy)
    if optimizer is None:
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        params = [p for p in policy.parameters() if p.requires_grad]
        if value_model is not None:
            params += [p for p in value_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=learning_rate)
    policy.eval()
    if value_model is not None:
        value_model.eval()
    return TrainingState(
        policy=policy,
        tokenizer=tokenizer,
        optimizer=optimizer,
        ref_model=ref_model,
        value_model=value_model,
        step=0,
        kl_coef=float(config.kl_coef),
        config=config,
        scheduler=scheduler,
        iteration=0,
        loader_state={"position": 0},
    )


def resolve_schedule(value: Any, iteration: int) -> Any:
    """``value.fn(iteration)`` when ``value`` is a ``Schedule``, else ``value`` itself.

    ``train`` resolves ``algorithm_config`` and ``reward_fn`` with it each iteration; an
    ``algorithm_config`` may also be a plain function of the iteration.

    Args:
      value: a ``Schedule`` or a constant.
      iteration: the iteration index.
    """
    if isinstance(value, Schedule):
        return value.fn(iteration)
    return value


# --------------------------------------------------------------------------------------------
# One optimizer update.
# --------------------------------------------------------------------------------------------


def default_optimizer_step(state: TrainingState) -> None:
    """The default ``optimizer_step_fn``: ``optimizer.step()`` then ``scheduler.step()``.

    Called by ``training_step`` after the gradients were accumulated, clipped to
    ``max_grad_norm`` and found finite. Replace it to add e.g. weight averaging.

    Args:
      state: the current state (its ``optimizer`` and ``scheduler`` are stepped).
    """
    state.optimizer.step()
    if state.scheduler is not None:
        state.scheduler.step()


def _trainable_parameters(state: TrainingState) -> list[torch.nn.Parameter]:
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    return [p for p in params if p.requires_grad]


def _micro_batches(batch: Batch, micro_batch_size: int | None) -> list[Batch]:
    if micro_batch_size is None or micro_batch_size >= batch.completion_ids.shape[0]:
        return [batch]
    return pack_by_length(batch, max_sequences=micro_batch_size)


def _model_inputs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([batch.prompt_ids, batch.completion_ids], dim=1), batch.attention_mask


# TIS diagnostics (``compute_tis_weights``) averaged over micro-batches and updates;
# ``tis_ratio_max`` is a maximum instead.
_TIS_MEAN_METRICS = (
    "tis_weight_mean",
    "tis_clip_fraction",
    "tis_mismatch_kl",
    "tis_logprob_abs_diff",
)
# Loss metrics averaged over micro-batches with their loss weights.
_STEP_METRICS = ("policy_loss", "value_loss", "kl", "clip_fraction", "approx_kl")


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


class _StepSettings(NamedTuple):
    """What every micro-batch of one ``training_step`` shares."""

    config: AlgorithmConfig
    algorithm: Any
    temperature: float
    extract: Callable[..., Any]
    registry: Mapping[str, Any]
    loss_fn: Callable[..., Any] | None
    kl_fn: Callable[..., Any] | None
    pair_selector: Callable[..., Any] | None
    values: Callable[..., Any] = get_values


class _Passes(NamedTuple):
    """This rank's backward passes: finiteness, weighted losses, metrics and entropy sums."""

    finite: bool
    losses: list[float]
    metrics: list[tuple[float, dict[str, float]]]
    entropies: list[tuple[float, float]]


class _StepSums(NamedTuple):
    """The step's totals over every rank (``DataParallel.all_reduce``)."""

    finite: bool
    loss: float
    tokens: float
    sequences: int
    entropy: tuple[float, float]
    metrics: dict[str, tuple[float, float, float]]
    tis_ratio_max: float


def _step_config(
    algorithm_config: AlgorithmConfig, batch: Batch, parallel: DataParallel
) -> AlgorithmConfig:
    """Dr. GRPO's constant ``L`` is the (global) batch's ``Tc`` unless given: it must not
    change between micro-batches, nor between ranks."""
    config = algorithm_config
    if config.norm_length is None and config.loss_agg_mode == "seq-mean-token-sum-norm":
        longest = parallel.all_reduce([batch.completion_ids.shape[1]], "max")[0]
        config = config._replace(norm_length=int(longest))
    return config


def _weighted_micro_batches(
    batch: Batch, config: AlgorithmConfig, parallel: DataParallel
) -> tuple[list[Batch], list[float]]:
    """Length-packed micro-batches and their loss weights w_i under the global normaliser."""
    micro = _micro_batches(batch, config.micro_batch_size) if len(batch.completion_ids) else []
    totals = parallel.all_reduce(microbatch_loss_totals(micro, config.loss_agg_mode))
    weights = microbatch_loss_weights(micro, config.loss_agg_mode, global_totals=tuple(totals))
    return micro, weights


def _micro_batch_loss(
    state: TrainingState, mb: Batch, settings: _StepSettings
) -> tuple[torch.Tensor, Mapping[str, float], torch.Tensor | None]:
    """``(loss, metrics, entropy [b, Tc])`` of one micro-batch, with the graph for backward."""
    input_ids, attention_mask = _model_inputs(mb)
    tc = mb.completion_ids.shape[1]
    new_logprobs, entropy = settings.extract(
        state.policy,
        input_ids,
        attention_mask,
        temperature=settings.temperature,
        completion_length=tc,
        return_entropy=True,
    )
    extras: dict[str, Any] = {"kl_coef": state.kl_coef}
    if settings.kl_fn is not None:
        extras["kl_fn"] = settings.kl_fn
    if settings.pair_selector is not None:
        extras["pair_selector"] = settings.pair_selector
    if entropy is not None:
        extras["entropy"] = entropy
    if settings.algorithm.needs_value:
        if state.value_model is None:
            name = settings.config.name
            raise ValueError(f"algorithm {name!r} needs state.value_model, got None")
        extras["new_values"] = settings.values(state.value_model, input_ids, attention_mask, tc)
    loss, metrics = compute_loss_by_algorithm(
        settings.config, mb, new_logprobs, registry=settings.registry, loss_fn=settings.loss_fn,
        **extras,
    )
    return loss, metrics, entropy


def _idle_pass(state: TrainingState, settings: _StepSettings, parallel: DataParallel) -> None:
    """Sharded weights (FSDP2): a forward and backward with zero loss on a 2-token input, so
    this rank joins the all-gathers and reduce-scatters of a micro-batch it does not have (adds
    0 gradient). The critic takes part when it is sharded too (its passes must line up)."""
    device = next(state.policy.parameters()).device
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    loss = settings.extract(
        state.policy, ids, mask, temperature=settings.temperature, completion_length=1
    ).sum()
    if parallel.is_sharded(state.value_model):
        loss = loss + settings.values(state.value_model, ids, mask, 1).sum()
    (loss * 0.0).backward()


def _accumulate_gradients(
    state: TrainingState,
    micro: Sequence[Batch],
    weights: Sequence[float],
    settings: _StepSettings,
    parallel: DataParallel,
) -> _Passes:
    """Backward of ``w_i · loss_i`` for each micro-batch, locally (``no_sync``); stops at the
    first non-finite loss. Sharded weights: every rank runs as many passes as the busiest one,
    and a non-finite pass still runs its backward (its reduce-scatters pair with the others')."""
    lockstep = parallel.is_sharded(state.policy)
    passes = int(parallel.all_reduce([len(micro)], "max")[0]) if lockstep else len(micro)
    finite = True
    losses, metrics_seen, entropies = [], [], []
    with parallel.no_sync(state.policy, state.value_model):
        for index in range(passes):
            if index >= len(micro) or not finite:  # only with lockstep passes
                _idle_pass(state, settings, parallel)
                continue
            mb, weight = micro[index], weights[index]
            loss, metrics, entropy = _micro_batch_loss(state, mb, settings)
            if not torch.isfinite(loss):
                finite = False
                if lockstep:
                    (loss * 0.0).backward()
                    continue
                break
            if weight and loss.requires_grad:  # a fully masked batch has no graph
                (loss * weight).backward()
            losses.append(float(loss.detach()) * weight)
            metrics_seen.append((weight, dict(metrics)))
            if entropy is not None:
                m = mb.completion_mask
                entropies.append((float((entropy.detach() * m).sum()), float(m.sum())))
    return _Passes(finite, losses, metrics_seen, entropies)


def _custom_metric_names(passes: _Passes) -> tuple[str, ...]:
    """Numeric metrics a loss function returned beyond the ones ``TrainingStats`` has fields
    (or TIS diagnostics) for, sorted."""
    known = {*_STEP_METRICS, *_TIS_MEAN_METRICS, "tis_ratio_max"}
    return tuple(sorted({
        name for _, metrics in passes.metrics for name, value in metrics.items()
        if name not in known and isinstance(value, (int, float)) and not isinstance(value, bool)
    }))


def _names_tag(names: Sequence[str]) -> float:
    """A 16-bit fingerprint of a list of names, exact as a float64 (squares and sums too)."""
    return float(zlib.crc32("\0".join(names).encode()) % 65536)


def _global_step_sums(
    passes: _Passes, batch: Batch, tis: bool, parallel: DataParallel
) -> _StepSums:
    """One ``all_reduce`` of the step's scalars: every rank agrees on finiteness and stats.

    A loss function's extra metrics are summed over ranks too when every rank saw the same
    names (checked in the same reduction: the fingerprints' variance is 0); when they disagree
    (e.g. a rank with no rows) none is reported, so every rank's statistics stay equal."""

    custom = _custom_metric_names(passes)
    metric_names = _STEP_METRICS + (_TIS_MEAN_METRICS if tis else ()) + custom
    tag = _names_tag(custom)

    def metric_sums(name: str) -> list[float]:
        vals = [(w, m[name]) for w, m in passes.metrics if name in m]
        return [sum(w * v for w, v in vals), sum(w for w, _ in vals), len(vals)]

    local = [0.0 if passes.finite else 1.0, sum(passes.losses), float(batch.completion_mask.sum())]
    local += [int(batch.completion_ids.shape[0])]
    local += [sum(e for e, _ in passes.entropies), sum(n for _, n in passes.entropies)]
    local += [1.0, tag, tag * tag]
    fixed = len(local) + 3 * (len(metric_names) - len(custom))
    for name in metric_names:
        local += metric_sums(name)
    head = parallel.all_reduce(local[:fixed])
    ranks, tag_sum, tag_squares = (int(x) for x in head[6:9])
    same_names = ranks * tag_squares == tag_sum * tag_sum  # exact integers in float64
    if not same_names:  # ranks disagree on which extra metrics exist: report none of them
        metric_names = metric_names[: len(metric_names) - len(custom)]
    tail = parallel.all_reduce(local[fixed:]) if same_names else []
    reduced = head[:6] + head[9:] + tail
    ratio_maxima = [m["tis_ratio_max"] for _, m in passes.metrics if "tis_ratio_max" in m]
    tis_ratio_max = max(ratio_maxima, default=-math.inf)
    if tis:
        tis_ratio_max = parallel.all_reduce([tis_ratio_max], "max")[0]
    return _StepSums(
        finite=reduced[0] == 0,
        loss=reduced[1],
        tokens=reduced[2],
        sequences=int(reduced[3]),
        entropy=(reduced[4], reduced[5]),
        metrics={n: tuple(reduced[6 + 3 * i : 9 + 3 * i]) for i, n in enumerate(metric_names)},
        tis_ratio_max=tis_ratio_max,
    )


def _clip_and_step(
    state: TrainingState,
    finite: bool,
    config: AlgorithmConfig,
    optimizer_step_fn: Callable[[TrainingState], None],
    parallel: DataParallel,
) -> tuple[float, bool]:
    """Sum gradients over ranks, clip to ``max_grad_norm``, step when everything is finite;
    always drop the gradients. Returns ``(norm before clipping, whether the update was made)``."""
    params = _trainable_parameters(state)
    if finite and not parallel.is_sharded(state.policy):  # sharded: summed by the backward
        parallel.synchronize_gradients(params)
    grad_norm = float("nan")
    if finite:
        max_norm = config.max_grad_norm if config.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.tensor(0.0)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        finite = math.isfinite(grad_norm)
    if finite:
        optimizer_step_fn(state)
    state.optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def _step_stats(
    state: TrainingState, sums: _StepSums, grad_norm: float, finite: bool, tis: bool
) -> TrainingStats:
    nan = float("nan")

    def metric(name: str) -> float:
        weighted, total, count = sums.metrics[name]
        return weighted / total if count and total else nan

    extra = {}
    if tis:
        extra = {name: metric(name) for name in _TIS_MEAN_METRICS}
        extra["tis_ratio_max"] = sums.tis_ratio_max
    known = {*_STEP_METRICS, *_TIS_MEAN_METRICS}
    extra.update({name: metric(name) for name in sums.metrics if name not in known})
    extra = {k: v for k, v in extra.items() if math.isfinite(v)}
    entropy_sum, entropy_tokens = sums.entropy
    return TrainingStats(
        step=state.step,
        loss=sums.loss if finite else nan,
        policy_loss=metric("policy_loss") if finite else nan,
        value_loss=metric("value_loss") if finite else nan,
        kl=metric("kl"),
        kl_coef=state.kl_coef,
        entropy=entropy_sum / entropy_tokens if entropy_tokens else nan,
        clip_fraction=metric("clip_fraction"),
        approx_kl=metric("approx_kl"),
        grad_norm=grad_norm,
        num_tokens=int(sums.tokens),
        num_sequences=int(sums.sequences),
        skipped_updates=0 if finite else 1,
        extra=extra or None,
    )


def training_step(
    state: TrainingState,
    batch: Batch,
    algorithm_config: AlgorithmConfig,
    loss_fn: Callable[..., Any] | None = None,
    optimizer_step_fn: Callable[[TrainingState], None] | None = None,
    temperature: float = 1.0,
    registry: Mapping[str, Any] = ALGORITHMS,
    logprob_extractor: Callable[..., Any] | None = None,
    kl_fn: Callable[..., Any] | None = None,
    pair_selector: Callable[..., Any] | None = None,
    *,
    value_fn: Callable[..., Any] | None = None,
    data_parallel: DataParallel | None = None,
) -> tuple[TrainingState, TrainingStats]:
    """One optimizer update over ``batch``, with gradient accumulation and a finiteness guard.

    The batch is cut into length-packed micro-batches of at most
    ``algorithm_config.micro_batch_size`` rows; micro-batch ``i``'s loss is scaled by
    ``w_i`` (``microbatch_loss_weights``) so the accumulated gradient is the gradient of the
    full-batch loss. Then the global gradient norm is clipped to ``max_grad_norm``. If any loss
    or the gradient norm is not finite the update is skipped: gradients are dropped, weights and
    optimizer state stay bit-identical, and ``stats.skipped_updates == 1``.

    Data parallel (``data_parallel``, see ``DataParallel``): ``batch`` is this rank's rows (it
    may have none). The weights use the global normaliser (``microbatch_loss_totals``
    all-reduced), backward passes stay local (``no_sync``), then one ``synchronize_gradients``
    sums the gradients over ranks — so the update is the one a single process would make on the
    union of the ranks' batches, whatever the ranks' micro-batch counts. Finiteness is agreed
    on (a non-finite loss on any rank skips the update on all) and the stats are global.

    Args:
      state: the current state.
      batch: ``Batch`` with completion ``[B, Tc]`` tensors and advantages.
      algorithm_config: the algorithm configuration.
      loss_fn: a ``LossFn`` replacing the registry's.
      optimizer_step_fn: ``fn(state) -> None`` replacing ``default_optimizer_step``.
      temperature: the sampling temperature (log-probs use ``logits / temperature``).
      registry: where to look the algorithm up.
      logprob_extractor: replacement for ``get_logprobs`` with its signature.
      kl_fn: a ``KLFn`` for the loss's KL term instead of ``config.kl_estimator``.
      pair_selector: ``fn(rewards [B], group_size) -> (chosen [P], rejected [P])`` for DPO.
      value_fn: a ``ValueFn`` replacing ``get_values`` for the critic's new values.
      data_parallel: the collectives (``None``: ``current_data_parallel()``).
    Returns:
      ``(state._replace(step=step + 1), stats)``; ``step`` advances even when skipped.
    """
    if not isinstance(batch, Batch):
        raise TypeError(f"batch must be an rlprim.Batch, got {type(batch).__name__}")
    parallel = data_parallel or current_data_parallel()
    config = _step_config(algorithm_config, batch, parallel)
    settings = _StepSettings(
        config, get_algorithm(config.name, registry), temperature,
        logprob_extractor or get_logprobs, registry, loss_fn, kl_fn, pair_selector,
        value_fn or get_values,
    )
    micro, weights = _weighted_micro_batches(batch, config, parallel)
    state.optimizer.zero_grad(set_to_none=True)
    passes = _accumulate_gradients(state, micro, weights, settings, parallel)
    tis = algorithm_config.tis_cap is not None
    sums = _global_step_sums(passes, batch, tis, parallel)
    step_fn = optimizer_step_fn or default_optimizer_step
    grad_norm, finite = _clip_and_step(state, sums.finite, config, step_fn, parallel)
    stats = _step_stats(state, sums, grad_norm, finite, tis)
    return state._replace(step=state.step + 1), stats


# --------------------------------------------------------------------------------------------
# The phases of one iteration: sample and score → reference and KL → values and advantages →
# update → refresh. Each is usable alone; ``training_iteration`` is their composition.
# --------------------------------------------------------------------------------------------


class SampleResult(NamedTuple):
    """What ``sample_and_score`` returns. ``N = Σ_r B_r`` rows over all ranks (``B`` in one
    process).

    Fields:
      rollouts: this rank's scored ``Rollout`` s (``rewards`` set to the shaped scalar reward);
        ``[]`` when some rank has no informative group (the iteration is skipped).
      batch: ``rollouts_to_batch(rollouts)`` (``[B, …]``; ``old_logprobs`` are the generator's),
        or ``None`` when skipped.
      rewards: ``[N]`` shaped rewards of every rank, in rank order (``None`` when skipped).
      completion_mask: ``[N, Tc_max]`` completion masks of every rank (``None`` when skipped).
      row_counts: ``[B_0, B_1, …]`` rows per rank (``[B]`` in one process).
      stats: ``dynamic_sampling/*`` statistics of the job (empty without dynamic sampling).
      seconds: time spent sampling and scoring.
    """

    rollouts: list[Any]
    batch: Batch | None
    rewards: torch.Tensor | None
    completion_mask: torch.Tensor | None
    row_counts: list[int]
    stats: dict[str, float]
    seconds: float


class ReferenceResult(NamedTuple):
    """What ``reference_and_kl`` returns (``kl*`` are ``None`` / ``nan`` when no reference ran).

    Fields:
      batch: the sample batch with ``ref_logprobs`` ``[B, Tc]``, ``old_logprobs`` (the ratio's
        π_old: ``None`` on-policy — the detached current log-probs — else ``sampling_logprobs``)
        and ``engine_logprobs`` (the generator's, with TIS) set.
      sampling_logprobs: ``[B, Tc]`` log-probs of the sampled tokens at the sampling temperature
        (the generator's, or the trainer's with TIS or when the generator gave none), or
        ``None`` when nothing needs them.
      kl: ``[B, Tc]`` per-token KL of ``sampling_logprobs`` to ``ref_logprobs`` (masked).
      global_kl: ``[N, Tc_max]`` the same for every rank, in rank order.
      kl_mean: ``Σ kl / Σ m`` over every rank's tokens (``stats.kl``).
      kl_sequence_mean: the mean over all ``N`` sequences of ``Σ_t kl_t`` (what an adaptive
        controller observes).
      seconds: time spent on the forward passes.
    """

    batch: Batch
    sampling_logprobs: torch.Tensor | None
    kl: torch.Tensor | None
    global_kl: torch.Tensor | None
    kl_mean: float
    kl_sequence_mean: float
    seconds: float


class AdvantageResult(NamedTuple):
    """What ``values_and_advantages`` returns.

    Fields:
      batch: the reference batch with ``advantages`` (``[B]`` or ``[B, Tc]``), ``returns``
        (``[B, Tc]`` or ``None``) and ``values`` (``[B, Tc]`` or ``None``) set: ready for
        ``update_policy``.
      seconds: time spent on the critic and the advantages.
    """

    batch: Batch
    seconds: float


class UpdateResult(NamedTuple):
    """What ``update_policy`` returns.

    Fields:
      state: the state after the updates (``step`` advanced by their number).
      step_stats: one ``TrainingStats`` per ``training_step``, in order.
      seconds: time spent updating.
    """

    state: TrainingState
    step_stats: list[TrainingStats]
    seconds: float


def _no_grad_logprobs(model, batch: Batch, temperature: float, micro_batch_size, extract):
    input_ids, attention_mask = _model_inputs(batch)
    tc = batch.completion_ids.shape[1]
    rows = batch.completion_ids.shape[0]
    size = micro_batch_size or rows
    parts = []
    with torch.no_grad():
        for i in range(0, rows, size):
            parts.append(
                extract(
                    model,
                    input_ids[i : i + size],
                    attention_mask[i : i + size],
                    temperature=temperature,
                    completion_length=tc,
                )
            )
    return torch.cat(parts) * batch.completion_mask


def _shaped_rewards(rollouts, rewards, config: AlgorithmConfig, gen_config, shaping_fn):
    if not (config.overlong_shaping or shaping_fn is not None):
        return rewards
    lengths = torch.tensor(
        [len(r.completion_ids or r.generation.token_ids) for r in rollouts], dtype=torch.float32
    )
    max_len = config.max_response_len or gen_config.max_new_tokens
    buffer = None
    if config.overlong_shaping:
        buffer = config.overlong_buffer_len or max(1, max_len // 5)
    return apply_reward_shaping(
        rewards,
        lengths,
        shaping_fn=shaping_fn,
        overlong_buffer_len=buffer,
        max_response_len=max_len if buffer is not None else None,
        overlong_penalty=config.overlong_penalty,
    )


# How each rank's DynamicSamplingStats field combines into the job's: counts add up, the
# slowest rank's rounds count, and the target is reached only if every rank reached its own.
_SAMPLING_REDUCTIONS = {"rounds": "max", "target_reached": "min"}


def _global_sampling_stats(
    stats: Mapping[str, float], parallel: DataParallel
) -> dict[str, float]:
    """``dynamic_sampling/*`` of the whole job (same keys on every rank)."""
    result = dict(stats)
    for op in ("sum", "max", "min"):
        keys = [
            k for k in sorted(stats)
            if _SAMPLING_REDUCTIONS.get(k.split("/", 1)[1], "sum") == op
        ]
        if keys:
            result.update(
                zip(keys, parallel.all_reduce([stats[k] for k in keys], op), strict=True)
            )
    return result


def _global_tool_stats(summary: Any, parallel: DataParallel) -> dict[str, float]:
    """``tools/<name>``: a tool tracker's numeric values, averaged over ranks (one
    ``all_reduce``; none when the ranks' names differ, so every rank reports the same)."""
    if not isinstance(summary, Mapping):
        raise TypeError(
            f"tool_tracker must return a mapping of names to values, got {type(summary).__name__}"
        )
    names = sorted(
        str(k) for k, v in summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    )
    values = {str(k): v for k, v in summary.items()}
    tag = _names_tag(names)
    ranks, tag_sum, tag_squares = (int(x) for x in parallel.all_reduce([1.0, tag, tag * tag]))
    if ranks * tag_squares != tag_sum * tag_sum:  # ranks disagree on the names
        return {}
    sums = parallel.all_reduce([float(values[n]) for n in names]) if names else []
    return {f"tools/{n}": v / ranks for n, v in zip(names, sums, strict=True)}


def _scored_rollouts(
    state, prompts, gen_config, config, reward_fn, generator, aggregator, shaping_fn,
    group_offset,
):
    """Rollouts for ``prompts`` with shaped scalar rewards ``[B]`` set on each rollout."""

    def sample(seed_offset: int):
        cfg = gen_config
        if seed_offset and gen_config.seed is not None:
            cfg = gen_config._replace(seed=gen_config.seed + 100_003 * seed_offset)
        rollouts = create_batch_rollouts(
            unwrap_model(state.policy), state.tokenizer, prompts, cfg, generator=generator,
            group_offset=group_offset,
        )
        rewards = compute_batch_rewards(rollouts, reward_fn, aggregator)
        rewards = _shaped_rewards(rollouts, rewards, config, gen_config, shaping_fn)
        return [r._replace(rewards=float(x)) for r, x in zip(rollouts, rewards, strict=True)]

    if not config.filter_groups:
        return sample(0), {}
    rollouts, ds = sample_until_informative(
        sample, target_groups=len(prompts), max_rounds=config.max_sampling_rounds
    )
    return rollouts, {f"dynamic_sampling/{k}": float(v) for k, v in ds._asdict().items()}


def sample_and_score(
    state: TrainingState,
    prompts: Sequence[Any],
    gen_config: GenerationConfig,
    algorithm_config: AlgorithmConfig,
    reward_fn: Callable[..., Any],
    generator: Callable[..., Any] = hf_generator,
    *,
    aggregator: Callable[..., Any] | None = None,
    shaping_fn: Callable[..., Any] | None = None,
    tool_tracker: Callable[..., Mapping[str, Any]] | None = None,
    data_parallel: DataParallel | None = None,
) -> SampleResult:
    """Phase 1: sample ``G`` completions per prompt, score them, and batch them.

    Reads ``state.policy`` and ``state.tokenizer`` (the weights are not changed). This rank's
    share of ``prompts`` (``data_parallel.shard_prompts``; group ids stay global) is sampled by
    ``generator`` with ``gen_config`` (seed ``data_parallel.rank_seed(gen_config.seed)``) in one
    ``create_batch_rollouts`` call: ``B = P·G`` rollouts, row ``i·G + j`` being sample ``j`` of
    prompt ``i``. Rewards ``compute_batch_rewards(rollouts, reward_fn, aggregator)`` ``[B]``,
    then shaping: ``shaping_fn(rewards, lengths)`` when given, else DAPO's overlong penalty when
    ``algorithm_config.overlong_shaping``. With ``algorithm_config.filter_groups`` groups of
    equal rewards are dropped and prompts re-sampled (``sample_until_informative``, at most
    ``max_sampling_rounds`` rounds, seed offset ``100_003 · round``). When any rank is left
    without an informative group, every rank returns an empty result. The rewards and
    completion masks of every rank are gathered, for batch-level advantages and statistics.

    Args:
      state: the current state.
      prompts: the global prompt items (``str`` or ``{"prompt": ..., **metadata}``).
      gen_config: sampling configuration (``temperature`` T, ``num_samples`` G, ``seed``).
      algorithm_config: reads ``filter_groups``, ``max_sampling_rounds`` and the overlong
        shaping fields.
      reward_fn: ``reward_fn(rollout) -> float | Sequence[float]``.
      generator: ``generator(model, tokenizer, prompts, config) -> list[Generation]``.
      aggregator: reduces vector rewards ``[B, K] -> [B]``.
      shaping_fn: ``fn(rewards [B], lengths [B]) -> rewards [B]``.
      tool_tracker: ``fn(rollouts) -> {name: value}`` (e.g. ``track_tool_calls``); its int
        and float values join ``stats`` as ``tools/<name>``, averaged over ranks (none are
        reported when ranks return different names). Other values are left out.
      data_parallel: the collectives (``None``: ``current_data_parallel()``).
    Returns:
      ``SampleResult(rollouts, batch, rewards [N], completion_mask [N, Tc], row_counts, stats,
      seconds)``.
    """
    if not prompts:
        raise ValueError("prompts must not be empty")
    parallel = data_parallel or current_data_parallel()
    prompts, group_offset = parallel.shard_prompts(prompts)
    gen_config = gen_config._replace(seed=parallel.rank_seed(gen_config.seed))
    start = time.perf_counter()
    with parallel.gathered_parameters(state.policy):  # FSDP2: ranks sample different lengths
        rollouts, stats = _scored_rollouts(
            state, prompts, gen_config, algorithm_config, reward_fn, generator, aggregator,
            shaping_fn, group_offset,
        )
    seconds = time.perf_counter() - start
    stats = _global_sampling_stats(stats, parallel)
    if tool_tracker is not None:
        stats.update(_global_tool_stats(tool_tracker(rollouts), parallel))
    if parallel.all_reduce([1.0 if rollouts else 0.0], "min")[0] == 0:
        return SampleResult([], None, None, None, [], stats, seconds)
    batch = rollouts_to_batch(rollouts, state.tokenizer)
    rewards, row_counts = parallel.gather_rows(batch.rewards)
    mask, _ = parallel.gather_rows(batch.completion_mask)
    return SampleResult(rollouts, batch, rewards, mask, row_counts, stats, seconds)


def _is_on_policy(config: AlgorithmConfig, num_rows: int) -> bool:
    """One epoch of one minibatch: the ratio's π_old is the detached current policy."""
    num_minibatches = 1
    if config.minibatch_size is not None:
        num_minibatches = math.ceil(num_rows / config.minibatch_size)
    return config.num_epochs == 1 and num_minibatches == 1


def _sampling_logprobs(
    state: TrainingState,
    batch: Batch,
    config: AlgorithmConfig,
    temperature: float,
    needed: bool,
    extract: Callable[..., Any],
    parallel: DataParallel,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(engine_logprobs, sampling_logprobs)``: with TIS the generator's log-probs are the
    engine's and π_old is the trainer's own; a no-grad forward runs only when ``needed``."""
    engine_logprobs, sampling_logprobs = None, batch.old_logprobs
    if config.tis_cap is not None:
        if batch.old_logprobs is None:
            raise ValueError(
                f"algorithm_config.tis_cap={config.tis_cap} needs the generator's sampling "
                "log-probs (Generation.logprobs), but the generator returned none"
            )
        engine_logprobs, sampling_logprobs = batch.old_logprobs, None
    if sampling_logprobs is None and needed:
        with parallel.gathered_parameters(state.policy):  # FSDP2: micro-batch counts differ
            sampling_logprobs = _no_grad_logprobs(
                state.policy, batch, temperature, config.micro_batch_size, extract
            )
    return engine_logprobs, sampling_logprobs


def reference_and_kl(
    state: TrainingState,
    samples: SampleResult,
    algorithm_config: AlgorithmConfig,
    temperature: float = 1.0,
    *,
    registry: Mapping[str, Any] = ALGORITHMS,
    logprob_extractor: Callable[..., Any] | None = None,
    kl_fn: Callable[..., Any] | None = None,
    data_parallel: DataParallel | None = None,
) -> ReferenceResult:
    """Phase 2: π_old's log-probs, the reference's log-probs and the per-token KL.

    Reads ``samples.batch`` and runs (without gradients) ``state.ref_model`` and, when needed,
    ``state.policy``. π_old: the generator's sampling log-probs; with ``tis_cap`` they become
    ``engine_logprobs`` and the trainer's own are computed, as they are when the generator gave
    none and either the update is off-policy (several epochs or minibatches) or a reference
    runs. The reference runs only when ``requires_reference_model`` (β > 0 or DPO)::

        ref_logprobs = get_reference_logprobs(ref_model, ..., temperature=T) · m   [B, Tc]
        kl = compute_per_token_kl(sampling_logprobs, ref_logprobs, kl_estimator) · m

    so with ``d = log π_old − log π_ref`` the k3 estimator gives ``exp(−d) + d − 1`` per token
    (reverse KL, KL(π_θ ‖ π_ref)). ``kl_mean = Σ kl / Σ m`` and ``kl_sequence_mean =
    mean_i Σ_t kl_it`` are over every rank's rows.

    Args:
      state: the current state (``ref_model`` needed when a reference runs).
      samples: ``sample_and_score``'s result (not an empty one).
      algorithm_config: reads ``kl_coef``, ``kl_estimator``, ``tis_cap``, ``num_epochs``,
        ``minibatch_size`` and ``micro_batch_size``.
      temperature: the sampling temperature T (log-probs of ``logits / T``).
      registry: where to look the algorithm up (``requires_reference_model``).
      logprob_extractor: replacement for ``get_logprobs``.
      kl_fn: a ``KLFn`` replacing ``kl_estimator``.
      data_parallel: the collectives (``None``: ``current_data_parallel()``).
    Returns:
      ``ReferenceResult(batch, sampling_logprobs, kl, global_kl, kl_mean, kl_sequence_mean,
      seconds)``.
    """
    config, batch = algorithm_config, samples.batch
    if batch is None:
        raise ValueError("samples has no batch (an empty SampleResult): skip the iteration")
    parallel = data_parallel or current_data_parallel()
    start = time.perf_counter()
    on_policy = _is_on_policy(config, sum(samples.row_counts))
    needs_reference = requires_reference_model(config, registry)
    engine_logprobs, sampling_logprobs = _sampling_logprobs(
        state, batch, config, temperature, not on_policy or needs_reference,
        logprob_extractor or get_logprobs, parallel,
    )
    ref_logprobs = kl = global_kl = None
    kl_mean = kl_sequence_mean = float("nan")
    if needs_reference:
        if state.ref_model is None:
            raise ValueError(
                f"algorithm {config.name!r} with kl_coef={state.kl_coef} needs state.ref_model, "
                "got None"
            )
        input_ids, attention_mask = _model_inputs(batch)
        ref_logprobs = get_reference_logprobs(
            state.ref_model, input_ids, attention_mask, temperature=temperature,
            completion_length=batch.completion_ids.shape[1],
        ) * batch.completion_mask
        kl = compute_per_token_kl(
            sampling_logprobs, ref_logprobs, config.kl_estimator, kl_fn=kl_fn
        ) * batch.completion_mask
        global_kl = parallel.gather_rows(kl)[0]
        kl_mean = float(global_kl.sum() / samples.completion_mask.sum().clamp(min=1))
        kl_sequence_mean = float(global_kl.sum(dim=1).mean())
    batch = batch._replace(
        ref_logprobs=ref_logprobs,
        old_logprobs=None if on_policy else sampling_logprobs,
        engine_logprobs=engine_logprobs,
    )
    seconds = time.perf_counter() - start
    return ReferenceResult(
        batch, sampling_logprobs, kl, global_kl, kl_mean, kl_sequence_mean, seconds
    )


def _keep_rows(x: torch.Tensor, rows: range, shape: torch.Size) -> torch.Tensor:
    """This rank's ``[B_r]`` / ``[B_r, Tc_r]`` part of a global-batch tensor."""
    local = x[rows.start : rows.stop]
    return local[:, : shape[1]] if local.dim() == 2 else local


def values_and_advantages(
    state: TrainingState,
    samples: SampleResult,
    reference: ReferenceResult,
    algorithm_config: AlgorithmConfig,
    group_size: int,
    *,
    registry: Mapping[str, Any] = ALGORITHMS,
    advantage_fn: Callable[..., Any] | None = None,
    value_fn: Callable[..., Any] | None = None,
    data_parallel: DataParallel | None = None,
) -> AdvantageResult:
    """Phase 3: the critic's values (when the algorithm has one) and the advantages.

    Reads ``reference.batch`` and runs ``state.value_model`` without gradients (PPO):
    ``values [B, Tc]``. The advantages are those of the global batch (every rank's rewards,
    masks, values and KL, so batch-level statistics such as whitening are global)::

        compute_advantages_by_algorithm(config, samples.rewards [N], group_size=G,
            mask=samples.completion_mask, values, kl=reference.global_kl, kl_coef=state.kl_coef)

    → ``[N]`` (group methods, RLOO, REINFORCE) or ``([N, Tc], returns [N, Tc])`` (PPO; with
    ``kl_in_reward`` the per-token reward is ``r_t − β·kl_t``); each rank keeps its rows.

    Args:
      state: the current state (its ``kl_coef`` is β).
      samples: ``sample_and_score``'s result.
      reference: ``reference_and_kl``'s result.
      algorithm_config: the algorithm configuration.
      group_size: completions per prompt ``G``.
      registry: where to look the algorithm up.
      advantage_fn: replaces the registry's advantage function.
      value_fn: a ``ValueFn`` replacing ``get_values`` (seed 003's ``value_fn``).
      data_parallel: the collectives (``None``: ``current_data_parallel()``).
    Returns:
      ``AdvantageResult(batch with advantages, returns and values, seconds)``.
    """
    config, batch = algorithm_config, reference.batch
    parallel = data_parallel or current_data_parallel()
    start = time.perf_counter()
    values = global_values = None
    if get_algorithm(config.name, registry).needs_value:
        if state.value_model is None:
            raise ValueError(f"algorithm {config.name!r} needs state.value_model, got None")
        input_ids, attention_mask = _model_inputs(batch)
        with torch.no_grad(), parallel.gathered_parameters(state.value_model):
            values = (value_fn or get_values)(
                state.value_model, input_ids, attention_mask, batch.completion_ids.shape[1],
                batch.completion_mask,
            )
        global_values = parallel.gather_rows(values)[0]
    advantages = compute_advantages_by_algorithm(
        config,
        samples.rewards,
        registry=registry,
        advantage_fn=advantage_fn,
        group_size=group_size,
        mask=samples.completion_mask,
        values=global_values,
        kl=reference.global_kl,
        kl_coef=state.kl_coef,
    )
    returns = None
    if isinstance(advantages, tuple):
        advantages, returns = advantages
    rows, shape = parallel.local_rows(samples.row_counts), batch.completion_mask.shape
    advantages, returns = (
        None if x is None else _keep_rows(x, rows, shape) for x in (advantages, returns)
    )
    batch = batch._replace(advantages=advantages, returns=returns, values=values)
    return AdvantageResult(batch, time.perf_counter() - start)


def _local_minibatches(
    batch: Batch, global_rows: int, rows: range, size: int, seed: int
) -> list[Batch]:
    """``split_minibatches(global_batch, size, seed)`` restricted to this rank's ``rows``.

    Minibatch ``k`` holds the rows ``perm[k·size : (k+1)·size]`` of the global batch (the
    permutation ``split_minibatches`` draws); this rank keeps those in ``rows``, in the same
    order — possibly none (a 0-row batch). Every rank gets the same number of minibatches, so
    all take the same optimizer steps. In one process this is ``split_minibatches``.
    """
    order = torch.randperm(global_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    result = []
    for start in range(0, global_rows, size):
        local = [i - rows.start for i in order[start : start + size] if i in rows]
        if local:
            result.append(trim_padding(select_batch(batch, local)))
        else:
            result.append(Batch(*(None if x is None else x[:0] for x in batch)))
    return result


def update_policy(
    state: TrainingState,
    batch: Batch,
    algorithm_config: AlgorithmConfig,
    row_counts: Sequence[int] | None = None,
    *,
    temperature: float = 1.0,
    loss_fn: Callable[..., Any] | None = None,
    optimizer_step_fn: Callable[[TrainingState], None] | None = None,
    registry: Mapping[str, Any] = ALGORITHMS,
    logprob_extractor: Callable[..., Any] | None = None,
    kl_fn: Callable[..., Any] | None = None,
    pair_selector: Callable[..., Any] | None = None,
    value_fn: Callable[..., Any] | None = None,
    data_parallel: DataParallel | None = None,
) -> UpdateResult:
    """Phase 4: ``num_epochs`` × minibatches of ``training_step`` on ``batch``.

    Reads ``batch`` (advantages set; ``old_logprobs`` is π_old, or ``None`` on-policy) and
    updates ``state.policy`` (and critic) and the optimizer in place. Epoch ``e`` draws the
    minibatches of ``minibatch_size`` global rows from the permutation seeded by
    ``state.step · 1009 + e`` (``split_minibatches``; one minibatch of all rows without
    ``minibatch_size``); data parallel, each rank trains on its rows of each minibatch.

    Args:
      state: the current state.
      batch: this rank's ``Batch`` from ``values_and_advantages``.
      algorithm_config: reads ``num_epochs``, ``minibatch_size`` and everything
        ``training_step`` reads.
      row_counts: ``[B_0, B_1, …]`` rows per rank (``SampleResult.row_counts``); ``None``
        gathers them.
      temperature: the sampling temperature.
      loss_fn, optimizer_step_fn, registry, logprob_extractor, kl_fn, pair_selector,
        value_fn: passed to ``training_step``.
      data_parallel: the collectives (``None``: ``current_data_parallel()``).
    Returns:
      ``UpdateResult(state, step_stats, seconds)``.
    """
    config = algorithm_config
    parallel = data_parallel or current_data_parallel()
    if row_counts is None:
        row_counts = parallel.gather_rows(torch.zeros(len(batch.completion_ids)))[1]
    global_rows, rows = sum(row_counts), parallel.local_rows(row_counts)
    single = config.minibatch_size is None or math.ceil(global_rows / config.minibatch_size) == 1
    start = time.perf_counter()
    step_stats: list[TrainingStats] = []
    for epoch in range(config.num_epochs):
        seed = state.step * 1009 + epoch
        minibatches = (
            [batch] if single
            else _local_minibatches(batch, global_rows, rows, config.minibatch_size, seed)
        )
        for minibatch in minibatches:
            state, stats = training_step(
                state, minibatch, config, loss_fn=loss_fn, optimizer_step_fn=optimizer_step_fn,
                temperature=temperature, registry=registry, logprob_extractor=logprob_extractor,
                kl_fn=kl_fn, pair_selector=pair_selector, value_fn=value_fn,
                data_parallel=parallel,
            )
            step_stats.append(stats)
    return UpdateResult(state, step_stats, time.perf_counter() - start)


def refresh_reference(
    state: TrainingState,
    ref_model_update_fn: Callable[..., Any] | None = None,
    kl_controller: Callable[..., float] | None = None,
    observed_kl: float = float("nan"),
    num_sequences: int = 0,
    *,
    data_parallel: DataParallel | None = None,
) -> TrainingState:
    """Phase 5: the next β and the refreshed reference model.

    β ← ``kl_controller(state.kl_coef, observed_kl, num_sequences)`` when a controller is given
    and ``observed_kl`` is finite — Ziegler et al. (2019) control the KL of whole sequences, so
    ``training_iteration`` passes ``ReferenceResult.kl_sequence_mean`` (the batch mean of
    ``Σ_t kl_t``) and ``N`` (``create_adaptive_kl_controller``). Then
    ``ref_model ← ref_model_update_fn(ref_model, policy, state.step)`` when both are given
    (``update_reference_model``; under FSDP2 with the policy's gathered weights).

    Args:
      state: the state after the update.
      ref_model_update_fn: ``fn(ref_model, policy, step) -> ref_model`` or ``None``.
      kl_controller: ``fn(coef, observed_kl, n_steps) -> coef`` or ``None``.
      observed_kl: the KL the controller observes.
      num_sequences: the number of sequences it was observed on (``n_steps``).
      data_parallel: the collectives (``None``: ``current_data_parallel()``).
    Returns:
      ``state`` with the new ``kl_coef`` and ``ref_model``.
    """
    parallel = data_parallel or current_data_parallel()
    if kl_controller is not None and math.isfinite(observed_kl):
        state = state._replace(
            kl_coef=float(kl_controller(state.kl_coef, observed_kl, num_sequences))
        )
    if ref_model_update_fn is not None and state.ref_model is not None:
        policy = parallel.full_model(state.policy, state.ref_model)
        state = state._replace(
            ref_model=update_reference_model(
                state.ref_model, policy, ref_model_update_fn, state.step
            )
        )
    return state


# --------------------------------------------------------------------------------------------
# One iteration: the phases composed.
# --------------------------------------------------------------------------------------------


def _iteration_config(
    algorithm_config: AlgorithmConfig, gen_config: GenerationConfig, registry: Mapping[str, Any]
) -> AlgorithmConfig:
    """The checked config; Dr. GRPO's constant ``L`` defaults to ``max_new_tokens``."""
    config = validate_algorithm_config(algorithm_config)
    get_algorithm(config.name, registry)
    if config.loss_agg_mode == "seq-mean-token-sum-norm" and config.norm_length is None:
        config = config._replace(norm_length=gen_config.max_new_tokens)
    return config


def _iteration_stats(
    state: TrainingState,
    samples: SampleResult,
    reference: ReferenceResult,
    advantages: AdvantageResult,
    update: UpdateResult,
) -> TrainingStats:
    """The iteration's ``TrainingStats``: batch statistics of every rank's rows and the
    updates' statistics averaged (``tis_ratio_max`` maximised)."""
    steps, mask, rewards = update.step_stats, samples.completion_mask, samples.rewards
    extra = {**samples.stats}
    if math.isfinite(reference.kl_sequence_mean):
        extra["kl_sequence"] = reference.kl_sequence_mean
    step_extras = [s.extra for s in steps if s.extra]
    for name in _TIS_MEAN_METRICS:
        if any(name in e for e in step_extras):
            extra[name] = _mean([e[name] for e in step_extras if name in e])
    ratio_maxima = [e["tis_ratio_max"] for e in step_extras if "tis_ratio_max" in e]
    if ratio_maxima:
        extra["tis_ratio_max"] = max(ratio_maxima)
    custom = sorted({k for e in step_extras for k in e} - {*_TIS_MEAN_METRICS, "tis_ratio_max"})
    for name in custom:  # a loss function's own metrics, averaged over the updates
        extra.setdefault(name, _mean([e[name] for e in step_extras if name in e]))
    return TrainingStats(
        step=state.step,
        loss=_mean([s.loss for s in steps]),
        policy_loss=_mean([s.policy_loss for s in steps]),
        value_loss=_mean([s.value_loss for s in steps]),
        kl=reference.kl_mean,
        kl_coef=state.kl_coef,
        entropy=_mean([s.entropy for s in steps]),
        reward_mean=float(rewards.mean()),
        reward_std=float(rewards.std()) if rewards.numel() > 1 else 0.0,
        clip_fraction=_mean([s.clip_fraction for s in steps]),
        approx_kl=_mean([s.approx_kl for s in steps]),
        grad_norm=_mean([s.grad_norm for s in steps]),
        num_tokens=int(mask.sum()),
        num_sequences=int(mask.shape[0]),
        skipped_updates=sum(s.skipped_updates for s in steps),
        response_length=float(mask.sum(dim=1).float().mean()),
        time_generate=samples.seconds,
        time_reference=reference.seconds + advantages.seconds,
        time_train=update.seconds,
        extra=extra or None,
    )


def training_iteration(
    state: TrainingState,
    prompts: Sequence[Any],
    gen_config: GenerationConfig,
    algorithm_config: AlgorithmConfig,
    reward_fn: Callable[..., Any],
    generator: Callable[..., Any] = hf_generator,
    ref_model_update_fn: Callable[..., Any] | None = None,
    *,
    aggregator: Callable[..., Any] | None = None,
    shaping_fn: Callable[..., Any] | None = None,
    advantage_fn: Callable[..., Any] | None = None,
    loss_fn: Callable[..., Any] | None = None,
    optimizer_step_fn: Callable[[TrainingState], None] | None = None,
    kl_controller: Callable[..., float] | None = None,
    registry: Mapping[str, Any] = ALGORITHMS,
    logprob_extractor: Callable[..., Any] | None = None,
    kl_fn: Callable[..., Any] | None = None,
    pair_selector: Callable[..., Any] | None = None,
    value_fn: Callable[..., Any] | None = None,
    tool_tracker: Callable[..., Mapping[str, Any]] | None = None,
    data_parallel: DataParallel | None = None,
) -> tuple[TrainingState, TrainingStats]:
    """One RL iteration: the five phases in order, each a public function.

    1. ``sample_and_score``: ``G = gen_config.num_samples`` completions per prompt, rewards
       (``aggregator``, shaping, DAPO's dynamic sampling), the ``Batch``.
    2. ``reference_and_kl``: π_old's and the reference's log-probs at the sampling temperature
       and the per-token KL (the reference runs only when β > 0 or DPO).
    3. ``values_and_advantages``: the critic's values (PPO) and the advantages of the batch.
    4. ``update_policy``: ``num_epochs`` × minibatches of ``training_step``. With one epoch and
       one minibatch the ratio's π_old is the detached current log-probs (no extra forward);
       otherwise the sampling log-probs. With ``config.tis_cap = C`` the generator's log-probs
       become ``batch.engine_logprobs`` and the losses weight each token by
       ``min(π_old / π_engine, C)``; the ``tis_*`` diagnostics join ``stats.extra``.
    5. ``refresh_reference``: ``kl_controller(β, kl_sequence_mean, N)`` gives the next β (when
       given; otherwise β is ``config.kl_coef``), ``ref_model_update_fn`` the next reference.

    When some rank has no informative group left (dynamic sampling), the iteration is skipped:
    the state is unchanged and ``stats.extra["no_informative_groups"] == 1``.

    Data parallel (``torchrun``; ``data_parallel`` defaults to ``current_data_parallel()``):
    ``prompts`` is the global list, each rank samples its share with its own seed, advantages
    and every statistic are the global batch's, minibatches are the single-process ones, and
    ``training_step`` sums gradients over ranks, so every rank ends with the same weights and
    stats (timings are per rank; ``dynamic_sampling/*`` count the whole job: groups summed,
    rounds the most any rank needed, ``target_reached`` only if every rank reached its target).

    Args:
      state: the current state.
      prompts: prompt items (``str`` or ``{"prompt": ..., **metadata}``).
      gen_config: sampling configuration.
      algorithm_config: the algorithm configuration.
      reward_fn: ``reward_fn(rollout) -> float | Sequence[float]``.
      generator: ``generator(model, tokenizer, prompts, config) -> list[Generation]``.
      ref_model_update_fn: ``fn(ref_model, policy, step) -> ref_model`` or ``None``.
      aggregator: reduces vector rewards ``[B, K] -> [B]``.
      shaping_fn: ``fn(rewards [B], lengths [B]) -> rewards [B]``.
      advantage_fn: replaces the registry's advantage function.
      loss_fn: replaces the registry's loss function.
      optimizer_step_fn: replaces ``default_optimizer_step``.
      kl_controller: ``fn(coef, observed_kl, n_steps) -> coef``.
      registry: where to look the algorithm up.
      logprob_extractor: replacement for ``get_logprobs``.
      kl_fn: a ``KLFn`` replacing ``config.kl_estimator`` everywhere (statistics, KL in the
        reward, KL in the loss).
      pair_selector: DPO's pair selection (see ``dpo_loss_fn``).
      value_fn: a ``ValueFn`` replacing ``get_values`` (old and new values of the critic).
      tool_tracker: a ``ToolTracker`` (e.g. ``track_tool_calls``) whose numeric values join
        ``stats.extra`` as ``tools/<name>``.
      data_parallel: the collectives (``None``: ``current_data_parallel()``).
    Returns:
      ``(new_state, stats)`` with the iteration's statistics and phase timings.
    """
    config = _iteration_config(algorithm_config, gen_config, registry)
    parallel = data_parallel or current_data_parallel()
    beta = state.kl_coef if kl_controller is not None else float(config.kl_coef)
    state = state._replace(kl_coef=beta)
    temperature = gen_config.temperature

    samples = sample_and_score(
        state, prompts, gen_config, config, reward_fn, generator,
        aggregator=aggregator, shaping_fn=shaping_fn, tool_tracker=tool_tracker,
        data_parallel=parallel,
    )
    if samples.batch is None:  # some rank has nothing to train on: every rank skips together
        extra = {"no_informative_groups": 1.0, **samples.stats}
        skipped = TrainingStats(
            step=state.step, kl_coef=beta, skipped_updates=1, time_generate=samples.seconds,
            extra=extra,
        )
        return state, skipped
    reference = reference_and_kl(
        state, samples, config, temperature, registry=registry,
        logprob_extractor=logprob_extractor, kl_fn=kl_fn, data_parallel=parallel,
    )
    advantages = values_and_advantages(
        state, samples, reference, config, gen_config.num_samples, registry=registry,
        advantage_fn=advantage_fn, value_fn=value_fn, data_parallel=parallel,
    )
    update = update_policy(
        state, advantages.batch, config, samples.row_counts, temperature=temperature,
        loss_fn=loss_fn, optimizer_step_fn=optimizer_step_fn, registry=registry,
        logprob_extractor=logprob_extractor, kl_fn=kl_fn, pair_selector=pair_selector,
        value_fn=value_fn, data_parallel=parallel,
    )
    state = refresh_reference(
        update.state, ref_model_update_fn, kl_controller,
        observed_kl=reference.kl_sequence_mean, num_sequences=sum(samples.row_counts),
        data_parallel=parallel,
    )
    return state, _iteration_stats(state, samples, reference, advantages, update)


# --------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------


def _iteration_inputs(
    state: TrainingState,
    iteration: int,
    prompt_loader: Callable[[int], Sequence[Any]],
    gen_config: GenerationConfig,
    algorithm_config: Any,
    reward_fn: Any,
) -> tuple[Sequence[Any], GenerationConfig, AlgorithmConfig, Callable[..., Any], int]:
    """``(prompts, gen_config with seed + iteration, config, reward_fn, loader position)``."""
    config = resolve_schedule(algorithm_config, iteration)
    if callable(config) and not isinstance(config, AlgorithmConfig):
        config = config(iteration)
    if not isinstance(config, AlgorithmConfig):
        raise TypeError(
            f"algorithm_config for iteration {iteration} must be an AlgorithmConfig, "
            f"got {type(config).__name__}"
        )
    position = int((state.loader_state or {}).get("position", iteration))
    if gen_config.seed is not None:
        gen_config = gen_config._replace(seed=gen_config.seed + iteration)
    prompts = prompt_loader(position)
    return prompts, gen_config, config, resolve_schedule(reward_fn, iteration), position


def _evaluate(
    state: TrainingState, eval_fn: Callable[[TrainingState], Mapping[str, float]],
    parallel: DataParallel,
) -> dict[str, float]:
    """``eval_fn`` on the bare policy (unwrapped from DDP, FSDP2 weights gathered)."""
    policy = unwrap_model(state.policy)
    eval_state = state if policy is state.policy else state._replace(policy=policy)
    with parallel.gathered_parameters(policy):  # FSDP2: evaluation lengths differ by rank
        evaluation = eval_fn(eval_state)
    return {f"eval/{k}": float(v) for k, v in evaluation.items()}


def _accepts(fn: Callable[..., Any], num_args: int) -> bool:
    """Whether ``fn`` can be called with ``num_args`` positional arguments (``True`` when
    Python cannot tell, e.g. for some builtins)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(*range(num_args))
    except TypeError:
        return False
    return True


def _two_argument_updater(update: Callable[[Any, Any], Any]) -> Callable[[Any, Any, int], Any]:
    """``fn(ref_model, policy)`` (seed 003's form) as an updater ``fn(ref_model, policy, step)``."""

    def updater(ref_model: Any, policy: Any, step: int) -> Any:
        return update(ref_model, policy)

    return updater


_HOOK_FORMS = {  # name: (positional arguments, the call train makes, the usual fix)
    "checkpoint_fn": (1, "checkpoint_fn(state)",
                      "for save_checkpoint(state, path) pass rp.create_checkpoint_fn(directory)"),
    "eval_fn": (1, "eval_fn(state) -> {name: float}", "wrap it: lambda state: {...}"),
    "logger": (1, "logger(stats)",
               "for log_to_wandb(stats, run) pass rp.create_wandb_logger(...)[0]"),
    "prompt_loader": (1, "prompt_loader(position) -> prompts",
                      "rp.create_prompt_loader(items, batch_size) builds one"),
}


def _checked_hooks(
    ref_model_update_fn: Any, checkpoint_fn: Any, eval_fn: Any, logger: Any, prompt_loader: Any
) -> Callable[..., Any] | None:
    """Check ``train``'s hooks before any iteration runs; returns the reference updater in its
    three-argument form (a two-argument ``fn(ref_model, policy)`` is adapted)."""
    hooks = {"checkpoint_fn": checkpoint_fn, "eval_fn": eval_fn, "logger": logger,
             "prompt_loader": prompt_loader}
    for name, fn in hooks.items():
        if fn is None and name != "prompt_loader":
            continue
        num_args, form, fix = _HOOK_FORMS[name]
        if not callable(fn) or not _accepts(fn, num_args):
            raise TypeError(
                f"{name} must be callable as {form}; got {getattr(fn, '__name__', fn)!r}, "
                f"which is not ({fix})"
            )
    if ref_model_update_fn is None:
        return None
    if callable(ref_model_update_fn) and _accepts(ref_model_update_fn, 3):
        return ref_model_update_fn
    if callable(ref_model_update_fn) and _accepts(ref_model_update_fn, 2):
        return _two_argument_updater(ref_model_update_fn)
    raise TypeError(
        "ref_model_update_fn must be callable as fn(ref_model, policy, step) -> ref_model "
        f"(or fn(ref_model, policy)), got {getattr(ref_model_update_fn, '__name__', ref_model_update_fn)!r}"
        " (rp.create_ema_updater(decay) and rp.create_periodic_updater(every) build one)"
    )


def _progress_postfix(stats: TrainingStats) -> dict[str, str]:
    """The progress bar's measured numbers: reward, KL (absent when nothing measured it, e.g.
    β = 0 without a reference) and the step's seconds."""
    step_time = stats.time_generate + stats.time_reference + stats.time_train
    shown = {"reward": (stats.reward_mean, ".3f"), "kl": (stats.kl, ".4f"), "s": (step_time, ".2f")}
    return {k: format(v, spec) for k, (v, spec) in shown.items() if math.isfinite(v)}


def train(
    initial_state: TrainingState,
    prompt_loader: Callable[[int], Sequence[Any]],
    num_iterations: int,
    gen_config: GenerationConfig,
    algorithm_config: AlgorithmConfig | Schedule | Callable[[int], AlgorithmConfig],
    reward_fn: Callable[..., Any] | Schedule,
    ref_model_update_fn: Callable[..., Any] | None = None,
    checkpoint_fn: Callable[[TrainingState], Any] | None = None,
    eval_fn: Callable[[TrainingState], Mapping[str, float]] | None = None,
    logger: Callable[..., None] | None = None,
    generator: Callable[..., Any] = hf_generator,
    *,
    eval_every: int = 1,
    progress: bool = True,
    data_parallel: DataParallel | None = None,
    **iteration_kwargs: Any,
) -> TrainingState:
    """Run iterations ``state.iteration … num_iterations - 1`` and return the final state.

    Each iteration ``i``: prompts ``prompt_loader(position)`` (position from
    ``state.loader_state``), the algorithm config and reward function resolved for ``i``
    (``Schedule`` s — or a plain function for ``algorithm_config`` — switch algorithm, KL
    coefficient or reward mid-training), the sampling seed ``gen_config.seed + i`` (so a
    resumed run samples what the uninterrupted one would), ``training_iteration``, then
    ``eval_fn(state)`` every ``eval_every`` iterations (its metrics go to ``stats.extra``),
    ``logger(stats)`` and ``checkpoint_fn(state)``. A tqdm bar shows reward, KL and step time.
    Resuming is ``train(load_checkpoint(path, state), ...)`` with the same arguments.

    Under ``torchrun`` (see ``rlprim.distributed``) every rank runs this loop on the same
    global prompts; ``training_iteration`` shards them. ``eval_fn`` and ``checkpoint_fn`` run
    on every rank (``eval_fn`` gets the policy unwrapped from DDP; ``save_checkpoint`` writes
    from rank 0 only); ``logger`` and the progress bar run on the main process only
    (``data_parallel.is_main_process``).

    Args:
      initial_state: from ``create_training_state`` or ``load_checkpoint``.
      prompt_loader: ``fn(position) -> list of prompt items`` (``create_prompt_loader``).
      num_iterations: the iteration count to reach (not the number still to run).
      gen_config: sampling configuration (its ``seed`` is offset by the iteration).
      algorithm_config: an ``AlgorithmConfig``, a ``Schedule`` or ``fn(iteration) -> config``.
      reward_fn: a ``RewardFn`` or a ``Schedule`` of them.
      ref_model_update_fn: ``fn(ref_model, policy, step) -> ref_model``.
      checkpoint_fn: ``fn(state)`` called after every iteration (``create_checkpoint_fn``).
      eval_fn: ``fn(state) -> {name: value}``.
      logger: ``fn(stats)`` (``log_to_console``, ``create_jsonl_logger``, …).
      generator: the ``Generator``.
      eval_every: evaluate every this many iterations (and after the last).
      progress: show the tqdm progress bar.
      data_parallel: the collectives (``None``: ``current_data_parallel()``).
      **iteration_kwargs: passed to ``training_iteration`` (``aggregator``, ``advantage_fn``,
        ``loss_fn``, ``optimizer_step_fn``, ``kl_controller``, ``registry``, …).
    Returns:
      The final ``TrainingState``.
    """
    if progress:
        from tqdm.auto import tqdm
    else:  # tqdm.auto warns in notebooks without ipywidgets even when disabled
        from tqdm import tqdm

    if not isinstance(num_iterations, int) or num_iterations < 0:
        raise ValueError(f"num_iterations must be an int ≥ 0, got {num_iterations!r}")
    if eval_every < 1:
        raise ValueError(f"eval_every must be ≥ 1, got {eval_every}")
    ref_model_update_fn = _checked_hooks(
        ref_model_update_fn, checkpoint_fn, eval_fn, logger, prompt_loader
    )
    parallel = data_parallel or current_data_parallel()
    state, start = initial_state, initial_state.iteration
    main = parallel.is_main_process()  # the main process alone logs and shows progress
    bar = tqdm(
        total=max(0, num_iterations - start), disable=not (progress and main), desc="rlprim",
        leave=True,
    )
    t_start = time.perf_counter()
    try:
        for iteration in range(start, num_iterations):
            prompts, cfg, config, fn, position = _iteration_inputs(
                state, iteration, prompt_loader, gen_config, algorithm_config, reward_fn
            )
            state, stats = training_iteration(
                state, prompts, cfg, config, fn, generator, ref_model_update_fn,
                data_parallel=parallel, **iteration_kwargs,
            )
            # rng_state=None: the live RNG is the truth (a loaded state's saved RNG is stale).
            state = state._replace(
                iteration=iteration + 1, loader_state={"position": position + 1}, rng_state=None
            )
            extra = dict(stats.extra or {})
            extra.update(iteration=float(iteration), algorithm=config.name)
            extra["wall_time"] = time.perf_counter() - t_start
            if eval_fn is not None and (
                (iteration + 1) % eval_every == 0 or iteration + 1 == num_iterations
            ):
                extra.update(_evaluate(state, eval_fn, parallel))
            stats = stats._replace(step=iteration, extra=extra)
            if logger is not None and main:
                logger(stats)
            if checkpoint_fn is not None:
                checkpoint_fn(state)
            bar.update(1)
            bar.set_postfix(_progress_postfix(stats))
    finally:
        bar.close()
    return state
