"""The training loop, composed only of rlprim's public primitives.

``training_step`` makes one optimizer update from a ``Batch``; ``training_iteration`` does one
round of generate → score → (KL) → advantages → ``num_epochs`` × minibatches of
``training_step`` → reference update; ``train`` repeats iterations with logging, evaluation and
checkpoints; ``quick_start_training`` is the one-liner on top.

State: ``TrainingState`` carries the models and the optimizer. As everywhere in rlprim the
functions return a new ``TrainingState``; the one exception to purity is that the policy's
(and critic's) weights and the optimizer's state are updated in place, as PyTorch does.
The policy stays in eval mode throughout (no dropout), so log-probs at sampling and training
time are computed by the same function.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from typing import Any

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
    split_minibatches,
    trim_padding,
)
from rlprim.critic import create_value_model, get_values
from rlprim.distributed import (
    all_reduce_scalars,
    full_state_dict,
    gather_rows,
    gathered_parameters,
    get_distributed_info,
    is_distributed,
    is_fsdp_module,
    is_main_process,
    load_full_state_dict,
    no_sync,
    rank_seed,
    shard_bounds,
    synchronize_gradients,
    unwrap_model,
)
from rlprim.inference import hf_generator
from rlprim.kl import compute_per_token_kl, create_reference_model, update_reference_model
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
    "training_iteration",
    "train",
    "resolve_schedule",
    "quick_start_training",
]

BUNDLED_MODEL = "rlprim/arith-tiny"


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
) -> TrainingState:
    """A ``TrainingState`` ready for ``train``: reference and critic built when needed.

    The reference model is a frozen copy of the policy (``create_reference_model``) when the
    algorithm needs one (``requires_reference_model``: β > 0 or DPO) and none is given; the
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
    Returns:
      ``TrainingState(step=0, iteration=0, kl_coef=config.kl_coef, loader_state={"position": 0})``.
    """
    config = algorithm_config or create_algorithm_config("grpo", registry=registry)
    validate_algorithm_config(config)
    algorithm = get_algorithm(config.name, registry)
    if ref_model is None and requires_reference_model(config, registry):
        ref_model = create_reference_model(policy)
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


def _full_policy(state: TrainingState) -> Any:
    """The policy module for a reference update: a full-weight copy under FSDP2 (built from
    ``state.ref_model``'s architecture), else the unwrapped policy."""
    policy = unwrap_model(state.policy)
    if not is_fsdp_module(policy):
        return policy
    copy = deepcopy(state.ref_model)
    load_full_state_dict(copy, full_state_dict(policy))
    return copy


def _idle_pass(
    policy: Any, value_model: Any, extract: Callable[..., Any], temperature: float
) -> None:
    """FSDP2: a forward and backward with zero loss on a 2-token input, so this rank joins the
    all-gathers and reduce-scatters of a micro-batch it does not have (adds 0 gradient). The
    critic takes part when it is sharded too (its passes must line up as well)."""
    device = next(policy.parameters()).device
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    loss = extract(policy, ids, mask, temperature=temperature, completion_length=1).sum()
    if is_fsdp_module(value_model):
        loss = loss + get_values(value_model, ids, mask, 1).sum()
    (loss * 0.0).backward()


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


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


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
) -> tuple[TrainingState, TrainingStats]:
    """One optimizer update over ``batch``, with gradient accumulation and a finiteness guard.

    The batch is cut into length-packed micro-batches of at most
    ``algorithm_config.micro_batch_size`` rows; micro-batch ``i``'s loss is scaled by
    ``w_i`` (``microbatch_loss_weights``) so the accumulated gradient is the gradient of the
    full-batch loss. Then the global gradient norm is clipped to ``max_grad_norm``. If any loss
    or the gradient norm is not finite the update is skipped: gradients are dropped, weights and
    optimizer state stay bit-identical, and ``stats.skipped_updates == 1``.

    Data parallel (``rlprim.distributed.is_distributed()``): ``batch`` is this rank's rows (it
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
    Returns:
      ``(state._replace(step=step + 1), stats)``; ``step`` advances even when skipped.
    """
    if not isinstance(batch, Batch):
        raise TypeError(f"batch must be an rlprim.Batch, got {type(batch).__name__}")
    config = algorithm_config
    if config.norm_length is None and config.loss_agg_mode == "seq-mean-token-sum-norm":
        # The constant of Dr. GRPO must not change between micro-batches.
        config = config._replace(norm_length=int(batch.completion_ids.shape[1]))
    algorithm = get_algorithm(config.name, registry)
    extract = logprob_extractor or get_logprobs
    step_fn = optimizer_step_fn or default_optimizer_step
    params = _trainable_parameters(state)
    # --- data parallel: global normalisers (rlprim.distributed) ---
    parallel = is_distributed()
    if parallel:
        mode = config.loss_agg_mode
        if mode == "seq-mean-token-sum-norm" and algorithm_config.norm_length is None:
            # The global batch's Tc: the longest completion on any rank.
            tc_global = all_reduce_scalars([batch.completion_ids.shape[1]], "max")[0]
            config = config._replace(norm_length=int(tc_global))
        micro = _micro_batches(batch, config.micro_batch_size) if len(batch.completion_ids) else []
        totals = all_reduce_scalars(microbatch_loss_totals(micro, config.loss_agg_mode))
        weights = microbatch_loss_weights(micro, config.loss_agg_mode, global_totals=tuple(totals))
    # --- end data parallel ---
    else:
        micro = _micro_batches(batch, config.micro_batch_size)
        weights = microbatch_loss_weights(micro, config.loss_agg_mode)
    want_entropy = True
    # FSDP2 reduce-scatters in every backward: all ranks run as many passes as the busiest.
    fsdp = parallel and is_fsdp_module(state.policy)
    passes = int(all_reduce_scalars([len(micro)], "max")[0]) if fsdp else len(micro)

    state.optimizer.zero_grad(set_to_none=True)
    finite = True
    losses, metrics_seen, entropies = [], [], []
    # Data parallel: backward passes accumulate locally; gradients are summed once below.
    with no_sync(state.policy, state.value_model) if parallel else contextlib.nullcontext():
        for index in range(passes):
            if index >= len(micro) or not finite:  # FSDP2 only: keep the collectives in step
                _idle_pass(state.policy, state.value_model, extract, temperature)
                continue
            mb, weight = micro[index], weights[index]
            input_ids, attention_mask = _model_inputs(mb)
            tc = mb.completion_ids.shape[1]
            out = extract(
                state.policy,
                input_ids,
                attention_mask,
                temperature=temperature,
                completion_length=tc,
                return_entropy=want_entropy,
            )
            new_logprobs, entropy = out if want_entropy else (out, None)
            extras: dict[str, Any] = {"kl_coef": state.kl_coef}
            if kl_fn is not None:
                extras["kl_fn"] = kl_fn
            if pair_selector is not None:
                extras["pair_selector"] = pair_selector
            if entropy is not None:
                extras["entropy"] = entropy
            if algorithm.needs_value:
                if state.value_model is None:
                    raise ValueError(f"algorithm {config.name!r} needs state.value_model, got None")
                extras["new_values"] = get_values(state.value_model, input_ids, attention_mask, tc)
            loss, metrics = compute_loss_by_algorithm(
                config, mb, new_logprobs, registry=registry, loss_fn=loss_fn, **extras
            )
            if not torch.isfinite(loss):
                finite = False
                if fsdp:  # the update is skipped on every rank; this pass's backward must
                    # still run (its reduce-scatters pair with the other ranks'), NaN or not.
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

    def metric_sums(name: str) -> tuple[float, float, int]:
        vals = [(w, m[name]) for w, m in metrics_seen if name in m]
        return sum(w * v for w, v in vals), sum(w for w, _ in vals), len(vals)

    mask = batch.completion_mask
    tokens = float(mask.sum())
    num_sequences = int(batch.completion_ids.shape[0])
    metric_names = ("policy_loss", "value_loss", "kl", "clip_fraction", "approx_kl")
    if algorithm_config.tis_cap is not None:
        metric_names += _TIS_MEAN_METRICS
    seen_ratio_max = [m["tis_ratio_max"] for _, m in metrics_seen if "tis_ratio_max" in m]
    tis_ratio_max = max(seen_ratio_max, default=-math.inf)
    global_sums: dict[str, tuple[float, float, int]] = {}
    # --- data parallel: agree on finiteness, sum stats and gradients over ranks ---
    if parallel:
        local = [0.0 if finite else 1.0, sum(losses), tokens, num_sequences]
        local += [sum(e for e, _ in entropies), sum(n for _, n in entropies)]
        for name in metric_names:
            local += list(metric_sums(name))
        reduced = all_reduce_scalars(local)
        finite = reduced[0] == 0
        losses, tokens, num_sequences = [reduced[1]], reduced[2], int(reduced[3])
        entropies = [(reduced[4], reduced[5])]
        for i, name in enumerate(metric_names):
            global_sums[name] = tuple(reduced[6 + 3 * i : 9 + 3 * i])
        if algorithm_config.tis_cap is not None:
            tis_ratio_max = all_reduce_scalars([tis_ratio_max], "max")[0]
        if finite and not fsdp:  # FSDP2 has summed them already (reduce-scatter)
            synchronize_gradients(params)
    # --- end data parallel ---
    grad_norm = float("nan")
    if finite:
        max_norm = config.max_grad_norm if config.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.tensor(0.0)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        finite = math.isfinite(grad_norm)
    if finite:
        step_fn(state)
    state.optimizer.zero_grad(set_to_none=True)

    def metric(name: str) -> float:
        weighted, total, count = global_sums.get(name) or metric_sums(name)
        return weighted / total if count and total else float("nan")

    ent_tokens = sum(n for _, n in entropies)
    extra = {}
    if algorithm_config.tis_cap is not None:
        extra = {name: metric(name) for name in _TIS_MEAN_METRICS}
        extra["tis_ratio_max"] = tis_ratio_max
        extra = {k: v for k, v in extra.items() if math.isfinite(v)}
    stats = TrainingStats(
        step=state.step,
        loss=sum(losses) if finite else float("nan"),
        policy_loss=metric("policy_loss") if finite else float("nan"),
        value_loss=metric("value_loss") if finite else float("nan"),
        kl=metric("kl"),
        kl_coef=state.kl_coef,
        entropy=sum(s for s, _ in entropies) / ent_tokens if ent_tokens else float("nan"),
        clip_fraction=metric("clip_fraction"),
        approx_kl=metric("approx_kl"),
        grad_norm=grad_norm,
        num_tokens=int(tokens),
        num_sequences=int(num_sequences),
        skipped_updates=0 if finite else 1,
        extra=extra or None,
    )
    return state._replace(step=state.step + 1), stats


# --------------------------------------------------------------------------------------------
# One iteration: generate, score, advantages, update.
# --------------------------------------------------------------------------------------------


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


def _global_sampling_stats(stats: Mapping[str, float]) -> dict[str, float]:
    """Data parallel: ``dynamic_sampling/*`` of the whole job (same keys on every rank)."""
    result = dict(stats)
    for op in ("sum", "max", "min"):
        keys = [
            k for k in sorted(stats)
            if _SAMPLING_REDUCTIONS.get(k.split("/", 1)[1], "sum") == op
        ]
        if keys:
            result.update(zip(keys, all_reduce_scalars([stats[k] for k in keys], op), strict=True))
    return result


def _sample_and_score(
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


def _local_rows(x: torch.Tensor, row_offset: int, shape: torch.Size) -> torch.Tensor:
    """Data parallel: this rank's ``[B_r]`` / ``[B_r, Tc_r]`` part of a global-batch tensor."""
    rows = x[row_offset : row_offset + shape[0]]
    return rows[:, : shape[1]] if rows.dim() == 2 else rows


def _local_minibatches(
    batch: Batch, global_rows: int, row_offset: int, size: int, seed: int
) -> list[Batch]:
    """Data parallel: ``split_minibatches(global_batch, size, seed)`` restricted to this rank.

    Minibatch ``k`` holds the rows ``perm[k·size : (k+1)·size]`` of the global batch (the
    permutation ``split_minibatches`` draws); this rank keeps those in ``[row_offset,
    row_offset + B_r)``, in the same order — possibly none (a 0-row batch). Every rank gets the
    same number of minibatches, so all take the same optimizer steps.
    """
    order = torch.randperm(global_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    local_count = batch.completion_ids.shape[0]
    result = []
    for start in range(0, global_rows, size):
        rows = [i - row_offset for i in order[start : start + size]]
        rows = [i for i in rows if 0 <= i < local_count]
        if rows:
            result.append(trim_padding(select_batch(batch, rows)))
        else:
            result.append(Batch(*(None if x is None else x[:0] for x in batch)))
    return result


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
) -> tuple[TrainingState, TrainingStats]:
    """One RL iteration: rollouts → rewards → (KL) → advantages → updates → reference update.

    1. ``G = gen_config.num_samples`` completions per prompt from ``generator`` (one call).
    2. Rewards ``reward_fn(rollout)`` (vector rewards reduced by ``aggregator``), then
       shaping (DAPO overlong punishment when ``config.overlong_shaping``, or ``shaping_fn``);
       with ``config.filter_groups`` groups of equal rewards are dropped and re-sampled
       (``sample_until_informative``, at most ``config.max_sampling_rounds`` rounds).
    3. Reference log-probs only when ``requires_reference_model`` (β > 0 or DPO): with β = 0
       the reference model is never run. Per-token KL of the sampling log-probs to the
       reference (``config.kl_estimator``) for stats and for ``kl_in_reward``.
    4. Critic values (PPO), advantages (``advantage_fn`` or the registry's).
    5. ``num_epochs`` × shuffled minibatches of ``training_step``. With one epoch and one
       minibatch the ratio's old log-probs are the detached current ones (no extra forward);
       otherwise they are the sampling log-probs the generator returned (or one no-grad
       forward when it returned none).
       With ``config.tis_cap = C`` (truncated importance sampling, for an engine such as vLLM
       whose log-probs differ from the trainer's) the generator's log-probs become
       ``batch.engine_logprobs``, π_old is the trainer's own (the detached current log-probs
       on-policy, else one no-grad forward), and the policy losses weight each token by
       ``min(π_old / π_engine, C)``; the ``tis_*`` diagnostics join ``stats.extra``.
    6. ``kl_controller(kl_coef, observed_kl, n_steps=B)`` updates β when given, with
       ``observed_kl`` the batch mean of the per-sequence KL (summed over tokens)
       (``create_adaptive_kl_controller``); otherwise β is ``config.kl_coef``.
    7. ``ref_model_update_fn(ref_model, policy, step)`` refreshes the reference.

    Data parallel (``torchrun``, ``rlprim.distributed.is_distributed()``): ``prompts`` is the
    global list; this rank samples its contiguous share (``shard_bounds``, group ids kept
    global) with seed ``rank_seed(gen_config.seed, rank)``. Rewards, masks, values and KL are
    gathered so advantages and every statistic are the global batch's; minibatches are the
    single-process ones (same shuffle of the global rows), each rank training on its rows of
    each; ``training_step`` sums gradients over ranks. Every rank ends with the same weights
    and the same stats (timings are per rank; ``dynamic_sampling/*`` count the whole job:
    groups summed, rounds the most any rank needed, ``target_reached`` only if every rank
    reached its target). When any rank is
    left without an informative group, every rank skips the iteration.

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
    Returns:
      ``(new_state, stats)`` with the iteration's statistics and phase timings.
    """
    config = validate_algorithm_config(algorithm_config)
    if not prompts:
        raise ValueError("prompts must not be empty")
    algorithm = get_algorithm(config.name, registry)
    kl_coef = state.kl_coef if kl_controller is not None else float(config.kl_coef)
    state = state._replace(kl_coef=kl_coef)
    extract = logprob_extractor or get_logprobs
    temperature = gen_config.temperature
    if config.loss_agg_mode == "seq-mean-token-sum-norm" and config.norm_length is None:
        config = config._replace(norm_length=gen_config.max_new_tokens)
    # --- data parallel: this rank's prompts and sampling seed ---
    parallel = is_distributed()
    group_offset = 0
    if parallel:
        info = get_distributed_info()
        group_offset, stop = shard_bounds(len(prompts), info.rank, info.world_size)
        prompts = list(prompts)[group_offset:stop]
        gen_config = gen_config._replace(seed=rank_seed(gen_config.seed, info.rank))
    # --- end data parallel ---

    t0 = time.perf_counter()
    with gathered_parameters(state.policy):  # FSDP2: ranks sample different lengths
        rollouts, sampling_stats = _sample_and_score(
            state, prompts, gen_config, config, reward_fn, generator, aggregator, shaping_fn,
            group_offset,
        )
    time_generate = time.perf_counter() - t0
    if parallel and sampling_stats:
        sampling_stats = _global_sampling_stats(sampling_stats)
    if parallel and all_reduce_scalars([1.0 if rollouts else 0.0], "min")[0] == 0:
        rollouts = []  # some rank has nothing to train on: every rank skips together
    if not rollouts:
        stats = TrainingStats(
            step=state.step, kl_coef=kl_coef, skipped_updates=1, time_generate=time_generate,
            extra={"no_informative_groups": 1.0, **sampling_stats},
        )
        return state, stats

    batch = rollouts_to_batch(rollouts, state.tokenizer)
    rewards = batch.rewards
    mask = batch.completion_mask
    # Batch-level quantities (advantages, statistics) use the global batch when data parallel.
    global_rewards, global_mask, global_rows, row_offset = rewards, mask, int(mask.shape[0]), 0
    # --- data parallel: the global batch's rewards and masks, in single-process order ---
    if parallel:
        global_rewards, row_counts = gather_rows(rewards)
        global_mask, _ = gather_rows(mask)
        global_rows, row_offset = sum(row_counts), sum(row_counts[: info.rank])
    # --- end data parallel ---
    num_minibatches = 1
    if config.minibatch_size is not None:
        num_minibatches = math.ceil(global_rows / config.minibatch_size)
    on_policy = config.num_epochs == 1 and num_minibatches == 1

    t1 = time.perf_counter()
    engine_logprobs = None
    if config.tis_cap is not None:
        # TIS: the generator's log-probs are the engine's; π_old is recomputed by the trainer.
        if batch.old_logprobs is None:
            raise ValueError(
                f"algorithm_config.tis_cap={config.tis_cap} needs the generator's sampling "
                "log-probs (Generation.logprobs), but the generator returned none"
            )
        engine_logprobs, batch = batch.old_logprobs, batch._replace(old_logprobs=None)
    sampling_logprobs = batch.old_logprobs
    if sampling_logprobs is None and (not on_policy or requires_reference_model(config, registry)):
        with gathered_parameters(state.policy):  # FSDP2: micro-batch counts differ by rank
            sampling_logprobs = _no_grad_logprobs(
                state.policy, batch, temperature, config.micro_batch_size, extract
            )
    ref_logprobs = kl = None
    kl_mean = kl_sequence_mean = float("nan")
    if requires_reference_model(config, registry):
        if state.ref_model is None:
            raise ValueError(
                f"algorithm {config.name!r} with kl_coef={kl_coef} needs state.ref_model, got None"
            )
        input_ids, attention_mask = _model_inputs(batch)
        ref_logprobs = (
            get_reference_logprobs(
                state.ref_model,
                input_ids,
                attention_mask,
                temperature=temperature,
                completion_length=batch.completion_ids.shape[1],
            )
            * mask
        )
        kl = compute_per_token_kl(
            sampling_logprobs, ref_logprobs, config.kl_estimator, kl_fn=kl_fn
        ) * mask
        global_kl = gather_rows(kl)[0] if parallel else kl
        kl_mean = float(global_kl.sum() / global_mask.sum().clamp(min=1))
        kl_sequence_mean = float(global_kl.sum(dim=1).mean())
    values = None
    if algorithm.needs_value:
        if state.value_model is None:
            raise ValueError(f"algorithm {config.name!r} needs state.value_model, got None")
        input_ids, attention_mask = _model_inputs(batch)
        with torch.no_grad(), gathered_parameters(state.value_model):
            values = get_values(
                state.value_model, input_ids, attention_mask, batch.completion_ids.shape[1], mask
            )
    time_reference = time.perf_counter() - t1

    group_size = gen_config.num_samples
    adv_values, adv_kl = values, kl
    # --- data parallel: advantages of the global batch (batch-level statistics included) ---
    if parallel:
        adv_values = gather_rows(values)[0] if values is not None else None
        adv_kl = global_kl if kl is not None else None
    # --- end data parallel ---
    adv = compute_advantages_by_algorithm(
        config,
        global_rewards,
        registry=registry,
        advantage_fn=advantage_fn,
        group_size=group_size,
        mask=global_mask,
        values=adv_values,
        kl=adv_kl,
        kl_coef=kl_coef,
    )
    returns = None
    if isinstance(adv, tuple):
        adv, returns = adv
    # --- data parallel: keep this rank's rows (and columns) ---
    if parallel:
        adv, returns = (
            None if x is None else _local_rows(x, row_offset, mask.shape) for x in (adv, returns)
        )
    # --- end data parallel ---
    batch = batch._replace(
        advantages=adv,
        returns=returns,
        values=values,
        ref_logprobs=ref_logprobs,
        old_logprobs=None if on_policy else sampling_logprobs,
        engine_logprobs=engine_logprobs,
    )

    t2 = time.perf_counter()
    step_stats: list[TrainingStats] = []
    for epoch in range(config.num_epochs):
        if num_minibatches == 1:
            minibatches = [batch]
        elif parallel:  # data parallel: this rank's rows of the single-process minibatches
            minibatches = _local_minibatches(
                batch, global_rows, row_offset, config.minibatch_size, state.step * 1009 + epoch
            )
        else:
            minibatches = split_minibatches(
                batch, config.minibatch_size, shuffle_seed=state.step * 1009 + epoch
            )
        for mb in minibatches:
            state, s = training_step(
                state, mb, config, loss_fn=loss_fn, optimizer_step_fn=optimizer_step_fn,
                temperature=temperature, registry=registry, logprob_extractor=logprob_extractor,
                kl_fn=kl_fn, pair_selector=pair_selector,
            )
            step_stats.append(s)
    time_train = time.perf_counter() - t2

    if kl_controller is not None and math.isfinite(kl_sequence_mean):
        # Ziegler et al. control the KL of whole sequences (summed over tokens).
        state = state._replace(
            kl_coef=float(kl_controller(kl_coef, kl_sequence_mean, global_rows))
        )
    if ref_model_update_fn is not None and state.ref_model is not None:
        state = state._replace(
            ref_model=update_reference_model(
                state.ref_model, _full_policy(state), ref_model_update_fn, state.step
            )
        )

    lengths = global_mask.sum(dim=1)
    extra = {**sampling_stats}
    if math.isfinite(kl_sequence_mean):
        extra["kl_sequence"] = kl_sequence_mean
    step_extras = [s.extra for s in step_stats if s.extra]
    for name in _TIS_MEAN_METRICS:
        if any(name in e for e in step_extras):
            extra[name] = _mean([e[name] for e in step_extras if name in e])
    ratio_maxima = [e["tis_ratio_max"] for e in step_extras if "tis_ratio_max" in e]
    if ratio_maxima:
        extra["tis_ratio_max"] = max(ratio_maxima)
    stats = TrainingStats(
        step=state.step,
        loss=_mean([s.loss for s in step_stats]),
        policy_loss=_mean([s.policy_loss for s in step_stats]),
        value_loss=_mean([s.value_loss for s in step_stats]),
        kl=kl_mean,
        kl_coef=state.kl_coef,
        entropy=_mean([s.entropy for s in step_stats]),
        reward_mean=float(global_rewards.mean()),
        reward_std=float(global_rewards.std()) if global_rewards.numel() > 1 else 0.0,
        clip_fraction=_mean([s.clip_fraction for s in step_stats]),
        approx_kl=_mean([s.approx_kl for s in step_stats]),
        grad_norm=_mean([s.grad_norm for s in step_stats]),
        num_tokens=int(global_mask.sum()),
        num_sequences=int(global_mask.shape[0]),
        skipped_updates=sum(s.skipped_updates for s in step_stats),
        response_length=float(lengths.float().mean()),
        time_generate=time_generate,
        time_reference=time_reference,
        time_train=time_train,
        extra=extra or None,
    )
    return state, stats


# --------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------


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
    from rank 0 only); ``logger`` and the progress bar run on rank 0 only.

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
    state = initial_state
    start = state.iteration
    main = is_main_process()  # data parallel: rank 0 alone logs and shows progress
    bar = tqdm(
        total=max(0, num_iterations - start), disable=not (progress and main), desc="rlprim",
        leave=True,
    )
    t_start = time.perf_counter()
    try:
        for iteration in range(start, num_iterations):
            config = resolve_schedule(algorithm_config, iteration)
            if callable(config) and not isinstance(config, AlgorithmConfig):
                config = config(iteration)
            if not isinstance(config, AlgorithmConfig):
                raise TypeError(
                    f"algorithm_config for iteration {iteration} must be an AlgorithmConfig, "
                    f"got {type(config).__name__}"
                )
            fn = resolve_schedule(reward_fn, iteration)
            position = int((state.loader_state or {}).get("position", iteration))
            prompts = prompt_loader(position)
            cfg = gen_config
            if gen_config.seed is not None:
                cfg = gen_config._replace(seed=gen_config.seed + iteration)
            state, stats = training_iteration(
                state, prompts, cfg, config, fn, generator, ref_model_update_fn,
                **iteration_kwargs,
            )
            # rng_state=None: the live RNG is the truth (a loaded state's saved RNG is stale).
            state = state._replace(
                iteration=iteration + 1, loader_state={"position": position + 1}, rng_state=None
            )
            extra = dict(stats.extra or {})
            extra["iteration"] = float(iteration)
            extra["algorithm"] = config.name
            extra["wall_time"] = time.perf_counter() - t_start
            if eval_fn is not None and (
                (iteration + 1) % eval_every == 0 or iteration + 1 == num_iterations
            ):
                # eval_fn sees the bare model (generate, config) when the policy is DDP-wrapped.
                policy = unwrap_model(state.policy)
                eval_state = state if policy is state.policy else state._replace(policy=policy)
                with gathered_parameters(policy):  # FSDP2: evaluation lengths differ by rank
                    evaluation = eval_fn(eval_state)
                extra.update({f"eval/{k}": float(v) for k, v in evaluation.items()})
            stats = stats._replace(step=iteration, extra=extra)
            if logger is not None and main:
                logger(stats)
            if checkpoint_fn is not None:
                checkpoint_fn(state)
            bar.update(1)
            step_time = stats.time_generate + stats.time_reference + stats.time_train
            bar.set_postfix(
                reward=f"{stats.reward_mean:.3f}", kl=f"{stats.kl:.4f}", s=f"{step_time:.2f}"
            )
    finally:
        bar.close()
    return state


# --------------------------------------------------------------------------------------------
# The one-liner.
# --------------------------------------------------------------------------------------------


def quick_start_training(
    model_name: str = BUNDLED_MODEL,
    prompts: Sequence[Any] | None = None,
    reward_fn: Callable[..., Any] | None = None,
    num_iterations: int = 100,
    algorithm: str = "grpo",
    *,
    eval_fn: Callable[[TrainingState], Mapping[str, float]] | None = None,
    prompts_per_iteration: int = 32,
    num_samples: int = 8,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    learning_rate: float = 3e-4,
    seed: int = 0,
    output_dir: str | None = None,
    eval_every: int = 5,
    logger: Callable[..., None] | None = None,
    progress: bool = True,
    generator: Callable[..., Any] = hf_generator,
    **overrides: Any,
) -> TrainingState:
    """Train ``model_name`` with ``algorithm`` on ``prompts`` in one call; return the final state.

    Everything is the public primitives: ``load_model`` / ``load_tokenizer``,
    ``create_algorithm_config(algorithm, overrides)``, ``create_training_state`` (AdamW),
    ``create_prompt_loader`` (``prompts_per_iteration`` prompts, shuffled by ``seed``) and
    ``train`` with ``num_samples`` completions per prompt. With the bundled model
    (``"rlprim/arith-tiny"``) and no ``prompts`` it trains on the arithmetic task's training
    split with ``arithmetic_reward`` and reports held-out greedy accuracy (``eval_fn``) every
    ``eval_every`` iterations. With ``output_dir`` it writes ``stats.jsonl``, a
    ``reward_curve.png`` and a final checkpoint there.

    Args:
      model_name: a bundled short name, a local directory or a hub name.
      prompts: prompt items; ``None`` only with the bundled model (the arithmetic task).
      reward_fn: ``reward_fn(rollout) -> float``; ``None`` only with the bundled model.
      num_iterations: training iterations.
      algorithm: a registered algorithm name.
      eval_fn: ``fn(state) -> {name: value}``; defaults to held-out accuracy for the bundled
        model.
      prompts_per_iteration, num_samples, max_new_tokens, temperature: sampling settings.
      learning_rate: AdamW's learning rate.
      seed: seeds sampling, shuffling and torch.
      output_dir: where to write stats, plot and checkpoint (``None``: nothing written).
      eval_every: iterations between evaluations.
      logger: an extra ``Logger``.
      progress: show the tqdm bar.
      generator: the ``Generator``.
      **overrides: ``AlgorithmConfig`` fields, e.g. ``kl_coef=0.0``.
    Returns:
      The final ``TrainingState``.
    """
    import os

    from rlprim.checkpoint import save_checkpoint
    from rlprim.data import create_prompt_loader
    from rlprim.inference import load_model, load_tokenizer
    from rlprim.logging import combine_loggers, create_jsonl_logger, plot_training_stats

    if prompts is None or reward_fn is None:
        if model_name != BUNDLED_MODEL:
            raise ValueError(
                f"prompts and reward_fn are required for model_name={model_name!r}; only the "
                f"bundled {BUNDLED_MODEL!r} has a default task (arithmetic)"
            )
        from rlprim.tasks.arithmetic import (
            arithmetic_reward,
            arithmetic_split,
            create_arithmetic_eval_fn,
        )

        train_problems, held_out = arithmetic_split(2000, 200, seed=seed)
        prompts = train_problems if prompts is None else prompts
        reward_fn = arithmetic_reward if reward_fn is None else reward_fn
        if eval_fn is None:
            eval_fn = create_arithmetic_eval_fn(held_out)
    torch.manual_seed(seed)
    policy = load_model(model_name)
    tokenizer = load_tokenizer(model_name)
    config = create_algorithm_config(algorithm, overrides)
    state = create_training_state(policy, tokenizer, config, learning_rate=learning_rate)
    loader = create_prompt_loader(
        list(prompts), batch_size=min(prompts_per_iteration, len(prompts)), seed=seed
    )
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        num_samples=num_samples,
        seed=seed,
    )
    stats_path = None
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        stats_path = os.path.join(output_dir, "stats.jsonl")
        if os.path.exists(stats_path):
            os.remove(stats_path)
        logger = combine_loggers(create_jsonl_logger(stats_path), logger)
    state = train(
        state,
        loader,
        num_iterations,
        gen_config,
        config,
        reward_fn,
        eval_fn=eval_fn,
        logger=logger,
        generator=generator,
        eval_every=eval_every,
        progress=progress,
    )
    if output_dir is not None:
        save_checkpoint(state, os.path.join(output_dir, "checkpoint"))
        metrics = ["reward_mean", "eval/heldout_accuracy", "kl", "entropy"]
        if os.path.getsize(stats_path) > 0:
            plot_training_stats(
                stats_path, os.path.join(output_dir, "reward_curve.png"), metrics=metrics,
                x="time",
            )
    return state
