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
an f-divergence that matches KL to second order).
"""

from __future__ import annotations

import torch

__all__ = [
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_low_var",
    "compute_per_token_kl",
]


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
    kl_fn=None,
) -> torch.Tensor:
    """Per-token reverse-KL estimate ``KL(π_θ ‖ π_ref)`` for sampled tokens.

    ``estimator`` names one of ``"k1"``, ``"k2"``, ``"k3"``, ``"low_var"`` (see their
    docstrings); ``kl_fn(logprobs, ref_logprobs) -> [...]`` overrides it with any ``KLFn``.

    Args:
      logprobs: ``[B, T]`` log π_θ of the sampled tokens.
      ref_logprobs: ``[B, T]`` log π_ref of the same tokens.
      estimator: the estimator's name.
      kl_fn: an optional replacement estimator.
    Returns:
      ``[B, T]`` per-token estimates (unmasked: multiply by the completion mask to reduce).
    """
    if kl_fn is not None:
        _check_pair(logprobs, ref_logprobs)
        return kl_fn(logprobs, ref_logprobs)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"estimator must be one of {sorted(KL_ESTIMATORS)}, got {estimator!r}"
        )
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)
