"""Advantages and returns: discounted returns, GAE, group-relative (GRPO / Dr. GRPO), RLOO,
REINFORCE (with REINFORCE++ whitening), ReMax, the PPO-for-LLMs form, and whitening.

Shapes: ``B`` sequences, ``T`` completion tokens. Sequence-level functions take ``rewards [B]``
and return ``[B]`` (broadcast over tokens by the loss); token-level functions take ``[B, T]``
tensors with a ``mask [B, T]`` (1 = a token that trains, 0 = padding or tool/environment tokens).

Masked positions are treated as *non-existent*: they carry no reward, no value and take no
discounting step, so discounting runs over the valid tokens only, skipping any masked tokens in
between (tool outputs in a multi-turn completion do not break the credit assignment), and the
first valid token after a masked stretch is the "next" token of the one before it. Every
token-level output is 0 where the mask is 0, and what is stored at masked positions of the inputs
(even NaN) never reaches the outputs. The sequence ends after its last valid token, where the
bootstrap value is 0 (a completion ends the episode).

Groups (GRPO, RLOO, group baselines) are ``group_size`` *consecutive* rows: rows
``[k·G, (k+1)·G)`` are the ``G`` samples of prompt ``k``, as the generators produce them.

These functions do not detach their inputs; pass detached ``values`` (advantages and returns are
targets, not things to differentiate through).
"""

from __future__ import annotations

import torch

from rlprim.checks import (
    as_float,
    check_finite,
    check_group_size,
    check_mask,
    check_nonnegative,
    check_same_shape,
    check_tensor,
    check_unit_interval,
)

__all__ = [
    "compute_discounted_returns",
    "compute_gae",
    "compute_grpo_advantages",
    "compute_rloo_advantages",
    "compute_reinforce_advantages",
    "compute_remax_advantages",
    "compute_ppo_advantages",
    "whiten",
]

GRPO_SCALES = ("group", "batch", "none")
REINFORCE_BASELINES = ("none", "group", "batch")


# --------------------------------------------------------------------------- input checks


def _check_sequence_rewards(rewards: object, name: str = "rewards") -> torch.Tensor:
    rewards = as_float(check_tensor(name, rewards, ndim=1))
    check_finite(name, rewards)
    return rewards


# --------------------------------------------------------------------------- token level


def _discounted_sum_backwards(
    rewards: torch.Tensor, mask: torch.Tensor, discount: float
) -> torch.Tensor:
    """``out_t = x_t + discount · out_{next valid}`` over valid tokens; 0 at masked ones.

    Masked positions leave the running sum untouched (they are skipped, not zeros that decay
    the sum). ``torch.where`` keeps garbage stored at masked positions out of the result.
    """
    running = rewards.new_zeros(rewards.shape[0])
    out = torch.zeros_like(rewards)
    for t in range(rewards.shape[1] - 1, -1, -1):
        valid = mask[:, t]
        running = torch.where(valid, rewards[:, t] + discount * running, running)
        out[:, t] = torch.where(valid, running, torch.zeros_like(running))
    return out


def compute_discounted_returns(
    rewards: torch.Tensor, mask: torch.Tensor | None, gamma: float = 1.0
) -> torch.Tensor:
    """Discounted returns per token: ``G_t = r_t + γ · G_{t'}``.

    ``t'`` is the next *valid* token after ``t`` (masked tokens are skipped, not treated as zero
    reward steps), and ``G = 0`` after the last valid token of a row. Rewards stored at masked
    positions are ignored. This is the Monte-Carlo return of Sutton & Barto (2018, eq. 3.8)
    restricted to the tokens the policy produced.

    Args:
      rewards: ``[B, T]`` per-token rewards.
      mask: ``[B, T]`` bool or 0/1, 1 on valid tokens; ``None`` means all tokens are valid.
      gamma: discount ``γ ∈ [0, 1]``.
    Returns:
      ``[B, T]`` returns, 0 where ``mask`` is 0.
    Raises:
      TypeError / ValueError: non-tensor input, shapes that differ or are not 2-D, a mask that
        is not 0/1, non-finite rewards at valid positions, ``gamma`` outside ``[0, 1]``.
    """
    rewards = as_float(check_tensor("rewards", rewards, ndim=2))
    mask = check_mask(mask, rewards, "rewards")
    gamma = check_unit_interval("gamma", gamma)
    check_finite("rewards", rewards, mask)
    return _discounted_sum_backwards(rewards, mask, gamma)


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation", eq. 16).

    Over the valid tokens of each row, with ``t'`` the next valid token after ``t``::

        δ_t = r_t + γ · V_{t'} - V_t              (V = 0 after the last valid token)
        A_t = δ_t + γλ · A_{t'}                    (A = 0 after the last valid token)
        R_t = A_t + V_t                            (the λ-return, the critic's target)

    λ = 1 gives ``A_t = G_t - V_t`` (Monte-Carlo returns minus values); λ = 0 gives the one-step
    TD error ``δ_t``. Masked tokens are skipped (see the module docstring), so tool tokens in a
    multi-turn completion neither receive credit nor interrupt it.

    Args:
      rewards: ``[B, T]`` per-token rewards.
      values: ``[B, T]`` critic values ``V_t`` of the state before token ``t``.
      mask: ``[B, T]`` bool or 0/1, 1 on valid tokens; ``None`` means all tokens are valid.
      gamma: discount ``γ ∈ [0, 1]``.
      lam: GAE ``λ ∈ [0, 1]``.
    Returns:
      ``(advantages [B, T], returns [B, T])``, both 0 where ``mask`` is 0.
    Raises:
      TypeError / ValueError: non-tensor input, shapes that differ or are not 2-D, a mask that
        is not 0/1, non-finite rewards or values at valid positions, ``gamma`` or ``lam``
        outside ``[0, 1]``.
    """
    rewards = as_float(check_tensor("rewards", rewards, ndim=2))
    values = as_float(check_tensor("values", values, ndim=2))
    check_same_shape("values", values, "rewards", rewards)
    mask = check_mask(mask, rewards, "rewards")
    gamma = check_unit_interval("gamma", gamma)
    lam = check_unit_interval("lam", lam)
    check_finite("rewards", rewards, mask)
    check_finite("values", values, mask)

    dtype = torch.promote_types(rewards.dtype, values.dtype)
    rewards, values = rewards.to(dtype), values.to(dtype)
    zero = rewards.new_zeros(rewards.shape[0])
    next_value, next_advantage = zero, zero
    advantages = torch.zeros_like(rewards)
    for t in range(rewards.shape[1] - 1, -1, -1):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # A masked token passes the next valid token's value and advantage through unchanged.
        next_value = torch.where(valid, values[:, t], next_value)
        next_advantage = torch.where(valid, advantage, next_advantage)
        advantages[:, t] = torch.where(valid, advantage, zero)
    returns = torch.where(mask, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


def compute_ppo_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    kl: torch.Tensor | None,
    mask: torch.Tensor | None,
    kl_coef: float,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO advantages for language models: a KL-penalised per-token reward, then GAE.

    The RLHF form of Ziegler et al. (2019, "Fine-Tuning Language Models from Human
    Preferences") and Ouyang et al. (2022, InstructGPT): with ``L_b`` the last valid token of
    row ``b``::

        r_{b,t} = -β · KL_{b,t} + [t = L_b] · R_b        (β = kl_coef, R_b = rewards[b])
        (A, R)  = compute_gae(r, values, mask, γ, λ)

    ``kl`` is a per-token KL estimate such as ``rlprim.kl.compute_per_token_kl`` (k1 is the
    classic choice). A row with no valid token gets all-zero outputs (its reward has nowhere to
    go). PPO implementations usually whiten the advantages next: ``whiten(advantages, mask)``.

    Args:
      rewards: ``[B]`` sequence rewards.
      values: ``[B, T]`` critic values.
      kl: ``[B, T]`` per-token KL estimates, or ``None`` for no penalty.
      mask: ``[B, T]`` bool or 0/1, 1 on valid tokens; ``None`` means all tokens are valid.
      kl_coef: β ≥ 0.
      gamma: discount ``γ ∈ [0, 1]``.
      lam: GAE ``λ ∈ [0, 1]``.
    Returns:
      ``(advantages [B, T], returns [B, T])``, both 0 where ``mask`` is 0.
    Raises:
      TypeError / ValueError: non-tensor input, wrong dimensions, ``rewards`` length not ``B``,
        ``kl`` or ``mask`` shape not that of ``values``, non-finite rewards (or values / KL at
        valid positions), ``kl_coef < 0``, ``gamma`` or ``lam`` outside ``[0, 1]``.
    """
    rewards = _check_sequence_rewards(rewards)
    values = as_float(check_tensor("values", values, ndim=2))
    if rewards.shape[0] != values.shape[0]:
        raise ValueError(
            f"rewards must have one entry per row of values (B={values.shape[0]}), got shape "
            f"{tuple(rewards.shape)}"
        )
    mask = check_mask(mask, values, "values")
    kl_coef = check_nonnegative("kl_coef", kl_coef)
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    token_rewards = torch.zeros(values.shape, dtype=dtype, device=values.device)
    if kl is not None:
        kl = as_float(check_tensor("kl", kl, ndim=2))
        check_same_shape("kl", kl, "values", values)
        check_finite("kl", kl, mask)
        # Masked positions may hold junk; compute_gae skips them.
        token_rewards = -kl_coef * kl.to(dtype)
    if values.shape[1] > 0:
        positions = torch.arange(values.shape[1], device=values.device)
        # argmax of position·mask is the last valid index (0 for an empty row, masked anyway).
        last = (positions * mask).argmax(dim=1)
        rows = torch.arange(values.shape[0], device=values.device)
        token_rewards[rows, last] += rewards.to(dtype=dtype, device=values.device)
    return compute_gae(token_rewards, values, mask, gamma, lam)


# --------------------------------------------------------------------------- sequence level


def compute_grpo_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024, "DeepSeekMath", §4.1.2).

    For the group ``g`` of row ``i`` (``group_size`` consecutive rows)::

        scale="group":  A_i = (r_i - mean_g) / (std_g + ε)
        scale="batch":  A_i = (r_i - mean_g) / (std_batch + ε)
        scale="none":   A_i =  r_i - mean_g                  (Dr. GRPO, Liu et al. 2025,
                                                              "Understanding R1-Zero-Like
                                                              Training")

    ``std`` is the unbiased (Bessel-corrected) standard deviation; ``std_batch`` is that of all
    ``B`` rewards. A group of one (``group_size=1``) and any group whose rewards are all equal get
    exactly 0 (no signal to compare against, and no rounding noise divided by ``ε``).

    Args:
      rewards: ``[B]`` sequence rewards.
      group_size: ``G``, the number of samples per prompt; must divide ``B``.
      scale: ``"group"``, ``"batch"`` or ``"none"``.
      eps: ``ε ≥ 0`` added to the std.
    Returns:
      ``[B]`` advantages; they sum to zero within each group.
    Raises:
      TypeError / ValueError: non-tensor or non-1-D rewards, non-finite rewards, a
        ``group_size`` that is not a positive divisor of ``B``, an unknown ``scale``, ``eps < 0``.
    """
    rewards = _check_sequence_rewards(rewards)
    group_size = check_group_size(group_size, rewards.shape[0])
    if scale not in GRPO_SCALES:
        raise ValueError(f"scale must be one of {list(GRPO_SCALES)}, got {scale!r}")
    eps = check_nonnegative("eps", eps)
    if group_size == 1 or rewards.numel() == 0:
        return torch.zeros_like(rewards)

    groups = rewards.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (groups.std(dim=1, correction=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (rewards.std(correction=1) + eps)
    constant = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(centered), centered).view(-1)


def compute_rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, "Back to Basics: Revisiting
    REINFORCE Style Optimization for Learning from Human Feedback in LLMs"; Kool et al. 2019).

    Each sample's baseline is the mean reward of the *other* samples of its group::

        A_i = r_i - (Σ_{j∈g} r_j - r_i) / (G - 1)  =  G / (G - 1) · (r_i - mean_g)

    Args:
      rewards: ``[B]`` sequence rewards.
      group_size: ``G ≥ 2``, the number of samples per prompt; must divide ``B``.
    Returns:
      ``[B]`` advantages; they sum to zero within each group.
    Raises:
      TypeError / ValueError: non-tensor or non-1-D rewards, non-finite rewards, a
        ``group_size`` that does not divide ``B``, or ``group_size < 2`` (RLOO has no baseline
        for a lone sample).
    """
    rewards = _check_sequence_rewards(rewards)
    group_size = check_group_size(group_size, rewards.shape[0])
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2 for RLOO (the baseline averages the other samples of a "
            f"group), got {group_size}"
        )
    groups = rewards.view(-1, group_size)
    leave_one_out_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - leave_one_out_mean).view(-1)


def compute_reinforce_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    baseline: str = "none",
    whiten: bool = False,
    mask: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE advantages (Williams 1992) with an optional mean baseline and REINFORCE++
    global whitening (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large
    Language Models")::

        baseline="none":   A_i = r_i
        baseline="group":  A_i = r_i - mean_g      (group_size consecutive rows; REINFORCE++-
                                                    baseline when combined with whitening)
        baseline="batch":  A_i = r_i - mean_batch
        whiten=True:       A ← (A - mean(A)) / sqrt(var(A) + ε)  over the whole batch

    Without ``mask`` the result is per sequence, ``[B]``, and whitening runs over the ``B``
    sequences. With ``mask [B, T]`` the result is per token, ``A_{i,t} = A_i`` on valid tokens
    and 0 elsewhere, and whitening runs over all valid tokens of the batch (so longer sequences
    weigh more, as in REINFORCE++'s token-level normalisation). The variance is unbiased; see
    ``whiten``. For REINFORCE++ with a per-token KL penalty in the reward, build the token
    rewards, take ``compute_discounted_returns`` and ``whiten`` them with the mask.

    Args:
      rewards: ``[B]`` sequence rewards.
      group_size: samples per prompt; required for ``baseline="group"``, must divide ``B``.
      baseline: ``"none"``, ``"group"`` or ``"batch"``.
      whiten: whiten the advantages over the batch (REINFORCE++).
      mask: optional ``[B, T]`` bool or 0/1 token mask: returns token-level advantages.
      eps: ``ε ≥ 0`` added to the variance when whitening.
    Returns:
      ``[B]`` advantages, or ``[B, T]`` (0 where ``mask`` is 0) when ``mask`` is given.
    Raises:
      TypeError / ValueError: non-tensor or non-1-D rewards, non-finite rewards, an unknown
        ``baseline``, ``baseline="group"`` without ``group_size``, a ``group_size`` that is not a
        positive divisor of ``B``, a ``mask`` that is not ``[B, T]`` 0/1, ``eps < 0``.
    """
    rewards = _check_sequence_rewards(rewards)
    if baseline not in REINFORCE_BASELINES:
        raise ValueError(
            f"baseline must be one of {list(REINFORCE_BASELINES)}, got {baseline!r}"
        )
    if group_size is not None:
        group_size = check_group_size(group_size, rewards.shape[0])
    elif baseline == "group":
        raise ValueError("group_size must be given for baseline='group', got None")
    eps = check_nonnegative("eps", eps)
    if mask is not None:
        mask = check_tensor("mask", mask, ndim=2)
        if mask.shape[0] != rewards.shape[0]:
            raise ValueError(
                f"mask must have one row per reward (B={rewards.shape[0]}), got shape "
                f"{tuple(mask.shape)}"
            )
        mask = check_mask(mask, mask, "mask")

    advantages = rewards
    if baseline == "group":
        groups = rewards.view(-1, group_size)
        advantages = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    elif baseline == "batch" and rewards.numel() > 0:
        advantages = rewards - rewards.mean()

    if mask is None:
        return _whiten(advantages, None, True, eps) if whiten else advantages.clone()
    token_advantages = advantages.to(mask.device)[:, None].expand(mask.shape)
    if whiten:
        return _whiten(token_advantages, mask, True, eps)
    return torch.where(mask, token_advantages, torch.zeros_like(token_advantages))


def compute_remax_advantages(
    rewards: torch.Tensor, greedy_rewards: torch.Tensor
) -> torch.Tensor:
    """ReMax advantages (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient
    Reinforcement Learning Method for Aligning Large Language Models")::

        A_i = r(x_i, y_i) - r(x_i, ȳ_i)

    where ``ȳ_i`` is the greedy (argmax) completion of the same prompt: the greedy reward is the
    baseline, so no critic and no group are needed.

    Args:
      rewards: ``[B]`` rewards of the sampled completions.
      greedy_rewards: ``[B]`` rewards of the greedy completions of the same prompts.
    Returns:
      ``[B]`` advantages.
    Raises:
      TypeError / ValueError: non-tensor or non-1-D input, shapes that differ, non-finite values.
    """
    rewards = _check_sequence_rewards(rewards)
    greedy_rewards = _check_sequence_rewards(greedy_rewards, name="greedy_rewards")
    check_same_shape("greedy_rewards", greedy_rewards, "rewards", rewards)
    return rewards - greedy_rewards.to(rewards.device)


# --------------------------------------------------------------------------- whitening


def _whiten(
    x: torch.Tensor, mask: torch.Tensor | None, shift_mean: bool, eps: float
) -> torch.Tensor:
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    count = mask.sum()
    if int(count) == 0:
        return torch.zeros_like(x)
    zero = torch.zeros_like(x)
    mean = torch.where(mask, x, zero).sum() / count
    squared = torch.where(mask, (x - mean).square(), zero).sum()
    variance = squared / (count - 1) if int(count) > 1 else squared  # one element: 0
    whitened = (x - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, zero)


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Whiten ``x`` over its valid entries (advantage / reward normalisation in PPO, Schulman et
    al. 2017, and REINFORCE++, Hu 2025)::

        x̂ = (x - μ) / sqrt(σ² + ε)            (shift_mean=True)
        x̂ = (x - μ) / sqrt(σ² + ε) + μ        (shift_mean=False: rescale only, keep the mean,
                                               as PPO implementations do for rewards)

    ``μ`` and ``σ²`` are the mean and the unbiased (Bessel-corrected) variance of the entries
    where ``mask`` is 1; a single valid entry has ``σ² = 0``. Entries where ``mask`` is 0 are
    returned as 0 (and their stored values, even NaN, are ignored); an all-zero mask gives all
    zeros.

    Args:
      x: ``[...]`` values, e.g. advantages ``[B]`` or ``[B, T]``.
      mask: optional bool or 0/1 tensor of ``x``'s shape; ``None`` means all entries are valid.
      shift_mean: subtract the mean (True) or add it back after scaling (False).
      eps: ``ε ≥ 0`` added to the variance.
    Returns:
      The whitened tensor, ``x``'s shape, 0 where ``mask`` is 0.
    Raises:
      TypeError / ValueError: non-tensor ``x``, a mask of another shape or not 0/1, non-finite
        ``x`` at valid entries, ``eps < 0``.
    """
    x = as_float(check_tensor("x", x))
    mask = check_mask(mask, x, "x")
    eps = check_nonnegative("eps", eps)
    check_finite("x", x, mask)
    return _whiten(x, mask, shift_mean, eps)
