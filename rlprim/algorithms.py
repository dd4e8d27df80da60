"""Algorithms as data: ``AlgorithmConfig``, each algorithm's published defaults, and a registry
mapping a name to its advantage and loss functions.

An algorithm is an ``Algorithm(advantage_fn, loss_fn, needs_ref, needs_value, defaults)``
record. The built-in registry ``ALGORITHMS`` is a read-only mapping; ``register_algorithm``
returns a *new* registry with one more entry (no global state is changed, no subclassing), and
every function that looks an algorithm up takes ``registry=`` so a user's registry flows
explicitly through their code::

    my_registry = register_algorithm("my_pg", Algorithm(my_adv, my_loss), registry=ALGORITHMS)
    config = create_algorithm_config("my_pg", registry=my_registry)
    loss, metrics = compute_loss_by_algorithm(config, batch, new_logprobs, registry=my_registry)
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

from rlprim.advantages import (
    compute_grpo_advantages,
    compute_ppo_advantages,
    compute_reinforce_advantages,
    compute_rloo_advantages,
    whiten,
)
from rlprim.kl import KL_ESTIMATORS, compute_per_token_kl
from rlprim.losses import (
    DPO_LOSS_TYPES,
    LOSS_AGG_MODES,
    aggregate_loss,
    compute_cispo_loss,
    compute_dpo_loss,
    compute_dpo_pairs,
    compute_entropy_bonus,
    compute_gspo_loss,
    compute_ppo_loss,
    compute_reinforce_loss,
    compute_tis_weights,
    compute_value_loss,
)
from rlprim.types import Algorithm, AlgorithmConfig, Batch

__all__ = [
    "ALGORITHMS",
    "create_algorithm_config",
    "validate_algorithm_config",
    "register_algorithm",
    "get_algorithm",
    "requires_reference_model",
    "compute_advantages_by_algorithm",
    "compute_loss_by_algorithm",
    "group_size_from_ids",
    "group_advantage_fn",
    "rloo_advantage_fn",
    "reinforce_advantage_fn",
    "ppo_advantage_fn",
    "clipped_policy_loss_fn",
    "gspo_loss_fn",
    "cispo_loss_fn",
    "reinforce_loss_fn",
    "ppo_loss_fn",
    "dpo_loss_fn",
]

_SCALES = ("group", "batch", "none")
_BASELINES = ("none", "group", "batch")


# --------------------------------------------------------------------------------------------
# Helpers shared by the registry's functions.
# --------------------------------------------------------------------------------------------


def group_size_from_ids(group_ids: torch.Tensor) -> int:
    """The common size ``G`` of consecutive groups described by ``group_ids [B]``.

    Rows of a group are consecutive (``[0, 0, 1, 1, 2, 2]`` → 2). All groups must have the same
    size; the advantage functions need that to reshape ``[B]`` to ``[B / G, G]``.

    Args:
      group_ids: ``[B]`` integer group index of each row.
    Returns:
      ``G``, the size of every group.
    """
    ids = torch.as_tensor(group_ids).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("group_ids must not be empty")
    change = torch.ones(ids.numel(), dtype=torch.bool)
    change[1:] = ids[1:] != ids[:-1]
    starts = torch.nonzero(change).reshape(-1).tolist() + [ids.numel()]
    sizes = {b - a for a, b in zip(starts[:-1], starts[1:], strict=True)}
    if len(sizes) != 1:
        raise ValueError(
            "group_ids must describe consecutive groups of one size, got sizes "
            f"{sorted(sizes)} from group_ids={ids.tolist()[:32]}"
        )
    n_groups = len(starts) - 1
    if len(set(ids.tolist())) != n_groups:
        raise ValueError(
            f"group_ids must keep each group's rows consecutive, got {ids.tolist()[:32]}"
        )
    return sizes.pop()


def _penalised_sequence_rewards(rewards, config, kl, mask, kl_coef):
    """``r - β·Σ_t KL_t`` when the KL goes in the reward (for sequence-level advantages)."""
    if config.kl_in_reward and kl is not None and kl_coef:
        if mask is None:
            raise ValueError("mask is required with kl when config.kl_in_reward is True")
        return rewards - kl_coef * (kl * mask).sum(dim=-1)
    return rewards


def _current_kl_coef(config: AlgorithmConfig, kl_coef: float | None) -> float:
    return config.kl_coef if kl_coef is None else float(kl_coef)


# --------------------------------------------------------------------------------------------
# Advantage functions: fn(rewards [B], config, **extras) -> advantages [B] or [B, Tc].
# --------------------------------------------------------------------------------------------


def group_advantage_fn(
    rewards: torch.Tensor,
    config: AlgorithmConfig,
    *,
    group_size: int,
    mask: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float | None = None,
    **_: Any,
) -> torch.Tensor:
    """Group-relative advantages (GRPO / Dr. GRPO / DAPO / GSPO / CISPO): ``[B]``.

    ``A_i = (r_i - mean_g) / (std_g + ε)`` with ``config.scale_rewards`` choosing the std
    (``"group"``, ``"batch"`` or ``"none"``) and ``ε = config.adv_eps``; see
    ``compute_grpo_advantages``. When ``config.kl_in_reward``, ``r_i`` is first penalised by
    ``β · Σ_t KL_t`` over the mask. Shao et al. 2024 (GRPO); Liu et al. 2025 (Dr. GRPO).

    Args:
      rewards: ``[B]`` scalar rewards, groups of ``group_size`` consecutive rows.
      config: the algorithm configuration.
      group_size: ``G``.
      mask / kl: ``[B, Tc]`` completion mask and per-token KL, used only with ``kl_in_reward``.
      kl_coef: the β in force (defaults to ``config.kl_coef``).
    """
    r = _penalised_sequence_rewards(rewards, config, kl, mask, _current_kl_coef(config, kl_coef))
    adv = compute_grpo_advantages(
        r, group_size, scale=config.scale_rewards, eps=config.adv_eps
    )
    return whiten(adv) if config.whiten_advantages else adv


def rloo_advantage_fn(
    rewards: torch.Tensor,
    config: AlgorithmConfig,
    *,
    group_size: int,
    mask: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float | None = None,
    **_: Any,
) -> torch.Tensor:
    """RLOO advantages ``A_i = r_i - (Σ_j r_j - r_i) / (G - 1)``: ``[B]``.

    Each sample's baseline is the mean reward of the other samples of its prompt (Kool et al.
    2019; Ahmadian et al. 2024). KL-in-reward and whitening as in ``group_advantage_fn``.

    Args:
      rewards: ``[B]`` scalar rewards, groups of ``group_size ≥ 2`` consecutive rows.
      config: the algorithm configuration.
      group_size: ``G``.
    """
    r = _penalised_sequence_rewards(rewards, config, kl, mask, _current_kl_coef(config, kl_coef))
    adv = compute_rloo_advantages(r, group_size)
    return whiten(adv) if config.whiten_advantages else adv


def reinforce_advantage_fn(
    rewards: torch.Tensor,
    config: AlgorithmConfig,
    *,
    group_size: int | None = None,
    mask: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float | None = None,
    **_: Any,
) -> torch.Tensor:
    """REINFORCE advantages ``A_i = r_i - b`` (``b`` from ``config.reinforce_baseline``): ``[B]``.

    With ``config.whiten_advantages`` the advantages are whitened over the batch
    (REINFORCE++, Hu 2025). Williams 1992.

    Args:
      rewards: ``[B]`` scalar rewards.
      config: the algorithm configuration.
      group_size: ``G`` (needed for the ``"group"`` baseline).
    """
    r = _penalised_sequence_rewards(rewards, config, kl, mask, _current_kl_coef(config, kl_coef))
    return compute_reinforce_advantages(
        r,
        group_size=group_size,
        baseline=config.reinforce_baseline,
        whiten=config.whiten_advantages,
    )


def ppo_advantage_fn(
    rewards: torch.Tensor,
    config: AlgorithmConfig,
    *,
    values: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float | None = None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-for-LLMs advantages and returns: ``([B, Tc], [B, Tc])``.

    Per-token reward ``r_t = -β·KL_t`` plus the sequence reward on the last action token, then
    GAE with ``config.gamma`` and ``config.gae_lambda`` (Ziegler et al. 2019; Ouyang et al.
    2022; Schulman et al. 2016). Advantages are whitened over the mask when
    ``config.whiten_advantages``. Returns ``(advantages, returns)``; returns are the critic's
    targets.

    Args:
      rewards: ``[B]`` sequence rewards.
      config: the algorithm configuration.
      values: ``[B, Tc]`` critic values at sampling time (required).
      mask: ``[B, Tc]`` completion mask (required).
      kl: ``[B, Tc]`` per-token KL, used when ``config.kl_in_reward``.
      kl_coef: the β in force (defaults to ``config.kl_coef``).
    """
    if values is None or mask is None:
        raise ValueError("ppo_advantage_fn needs values [B, Tc] and mask [B, Tc], got None")
    beta = _current_kl_coef(config, kl_coef)
    use_kl = config.kl_in_reward and kl is not None and beta > 0
    adv, ret = compute_ppo_advantages(
        rewards,
        values,
        kl if use_kl else None,
        mask,
        kl_coef=beta if use_kl else 0.0,
        gamma=config.gamma,
        lam=config.gae_lambda,
    )
    if config.whiten_advantages:
        adv = whiten(adv, mask)
    return adv, ret


# --------------------------------------------------------------------------------------------
# Loss functions: fn(batch, new_logprobs [B, Tc], config, **extras) -> (loss, metrics).
# --------------------------------------------------------------------------------------------


def _old_logprobs(batch: Batch, new_logprobs: torch.Tensor) -> torch.Tensor:
    # On-policy (one epoch, one minibatch): the behaviour policy is the current one.
    return new_logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs


def _tis_weights(
    batch: Batch, new_logprobs: torch.Tensor, config: AlgorithmConfig, level: str = "token"
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """TIS weights when ``config.tis_cap`` is set and the batch carries engine log-probs."""
    if config.tis_cap is None or batch.engine_logprobs is None:
        return None, {}
    return compute_tis_weights(
        _old_logprobs(batch, new_logprobs),
        batch.engine_logprobs,
        batch.completion_mask,
        cap=config.tis_cap,
        level=level,
    )


def _require_advantages(batch: Batch) -> torch.Tensor:
    if batch.advantages is None:
        raise ValueError("batch.advantages is None: compute advantages before the loss")
    return batch.advantages


def _kl_term(batch, new_logprobs, config, kl_coef, kl_fn=None):
    """``β · aggregate(KL_t)`` when the KL goes in the loss, else zero; plus its metric."""
    beta = _current_kl_coef(config, kl_coef)
    if config.kl_in_reward or beta == 0.0:
        return new_logprobs.new_zeros(()), {}
    if batch.ref_logprobs is None:
        raise ValueError(
            f"batch.ref_logprobs is None but kl_coef={beta} > 0 puts a KL term in the loss"
        )
    per_token = compute_per_token_kl(
        new_logprobs, batch.ref_logprobs, config.kl_estimator, kl_fn=kl_fn
    )
    kl = aggregate_loss(per_token, batch.completion_mask, config.loss_agg_mode, config.norm_length)
    return beta * kl, {"kl": float(kl.detach())}


def _with_kl_and_entropy(loss, metrics, batch, new_logprobs, config, kl_coef, entropy, kl_fn):
    """Add the KL term (when in the loss) and the entropy bonus to a policy loss."""
    metrics = {"policy_loss": float(loss.detach()), **metrics}
    kl_loss, kl_metrics = _kl_term(batch, new_logprobs, config, kl_coef, kl_fn)
    return _with_entropy(loss + kl_loss, {**metrics, **kl_metrics}, batch, config, entropy)


def _with_entropy(loss, metrics, batch, config, entropy):
    if config.entropy_coef and entropy is not None:
        bonus, m = compute_entropy_bonus(
            entropy, batch.completion_mask, config.entropy_coef, config.loss_agg_mode
        )
        loss = loss + bonus
        metrics = {**metrics, **m}
    return loss, metrics


def clipped_policy_loss_fn(
    batch: Batch,
    new_logprobs: torch.Tensor,
    config: AlgorithmConfig,
    *,
    entropy: torch.Tensor | None = None,
    kl_coef: float | None = None,
    kl_fn: Any = None,
    **_: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate with optional KL and entropy terms (GRPO, Dr. GRPO, DAPO).

    ``L = agg(max(-A·ρ_t, -A·clip(ρ_t, 1-ε_low, 1+ε_high))) + β·agg(KL_t) - c_H·agg(H_t)``
    with ``ρ_t = exp(logp_t - old_logp_t)``, the aggregation ``config.loss_agg_mode`` and the
    KL term only when ``β > 0`` and not ``config.kl_in_reward`` (Shao et al. 2024; Yu et al.
    2025; Liu et al. 2025). With ``config.tis_cap = C`` and ``batch.engine_logprobs`` each
    token's surrogate is weighted by ``min(exp(old_logp_t - engine_logp_t), C)``
    (``compute_tis_weights``; its diagnostics join the metrics).

    Args:
      batch: the ``Batch`` (advantages ``[B]`` or ``[B, Tc]``, completion_mask ``[B, Tc]``).
      new_logprobs: ``[B, Tc]`` current policy log-probs of the completion tokens.
      config: the algorithm configuration.
      entropy: ``[B, Tc]`` per-token entropy for the bonus (optional).
      kl_coef: the β in force (defaults to ``config.kl_coef``).
      kl_fn: a ``KLFn`` replacing ``config.kl_estimator`` in the KL term.
    """
    weights, tis_metrics = _tis_weights(batch, new_logprobs, config)
    loss, metrics = compute_ppo_loss(
        new_logprobs,
        _old_logprobs(batch, new_logprobs),
        _require_advantages(batch),
        batch.completion_mask,
        clip_eps_low=config.clip_eps_low,
        clip_eps_high=config.clip_eps_high,
        dual_clip_c=config.dual_clip_c,
        loss_agg_mode=config.loss_agg_mode,
        norm_length=config.norm_length,
        token_weights=weights,
    )
    return _with_kl_and_entropy(
        loss, {**metrics, **tis_metrics}, batch, new_logprobs, config, kl_coef, entropy, kl_fn
    )


def gspo_loss_fn(
    batch: Batch,
    new_logprobs: torch.Tensor,
    config: AlgorithmConfig,
    *,
    entropy: torch.Tensor | None = None,
    kl_coef: float | None = None,
    kl_fn: Any = None,
    **_: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO: the clipped surrogate on the sequence ratio ``exp(mean_t log ρ_t)``.

    Zheng et al. 2025 ("Group Sequence Policy Optimization"); see ``compute_gspo_loss``. KL and
    entropy terms as in ``clipped_policy_loss_fn``; TIS (``config.tis_cap``) at the sequence
    level.

    Args:
      batch: the ``Batch`` (advantages ``[B]``).
      new_logprobs: ``[B, Tc]`` current policy log-probs.
      config: the algorithm configuration.
    """
    weights, tis_metrics = _tis_weights(batch, new_logprobs, config, level="sequence")
    loss, metrics = compute_gspo_loss(
        new_logprobs,
        _old_logprobs(batch, new_logprobs),
        _require_advantages(batch),
        batch.completion_mask,
        clip_eps_low=config.clip_eps_low,
        clip_eps_high=config.clip_eps_high,
        sequence_weights=weights,
    )
    return _with_kl_and_entropy(
        loss, {**metrics, **tis_metrics}, batch, new_logprobs, config, kl_coef, entropy, kl_fn
    )


def cispo_loss_fn(
    batch: Batch,
    new_logprobs: torch.Tensor,
    config: AlgorithmConfig,
    *,
    entropy: torch.Tensor | None = None,
    kl_coef: float | None = None,
    kl_fn: Any = None,
    **_: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CISPO: REINFORCE weighted by a clipped, stop-gradient importance ratio.

    ``L = -agg(sg(clip(ρ_t, 1-ε_low, 1+ε_high)) · A · log π_θ(y_t))`` (MiniMax 2025, "MiniMax-M1");
    see ``compute_cispo_loss``. KL, entropy and TIS terms as in ``clipped_policy_loss_fn``.

    Args:
      batch: the ``Batch``.
      new_logprobs: ``[B, Tc]`` current policy log-probs.
      config: the algorithm configuration.
    """
    weights, tis_metrics = _tis_weights(batch, new_logprobs, config)
    loss, metrics = compute_cispo_loss(
        new_logprobs,
        _old_logprobs(batch, new_logprobs),
        _require_advantages(batch),
        batch.completion_mask,
        clip_eps_low=config.clip_eps_low,
        clip_eps_high=config.clip_eps_high,
        loss_agg_mode=config.loss_agg_mode,
        norm_length=config.norm_length,
        token_weights=weights,
    )
    return _with_kl_and_entropy(
        loss, {**metrics, **tis_metrics}, batch, new_logprobs, config, kl_coef, entropy, kl_fn
    )


def reinforce_loss_fn(
    batch: Batch,
    new_logprobs: torch.Tensor,
    config: AlgorithmConfig,
    *,
    entropy: torch.Tensor | None = None,
    kl_coef: float | None = None,
    kl_fn: Any = None,
    **_: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy-gradient loss ``-agg(A · log π_θ(y_t))`` (REINFORCE, RLOO).

    Williams 1992; Ahmadian et al. 2024. KL, entropy and TIS terms as in
    ``clipped_policy_loss_fn`` (TIS with π_old = ``batch.old_logprobs``, the current policy's
    detached log-probs on-policy).

    Args:
      batch: the ``Batch``.
      new_logprobs: ``[B, Tc]`` current policy log-probs.
      config: the algorithm configuration.
    """
    weights, tis_metrics = _tis_weights(batch, new_logprobs, config)
    loss, metrics = compute_reinforce_loss(
        new_logprobs,
        _require_advantages(batch),
        batch.completion_mask,
        loss_agg_mode=config.loss_agg_mode,
        norm_length=config.norm_length,
        token_weights=weights,
    )
    return _with_kl_and_entropy(
        loss, {**metrics, **tis_metrics}, batch, new_logprobs, config, kl_coef, entropy, kl_fn
    )


def ppo_loss_fn(
    batch: Batch,
    new_logprobs: torch.Tensor,
    config: AlgorithmConfig,
    *,
    new_values: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    kl_coef: float | None = None,
    kl_fn: Any = None,
    **_: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO with a critic: clipped policy loss + ``c_V`` · clipped value loss (− entropy bonus).

    ``L = L_clip + c_V · 0.5·agg(max((V - R)², (V_clip - R)²)) - c_H·agg(H)`` (Schulman et al.
    2017; Ouyang et al. 2022). The KL usually sits in the reward (``kl_in_reward``); with
    ``kl_in_reward=False`` and ``β > 0`` it is added to the loss instead.

    Args:
      batch: the ``Batch`` with ``advantages [B, Tc]``, ``returns [B, Tc]`` and ``values
        [B, Tc]`` (values at sampling time, for clipping).
      new_logprobs: ``[B, Tc]`` current policy log-probs.
      config: the algorithm configuration.
      new_values: ``[B, Tc]`` current critic values (required).
    """
    if new_values is None:
        raise ValueError("ppo_loss_fn needs new_values [B, Tc] from the critic, got None")
    if batch.returns is None:
        raise ValueError("batch.returns is None: PPO needs value targets (compute advantages)")
    loss, metrics = clipped_policy_loss_fn(
        batch, new_logprobs, config, entropy=entropy, kl_coef=kl_coef, kl_fn=kl_fn
    )
    old_values = batch.values if batch.values is not None else new_values.detach()
    value_loss, value_metrics = compute_value_loss(
        new_values,
        old_values,
        batch.returns,
        batch.completion_mask,
        value_clip=config.value_clip,
        loss_agg_mode="token-mean",
    )
    metrics = {**metrics, **value_metrics, "value_loss": float(value_loss.detach())}
    return loss + config.value_coef * value_loss, metrics


def dpo_loss_fn(
    batch: Batch,
    new_logprobs: torch.Tensor,
    config: AlgorithmConfig,
    *,
    pair_selector=None,
    **_: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Online DPO on pairs picked from each group: ``compute_dpo_loss`` on sequence log-probs.

    Sequence log-probs are ``Σ_t log π(y_t) · mask_t``; pairs come from
    ``pair_selector(rewards [B], group_size) -> (chosen_idx [P], rejected_idx [P])``
    (default ``compute_dpo_pairs``: best vs worst of each group, all-equal groups skipped).
    Rafailov et al. 2023 (DPO); Guo et al. 2024 (online AI feedback).

    Args:
      batch: the ``Batch`` with ``rewards [B]``, ``group_ids [B]`` and ``ref_logprobs [B, Tc]``.
      new_logprobs: ``[B, Tc]`` current policy log-probs.
      config: the algorithm configuration (``beta``, ``dpo_loss_type``).
      pair_selector: optional replacement for ``compute_dpo_pairs``.
    """
    if batch.rewards is None or batch.group_ids is None:
        raise ValueError("dpo_loss_fn needs batch.rewards and batch.group_ids, got None")
    if batch.ref_logprobs is None:
        raise ValueError("dpo_loss_fn needs batch.ref_logprobs, got None")
    select = compute_dpo_pairs if pair_selector is None else pair_selector
    chosen, rejected = select(batch.rewards, group_size_from_ids(batch.group_ids))
    mask = batch.completion_mask.to(new_logprobs.dtype)
    policy_seq = (new_logprobs * mask).sum(dim=-1)
    ref_seq = (batch.ref_logprobs * mask).sum(dim=-1)
    if len(chosen) == 0:
        # No informative group: a zero loss that still depends on the weights.
        return (policy_seq * 0.0).sum(), {"dpo_pairs": 0.0}
    loss, metrics = compute_dpo_loss(
        policy_seq[chosen],
        policy_seq[rejected],
        ref_seq[chosen],
        ref_seq[rejected],
        beta=config.beta,
        loss_type=config.dpo_loss_type,
    )
    return loss, {"policy_loss": float(loss.detach()), **metrics, "dpo_pairs": float(len(chosen))}


# --------------------------------------------------------------------------------------------
# The registry.
# --------------------------------------------------------------------------------------------

ALGORITHMS: Mapping[str, Algorithm] = MappingProxyType(
    {
        # Shao et al. 2024: β = 0.04, k3 KL in the loss, per-sequence then per-token means.
        "grpo": Algorithm(
            group_advantage_fn,
            clipped_policy_loss_fn,
            defaults={
                "kl_coef": 0.04,
                "kl_estimator": "k3",
                "loss_agg_mode": "seq-mean-token-mean",
                "scale_rewards": "group",
            },
        ),
        # Liu et al. 2025: no std scaling, no per-length normalisation, no KL.
        "dr_grpo": Algorithm(
            group_advantage_fn,
            clipped_policy_loss_fn,
            defaults={
                "kl_coef": 0.0,
                "loss_agg_mode": "seq-mean-token-sum-norm",
                "scale_rewards": "none",
            },
        ),
        # Yu et al. 2025: clip-higher, token-level loss, no KL, dynamic sampling, overlong shaping.
        "dapo": Algorithm(
            group_advantage_fn,
            clipped_policy_loss_fn,
            defaults={
                "clip_eps_low": 0.2,
                "clip_eps_high": 0.28,
                "kl_coef": 0.0,
                "loss_agg_mode": "token-mean",
                "filter_groups": True,
                "overlong_shaping": True,
                "overlong_penalty": 1.0,
            },
        ),
        # Zheng et al. 2025: sequence-level ratio with clip range 3e-4 / 4e-4, no KL.
        "gspo": Algorithm(
            group_advantage_fn,
            gspo_loss_fn,
            defaults={
                "clip_eps_low": 3e-4,
                "clip_eps_high": 4e-4,
                "kl_coef": 0.0,
                "loss_agg_mode": "seq-mean-token-mean",
            },
        ),
        # MiniMax 2025: only an upper bound on the IS weight (ε_low = 1 leaves the weight
        # unbounded below); the paper does not publish ε_high, 4 (a cap of 5) is a common choice.
        "cispo": Algorithm(
            group_advantage_fn,
            cispo_loss_fn,
            defaults={
                "clip_eps_low": 1.0,
                "clip_eps_high": 4.0,
                "kl_coef": 0.0,
                "loss_agg_mode": "token-mean",
            },
        ),
        # Ziegler et al. 2019 / Ouyang et al. 2022: critic, GAE, KL in the reward.
        "ppo": Algorithm(
            ppo_advantage_fn,
            ppo_loss_fn,
            needs_value=True,
            defaults={
                "kl_coef": 0.05,
                "kl_estimator": "k1",
                "kl_in_reward": True,
                "gamma": 1.0,
                "gae_lambda": 0.95,
                "value_coef": 0.5,
                "value_clip": 0.2,
                "whiten_advantages": True,
                "num_epochs": 4,
                "loss_agg_mode": "token-mean",
            },
        ),
        # Williams 1992: plain policy gradient (REINFORCE++ = baseline "batch" + whitening).
        "reinforce": Algorithm(
            reinforce_advantage_fn,
            reinforce_loss_fn,
            defaults={
                "kl_coef": 0.0,
                "reinforce_baseline": "none",
                "loss_agg_mode": "seq-mean-token-sum",
            },
        ),
        # Ahmadian et al. 2024: leave-one-out baseline, sequence-level REINFORCE.
        "rloo": Algorithm(
            rloo_advantage_fn,
            reinforce_loss_fn,
            defaults={
                "kl_coef": 0.0,
                "loss_agg_mode": "seq-mean-token-sum",
            },
        ),
        # Rafailov et al. 2023, online: pairs from each group, β = 0.1.
        "dpo": Algorithm(
            group_advantage_fn,
            dpo_loss_fn,
            needs_ref=True,
            defaults={"beta": 0.1, "dpo_loss_type": "sigmoid", "kl_coef": 0.0},
        ),
    }
)


def register_algorithm(
    name: str,
    algorithm: Algorithm,
    registry: Mapping[str, Algorithm] = ALGORITHMS,
    overwrite: bool = False,
) -> Mapping[str, Algorithm]:
    """Return a new read-only registry: ``registry`` plus ``name -> algorithm``.

    Nothing global changes: pass the returned registry (``registry=``) to
    ``create_algorithm_config``, ``compute_loss_by_algorithm`` and the training functions.

    Args:
      name: the new algorithm's name.
      algorithm: an ``Algorithm(advantage_fn, loss_fn, needs_ref, needs_value, defaults)``.
      registry: the registry to extend (default: the built-in ``ALGORITHMS``).
      overwrite: allow replacing an existing entry.
    Returns:
      A ``MappingProxyType`` with the new entry.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm must be an rlprim.Algorithm, got {type(algorithm).__name__}")
    if not callable(algorithm.advantage_fn) or not callable(algorithm.loss_fn):
        raise TypeError("algorithm.advantage_fn and algorithm.loss_fn must be callable")
    if name in registry and not overwrite:
        raise ValueError(f"algorithm {name!r} is already registered; pass overwrite=True")
    unknown = set(algorithm.defaults) - set(AlgorithmConfig._fields)
    if unknown:
        raise ValueError(
            f"algorithm.defaults has unknown fields {sorted(unknown)}; valid fields: "
            f"{list(AlgorithmConfig._fields)}"
        )
    return MappingProxyType({**registry, name: algorithm})


def get_algorithm(name: str, registry: Mapping[str, Algorithm] = ALGORITHMS) -> Algorithm:
    """Look ``name`` up in ``registry``; an unknown name lists the valid ones.

    Args:
      name: an algorithm name.
      registry: a registry (default ``ALGORITHMS``).
    Returns:
      The ``Algorithm`` record.
    """
    if name not in registry:
        raise ValueError(f"unknown algorithm name={name!r}; valid names: {sorted(registry)}")
    return registry[name]


def validate_algorithm_config(config: AlgorithmConfig) -> AlgorithmConfig:
    """Check every field of ``config``; return it unchanged or raise ``ValueError``.

    Args:
      config: the ``AlgorithmConfig`` to check.
    Returns:
      ``config``.
    """
    if not isinstance(config, AlgorithmConfig):
        raise TypeError(f"config must be an AlgorithmConfig, got {type(config).__name__}")
    c = config

    def bad(field, expected):
        raise ValueError(f"AlgorithmConfig.{field} must be {expected}, got {getattr(c, field)!r}")

    if c.clip_eps_low < 0:
        bad("clip_eps_low", "≥ 0")
    if c.clip_eps_high < 0:
        bad("clip_eps_high", "≥ 0")
    if c.dual_clip_c is not None and c.dual_clip_c <= 1:
        bad("dual_clip_c", "None or > 1")
    if c.kl_coef < 0:
        bad("kl_coef", "≥ 0")
    if c.kl_estimator not in KL_ESTIMATORS:
        bad("kl_estimator", f"one of {sorted(KL_ESTIMATORS)}")
    if c.loss_agg_mode not in LOSS_AGG_MODES:
        bad("loss_agg_mode", f"one of {list(LOSS_AGG_MODES)}")
    if c.norm_length is not None and c.norm_length < 1:
        bad("norm_length", "None or ≥ 1")
    if not 0.0 <= c.gamma <= 1.0:
        bad("gamma", "in [0, 1]")
    if not 0.0 <= c.gae_lambda <= 1.0:
        bad("gae_lambda", "in [0, 1]")
    if c.value_clip is not None and c.value_clip <= 0:
        bad("value_clip", "None or > 0")
    if c.num_epochs < 1:
        bad("num_epochs", "≥ 1")
    if c.max_sampling_rounds < 1:
        bad("max_sampling_rounds", "≥ 1")
    for field in ("minibatch_size", "micro_batch_size"):
        if getattr(c, field) is not None and getattr(c, field) < 1:
            bad(field, "None or ≥ 1")
    if c.max_grad_norm is not None and c.max_grad_norm <= 0:
        bad("max_grad_norm", "None or > 0")
    if c.scale_rewards not in _SCALES:
        bad("scale_rewards", f"one of {list(_SCALES)}")
    if c.adv_eps < 0:
        bad("adv_eps", "≥ 0")
    if c.reinforce_baseline not in _BASELINES:
        bad("reinforce_baseline", f"one of {list(_BASELINES)}")
    if c.beta <= 0:
        bad("beta", "> 0")
    if c.dpo_loss_type not in DPO_LOSS_TYPES:
        bad("dpo_loss_type", f"one of {list(DPO_LOSS_TYPES)}")
    if c.overlong_buffer_len is not None and c.overlong_buffer_len < 1:
        bad("overlong_buffer_len", "None or ≥ 1")
    if c.max_response_len is not None and c.max_response_len < 1:
        bad("max_response_len", "None or ≥ 1")
    if c.tis_cap is not None and c.tis_cap <= 0:
        bad("tis_cap", "None or > 0")
    return config


def create_algorithm_config(
    name: str = "grpo",
    overrides: Mapping[str, Any] | None = None,
    registry: Mapping[str, Algorithm] = ALGORITHMS,
    **kwargs: Any,
) -> AlgorithmConfig:
    """An ``AlgorithmConfig`` with ``name``'s published defaults, then ``overrides``.

    Precedence: ``AlgorithmConfig`` field defaults < the algorithm's ``defaults`` <
    ``overrides`` < keyword arguments. An unknown name or field raises ``ValueError`` listing
    the valid ones; the result is validated with ``validate_algorithm_config``.

    Args:
      name: a registered algorithm name.
      overrides: field values to change, e.g. ``{"kl_coef": 0.0}``.
      registry: where to look ``name`` up.
      **kwargs: more field values (same as ``overrides``).
    Returns:
      The validated ``AlgorithmConfig``.
    """
    algorithm = get_algorithm(name, registry)
    changes = {**dict(overrides or {}), **kwargs}
    unknown = set(changes) - set(AlgorithmConfig._fields)
    if unknown:
        raise ValueError(
            f"unknown AlgorithmConfig fields {sorted(unknown)} in overrides; valid fields: "
            f"{list(AlgorithmConfig._fields)}"
        )
    if "name" in changes and changes["name"] != name:
        raise ValueError(f"overrides['name']={changes['name']!r} disagrees with name={name!r}")
    fields = {**dict(algorithm.defaults), **changes, "name": name}
    return validate_algorithm_config(AlgorithmConfig(**fields))


def requires_reference_model(
    config: AlgorithmConfig, registry: Mapping[str, Algorithm] = ALGORITHMS
) -> bool:
    """Whether a run of ``config`` must compute reference log-probs.

    True when the algorithm needs them itself (DPO) or ``config.kl_coef > 0`` (KL in the loss
    or in the reward). With ``False`` the reference model is never run and need not exist.

    Args:
      config: the algorithm configuration.
      registry: where to look ``config.name`` up.
    """
    return get_algorithm(config.name, registry).needs_ref or config.kl_coef > 0


def compute_advantages_by_algorithm(
    config: AlgorithmConfig,
    rewards: torch.Tensor,
    registry: Mapping[str, Algorithm] = ALGORITHMS,
    advantage_fn=None,
    **extras: Any,
) -> Any:
    """Advantages for ``config``'s algorithm: ``advantage_fn(rewards, config, **extras)``.

    ``advantage_fn`` overrides the registry's (an ``AdvantageFn``). Critic-based algorithms
    (PPO) return ``(advantages [B, Tc], returns [B, Tc])``; the others ``advantages [B]``.

    Args:
      config: the algorithm configuration.
      rewards: ``[B]`` scalar rewards.
      registry: where to look ``config.name`` up.
      advantage_fn: optional replacement.
      **extras: ``group_size``, ``mask [B, Tc]``, ``values [B, Tc]``, ``kl [B, Tc]``,
        ``kl_coef``.
    """
    fn = advantage_fn or get_algorithm(config.name, registry).advantage_fn
    return fn(rewards, config, **extras)


def compute_loss_by_algorithm(
    config: AlgorithmConfig,
    batch: Batch,
    new_logprobs: torch.Tensor,
    registry: Mapping[str, Algorithm] = ALGORITHMS,
    loss_fn=None,
    **extras: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of ``config``'s algorithm: ``loss_fn(batch, new_logprobs, config, **extras)``.

    ``loss_fn`` overrides the registry's (a ``LossFn``). Non-finite losses are returned as
    they are: the training step decides to skip the update.

    Args:
      config: the algorithm configuration.
      batch: the ``Batch``.
      new_logprobs: ``[B, Tc]`` current policy log-probs of the completion tokens.
      registry: where to look ``config.name`` up.
      loss_fn: optional replacement.
      **extras: ``entropy [B, Tc]``, ``new_values [B, Tc]``, ``kl_coef``, ``kl_fn``,
        ``pair_selector``.
    Returns:
      ``(loss, metrics)``: a scalar tensor and a dict of floats.
    """
    if new_logprobs.shape != batch.completion_mask.shape:
        raise ValueError(
            f"new_logprobs must have the shape of batch.completion_mask "
            f"{tuple(batch.completion_mask.shape)}, got {tuple(new_logprobs.shape)}"
        )
    fn = loss_fn or get_algorithm(config.name, registry).loss_fn
    return fn(batch, new_logprobs, config, **extras)
