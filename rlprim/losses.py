"""Policy, value and preference losses, and the aggregation of per-token losses.

Shapes: ``B`` sequences, ``T`` completion tokens. Token-level losses take ``[B, T]`` log-probs of
the sampled tokens with a ``mask [B, T]`` (bool or 0/1; 1 = a token that trains, 0 = padding or
tool/environment tokens; ``None`` = every token trains). Advantages are ``[B]`` (one per
sequence, broadcast over its tokens) or ``[B, T]``. DPO works on per-sequence log-probs ``[P]``.

Every loss returns ``(loss, metrics)``: ``loss`` a differentiable scalar to *minimise*, ``metrics``
a ``dict[str, float]`` for logging. Token statistics in metrics are means over the valid tokens
(whatever the aggregation mode) and are 0 when there are none.

Conventions shared by all losses:
  * ``old_logprobs``, ``ref_logprobs``, advantages, returns and old values are targets: they are
    detached, so gradients flow only through the new log-probs / new values.
  * The log importance ratio ``log r = logπ_θ - logπ_old`` is clamped to ``[-20, 20]`` before
    ``exp`` so a stray token cannot overflow the loss.
  * Whatever is stored at masked positions (padding, even NaN) never reaches the loss, its
    gradient or the metrics; an all-zero mask gives a loss of exactly 0 that is still
    differentiable (its gradient is 0), never NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlprim.checks import (
    check_float_tensor,
    check_mask,
    check_nonnegative,
    check_number,
    check_same_shape,
    check_tensor,
)
from rlprim.kl import KL_ESTIMATORS, compute_per_token_kl

__all__ = [
    "aggregate_loss",
    "compute_ppo_loss",
    "compute_grpo_loss",
    "compute_dapo_loss",
    "compute_gspo_loss",
    "compute_cispo_loss",
    "compute_reinforce_loss",
    "compute_tis_weights",
    "compute_value_loss",
    "compute_entropy_bonus",
    "compute_dpo_pairs",
    "compute_dpo_loss",
]

LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
GSPO_VARIANTS = ("sequence", "token")
TIS_LEVELS = ("token", "sequence")
LOG_RATIO_CLAMP = 20.0

# --------------------------------------------------------------------------- input checks


def _check_positive(name: str, value: object) -> float:
    # Not checks.check_positive: beta and cap keep their own messages (">= 0", then "> 0").
    value = check_nonnegative(name, value)
    if value == 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _check_advantages(advantages: object, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """Returns ``[B, T]`` detached advantages: ``[B]`` is broadcast over tokens."""
    advantages = check_float_tensor("advantages", advantages)
    batch, length = like.shape
    if advantages.shape == (batch,):
        advantages = advantages.unsqueeze(1).expand(batch, length)
    elif advantages.shape != like.shape:
        raise ValueError(
            f"advantages must have shape [B] = ({batch},) or [B, T] = {tuple(like.shape)} "
            f"like {like_name}, got {tuple(advantages.shape)}"
        )
    return advantages.detach().to(device=like.device, dtype=like.dtype)


def _check_clip_range(clip_eps_low: object, clip_eps_high: object | None) -> tuple[float, float]:
    low = check_nonnegative("clip_eps_low", clip_eps_low)
    high = low if clip_eps_high is None else check_nonnegative("clip_eps_high", clip_eps_high)
    return low, high


def _check_dual_clip(dual_clip_c: object | None) -> float | None:
    if dual_clip_c is None:
        return None
    if isinstance(dual_clip_c, bool) or not isinstance(dual_clip_c, (int, float)):
        raise TypeError(
            f"dual_clip_c must be a float > 1 or None, got {type(dual_clip_c).__name__}"
        )
    if not (1.0 < dual_clip_c < math.inf):
        raise ValueError(f"dual_clip_c must be a finite number > 1 (or None), got {dual_clip_c}")
    return float(dual_clip_c)


def _check_agg_mode(mode: object, name: str = "loss_agg_mode") -> str:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"{name} must be one of {list(LOSS_AGG_MODES)}, got {mode!r}")
    return mode  # type: ignore[return-value]


def _check_norm_length(norm_length: object | None) -> int | None:
    if norm_length is None:
        return None
    if isinstance(norm_length, bool) or not isinstance(norm_length, int):
        raise TypeError(
            f"norm_length must be a positive int or None, got {type(norm_length).__name__}"
        )
    if norm_length < 1:
        raise ValueError(f"norm_length must be >= 1 (or None), got {norm_length}")
    return norm_length


def _check_kl_estimator(kl_estimator: object, kl_fn: object | None) -> None:
    if kl_fn is not None:
        if not callable(kl_fn):
            raise TypeError(f"kl_fn must be callable or None, got {type(kl_fn).__name__}")
        return
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {kl_estimator!r}"
        )


def _check_policy_inputs(
    new_logprobs: object, old_logprobs: object, advantages: object, mask: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    new_logprobs = check_float_tensor("new_logprobs", new_logprobs, ndim=2)
    old_logprobs = check_float_tensor("old_logprobs", old_logprobs)
    check_same_shape("old_logprobs", old_logprobs, "new_logprobs", new_logprobs)
    valid = check_mask(mask, new_logprobs, "new_logprobs")
    advantages = _check_advantages(advantages, new_logprobs, "new_logprobs")
    old_logprobs = old_logprobs.detach().to(device=new_logprobs.device, dtype=new_logprobs.dtype)
    return new_logprobs, old_logprobs, advantages, valid


def _check_token_weights(
    token_weights: object | None, like: torch.Tensor, name: str = "token_weights"
) -> torch.Tensor | None:
    """``None`` or a detached float ``[B, T]`` tensor shaped like ``like`` (a constant factor)."""
    if token_weights is None:
        return None
    weights = check_float_tensor(name, token_weights)
    check_same_shape(name, weights, "new_logprobs", like)
    return weights.detach().to(device=like.device, dtype=like.dtype)


# --------------------------------------------------------------------------- helpers


def _zero_masked(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x`` where valid, 0 elsewhere; garbage (even NaN) at masked positions gets no gradient."""
    return torch.where(valid, x, torch.zeros_like(x))


def _masked_mean_value(x: torch.Tensor, valid: torch.Tensor) -> float:
    count = int(valid.sum())
    if count == 0:
        return 0.0
    return float(_zero_masked(x.detach(), valid).sum() / count)


def _masked_max_value(x: torch.Tensor, valid: torch.Tensor) -> float:
    return float(x.detach()[valid].max()) if bool(valid.any()) else 0.0


def _masked_min_value(x: torch.Tensor, valid: torch.Tensor) -> float:
    return float(x.detach()[valid].min()) if bool(valid.any()) else 0.0


def _clamped_log_ratio(
    new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    log_ratio = _zero_masked(new_logprobs - old_logprobs, valid)
    return torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _aggregate(
    per_token_loss: torch.Tensor, valid: torch.Tensor, mode: str, norm_length: int | None
) -> torch.Tensor:
    """``aggregate_loss`` on checked inputs (``valid`` is a bool mask)."""
    masked = _zero_masked(per_token_loss, valid)
    weights = valid.to(per_token_loss.dtype)
    batch, length = per_token_loss.shape
    if mode == "token-mean":
        count = weights.sum()
        return masked.sum() / torch.clamp(count, min=1.0)
    if mode == "seq-mean-token-mean":
        row_counts = weights.sum(dim=1)
        row_means = masked.sum(dim=1) / torch.clamp(row_counts, min=1.0)
        rows_with_tokens = (row_counts > 0).to(per_token_loss.dtype)
        return (row_means * rows_with_tokens).sum() / torch.clamp(rows_with_tokens.sum(), min=1.0)
    if mode == "seq-mean-token-sum":
        return masked.sum() / max(batch, 1)
    # seq-mean-token-sum-norm (Dr. GRPO): a constant normaliser, independent of lengths.
    norm = length if norm_length is None else norm_length
    return masked.sum() / max(batch * norm, 1)


def _approx_kl_value(log_ratio: torch.Tensor, valid: torch.Tensor) -> float:
    # k3 of π_old vs π_θ from π_old's samples: exp(log r) - 1 - log r ≥ 0.
    with torch.no_grad():
        k3 = torch.expm1(log_ratio) - log_ratio
    return _masked_mean_value(k3, valid)


def _clipped_surrogate(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token PPO-clip loss (with optional dual clip) and its token statistics."""
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    # Where the clipped branch is strictly larger it is the max and carries no gradient.
    clip_active = clipped > unclipped
    per_token = torch.where(clip_active, clipped, unclipped)
    dual_active = torch.zeros_like(valid)
    if dual_clip_c is not None:
        bound = -dual_clip_c * advantages
        dual_active = (advantages < 0) & (per_token > bound)
        per_token = torch.where(dual_active, bound, per_token)
    metrics = {
        "clip_fraction": _masked_mean_value(clip_active.to(ratio.dtype), valid),
        "dual_clip_fraction": _masked_mean_value(dual_active.to(ratio.dtype), valid),
        "ratio_mean": _masked_mean_value(ratio, valid),
        "ratio_max": _masked_max_value(ratio, valid),
        "ratio_min": _masked_min_value(ratio, valid),
        "approx_kl": _approx_kl_value(log_ratio, valid),
    }
    return per_token, metrics


# --------------------------------------------------------------------------- aggregation


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor | None,
    mode: str = "token-mean",
    norm_length: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``l [B, T]`` to a scalar over the valid tokens (mask ``m``).

    Modes (``L_b = Σ_t m_bt`` tokens in row ``b``)::

        token-mean               Σ_bt l·m / Σ_bt m                (every token weighs the same;
                                                                   DAPO, Yu et al. 2025)
        seq-mean-token-mean      mean_b over rows with L_b > 0 of Σ_t l·m / L_b
                                                                  (every sequence weighs the
                                                                   same; GRPO, Shao et al. 2024)
        seq-mean-token-sum       (1/B) Σ_b Σ_t l·m                (rows without tokens count 0)
        seq-mean-token-sum-norm  Σ_bt l·m / (B · L)               L = norm_length or T: a
                                                                  constant, so no length bias
                                                                  (Dr. GRPO, Liu et al. 2025,
                                                                  "Understanding R1-Zero-Like
                                                                  Training")

    An all-zero mask gives exactly 0 (still differentiable, gradient 0), never NaN.

    Args:
      per_token_loss: ``[B, T]`` loss per token.
      mask: ``[B, T]`` bool or 0/1, 1 on tokens that count; ``None`` = all tokens.
      mode: one of ``LOSS_AGG_MODES``.
      norm_length: the constant ``L`` of ``seq-mean-token-sum-norm`` (ignored by other modes);
        ``None`` uses ``T``.
    Returns:
      A scalar tensor.
    Raises:
      TypeError / ValueError: a non-tensor or non-2-D loss, a mask of another shape or not 0/1,
        an unknown ``mode``, ``norm_length`` < 1.
    """
    per_token_loss = check_float_tensor("per_token_loss", per_token_loss, ndim=2)
    valid = check_mask(mask, per_token_loss, "per_token_loss")
    mode = _check_agg_mode(mode, "mode")
    norm_length = _check_norm_length(norm_length)
    return _aggregate(per_token_loss, valid, mode, norm_length)


# --------------------------------------------------------------------------- policy losses


def compute_ppo_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip_c: float | None = None,
    loss_agg_mode: str = "token-mean",
    norm_length: int | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate loss (Schulman et al. 2017, "Proximal Policy Optimization
    Algorithms", eq. 7), with asymmetric clip-higher and dual clip.

    Per token, with ``r = exp(clamp(logπ_θ - logπ_old, -20, 20))``::

        l = max(-A·r, -A·clip(r, 1 - ε_low, 1 + ε_high))
        l = min(l, -c·A)            if A < 0 and dual_clip_c = c is given
        l = w · l                   if token_weights = w is given (a constant, e.g. TIS)

    then ``loss = aggregate_loss(l, mask, loss_agg_mode, norm_length)``. ``ε_high > ε_low`` is
    DAPO's clip-higher (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System
    at Scale"); the dual clip bounds the loss of negative-advantage tokens whose ratio has blown
    up (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement
    Learning"). Where a clip is active the token's loss is constant in θ: its gradient is
    exactly 0. Where nothing clips the loss is the plain importance-weighted policy gradient
    ``-A·r`` (at ``r = 1`` its gradient is REINFORCE's ``-A·∇logπ``).

    Args:
      new_logprobs: ``[B, T]`` log π_θ of the sampled tokens (differentiable).
      old_logprobs: ``[B, T]`` log π_old of the same tokens (the policy that sampled them).
      advantages: ``[B]`` or ``[B, T]``.
      mask: ``[B, T]`` bool or 0/1; ``None`` = all tokens train.
      clip_eps_low: ε_low ≥ 0. clip_eps_high: ε_high ≥ 0; ``None`` = ε_low (symmetric PPO).
      dual_clip_c: c > 1 (Ye et al. use 3), or ``None`` to disable.
      loss_agg_mode / norm_length: see ``aggregate_loss``.
      token_weights: ``[B, T]`` constant per-token factors ``w`` (detached), e.g. the
        truncated importance weights of ``compute_tis_weights``; ``None`` = 1.
    Returns:
      ``(loss, metrics)``; metrics over the valid tokens: ``policy_loss``; ``clip_fraction``
      (tokens where the clipped branch is active, i.e. gradient 0); ``dual_clip_fraction``;
      ``ratio_mean`` / ``ratio_max`` / ``ratio_min``; ``approx_kl`` (mean k3 estimate of
      KL(π_old ‖ π_θ), ``r - 1 - log r``).
    Raises:
      TypeError / ValueError: shapes that differ (naming both), advantages neither ``[B]`` nor
        ``[B, T]``, a mask not 0/1, a negative ε, ``dual_clip_c ≤ 1``, an unknown
        ``loss_agg_mode``, ``norm_length`` < 1.
    """
    new_logprobs, old_logprobs, advantages, valid = _check_policy_inputs(
        new_logprobs, old_logprobs, advantages, mask
    )
    eps_low, eps_high = _check_clip_range(clip_eps_low, clip_eps_high)
    dual_clip_c = _check_dual_clip(dual_clip_c)
    loss_agg_mode = _check_agg_mode(loss_agg_mode)
    norm_length = _check_norm_length(norm_length)
    weights = _check_token_weights(token_weights, new_logprobs)

    log_ratio = _clamped_log_ratio(new_logprobs, old_logprobs, valid)
    advantages = _zero_masked(advantages, valid)
    per_token, metrics = _clipped_surrogate(
        log_ratio, advantages, valid, eps_low, eps_high, dual_clip_c
    )
    if weights is not None:
        per_token = per_token * _zero_masked(weights, valid)
    loss = _aggregate(per_token, valid, loss_agg_mode, norm_length)
    return loss, {"policy_loss": float(loss.detach()), **metrics}


def compute_grpo_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_fn=None,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    loss_agg_mode: str = "token-mean",
    norm_length: int | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO loss (Shao et al. 2024, "DeepSeekMath", eq. 3): the PPO-clip surrogate plus a
    per-token KL penalty to the reference policy, inside the loss.

    Per token, with ``l_clip`` the PPO-clip loss of ``compute_ppo_loss``::

        l = l_clip + β · KL_t(π_θ ‖ π_ref),    KL_t = kl_fn(logπ_θ, logπ_ref)  (default k3,
                                                 exp(-d) + d - 1 with d = logπ_θ - logπ_ref)

    aggregated with ``loss_agg_mode``. The paper averages over the tokens of each sequence,
    then over sequences (``"seq-mean-token-mean"``); the default here is ``"token-mean"``
    (DAPO's fix of the length bias, Yu et al. 2025) — pass the paper's mode to reproduce it.
    The advantages are usually ``compute_grpo_advantages`` (group-normalised rewards).

    Args:
      new_logprobs / old_logprobs: ``[B, T]`` log-probs under π_θ and π_old.
      advantages: ``[B]`` or ``[B, T]``.
      mask: ``[B, T]`` bool or 0/1; ``None`` = all tokens train.
      ref_logprobs: ``[B, T]`` log π_ref; required when ``kl_coef > 0``. When given with
        ``kl_coef = 0`` the KL is still reported in the metrics.
      kl_coef: β ≥ 0 (the paper uses 0.04).
      kl_estimator: ``"k1"``, ``"k2"``, ``"k3"`` or ``"low_var"`` (see ``rlprim.kl``).
      kl_fn: a ``KLFn`` ``(logprobs, ref_logprobs) -> [B, T]`` replacing the estimator.
      clip_eps_low / clip_eps_high: as in ``compute_ppo_loss``.
      loss_agg_mode / norm_length: see ``aggregate_loss``.
      token_weights: ``[B, T]`` constant factors on the surrogate ``l_clip`` only (not on the
        KL term), e.g. TIS weights; ``None`` = 1.
    Returns:
      ``(loss, metrics)``: the PPO metrics plus ``kl`` (mean per-token KL over valid tokens, 0
      without ``ref_logprobs``); ``policy_loss`` is the aggregated surrogate without the KL.
    Raises:
      TypeError / ValueError: as ``compute_ppo_loss``; ``kl_coef > 0`` without
        ``ref_logprobs``; ``ref_logprobs`` of another shape; a negative ``kl_coef``; an
        unknown ``kl_estimator``.
    """
    new_logprobs, old_logprobs, advantages, valid = _check_policy_inputs(
        new_logprobs, old_logprobs, advantages, mask
    )
    kl_coef = check_nonnegative("kl_coef", kl_coef)
    if ref_logprobs is None:
        if kl_coef > 0:
            raise ValueError(
                f"ref_logprobs is required when kl_coef > 0, got ref_logprobs=None with "
                f"kl_coef={kl_coef}"
            )
    else:
        ref_logprobs = check_float_tensor("ref_logprobs", ref_logprobs)
        check_same_shape("ref_logprobs", ref_logprobs, "new_logprobs", new_logprobs)
    _check_kl_estimator(kl_estimator, kl_fn)
    eps_low, eps_high = _check_clip_range(clip_eps_low, clip_eps_high)
    loss_agg_mode = _check_agg_mode(loss_agg_mode)
    norm_length = _check_norm_length(norm_length)
    weights = _check_token_weights(token_weights, new_logprobs)

    log_ratio = _clamped_log_ratio(new_logprobs, old_logprobs, valid)
    advantages = _zero_masked(advantages, valid)
    per_token, metrics = _clipped_surrogate(log_ratio, advantages, valid, eps_low, eps_high, None)
    if weights is not None:
        per_token = per_token * _zero_masked(weights, valid)
    policy_loss = _aggregate(per_token, valid, loss_agg_mode, norm_length)
    loss = policy_loss
    kl_value = 0.0
    if ref_logprobs is not None:
        ref = ref_logprobs.detach().to(device=new_logprobs.device, dtype=new_logprobs.dtype)
        # Masked positions hold 0 on both sides so padding garbage cannot reach the KL.
        per_token_kl = compute_per_token_kl(
            _zero_masked(new_logprobs, valid), _zero_masked(ref, valid), kl_estimator, kl_fn
        )
        kl_value = _masked_mean_value(per_token_kl, valid)
        if kl_coef > 0:
            loss = policy_loss + kl_coef * _aggregate(
                per_token_kl, valid, loss_agg_mode, norm_length
            )
    metrics = {"policy_loss": float(policy_loss.detach()), **metrics, "kl": kl_value}
    return loss, metrics


def compute_dapo_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    dual_clip_c: float | None = None,
    loss_agg_mode: str = "token-mean",
    norm_length: int | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DAPO policy loss (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System
    at Scale"): PPO-clip with decoupled clip ranges, token-level averaging, no KL term.

    Per token ``l = max(-A·r, -A·clip(r, 1 - ε_low, 1 + ε_high))`` with the paper's
    ``ε_low = 0.2``, ``ε_high = 0.28`` ("clip-higher", which keeps low-probability tokens able to
    grow and so preserves entropy), aggregated ``token-mean`` (``Σ l·m / Σ m`` over the whole
    batch, so long sequences are not down-weighted). The rest of DAPO lives elsewhere: dynamic
    sampling (drop groups whose rewards are all equal) in the rollouts and the overlong
    buffer in reward shaping.

    Args / Returns / Raises: as ``compute_ppo_loss`` (whose function this calls).
    """
    return compute_ppo_loss(
        new_logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high,
        dual_clip_c=dual_clip_c,
        loss_agg_mode=loss_agg_mode,
        norm_length=norm_length,
        token_weights=token_weights,
    )


def _check_sequence_weights(
    sequence_weights: object | None, like: torch.Tensor
) -> torch.Tensor | None:
    """``None`` or detached ``[B]`` weights on ``like``'s device and dtype."""
    if sequence_weights is None:
        return None
    seq_weights = check_float_tensor("sequence_weights", sequence_weights)
    if seq_weights.shape != (like.shape[0],):
        raise ValueError(
            f"sequence_weights must have shape [B] = ({like.shape[0]},), got "
            f"{tuple(seq_weights.shape)}"
        )
    return seq_weights.detach().to(like)


def _gspo_sequence_loss(
    seq_ratio: torch.Tensor,
    seq_advantages: torch.Tensor,
    has_tokens: torch.Tensor,
    eps_low: float,
    eps_high: float,
    seq_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO: ``(mean_i l_i over sequences with tokens, clip active [B])``, ``[B]`` inputs."""
    seq_advantages = _zero_masked(seq_advantages, has_tokens)
    unclipped = -seq_advantages * seq_ratio
    clipped = -seq_advantages * torch.clamp(seq_ratio, 1.0 - eps_low, 1.0 + eps_high)
    seq_clip_active = clipped > unclipped
    per_seq = torch.where(seq_clip_active, clipped, unclipped)
    if seq_weights is not None:
        per_seq = per_seq * _zero_masked(seq_weights, has_tokens)
    loss = per_seq.sum() / torch.clamp(has_tokens.sum(), min=1).to(per_seq.dtype)
    return loss, seq_clip_active


def _gspo_token_loss(
    new_logprobs: torch.Tensor,
    seq_ratio: torch.Tensor,
    token_advantages: torch.Tensor,
    valid: torch.Tensor,
    has_tokens: torch.Tensor,
    eps_low: float,
    eps_high: float,
    seq_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO-token: ``(seq-mean-token-mean loss, clip active on any token [B])``."""
    # s_it: value s_i, gradient s_i · ∇logπ_θ(y_it) through its own token only.
    token_logprobs = _zero_masked(new_logprobs, valid)
    token_ratio = seq_ratio.detach().unsqueeze(1) * torch.exp(
        token_logprobs - token_logprobs.detach()
    )
    token_advantages = _zero_masked(token_advantages, valid)
    unclipped = -token_advantages * token_ratio
    clipped = -token_advantages * torch.clamp(token_ratio, 1.0 - eps_low, 1.0 + eps_high)
    clip_active = clipped > unclipped
    per_token = torch.where(clip_active, clipped, unclipped)
    if seq_weights is not None:
        per_token = per_token * _zero_masked(seq_weights, has_tokens).unsqueeze(1)
    loss = _aggregate(per_token, valid, "seq-mean-token-mean", None)
    return loss, (clip_active & valid).any(dim=1)


def compute_gspo_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    clip_eps_low: float = 3e-4,
    clip_eps_high: float | None = 4e-4,
    variant: str = "sequence",
    sequence_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO loss (Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 5): the ratio,
    the clipping and the optimisation are per *sequence*.

    With ``|y_i| = Σ_t m_it`` valid tokens in sequence ``i``::

        s_i = exp( (1/|y_i|) Σ_t m_it · (logπ_θ(y_it) - logπ_old(y_it)) )   (length-normalised)
        l_i = max(-A_i·s_i, -A_i·clip(s_i, 1 - ε_low, 1 + ε_high))
        loss = mean over sequences with |y_i| > 0 of l_i

    The paper clips with ε_low = 3e-4 and ε_high = 4e-4 (sequence ratios stay very close to 1
    because they are geometric means over tokens). The mean log-ratio is clamped to ±20.

    ``variant="token"`` is the paper's GSPO-token: per token ``s_it = sg(s_i) · π_θ(y_it) /
    sg(π_θ(y_it))`` (numerically ``s_i``, gradient ``s_i·∇logπ_θ(y_it)``) with a per-token
    advantage ``A_it``, loss ``max(-A_it·s_it, -A_it·clip(s_it, ...))`` averaged over the tokens
    of each sequence, then over sequences. With ``A_it = A_i`` it equals GSPO in value and
    gradient.

    Args:
      new_logprobs / old_logprobs: ``[B, T]`` log-probs under π_θ and π_old.
      advantages: ``[B]`` (``variant="token"`` also takes ``[B, T]``).
      mask: ``[B, T]`` bool or 0/1; ``None`` = all tokens train.
      clip_eps_low: ε_low ≥ 0. clip_eps_high: ε_high ≥ 0; ``None`` = ε_low.
      variant: ``"sequence"`` (GSPO) or ``"token"`` (GSPO-token).
      sequence_weights: ``[B]`` constant factors ``w_i`` on each sequence's loss ``l_i`` (on
        every token of it for GSPO-token), e.g. ``compute_tis_weights(..., level="sequence")``;
        ``None`` = 1.
    Returns:
      ``(loss, metrics)``: ``policy_loss``; ``clip_fraction`` (fraction of sequences with
      tokens whose clipped branch is active); ``ratio_mean`` / ``ratio_max`` / ``ratio_min`` of
      the sequence ratios ``s_i``; ``approx_kl`` (token-mean k3 of KL(π_old ‖ π_θ)).
    Raises:
      TypeError / ValueError: shapes that differ (naming both), advantages of the wrong shape
        for the variant, a mask not 0/1, a negative ε, an unknown ``variant``.
    """
    new_logprobs = check_float_tensor("new_logprobs", new_logprobs, ndim=2)
    if variant not in GSPO_VARIANTS:
        raise ValueError(f"variant must be one of {list(GSPO_VARIANTS)}, got {variant!r}")
    if variant == "sequence":
        advantages = check_float_tensor("advantages", advantages)
        if advantages.shape != (new_logprobs.shape[0],):
            raise ValueError(
                f"advantages must have shape [B] = ({new_logprobs.shape[0]},) for GSPO's "
                f"sequence-level loss (use variant='token' for [B, T]), got "
                f"{tuple(advantages.shape)}"
            )
        seq_advantages = advantages.detach().to(new_logprobs)
    new_logprobs, old_logprobs, token_advantages, valid = _check_policy_inputs(
        new_logprobs, old_logprobs, advantages, mask
    )
    eps_low, eps_high = _check_clip_range(clip_eps_low, clip_eps_high)
    seq_weights = _check_sequence_weights(sequence_weights, new_logprobs)

    log_ratio = _zero_masked(new_logprobs - old_logprobs, valid)
    lengths = valid.sum(dim=1)
    has_tokens = lengths > 0
    seq_log_ratio = log_ratio.sum(dim=1) / torch.clamp(lengths, min=1).to(log_ratio.dtype)
    seq_log_ratio = torch.clamp(seq_log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    seq_ratio = torch.exp(seq_log_ratio)

    if variant == "sequence":
        loss, seq_clip_active = _gspo_sequence_loss(
            seq_ratio, seq_advantages, has_tokens, eps_low, eps_high, seq_weights
        )
    else:
        loss, seq_clip_active = _gspo_token_loss(
            new_logprobs, seq_ratio, token_advantages, valid, has_tokens, eps_low, eps_high,
            seq_weights,
        )

    metrics = {
        "policy_loss": float(loss.detach()),
        "clip_fraction": _masked_mean_value(seq_clip_active.to(seq_ratio.dtype), has_tokens),
        "ratio_mean": _masked_mean_value(seq_ratio, has_tokens),
        "ratio_max": _masked_max_value(seq_ratio, has_tokens),
        "ratio_min": _masked_min_value(seq_ratio, has_tokens),
        "approx_kl": _approx_kl_value(
            torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), valid
        ),
    }
    return loss, metrics


def compute_cispo_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    clip_eps_high: float = 4.0,
    clip_eps_low: float | None = None,
    loss_agg_mode: str = "token-mean",
    norm_length: int | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CISPO loss (MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with
    Lightning Attention"): clip the importance-sampling *weight*, not the update.

    Per token, with ``r = exp(clamp(logπ_θ - logπ_old, -20, 20))`` and ``sg`` = stop-gradient::

        w = clip(r, 1 - ε_low, 1 + ε_high)          (no lower bound when clip_eps_low is None)
        l = -sg(w) · A · logπ_θ

    aggregated ``token-mean`` as in the paper (``1 / Σ_i |o_i|``). Unlike PPO, no token's
    gradient is ever dropped: ``∇l = -w·A·∇logπ_θ`` for every valid token, clipped or not, so the
    rare "fork" tokens that PPO's clip would silence keep learning. Only the gradient is
    meaningful; the loss value is not a surrogate objective.

    Defaults: the paper imposes no lower bound (ε_low "set to a large value") and tunes only
    ε_high without publishing it; ``clip_eps_high = 4.0`` caps the weight at 5, as later CISPO
    recipes do (e.g. ScaleRL, Khatri et al. 2025). Tune it for your setting.

    Args:
      new_logprobs / old_logprobs: ``[B, T]`` log-probs under π_θ and π_old.
      advantages: ``[B]`` or ``[B, T]``.
      mask: ``[B, T]`` bool or 0/1; ``None`` = all tokens train.
      clip_eps_high: ε_high ≥ 0. clip_eps_low: ε_low ≥ 0, or ``None`` for no lower bound.
      loss_agg_mode / norm_length: see ``aggregate_loss``.
      token_weights: ``[B, T]`` constant factors multiplying ``l`` (e.g. TIS); ``None`` = 1.
    Returns:
      ``(loss, metrics)``: ``policy_loss``; ``clip_fraction`` (tokens whose weight was
      clipped); ``ratio_mean`` / ``ratio_max`` / ``ratio_min``; ``approx_kl``.
    Raises:
      TypeError / ValueError: shapes that differ, a mask not 0/1, a negative ε, an unknown
        ``loss_agg_mode``, ``norm_length`` < 1.
    """
    new_logprobs, old_logprobs, advantages, valid = _check_policy_inputs(
        new_logprobs, old_logprobs, advantages, mask
    )
    eps_high = check_nonnegative("clip_eps_high", clip_eps_high)
    lower = 0.0 if clip_eps_low is None else 1.0 - check_nonnegative("clip_eps_low", clip_eps_low)
    loss_agg_mode = _check_agg_mode(loss_agg_mode)
    norm_length = _check_norm_length(norm_length)
    weights = _check_token_weights(token_weights, new_logprobs)

    log_ratio = _clamped_log_ratio(new_logprobs, old_logprobs, valid)
    with torch.no_grad():
        ratio = torch.exp(log_ratio)
        weight = torch.clamp(ratio, min=lower, max=1.0 + eps_high)
        clipped = (ratio > 1.0 + eps_high) | (ratio < lower)
    per_token = -weight * _zero_masked(advantages, valid) * _zero_masked(new_logprobs, valid)
    if weights is not None:
        per_token = per_token * _zero_masked(weights, valid)
    loss = _aggregate(per_token, valid, loss_agg_mode, norm_length)
    metrics = {
        "policy_loss": float(loss.detach()),
        "clip_fraction": _masked_mean_value(clipped.to(ratio.dtype), valid),
        "ratio_mean": _masked_mean_value(ratio, valid),
        "ratio_max": _masked_max_value(ratio, valid),
        "ratio_min": _masked_min_value(ratio, valid),
        "approx_kl": _approx_kl_value(log_ratio, valid),
    }
    return loss, metrics


def compute_reinforce_loss(
    new_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    loss_agg_mode: str = "token-mean",
    norm_length: int | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE loss (Williams 1992, "Simple Statistical Gradient-Following Algorithms for
    Connectionist Reinforcement Learning"): ``l = -A · logπ_θ`` per token, aggregated.

    Its gradient ``-A·∇logπ_θ`` is the on-policy policy gradient; the baseline lives in the
    advantages (``compute_reinforce_advantages``, ``compute_rloo_advantages``, …). No
    importance ratio: use it on freshly sampled data (one gradient step per batch).

    Args:
      new_logprobs: ``[B, T]`` log π_θ of the sampled tokens.
      advantages: ``[B]`` or ``[B, T]``.
      mask: ``[B, T]`` bool or 0/1; ``None`` = all tokens train.
      loss_agg_mode / norm_length: see ``aggregate_loss``.
      token_weights: ``[B, T]`` constant factors multiplying ``l`` (e.g. TIS, when the samples
        came from another engine than π_θ); ``None`` = 1.
    Returns:
      ``(loss, {"policy_loss": ...})``.
    Raises:
      TypeError / ValueError: a non-2-D ``new_logprobs``, advantages neither ``[B]`` nor
        ``[B, T]``, a mask not 0/1, an unknown ``loss_agg_mode``, ``norm_length`` < 1.
    """
    new_logprobs = check_float_tensor("new_logprobs", new_logprobs, ndim=2)
    valid = check_mask(mask, new_logprobs, "new_logprobs")
    advantages = _check_advantages(advantages, new_logprobs, "new_logprobs")
    loss_agg_mode = _check_agg_mode(loss_agg_mode)
    norm_length = _check_norm_length(norm_length)
    weights = _check_token_weights(token_weights, new_logprobs)
    per_token = -_zero_masked(advantages, valid) * _zero_masked(new_logprobs, valid)
    if weights is not None:
        per_token = per_token * _zero_masked(weights, valid)
    loss = _aggregate(per_token, valid, loss_agg_mode, norm_length)
    return loss, {"policy_loss": float(loss.detach())}


# --------------------------------------------------------------------------- engine mismatch


def compute_tis_weights(
    train_logprobs: torch.Tensor,
    engine_logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    cap: float = 2.0,
    level: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance-sampling (TIS) weights for the engine/trainer mismatch.

    When an inference engine (vLLM, with its own kernels and precision) samples the tokens, the
    samples come from ``π_engine``, not from the trainer's ``π_old`` that the policy loss
    assumes. Yao et al. 2025 ("Your Efficient RL Framework Secretly Brings You Off-Policy RL
    Training") correct the policy gradient by a truncated importance weight, a constant
    (no gradient) factor on each token's loss::

        level="token":     w_t = min(exp(logπ_old(y_t) - logπ_engine(y_t)), C)          [B, T]
        level="sequence":  w_i = min(exp((1/|y_i|) Σ_t m_it (logπ_old - logπ_engine)), C)  [B]

    (the sequence level matches GSPO's length-normalised sequence ratio). Truncating at ``C``
    bounds the variance at the price of a small bias (Ionides 2008); ``C = 2`` is a common
    choice. The log-ratio is clamped to ±20 before ``exp``. Masked tokens get weight 0 and rows
    without valid tokens weight 0; neither affects any loss.

    Pass ``token_weights=w`` to ``compute_ppo_loss``, ``compute_grpo_loss``,
    ``compute_dapo_loss``, ``compute_cispo_loss`` or ``compute_reinforce_loss``, or
    ``sequence_weights=w`` to ``compute_gspo_loss``. Inside the training loop set
    ``AlgorithmConfig.tis_cap``; the batch then carries ``engine_logprobs``.

    Args:
      train_logprobs: ``[B, T]`` log π_old of the sampled tokens, computed by the trainer.
      engine_logprobs: ``[B, T]`` log-probs the engine reported for the same tokens.
      mask: ``[B, T]`` bool or 0/1; ``None`` = all tokens count.
      cap: the truncation ``C > 0``.
      level: ``"token"`` or ``"sequence"``.
    Returns:
      ``(weights, metrics)``: weights ``[B, T]`` (token) or ``[B]`` (sequence), detached; metrics
      over valid tokens (sequences for the ratio statistics at the sequence level):
      ``tis_weight_mean``; ``tis_clip_fraction`` (ratios above ``C``); ``tis_ratio_max`` (before
      truncation); ``tis_mismatch_kl``, the mean k3 estimate ``r - 1 - log r`` of
      KL(π_engine ‖ π_old) from the engine's samples (0 when both agree); and
      ``tis_logprob_abs_diff`` (mean ``|logπ_old - logπ_engine|``).
    Raises:
      TypeError / ValueError: tensors that are not 2-D floats of one shape, a mask not 0/1,
        ``cap ≤ 0`` or not finite, an unknown ``level``.
    """
    train_logprobs = check_float_tensor("train_logprobs", train_logprobs, ndim=2)
    engine_logprobs = check_float_tensor("engine_logprobs", engine_logprobs)
    check_same_shape("engine_logprobs", engine_logprobs, "train_logprobs", train_logprobs)
    valid = check_mask(mask, train_logprobs, "train_logprobs")
    cap = _check_positive("cap", cap)
    if not math.isfinite(cap):
        raise ValueError(f"cap must be finite, got {cap}")
    if level not in TIS_LEVELS:
        raise ValueError(f"level must be one of {list(TIS_LEVELS)}, got {level!r}")
    with torch.no_grad():
        engine = engine_logprobs.detach().to(train_logprobs)
        log_ratio = _clamped_log_ratio(train_logprobs.detach(), engine, valid)
        token_ratio = torch.exp(log_ratio)
        metrics = {
            "tis_mismatch_kl": _masked_mean_value(torch.expm1(log_ratio) - log_ratio, valid),
            "tis_logprob_abs_diff": _masked_mean_value(log_ratio.abs(), valid),
        }
        if level == "token":
            unit_ratio, unit_valid = token_ratio, valid
        else:
            lengths = valid.sum(dim=1)
            unit_valid = lengths > 0
            mean_log = log_ratio.sum(dim=1) / torch.clamp(lengths, min=1).to(log_ratio.dtype)
            unit_ratio = torch.exp(torch.clamp(mean_log, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        weights = _zero_masked(torch.clamp(unit_ratio, max=cap), unit_valid)
        metrics = {
            "tis_weight_mean": _masked_mean_value(weights, unit_valid),
            "tis_clip_fraction": _masked_mean_value((unit_ratio > cap).to(weights.dtype), unit_valid),
            "tis_ratio_max": _masked_max_value(unit_ratio, unit_valid),
            **metrics,
        }
    return weights, metrics


# --------------------------------------------------------------------------- value and entropy


def compute_value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None,
    value_clip: float | None = 0.2,
    loss_agg_mode: str = "token-mean",
    norm_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss of PPO's critic (the PPO2 baselines implementation, Dhariwal et al.
    2017; studied in Engstrom et al. 2020, "Implementation Matters in Deep Policy Gradients").

    Per token, with ``V`` the new values, ``V_old`` the values at rollout time, ``R`` the
    returns (e.g. from ``compute_gae``)::

        V_clip = V_old + clip(V - V_old, -ε_v, ε_v)
        l = 0.5 · max((V - R)², (V_clip - R)²)          (0.5 · (V - R)² if value_clip is None)

    aggregated with ``loss_agg_mode``. The max makes the clip pessimistic: the critic cannot
    cut its error by moving more than ε_v from ``V_old``.

    Args:
      new_values: ``[B, T]`` the critic's current predictions (differentiable).
      old_values: ``[B, T]`` predictions at rollout time.
      returns: ``[B, T]`` targets.
      mask: ``[B, T]`` bool or 0/1; ``None`` = all tokens train.
      value_clip: ε_v ≥ 0, or ``None`` for the plain squared error.
      loss_agg_mode / norm_length: see ``aggregate_loss``.
    Returns:
      ``(loss, metrics)``: ``value_loss``; ``value_clip_fraction`` (tokens where the clipped
      term is strictly larger, i.e. gradient 0).
    Raises:
      TypeError / ValueError: shapes that differ (naming both), a mask not 0/1, a negative
        ``value_clip``, an unknown ``loss_agg_mode``, ``norm_length`` < 1.
    """
    new_values = check_float_tensor("new_values", new_values, ndim=2)
    old_values = check_float_tensor("old_values", old_values)
    check_same_shape("old_values", old_values, "new_values", new_values)
    returns = check_float_tensor("returns", returns)
    check_same_shape("returns", returns, "new_values", new_values)
    valid = check_mask(mask, new_values, "new_values")
    if value_clip is not None:
        value_clip = check_nonnegative("value_clip", value_clip)
    loss_agg_mode = _check_agg_mode(loss_agg_mode)
    norm_length = _check_norm_length(norm_length)

    old_values = _zero_masked(old_values.detach().to(new_values), valid)
    returns = _zero_masked(returns.detach().to(new_values), valid)
    values = _zero_masked(new_values, valid)
    unclipped = (values - returns).square()
    if value_clip is None:
        per_token = 0.5 * unclipped
        clip_active = torch.zeros_like(valid)
    else:
        clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
        clipped = (clipped_values - returns).square()
        clip_active = clipped > unclipped
        per_token = 0.5 * torch.where(clip_active, clipped, unclipped)
    loss = _aggregate(per_token, valid, loss_agg_mode, norm_length)
    metrics = {
        "value_loss": float(loss.detach()),
        "value_clip_fraction": _masked_mean_value(clip_active.to(new_values.dtype), valid),
    }
    return loss, metrics


def compute_entropy_bonus(
    entropy: torch.Tensor,
    mask: torch.Tensor | None,
    entropy_coef: float,
    loss_agg_mode: str = "token-mean",
    norm_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Entropy bonus term to *add* to the loss: ``-c_H · aggregate(H)`` (Mnih et al. 2016,
    "Asynchronous Methods for Deep Reinforcement Learning"; Schulman et al. 2017, eq. 9).

    Minimising ``loss + (-c_H · H̄)`` maximises the policy's mean token entropy ``H̄``, which
    keeps exploration alive. A negative ``entropy_coef`` turns it into an entropy penalty.

    Args:
      entropy: ``[B, T]`` entropy of π_θ at each position (nats; e.g. ``compute_entropy``),
        differentiable.
      mask: ``[B, T]`` bool or 0/1; ``None`` = all tokens.
      entropy_coef: ``c_H`` (finite).
      loss_agg_mode / norm_length: see ``aggregate_loss``.
    Returns:
      ``(term, {"entropy": mean token entropy over valid tokens})``; ``term`` is a scalar.
    Raises:
      TypeError / ValueError: a non-2-D entropy, a mask of another shape or not 0/1, a
        non-finite ``entropy_coef``, an unknown ``loss_agg_mode``, ``norm_length`` < 1.
    """
    entropy = check_float_tensor("entropy", entropy, ndim=2)
    valid = check_mask(mask, entropy, "entropy")
    entropy_coef = check_number("entropy_coef", entropy_coef)
    loss_agg_mode = _check_agg_mode(loss_agg_mode)
    norm_length = _check_norm_length(norm_length)
    term = -entropy_coef * _aggregate(entropy, valid, loss_agg_mode, norm_length)
    return term, {"entropy": _masked_mean_value(entropy, valid)}


# --------------------------------------------------------------------------- DPO


def compute_dpo_pairs(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-DPO preference pairs: in each group the best sample is chosen, the worst rejected.

    Groups are ``group_size`` consecutive rows (the samples of one prompt). For group ``k`` with
    rewards ``r_{kG..kG+G-1}``: ``chosen = argmax r``, ``rejected = argmin r`` (the first index on
    ties); a group whose rewards are all equal carries no preference and is skipped. This is the
    highest-vs-lowest selection of Self-Rewarding LMs (Yuan et al. 2024) applied to online
    samples (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback").

    Args:
      rewards: ``[B]`` finite scalar rewards.
      group_size: ``G`` ≥ 1 dividing ``B``.
    Returns:
      ``(chosen_idx [P], rejected_idx [P])`` int64 row indices into the batch, one pair per
      group with distinct rewards, in group order (``P ≤ B / G``).
    Raises:
      TypeError / ValueError: a non-1-D ``rewards``, a non-finite reward (naming its index),
        ``group_size`` < 1 or not dividing ``B``.
    """
    rewards = check_tensor("rewards", rewards, ndim=1)
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    batch = rewards.shape[0]
    if batch % group_size != 0:
        raise ValueError(
            f"group_size must divide the batch size {batch} (rows of a group are consecutive), "
            f"got group_size={group_size}"
        )
    rewards = rewards.detach()
    if rewards.is_floating_point():
        bad = ~torch.isfinite(rewards)
        if bool(bad.any()):
            index = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"rewards must be finite, got {rewards[index].item()} at index {index}"
            )
    grouped = rewards.reshape(-1, group_size)
    best = grouped.max(dim=1).values
    worst = grouped.min(dim=1).values
    positions = torch.arange(group_size, device=rewards.device).expand_as(grouped)
    beyond = torch.full_like(positions, group_size)
    # First position that attains the max / min (explicit, not relying on argmax tie rules).
    first_best = torch.where(grouped == best.unsqueeze(1), positions, beyond).min(dim=1).values
    first_worst = torch.where(grouped == worst.unsqueeze(1), positions, beyond).min(dim=1).values
    offsets = torch.arange(grouped.shape[0], device=rewards.device) * group_size
    keep = best != worst
    chosen = (offsets + first_best)[keep].to(torch.long)
    rejected = (offsets + first_worst)[keep].to(torch.long)
    return chosen, rejected


def compute_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Direct preference losses on per-sequence log-probs (summed over completion tokens).

    With the log-ratio margin ``h = (logπ_θ(y_c) - logπ_ref(y_c)) - (logπ_θ(y_r) - logπ_ref(y_r))``
    per pair, averaged over pairs::

        sigmoid  -log σ(β·h)          DPO (Rafailov et al. 2023, "Direct Preference
                                      Optimization", eq. 7)
        ipo      (h - 1/(2β))²        IPO (Azar et al. 2023, "A General Theoretical Paradigm to
                                      Understand Learning from Human Preferences")
        hinge    max(0, 1 - β·h)      SLiC-HF calibration loss (Zhao et al. 2023, "SLiC-HF:
                                      Sequence Likelihood Calibration with Human Feedback")

    The implicit reward of a completion is ``β·(logπ_θ(y) - logπ_ref(y))``. No pairs (``P = 0``)
    gives a loss of 0, not NaN.

    Args:
      policy_chosen_logps / policy_rejected_logps: ``[P]`` log π_θ of the chosen / rejected
        completions (differentiable).
      ref_chosen_logps / ref_rejected_logps: ``[P]`` log π_ref of the same completions.
      beta: β > 0.
      loss_type: one of ``DPO_LOSS_TYPES``.
    Returns:
      ``(loss, metrics)``: ``dpo_loss``; ``reward_accuracy`` (fraction of pairs with
      ``h > 0``); ``chosen_reward`` / ``rejected_reward`` (mean implicit rewards);
      ``reward_margin`` (mean ``β·h``).
    Raises:
      TypeError / ValueError: inputs that are not 1-D or differ in shape (naming both),
        ``beta`` ≤ 0, an unknown ``loss_type``.
    """
    policy_chosen_logps = check_float_tensor("policy_chosen_logps", policy_chosen_logps, ndim=1)
    others = {
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    for name, value in others.items():
        check_same_shape(
            name, check_float_tensor(name, value), "policy_chosen_logps", policy_chosen_logps
        )
    beta = _check_positive("beta", beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(DPO_LOSS_TYPES)}, got {loss_type!r}")

    like = policy_chosen_logps
    ref_chosen = ref_chosen_logps.detach().to(like)
    ref_rejected = ref_rejected_logps.detach().to(like)
    chosen_log_ratio = policy_chosen_logps - ref_chosen
    rejected_log_ratio = policy_rejected_logps.to(like) - ref_rejected
    margin = chosen_log_ratio - rejected_log_ratio
    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(beta * margin)
    elif loss_type == "ipo":
        per_pair = (margin - 1.0 / (2.0 * beta)).square()
    else:
        per_pair = torch.relu(1.0 - beta * margin)
    num_pairs = per_pair.shape[0]
    loss = per_pair.sum() / max(num_pairs, 1)

    def mean_value(x: torch.Tensor) -> float:
        return float(x.detach().mean()) if num_pairs > 0 else 0.0

    metrics = {
        "dpo_loss": float(loss.detach()),
        "reward_accuracy": mean_value((margin > 0).to(like.dtype)),
        "chosen_reward": mean_value(beta * chosen_log_ratio),
        "rejected_reward": mean_value(beta * rejected_log_ratio),
        "reward_margin": mean_value(beta * margin),
    }
    return loss, metrics
