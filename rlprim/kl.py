"""KL divergence between the policy and a reference model: estimators, KL functions, reference
models and their updaters.

Directions (used everywhere in rlprim):
  * reverse KL = KL(π_θ ‖ π_ref) = E_{y~π_θ}[log π_θ(y) - log π_ref(y)], the usual RLHF penalty;
  * forward KL = KL(π_ref ‖ π_θ) = E_{y~π_ref}[log π_ref(y) - log π_θ(y)].
Both are estimated from tokens sampled from π_θ. Per token, with ``d = logp - ref_logp``
(log-probs of the sampled token under the policy and the reference), Schulman's estimators
(http://joschu.net/blog/kl-approx.html) of the reverse KL are
  k1 = d,  k2 = d² / 2,  k3 = exp(-d) + d - 1.
k1 and k3 are unbiased, k3 is non-negative with low variance; k2 is biased (its expectation is
an f-divergence that matches KL to second order). The forward KL is estimated from the same
samples with the importance weight ``w = π_ref / π_θ = exp(-d)`` (see ``compute_forward_kl``).

A KL function (``KLFn``) is ``kl_fn(logprobs, ref_logprobs) -> per-token estimates`` of the same
shape; every function here that takes ``kl_fn=`` accepts any such function in place of the named
``estimator``. ``create_truncated_kl`` and ``create_adaptive_kl`` build such functions.

Reference models are frozen copies of the policy (``create_reference_model``). An updater is
``update_fn(ref_model, policy, step) -> ref_model``; it decides from ``step`` alone (no hidden
counters) and changes the reference's weights in place under ``torch.no_grad``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rlprim.checks import check_int, check_mask, check_number, check_positive
from rlprim.protocols import KLFn, RefModelUpdateFn

__all__ = [
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_low_var",
    "compute_per_token_kl",
    "compute_reverse_kl",
    "compute_forward_kl",
    "compute_batch_kl",
    "kl_from_logits",
    "create_truncated_kl",
    "create_adaptive_kl",
    "create_adaptive_kl_controller",
    "create_reference_model",
    "update_reference_model",
    "create_ema_updater",
    "create_periodic_updater",
]

# Log importance weights are clamped to this range before exp (e^20 ≈ 4.9e8 is finite in fp16
# once multiplied by small log-ratios, and in bf16/fp32).
LOG_WEIGHT_CLAMP = 20.0
# Ziegler et al. (2019) clip the proportional error of the adaptive KL controller to ±0.2.
CONTROLLER_ERROR_CLIP = 0.2
KL_DIRECTIONS = ("reverse", "forward")


# --------------------------------------------------------------------------- input checks


def _check_pair(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> None:
    if not isinstance(logprobs, torch.Tensor) or not isinstance(ref_logprobs, torch.Tensor):
        raise TypeError(
            "logprobs and ref_logprobs must be torch.Tensor, got "
            f"{type(logprobs).__name__} and {type(ref_logprobs).__name__}"
        )
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs and ref_logprobs must have the same shape, got {tuple(logprobs.shape)} "
            f"and {tuple(ref_logprobs.shape)}"
        )


def _check_mask(mask: object, like: torch.Tensor) -> torch.Tensor | None:
    """Returns the mask as a bool tensor on ``like``'s device, or ``None`` for "all valid"."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    return check_mask(mask, like, "logprobs")


def _apply_mask(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # torch.where, not a product: an inf/NaN estimate at a padded position must not leak.
    if mask is None:
        return values
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def _check_estimator(estimator: object) -> str:
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(KL_ESTIMATORS)}, got {estimator!r}")
    return estimator  # type: ignore[return-value]


def _check_direction(direction: object) -> str:
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"direction must be one of {list(KL_DIRECTIONS)}, got {direction!r}")
    return direction  # type: ignore[return-value]


def _check_kl_fn_output(out: object, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.shape != like.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"kl_fn must return a tensor of the logprobs' shape {tuple(like.shape)}, got {got}"
        )
    return out


def _check_finite_number(name: str, value: object) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    return check_number(name, value)


def _check_module(name: str, value: object) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- estimators


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 estimator of the reverse KL per token: ``d = logp - ref_logp``.

    Unbiased for KL(π_θ ‖ π_ref) when tokens are sampled from π_θ, but high-variance and can be
    negative per sample (Schulman 2020, "Approximating KL Divergence").

    Args:
      logprobs: ``[...]`` log π_θ of the sampled tokens.
      ref_logprobs: ``[...]`` log π_ref of the same tokens.
    Returns:
      ``[...]`` per-token estimates.
    """
    _check_pair(logprobs, ref_logprobs)
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 estimator per token: ``d² / 2`` with ``d = logp - ref_logp``.

    Non-negative and low-variance, but biased: its expectation is an f-divergence that agrees
    with KL only to second order (Schulman 2020). Its gradient equals the gradient of the
    reverse KL under on-policy sampling, which is why some GRPO variants use it in the loss.

    Args:
      logprobs: ``[...]`` log π_θ of the sampled tokens.
      ref_logprobs: ``[...]`` log π_ref of the same tokens.
    Returns:
      ``[...]`` per-token estimates.
    """
    _check_pair(logprobs, ref_logprobs)
    return 0.5 * (logprobs - ref_logprobs).square()


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator of the reverse KL per token: ``exp(-d) + d - 1`` with ``d = logp - ref_logp``.

    Unbiased for KL(π_θ ‖ π_ref) under sampling from π_θ (``E[exp(-d)] = 1``) and non-negative
    per sample (Schulman 2020). The GRPO paper's KL term (Shao et al. 2024, eq. 4).

    Args:
      logprobs: ``[...]`` log π_θ of the sampled tokens.
      ref_logprobs: ``[...]`` log π_ref of the same tokens.
    Returns:
      ``[...]`` per-token estimates, ≥ 0.
    """
    _check_pair(logprobs, ref_logprobs)
    d = logprobs - ref_logprobs
    return torch.exp(-d) + d - 1.0


def kl_low_var(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 with clamps, safe in low precision: ``clamp(exp(c) - c - 1, -10, 10)``.

    With ``d = logp - ref_logp`` and ``c = clamp(-d, -20, 20)``; equal to ``kl_k3`` wherever
    ``|d| ≤ 20`` and the result is ≤ 10 (the "low_var_kl" of verl).

    Args:
      logprobs: ``[...]`` log π_θ of the sampled tokens.
      ref_logprobs: ``[...]`` log π_ref of the same tokens.
    Returns:
      ``[...]`` per-token estimates in ``[0, 10]``.
    """
    _check_pair(logprobs, ref_logprobs)
    c = torch.clamp(ref_logprobs - logprobs, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(c) - c - 1.0, min=-10.0, max=10.0)


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3, "low_var": kl_low_var}


def compute_per_token_kl(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "k3",
    kl_fn: KLFn | None = None,
) -> torch.Tensor:
    """Per-token reverse-KL estimate ``KL(π_θ ‖ π_ref)`` for sampled tokens.

    ``estimator`` names one of ``"k1"``, ``"k2"``, ``"k3"``, ``"low_var"`` (see their
    docstrings); ``kl_fn(logprobs, ref_logprobs) -> [...]`` overrides it with any ``KLFn``.

    Args:
      logprobs: ``[B, T]`` log π_θ of the sampled tokens.
      ref_logprobs: ``[B, T]`` log π_ref of the same tokens.
      estimator: the estimator's name.
      kl_fn: an optional replacement estimator; it must return a tensor of the inputs' shape.
    Returns:
      ``[B, T]`` per-token estimates (unmasked: multiply by the completion mask to reduce).
    """
    if kl_fn is not None:
        _check_pair(logprobs, ref_logprobs)
        return _check_kl_fn_output(kl_fn(logprobs, ref_logprobs), logprobs)
    return KL_ESTIMATORS[_check_estimator(estimator)](logprobs, ref_logprobs)


# --------------------------------------------------------------------------- KL functions


def compute_reverse_kl(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    estimator: str = "k3",
    kl_fn: KLFn | None = None,
) -> torch.Tensor:
    """Per-token estimates of the reverse KL, KL(π_θ ‖ π_ref), from tokens sampled from π_θ.

    ``KL(π_θ ‖ π_ref) = E_{y~π_θ}[log π_θ(y) - log π_ref(y)]``, estimated per token by
    ``estimator`` (k1 ``d``, k2 ``d²/2``, k3 ``exp(-d) + d - 1``, low_var clamped k3, with
    ``d = logp - ref_logp``; Schulman 2020) or by ``kl_fn(logprobs, ref_logprobs)``. This is the
    KL penalty of RLHF (Ziegler et al. 2019; Ouyang et al. 2022) and GRPO (Shao et al. 2024).

    Args:
      logprobs: ``[...]`` (usually ``[B, T]``) log π_θ of the sampled tokens.
      ref_logprobs: ``[...]`` log π_ref of the same tokens.
      mask: optional ``[...]`` 0/1 (or bool) mask; 1 = a token that counts.
      estimator: ``"k1"``, ``"k2"``, ``"k3"`` or ``"low_var"``.
      kl_fn: an optional ``KLFn`` replacing ``estimator``.
    Returns:
      ``[...]`` per-token estimates, exactly 0 where ``mask`` is 0 (even if the inputs there are
      inf or NaN).
    """
    _check_pair(logprobs, ref_logprobs)
    mask = _check_mask(mask, logprobs)
    if kl_fn is None:
        _check_estimator(estimator)
    return _apply_mask(compute_per_token_kl(logprobs, ref_logprobs, estimator, kl_fn), mask)


def _forward_estimate(log_weight: torch.Tensor, estimator: str) -> torch.Tensor:
    """Named forward-KL estimates as functions of the clamped log-weight ``u = ref_logp - logp``."""
    weight = torch.exp(log_weight)
    if estimator == "k1":
        return weight * log_weight
    if estimator == "k2":
        return 0.5 * weight * log_weight.square()
    k3 = 1.0 + (log_weight - 1.0) * weight
    if estimator == "k3":
        return k3
    return torch.clamp(k3, min=-10.0, max=10.0)  # low_var


def compute_forward_kl(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    estimator: str = "k3",
    kl_fn: KLFn | None = None,
) -> torch.Tensor:
    """Per-token estimates of the forward KL, KL(π_ref ‖ π_θ), from tokens sampled from π_θ.

    ``KL(π_ref ‖ π_θ) = E_{y~π_ref}[u(y)]`` with ``u = log π_ref(y) - log π_θ(y)``. The tokens
    come from π_θ, so each per-token estimate ``f`` of the KL under π_ref-samples is
    importance-weighted by ``w = π_ref(y) / π_θ(y) = exp(u)``: ``E_{π_θ}[w f] = E_{π_ref}[f]``
    (Schulman 2020's estimators with the roles of the two distributions swapped):

      k1:      ``w · u``                                     (``E_{π_ref}[u]`` = KL, unbiased)
      k2:      ``w · u² / 2``                                (biased, like reverse k2)
      k3:      ``w · (exp(-u) - 1 + u) = 1 + (u - 1) · w``  (unbiased, ≥ 0)
      low_var: k3 clamped to ``[-10, 10]``.

    k3 is unbiased because ``E_{π_ref}[exp(-u)] = E_{π_ref}[π_θ/π_ref] = 1``, and non-negative
    because ``exp(-u) - 1 + u ≥ 0`` and ``w > 0``. The log-weight ``u`` is clamped to ``±20``
    before use, so every estimate is finite; for ``|u| ≤ 20`` the formulas are exact. Unbiasedness
    needs π_θ > 0 wherever π_ref > 0 (true for softmax policies). These are value estimates: their
    pathwise gradients are not the gradient of the forward KL.

    A ``kl_fn`` is called with the roles swapped, ``kl_fn(ref_logprobs, logprobs)`` — it is asked
    for an estimate of KL(π_ref ‖ π_θ) as if the token came from π_ref — and its output is
    multiplied by ``exp(clamp(u, -20, 20))``; ``kl_fn=kl_k3`` then equals ``estimator="k3"``
    wherever ``|u| ≤ 20``, and any ``KLFn`` (e.g. from ``create_truncated_kl``) works in both
    directions.

    Args:
      logprobs: ``[...]`` log π_θ of the sampled tokens (sampled from π_θ).
      ref_logprobs: ``[...]`` log π_ref of the same tokens.
      mask: optional ``[...]`` 0/1 (or bool) mask; 1 = a token that counts.
      estimator: ``"k1"``, ``"k2"``, ``"k3"`` or ``"low_var"``.
      kl_fn: an optional ``KLFn`` replacing ``estimator`` (see above).
    Returns:
      ``[...]`` per-token estimates, exactly 0 where ``mask`` is 0.
    """
    _check_pair(logprobs, ref_logprobs)
    mask = _check_mask(mask, logprobs)
    if kl_fn is None:
        _check_estimator(estimator)
    log_weight = torch.clamp(ref_logprobs - logprobs, min=-LOG_WEIGHT_CLAMP, max=LOG_WEIGHT_CLAMP)
    if kl_fn is not None:
        swapped = _check_kl_fn_output(kl_fn(ref_logprobs, logprobs), logprobs)
        return _apply_mask(torch.exp(log_weight) * swapped, mask)
    return _apply_mask(_forward_estimate(log_weight, estimator), mask)


def compute_batch_kl(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "k3",
    kl_fn: KLFn | None = None,
    direction: str = "reverse",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence KL estimates and their batch mean.

    ``kl_seq[b] = Σ_t mask[b, t] · k(b, t)`` — the estimate of the KL between the policy's and the
    reference's distributions over whole completions, since the sequence KL is the sum of the
    per-token KLs along the sampled prefix (chain rule) — and ``kl_mean = (1/B) Σ_b kl_seq[b]``.
    ``k`` is ``compute_reverse_kl`` (default) or ``compute_forward_kl`` per ``direction``. This is
    the quantity an adaptive KL controller observes (Ziegler et al. 2019). For the mean per token
    instead, divide ``kl_seq.sum()`` by ``mask.sum()``.

    Args:
      logprobs: ``[B, T]`` log π_θ of the sampled tokens.
      ref_logprobs: ``[B, T]`` log π_ref of the same tokens.
      mask: ``[B, T]`` 0/1 (or bool) completion mask; 1 = a token that counts.
      estimator: ``"k1"``, ``"k2"``, ``"k3"`` or ``"low_var"``.
      kl_fn: an optional ``KLFn`` replacing ``estimator``.
      direction: ``"reverse"`` (KL(π_θ ‖ π_ref)) or ``"forward"`` (KL(π_ref ‖ π_θ)).
    Returns:
      ``(kl_seq [B], kl_mean [])``.
    """
    _check_pair(logprobs, ref_logprobs)
    if logprobs.dim() != 2:
        raise ValueError(
            f"logprobs must have 2 dimensions [B, T], got shape {tuple(logprobs.shape)}"
        )
    if logprobs.shape[0] == 0:
        raise ValueError("logprobs must hold at least one sequence, got B = 0")
    if mask is None:
        raise ValueError("mask is required ([B, T] completion mask), got None")
    kl_fn_by_direction = {"reverse": compute_reverse_kl, "forward": compute_forward_kl}
    per_token = kl_fn_by_direction[_check_direction(direction)](
        logprobs, ref_logprobs, mask=mask, estimator=estimator, kl_fn=kl_fn
    )
    kl_seq = per_token.sum(dim=-1)
    return kl_seq, kl_seq.mean()


def kl_from_logits(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    direction: str = "reverse",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Exact KL per position between the full next-token distributions of two models.

    With ``log p = log_softmax(logits / T)`` (policy) and ``log q = log_softmax(ref_logits / T)``
    (reference):
      reverse: ``KL(p ‖ q) = Σ_v p_v (log p_v - log q_v)``;
      forward: ``KL(q ‖ p) = Σ_v q_v (log q_v - log p_v)``.
    Terms with zero mass (``-inf`` logits) contribute 0; the result is clamped at 0 from below to
    remove rounding error (the exact KL is ≥ 0, Gibbs' inequality). Differentiable. It
    materialises ``[..., V]`` log-softmaxes: use it when full logits are at hand (distillation,
    analysis); for sampled tokens use the estimators (``compute_reverse_kl``).

    Args:
      logits: ``[..., V]`` policy logits.
      ref_logits: ``[..., V]`` reference logits.
      direction: ``"reverse"`` (KL(π_θ ‖ π_ref)) or ``"forward"`` (KL(π_ref ‖ π_θ)).
      temperature: softmax temperature ``T > 0``, the generation temperature.
    Returns:
      ``[...]`` KL per position, in float32 (or float64 for float64 inputs).
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(ref_logits, torch.Tensor):
        raise TypeError(
            "logits and ref_logits must be torch.Tensor, got "
            f"{type(logits).__name__} and {type(ref_logits).__name__}"
        )
    if logits.shape != ref_logits.shape:
        raise ValueError(
            f"logits and ref_logits must have the same shape [..., V], got "
            f"{tuple(logits.shape)} and {tuple(ref_logits.shape)}"
        )
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(
            f"logits must have a non-empty vocabulary dimension [..., V], got shape "
            f"{tuple(logits.shape)}"
        )
    direction = _check_direction(direction)
    temperature = check_positive("temperature", temperature)
    # At least float32: a bf16/fp16 log-softmax over a large vocabulary loses the KL's digits.
    dtype = torch.promote_types(torch.promote_types(logits.dtype, ref_logits.dtype), torch.float32)
    log_p = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    log_q = torch.log_softmax(ref_logits.to(dtype) / temperature, dim=-1)
    if direction == "forward":
        log_p, log_q = log_q, log_p
    p = log_p.exp()
    # Zero-mass terms are 0 (0 · log 0 = 0); torch.where keeps their NaN out of the gradient too.
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=dtype, device=p.device))
    return terms.sum(dim=-1).clamp_min(0.0)


# --------------------------------------------------------------------------- KL function factories


def create_truncated_kl(threshold: float, estimator: str = "k3") -> KLFn:
    """A ``KLFn`` whose per-token estimates are clamped to ``[-threshold, threshold]``.

    ``kl(t) = clamp(k(t), -τ, τ)`` with ``k`` the named estimator and ``τ = threshold``. A few
    rare tokens where policy and reference disagree strongly (``|d|`` large) can dominate a
    sequence's KL sum and its gradient; truncation caps each token's contribution, and a capped
    token passes no gradient, so the penalty stops pulling on outliers while acting normally on
    the rest. For the non-negative estimators (k2, k3, low_var) only the upper cap is active; k1
    is capped on both sides. The result is a biased (downward in magnitude) estimate of the KL.

    Args:
      threshold: ``τ > 0``, the largest per-token contribution.
      estimator: ``"k1"``, ``"k2"``, ``"k3"`` or ``"low_var"``.
    Returns:
      ``kl_fn(logprobs [...], ref_logprobs [...]) -> [...]``.
    """
    threshold = check_positive("threshold", threshold)
    base = KL_ESTIMATORS[_check_estimator(estimator)]

    def truncated_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
        return torch.clamp(base(logprobs, ref_logprobs), min=-threshold, max=threshold)

    return truncated_kl


def create_adaptive_kl(confidence_threshold: float, estimator: str = "k3") -> KLFn:
    """A ``KLFn`` that penalises only the tokens the policy is confident about.

    ``kl(t) = k(t) · 1[π_θ(y_t) ≥ c]`` with ``k`` the named estimator, ``π_θ(y_t) = exp(logp)``
    the policy's probability of the sampled token and ``c = confidence_threshold``; the gate is
    not differentiated. Rationale: tokens where the policy is uncertain are its decision points
    ("forking" high-entropy tokens, which carry most of the useful RL signal — Wang et al. 2025,
    "Beyond the 80/20 Rule"), so they are left free to move; tokens the policy has become
    confident about are where drift from the reference hardens into mode collapse or reward
    hacking (a token the reference finds unlikely but the policy now emits with high
    probability), so they stay anchored. Where both models are confident on the same token the
    estimate is ≈ 0 anyway.

    Args:
      confidence_threshold: ``c ∈ (0, 1]``; tokens with ``π_θ(y_t) ≥ c`` are penalised.
      estimator: ``"k1"``, ``"k2"``, ``"k3"`` or ``"low_var"``.
    Returns:
      ``kl_fn(logprobs [...], ref_logprobs [...]) -> [...]``, 0 on unconfident tokens.
    """
    confidence_threshold = check_positive("confidence_threshold", confidence_threshold)
    if confidence_threshold > 1.0:
        raise ValueError(
            f"confidence_threshold must be a probability in (0, 1], got {confidence_threshold}"
        )
    base = KL_ESTIMATORS[_check_estimator(estimator)]
    log_threshold = math.log(confidence_threshold)  # compare in log space: no exp underflow

    def adaptive_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
        estimate = base(logprobs, ref_logprobs)
        confident = logprobs.detach() >= log_threshold
        return torch.where(confident, estimate, torch.zeros_like(estimate))

    return adaptive_kl


def create_adaptive_kl_controller(
    init_coef: float, target: float, horizon: float
) -> Callable[..., float]:
    """The adaptive KL coefficient controller of Ziegler et al. (2019), as a pure function.

    Returns ``update(coef, observed_kl, n_steps=1) -> new_coef`` with
      ``e = clip(observed_kl / target - 1, -0.2, 0.2)``,
      ``new_coef = coef · (1 + e · n_steps / horizon)``,
    so β grows when the observed KL is above ``target`` and shrinks when below, by at most
    ``20% · n_steps / horizon`` per call ("Fine-Tuning Language Models from Human Preferences",
    §2.2). ``observed_kl`` is the mean sequence KL (``compute_batch_kl``'s second output) and
    ``n_steps`` the number of samples (or steps) since the last update.

    The controller keeps no state: the caller stores the coefficient (``TrainingState.kl_coef``)
    and passes it back. ``init_coef`` is the starting coefficient: ``update(None, ...)`` starts
    from it (``update(None, kl, n) == update(init_coef, kl, n)``).

    Args:
      init_coef: the initial coefficient β₀ ≥ 0.
      target: the target KL (> 0), in the units of ``observed_kl``.
      horizon: ``> 0``; the number of steps over which β changes by a factor of ``1 + e``.
    Returns:
      ``update(coef: float | None, observed_kl: float | Tensor, n_steps: int = 1) -> float``.
      ``update`` raises ValueError if ``n_steps ≥ 5 · horizon`` (β would reach 0 or below).
    """
    init_coef = _check_finite_number("init_coef", init_coef)
    if init_coef < 0:
        raise ValueError(f"init_coef must be >= 0, got {init_coef}")
    target = check_positive("target", target)
    horizon = check_positive("horizon", horizon)

    def update(coef: float | None, observed_kl: float | torch.Tensor, n_steps: int = 1) -> float:
        coef = init_coef if coef is None else _check_finite_number("coef", coef)
        if coef < 0:
            raise ValueError(f"coef must be >= 0, got {coef}")
        observed_kl = _check_finite_number("observed_kl", observed_kl)
        n_steps = check_int("n_steps", n_steps, 0)
        if n_steps * CONTROLLER_ERROR_CLIP >= horizon:
            raise ValueError(
                f"n_steps must be < 5 · horizon = {5 * horizon} so the coefficient stays "
                f"positive, got {n_steps}"
            )
        error = min(max(observed_kl / target - 1.0, -CONTROLLER_ERROR_CLIP), CONTROLLER_ERROR_CLIP)
        return coef * (1.0 + error * n_steps / horizon)

    return update


# --------------------------------------------------------------------------- reference models


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
        parameter.grad = None
    return model


def create_reference_model(model: nn.Module) -> nn.Module:
    """A frozen, independent copy of ``model`` to serve as π_ref.

    ``copy.deepcopy`` (same device and dtype, no storage shared with ``model``), put in eval mode
    (dropout off), with ``requires_grad = False`` and no ``.grad`` on every parameter, so the KL
    penalty never trains it (Ziegler et al. 2019; Ouyang et al. 2022). ``model`` is not changed.

    Args:
      model: the policy, a ``torch.nn.Module`` (unwrap DDP first: pass ``ddp_model.module``).
    Returns:
      the frozen copy.
    """
    _check_module("model", model)
    return _freeze(copy.deepcopy(model))


def update_reference_model(
    ref_model: nn.Module, policy: nn.Module, update_fn: RefModelUpdateFn, step: int
) -> nn.Module:
    """Refresh the reference model with ``update_fn(ref_model, policy, step)``.

    Checks the inputs, calls the updater (``create_ema_updater``, ``create_periodic_updater`` or
    any function with that signature) and checks it returned an ``nn.Module`` sharing no
    parameter storage with the policy (a reference aliased to the policy would make the KL
    identically 0, and freezing it would freeze the policy). The result
    is frozen again (eval mode, no grad), so an updater may return a fresh ``deepcopy``.

    Args:
      ref_model: the current reference model.
      policy: the policy being trained.
      update_fn: ``update_fn(ref_model, policy, step) -> ref_model``.
      step: the training step (optimizer updates made so far), ≥ 0.
    Returns:
      the (possibly new) reference model.
    """
    _check_module("ref_model", ref_model)
    _check_module("policy", policy)
    if not callable(update_fn):
        raise TypeError(f"update_fn must be callable, got {type(update_fn).__name__}")
    step = check_int("step", step, 0)
    return _frozen_reference(update_fn(ref_model, policy, step), policy, "update_fn")


def _frozen_reference(new_ref: Any, policy: nn.Module, source: str) -> nn.Module:
    """``new_ref`` frozen, after checking it is a module sharing no storage with ``policy``
    (``source`` names the function that made it)."""
    if not isinstance(new_ref, nn.Module):
        raise TypeError(
            f"{source} must return the reference model (a torch.nn.Module), got "
            f"{type(new_ref).__name__}"
        )
    policy_storages = {p.untyped_storage().data_ptr() for p in policy.parameters()} - {0}
    if new_ref is policy or any(
        p.untyped_storage().data_ptr() in policy_storages for p in new_ref.parameters()
    ):
        raise ValueError(
            f"{source} returned a model that shares parameters with the policy; the reference "
            "must be a separate copy (e.g. create_reference_model(policy))"
        )
    return _freeze(new_ref)


def _matched_tensors(
    ref_model: nn.Module, policy: nn.Module
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Pairs (ref, policy) parameters and buffers by name, checking names and shapes first."""
    pairs = []
    for kind, ref_items, policy_items in (
        ("parameters", dict(ref_model.named_parameters()), dict(policy.named_parameters())),
        ("buffers", dict(ref_model.named_buffers()), dict(policy.named_buffers())),
    ):
        if ref_items.keys() != policy_items.keys():
            missing = sorted(ref_items.keys() ^ policy_items.keys())
            raise ValueError(
                f"ref_model and policy must have the same {kind}; names in only one of them: "
                f"{missing[:5]}"
            )
        kind_pairs = []
        for name, ref_tensor in ref_items.items():
            policy_tensor = policy_items[name]
            if ref_tensor.shape != policy_tensor.shape:
                raise ValueError(
                    f"ref_model and policy disagree on the shape of {name!r}: "
                    f"{tuple(ref_tensor.shape)} vs {tuple(policy_tensor.shape)}"
                )
            kind_pairs.append((ref_tensor, policy_tensor))
        pairs.append(kind_pairs)
    return pairs[0], pairs[1]


def _is_update_step(step: int, update_every: int) -> bool:
    return step > 0 and step % update_every == 0


def create_ema_updater(decay: float, update_every: int = 1) -> RefModelUpdateFn:
    """An updater that moves the reference towards the policy by an exponential moving average.

    At steps ``step > 0`` with ``step % update_every == 0``, every reference parameter becomes
    ``θ_ref ← decay · θ_ref + (1 - decay) · θ``, in place under ``torch.no_grad``, and buffers
    (e.g. normalisation statistics) are copied from the policy; at other steps the reference is
    returned unchanged. ``decay = 0`` copies the policy exactly, ``decay = 1`` keeps the reference
    as it is. A slowly moving reference ("reference resetting" / EMA anchors, as in TR-DPO,
    Gorbatovski et al. 2024) lets the policy drift further over long runs while still being
    regularised locally. The updater holds no state: what it does depends only on ``step``.

    Args:
      decay: ``∈ [0, 1]``, the weight kept on the old reference.
      update_every: ``≥ 1``; update at positive multiples of this step.
    Returns:
      ``update_fn(ref_model, policy, step) -> ref_model`` (the same object, updated in place).
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(f"decay must be a float in [0, 1], got {type(decay).__name__}")
    if not (0.0 <= decay <= 1.0):  # also rejects NaN
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    decay = float(decay)
    update_every = check_int("update_every", update_every, 1)

    def ema_update(ref_model: nn.Module, policy: nn.Module, step: int) -> nn.Module:
        _check_module("ref_model", ref_model)
        _check_module("policy", policy)
        step = check_int("step", step, 0)
        params, buffers = _matched_tensors(ref_model, policy)  # all checks before any change
        if not _is_update_step(step, update_every) or decay == 1.0:
            return ref_model
        with torch.no_grad():
            for ref_p, policy_p in params:
                source = policy_p.to(device=ref_p.device, dtype=ref_p.dtype)
                if decay == 0.0:
                    ref_p.copy_(source)  # exact, even if the old reference held inf/NaN
                else:
                    ref_p.mul_(decay).add_(source, alpha=1.0 - decay)
            for ref_b, policy_b in buffers:
                ref_b.copy_(policy_b)
        return ref_model

    return ema_update


def create_periodic_updater(update_every: int) -> RefModelUpdateFn:
    """An updater that copies the policy's weights into the reference every ``update_every`` steps.

    At steps ``step > 0`` with ``step % update_every == 0`` the reference's parameters and buffers
    are overwritten with the policy's (in place, under ``torch.no_grad``, keeping the reference's
    device, dtype and frozen state); at other steps it is returned unchanged. Periodic reference
    resets let the KL anchor follow the policy over long runs (e.g. TR-DPO's hard update,
    Gorbatovski et al. 2024; the reference reset of ProRL, Liu et al. 2025). No hidden state:
    the decision depends only on ``step``.

    Args:
      update_every: ``≥ 1``; copy at positive multiples of this step.
    Returns:
      ``update_fn(ref_model, policy, step) -> ref_model`` (the same object, updated in place).
    """
    update_every = check_int("update_every", update_every, 1)

    def periodic_update(ref_model: nn.Module, policy: nn.Module, step: int) -> nn.Module:
        _check_module("ref_model", ref_model)
        _check_module("policy", policy)
        step = check_int("step", step, 0)
        params, buffers = _matched_tensors(ref_model, policy)
        if not _is_update_step(step, update_every):
            return ref_model
        with torch.no_grad():
            for ref_tensor, policy_tensor in params + buffers:
                ref_tensor.copy_(policy_tensor)
        return ref_model

    return periodic_update
