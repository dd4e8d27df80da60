"""Tests for rlprim.advantages: hand cases, loop references on random inputs, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import rlprim.advantages as advantages_module
from rlprim.advantages import (
    compute_discounted_returns,
    compute_gae,
    compute_grpo_advantages,
    compute_ppo_advantages,
    compute_reinforce_advantages,
    compute_remax_advantages,
    compute_rloo_advantages,
    whiten,
)

F64 = torch.float64


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def close(actual, expected, atol=1e-9, rtol=1e-7):
    torch.testing.assert_close(
        actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=rtol
    )


# --------------------------------------------------------------------------- references
# Written independently of the module: plain Python loops over rows and valid tokens.


def ref_discounted_returns(rewards, mask, gamma):
    rewards, mask = np.asarray(rewards, float), np.asarray(mask, bool)
    out = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        running = 0.0
        for tok in reversed(range(rewards.shape[1])):
            if mask[b, tok]:
                running = rewards[b, tok] + gamma * running
                out[b, tok] = running
    return out


def ref_gae(rewards, values, mask, gamma, lam):
    rewards, values = np.asarray(rewards, float), np.asarray(values, float)
    mask = np.asarray(mask, bool)
    adv = np.zeros_like(rewards)
    ret = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        valid = [tok for tok in range(rewards.shape[1]) if mask[b, tok]]
        last_adv = 0.0
        for k in reversed(range(len(valid))):
            tok = valid[k]
            next_value = values[b, valid[k + 1]] if k + 1 < len(valid) else 0.0
            delta = rewards[b, tok] + gamma * next_value - values[b, tok]
            last_adv = delta + gamma * lam * last_adv
            adv[b, tok] = last_adv
            ret[b, tok] = last_adv + values[b, tok]
    return adv, ret


def ref_grpo(rewards, group_size, scale, eps):
    rewards = [float(r) for r in rewards]
    n = len(rewards)
    batch_mean = sum(rewards) / n
    batch_std = math.sqrt(sum((r - batch_mean) ** 2 for r in rewards) / (n - 1)) if n > 1 else 0
    out = []
    for start in range(0, n, group_size):
        group = rewards[start : start + group_size]
        if group_size == 1 or max(group) == min(group):
            out += [0.0] * group_size
            continue
        mean = sum(group) / group_size
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - 1))
        denominator = {"group": std + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        out += [(r - mean) / denominator for r in group]
    return out


def ref_rloo(rewards, group_size):
    out = []
    for i, r in enumerate(rewards):
        start = (i // group_size) * group_size
        others = [rewards[j] for j in range(start, start + group_size) if j != i]
        out.append(r - sum(others) / len(others))
    return out


def ref_whiten(x, mask, shift_mean, eps):
    x, mask = np.asarray(x, float), np.asarray(mask, bool)
    vals = x[mask]
    if vals.size == 0:
        return np.zeros_like(x)
    mean = vals.mean()
    var = vals.var(ddof=1) if vals.size > 1 else 0.0
    out = (x - mean) / np.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return np.where(mask, out, 0.0)


def random_mask(rng, batch, length, interior=True):
    """Right-padded rows, optionally with interior holes (tool tokens); some rows empty."""
    lengths = rng.integers(0, length + 1, size=batch)
    mask = np.arange(length)[None, :] < lengths[:, None]
    if interior:
        mask &= rng.random((batch, length)) > 0.3
    return mask


# --------------------------------------------------------------------------- hypothesis inputs

finite = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False)
unit = st.floats(0.0, 1.0)


@st.composite
def token_inputs(draw, interior=True):
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 7))
    rewards = draw(st.lists(finite, min_size=batch * length, max_size=batch * length))
    values = draw(st.lists(finite, min_size=batch * length, max_size=batch * length))
    if interior:
        bits = draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length))
        mask = np.array(bits).reshape(batch, length)
    else:
        lengths = draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch))
        mask = np.arange(length)[None, :] < np.array(lengths)[:, None]
    shape = (batch, length)
    return (
        torch.tensor(rewards, dtype=F64).view(shape),
        torch.tensor(values, dtype=F64).view(shape),
        torch.from_numpy(mask),
    )


@st.composite
def grouped_rewards(draw, min_group=1):
    group_size = draw(st.integers(min_group, 6))
    num_groups = draw(st.integers(1, 4))
    rewards = draw(
        st.lists(finite, min_size=group_size * num_groups, max_size=group_size * num_groups)
    )
    return torch.tensor(rewards, dtype=F64), group_size


# --------------------------------------------------------------------------- discounted returns


def test_discounted_returns_hand_full_mask():
    # G2 = 3, G1 = 2 + 0.5*3 = 3.5, G0 = 1 + 0.5*3.5 = 2.75
    out = compute_discounted_returns(t([[1.0, 2.0, 3.0]]), None, gamma=0.5)
    close(out, [[2.75, 3.5, 3.0]])


def test_discounted_returns_hand_padding_and_interior_mask():
    rewards = t([[1.0, 2.0, 3.0], [1.0, 5.0, 2.0]])
    mask = t([[1, 1, 0], [1, 0, 1]])
    # Row 0: padding at the end, G1 = 2, G0 = 1 + 0.5*2 = 2.
    # Row 1: the masked token is skipped: G2 = 2, G0 = 1 + 0.5*2 = 2 (its reward 5 ignored).
    out = compute_discounted_returns(rewards, mask, gamma=0.5)
    close(out, [[2.0, 2.0, 0.0], [2.0, 0.0, 2.0]])


@pytest.mark.parametrize("seed", range(4))
def test_discounted_returns_matches_loop_reference(seed):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(5, 9))
    mask = random_mask(rng, 5, 9)
    gamma = float(rng.uniform(0, 1))
    out = compute_discounted_returns(t(rewards), torch.from_numpy(mask), gamma)
    close(out, ref_discounted_returns(rewards, mask, gamma))


@given(token_inputs(interior=False))
def test_discounted_returns_gamma_one_is_reverse_cumsum_and_gamma_zero_is_rewards(inputs):
    rewards, _, mask = inputs
    masked = rewards * mask
    reverse_cumsum = masked.flip(1).cumsum(1).flip(1) * mask
    close(compute_discounted_returns(rewards, mask, 1.0), reverse_cumsum, atol=1e-9)
    close(compute_discounted_returns(rewards, mask, 0.0), masked)


@given(token_inputs(), unit, st.floats(-100, 100))
def test_discounted_returns_ignore_masked_rewards(inputs, gamma, junk):
    rewards, _, mask = inputs
    out = compute_discounted_returns(rewards, mask, gamma)
    changed = torch.where(mask, rewards, torch.full_like(rewards, junk))
    assert torch.equal(out, compute_discounted_returns(changed, mask, gamma))
    assert torch.all(out[~mask] == 0)


def test_discounted_returns_none_mask_equals_all_ones_and_int_rewards_accepted():
    rewards = torch.tensor([[1, 0, 2]])
    out = compute_discounted_returns(rewards, None, 0.5)
    assert out.is_floating_point()
    close(out, compute_discounted_returns(rewards.float(), torch.ones(1, 3), 0.5))
    close(out, [[1.5, 1.0, 2.0]])


# --------------------------------------------------------------------------- GAE


def test_gae_hand_case():
    # δ2 = 1 - 0.7 = 0.3; δ1 = 0.9*0.7 - 0.6 = 0.03; δ0 = 0.9*0.6 - 0.5 = 0.04
    # A2 = 0.3; A1 = 0.03 + 0.72*0.3 = 0.246; A0 = 0.04 + 0.72*0.246 = 0.21712
    adv, ret = compute_gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), None, 0.9, 0.8)
    close(adv, [[0.21712, 0.246, 0.3]])
    close(ret, [[0.71712, 0.846, 1.0]])


def test_gae_hand_case_with_tool_tokens_and_padding():
    # The same sequence as above with a tool token (index 1) and padding (index 4) inserted;
    # junk at masked positions must not matter.
    rewards = t([[0.0, 9.0, 0.0, 1.0, float("nan")]])
    values = t([[0.5, 9.0, 0.6, 0.7, float("inf")]])
    mask = t([[1, 0, 1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, 0.9, 0.8)
    close(adv, [[0.21712, 0.0, 0.246, 0.3, 0.0]])
    close(ret, [[0.71712, 0.0, 0.846, 1.0, 0.0]])


@pytest.mark.parametrize("seed", range(4))
def test_gae_matches_loop_reference(seed):
    rng = np.random.default_rng(100 + seed)
    rewards, values = rng.normal(size=(6, 10)), rng.normal(size=(6, 10))
    mask = random_mask(rng, 6, 10, interior=seed % 2 == 0)
    gamma, lam = float(rng.uniform(0.5, 1)), float(rng.uniform(0, 1))
    adv, ret = compute_gae(t(rewards), t(values), torch.from_numpy(mask).int(), gamma, lam)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, gamma, lam)
    close(adv, ref_adv)
    close(ret, ref_ret)


@given(token_inputs(), unit)
def test_gae_lambda_one_is_returns_minus_values(inputs, gamma):
    rewards, values, mask = inputs
    adv, ret = compute_gae(rewards, values, mask, gamma, 1.0)
    expected = (compute_discounted_returns(rewards, mask, gamma) - values) * mask
    close(adv, expected, atol=1e-8)
    close(ret, compute_discounted_returns(rewards, mask, gamma), atol=1e-8)


@given(token_inputs(interior=False), unit)
def test_gae_lambda_zero_is_td_error(inputs, gamma):
    rewards, values, mask = inputs
    adv, _ = compute_gae(rewards, values, mask, gamma, 0.0)
    # Right-padded: the next value is the value one step later, 0 past the last valid token.
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros_like(values[:, :1])], 1)
    td = (rewards + gamma * next_values - values) * mask
    close(adv, td, atol=1e-9)


@given(token_inputs(), unit, unit)
def test_gae_skips_masked_tokens_like_removing_them(inputs, gamma, lam):
    rewards, values, mask = inputs
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)
    close(ret, (adv + values) * mask)
    for b in range(rewards.shape[0]):
        keep = mask[b]
        if keep.any():
            a_row, r_row = compute_gae(rewards[b, keep][None], values[b, keep][None], None,
                                       gamma, lam)
            close(adv[b, keep], a_row[0])
            close(ret[b, keep], r_row[0])


def test_gae_mixed_dtypes_promote():
    adv, ret = compute_gae(torch.zeros(2, 3), torch.ones(2, 3, dtype=F64), None, 1.0, 1.0)
    assert adv.dtype == F64 and ret.dtype == F64
    close(adv, -torch.ones(2, 3, dtype=F64))


# --------------------------------------------------------------------------- PPO advantages


def test_ppo_advantages_hand_case():
    # Token rewards: -0.1*[0.1, 0.2, 0.3] + [0, 0, 1] = [-0.01, -0.02, 0.97]; γ = λ = 1 so
    # A_t = Σ_{k≥t} r_k - V_t and R_t = Σ_{k≥t} r_k. Index 3 is padding (junk KL ignored).
    adv, ret = compute_ppo_advantages(
        rewards=t([1.0]),
        values=t([[0.5, 0.5, 0.5, 7.0]]),
        kl=t([[0.1, 0.2, 0.3, 9.0]]),
        mask=t([[1, 1, 1, 0]]),
        kl_coef=0.1,
        gamma=1.0,
        lam=1.0,
    )
    close(ret, [[0.94, 0.95, 0.97, 0.0]])
    close(adv, [[0.44, 0.45, 0.47, 0.0]])


def test_ppo_advantages_reward_lands_on_last_valid_token_after_tool_tokens():
    # Valid tokens 0 and 2 (token 1 is a tool token, 3 padding); γ = 0.5, λ = 1, V = 0:
    # the reward 4 sits on token 2, so A2 = 4, A0 = 0.5*4 = 2.
    adv, ret = compute_ppo_advantages(
        t([4.0]), torch.zeros(1, 4, dtype=F64), None, t([[1, 0, 1, 0]]), 0.0, 0.5, 1.0
    )
    close(adv, [[2.0, 0.0, 4.0, 0.0]])
    close(ret, [[2.0, 0.0, 4.0, 0.0]])


@pytest.mark.parametrize("seed", range(4))
def test_ppo_advantages_match_loop_reference(seed):
    rng = np.random.default_rng(200 + seed)
    batch, length = 5, 8
    rewards, values, kl = rng.normal(size=batch), rng.normal(size=(batch, length)), rng.random(
        (batch, length)
    )
    mask = random_mask(rng, batch, length, interior=seed % 2 == 1)
    kl_coef, gamma, lam = 0.05, float(rng.uniform(0.8, 1)), float(rng.uniform(0.5, 1))
    token_rewards = np.zeros((batch, length))
    for b in range(batch):
        valid = [tok for tok in range(length) if mask[b, tok]]
        for tok in valid:
            token_rewards[b, tok] = -kl_coef * kl[b, tok]
        if valid:
            token_rewards[b, valid[-1]] += rewards[b]
    ref_adv, ref_ret = ref_gae(token_rewards, values, mask, gamma, lam)
    adv, ret = compute_ppo_advantages(
        t(rewards), t(values), t(kl), torch.from_numpy(mask), kl_coef, gamma, lam
    )
    close(adv, ref_adv)
    close(ret, ref_ret)


def test_ppo_advantages_no_kl_equals_zero_coefficient_and_empty_rows_are_zero():
    rewards, values = t([1.0, -2.0, 3.0]), t([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    mask = t([[1, 1], [1, 0], [0, 0]])
    kl = t([[5.0, 6.0], [7.0, 8.0], [9.0, 1.0]])
    without = compute_ppo_advantages(rewards, values, None, mask, 0.3, 0.9, 0.9)
    zero_coef = compute_ppo_advantages(rewards, values, kl, mask, 0.0, 0.9, 0.9)
    with_kl = compute_ppo_advantages(rewards, values, kl, mask, 0.3, 0.9, 0.9)
    for a, b in zip(without, zero_coef, strict=True):
        close(a, b)
    assert not torch.allclose(without[0], with_kl[0])
    assert torch.all(with_kl[0][2] == 0) and torch.all(with_kl[1][2] == 0)


# --------------------------------------------------------------------------- GRPO


def test_grpo_hand_cases():
    rewards = t([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # Group 0: mean 2, unbiased std 1; group 1 is constant.
    d = 1.0 / (1.0 + 1e-4)
    close(compute_grpo_advantages(rewards, 3), [-d, 0.0, d, 0.0, 0.0, 0.0])
    # Batch: mean 3.5, Σ(r-mean)² = 15.5, unbiased var 15.5/5 = 3.1.
    db = 1.0 / (math.sqrt(3.1) + 1e-4)
    close(compute_grpo_advantages(rewards, 3, scale="batch"), [-db, 0.0, db, 0.0, 0.0, 0.0])
    close(compute_grpo_advantages(rewards, 3, scale="none"), [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    # G = 2: group [1, 2] has std 1/√2.
    d2 = 0.5 / (math.sqrt(0.5) + 0.01)
    close(compute_grpo_advantages(t([1.0, 2.0]), 2, eps=0.01), [-d2, d2])


def test_grpo_group_of_one_and_constant_groups_are_zero():
    assert torch.equal(compute_grpo_advantages(t([1.0, -3.0, 2.0]), 1), torch.zeros(3, dtype=F64))
    # 0.1 repeated is not exactly its own float mean; eps=0 must still give 0, not noise or NaN.
    for scale in ("group", "batch", "none"):
        out = compute_grpo_advantages(t([0.1, 0.1, 0.1, 0.0, 1.0, 0.0]), 3, scale, eps=0.0)
        assert torch.all(torch.isfinite(out))
        assert torch.all(out[:3] == 0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [1, 2, 4, 8])
def test_grpo_matches_loop_reference(scale, group_size):
    rng = np.random.default_rng(group_size)
    rewards = rng.integers(0, 3, size=16).astype(float) + rng.normal(size=16) * (scale == "none")
    out = compute_grpo_advantages(t(rewards), group_size, scale)
    close(out, ref_grpo(rewards, group_size, scale, 1e-4))


def test_grpo_float32_input_keeps_dtype():
    out = compute_grpo_advantages(torch.tensor([0.0, 1.0, 1.0, 0.0]), 2)
    assert out.dtype == torch.float32
    assert out.shape == (4,)


@given(grouped_rewards(), st.sampled_from(["group", "batch", "none"]))
def test_grpo_sums_to_zero_in_each_group(inputs, scale):
    rewards, group_size = inputs
    out = compute_grpo_advantages(rewards, group_size, scale)
    sums = out.view(-1, group_size).sum(1)
    close(sums, torch.zeros_like(sums), atol=1e-8)


@given(grouped_rewards(), st.sampled_from(["group", "none"]), st.data())
def test_grpo_invariant_to_adding_a_constant_per_group(inputs, scale, data):
    rewards, group_size = inputs
    num_groups = rewards.numel() // group_size
    shifts = data.draw(st.lists(finite, min_size=num_groups, max_size=num_groups))
    shifted = rewards + t(shifts).repeat_interleave(group_size)
    close(
        compute_grpo_advantages(shifted, group_size, scale),
        compute_grpo_advantages(rewards, group_size, scale),
        atol=1e-6,
    )


@given(grouped_rewards(), finite)
def test_grpo_batch_scale_invariant_to_a_batch_constant(inputs, shift):
    rewards, group_size = inputs
    close(
        compute_grpo_advantages(rewards + shift, group_size, "batch"),
        compute_grpo_advantages(rewards, group_size, "batch"),
        atol=1e-6,
    )


@given(grouped_rewards(min_group=2), st.data())
def test_grpo_group_scale_invariant_to_positive_scaling_per_group(inputs, data):
    rewards, group_size = inputs
    groups = rewards.view(-1, group_size)
    assume(bool((groups.std(1) > 1e-3).all()))
    factors = data.draw(
        st.lists(st.floats(0.01, 100.0), min_size=groups.shape[0], max_size=groups.shape[0])
    )
    scaled = (groups * t(factors)[:, None]).view(-1)
    close(
        compute_grpo_advantages(scaled, group_size, "group", eps=0.0),
        compute_grpo_advantages(rewards, group_size, "group", eps=0.0),
        atol=1e-8,
    )


# --------------------------------------------------------------------------- RLOO


def test_rloo_hand_case():
    # Σ = 12: A = [1 - 11/3, 2 - 10/3, 3 - 9/3, 6 - 6/3]; second group [0, 1]: [-1, 1].
    out = compute_rloo_advantages(t([1.0, 2.0, 3.0, 6.0]), 4)
    close(out, [-8 / 3, -4 / 3, 0.0, 4.0])
    close(compute_rloo_advantages(t([0.0, 1.0, 1.0, 1.0]), 2), [-1.0, 1.0, 0.0, 0.0])


@pytest.mark.parametrize("group_size", [2, 3, 6])
def test_rloo_matches_loop_reference(group_size):
    rng = np.random.default_rng(300 + group_size)
    rewards = rng.normal(size=12)
    close(compute_rloo_advantages(t(rewards), group_size), ref_rloo(list(rewards), group_size))


@given(grouped_rewards(min_group=2))
def test_rloo_identity_and_zero_sum(inputs):
    rewards, group_size = inputs
    out = compute_rloo_advantages(rewards, group_size)
    groups = rewards.view(-1, group_size)
    identity = group_size / (group_size - 1) * (groups - groups.mean(1, keepdim=True))
    close(out, identity.view(-1), atol=1e-8)
    sums = out.view(-1, group_size).sum(1)
    close(sums, torch.zeros_like(sums), atol=1e-8)


def test_rloo_rejects_group_of_one():
    with pytest.raises(ValueError, match=r"group_size.*>= 2.*got 1"):
        compute_rloo_advantages(t([1.0, 2.0]), 1)


# --------------------------------------------------------------------------- REINFORCE


def test_reinforce_hand_cases():
    rewards = t([1.0, 2.0, 3.0, 6.0])
    close(compute_reinforce_advantages(rewards), [1.0, 2.0, 3.0, 6.0])
    close(compute_reinforce_advantages(rewards, 2, "group"), [-0.5, 0.5, -1.5, 1.5])
    close(compute_reinforce_advantages(rewards, baseline="batch"), [-2.0, -1.0, 0.0, 3.0])
    # Whitening [1, 2, 3]: mean 2, unbiased var 1.
    s = 1.0 / math.sqrt(1.0 + 1e-8)
    close(compute_reinforce_advantages(t([1.0, 2.0, 3.0]), whiten=True), [-s, 0.0, s])


def test_reinforce_token_level_whitening_hand_case():
    # Tokens carry [1, 1, 3]: mean 5/3, unbiased var (4/9 + 4/9 + 16/9) / 2 = 4/3.
    mask = t([[1, 1, 0], [1, 0, 0]])
    out = compute_reinforce_advantages(t([1.0, 3.0]), whiten=True, mask=mask, eps=0.0)
    s = math.sqrt(4 / 3)
    close(out, [[-2 / 3 / s, -2 / 3 / s, 0.0], [4 / 3 / s, 0.0, 0.0]])
    plain = compute_reinforce_advantages(t([1.0, 3.0]), mask=mask)
    close(plain, [[1.0, 1.0, 0.0], [3.0, 0.0, 0.0]])


@pytest.mark.parametrize("baseline", ["none", "group", "batch"])
@pytest.mark.parametrize("use_whiten", [False, True])
@pytest.mark.parametrize("token_level", [False, True])
def test_reinforce_matches_numpy_reference(baseline, use_whiten, token_level):
    rng = np.random.default_rng(400)
    rewards, group_size = rng.normal(size=8), 4
    if baseline == "group":
        expected = rewards - np.repeat(rewards.reshape(-1, 4).mean(1), 4)
    elif baseline == "batch":
        expected = rewards - rewards.mean()
    else:
        expected = rewards.copy()
    mask = random_mask(rng, 8, 5) if token_level else np.ones(8, bool)
    if token_level:
        expected = np.where(mask, expected[:, None], 0.0)
    if use_whiten:
        expected = ref_whiten(expected, mask, True, 1e-8)
    out = compute_reinforce_advantages(
        t(rewards),
        group_size,
        baseline,
        whiten=use_whiten,
        mask=torch.from_numpy(mask) if token_level else None,
    )
    close(out, expected)


@given(grouped_rewards(min_group=2))
def test_reinforce_whitened_group_baseline_is_standardised(inputs):
    rewards, group_size = inputs
    centred = compute_reinforce_advantages(rewards, group_size, "group")
    close(centred.view(-1, group_size).sum(1), torch.zeros(rewards.numel() // group_size,
                                                           dtype=F64), atol=1e-8)
    assume(float(centred.std()) > 1e-3)
    out = compute_reinforce_advantages(rewards, group_size, "group", whiten=True)
    close(out.mean(), torch.tensor(0.0, dtype=F64), atol=1e-8)
    close(out.std(), torch.tensor(1.0, dtype=F64), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- ReMax


def test_remax_hand_case_and_reference():
    close(compute_remax_advantages(t([1.0, 0.0, 0.5]), t([0.5, 0.0, 1.0])), [0.5, 0.0, -0.5])
    rng = np.random.default_rng(500)
    r, g = rng.normal(size=7), rng.normal(size=7)
    close(compute_remax_advantages(t(r), t(g)), [a - b for a, b in zip(r, g, strict=True)])


@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=8))
def test_remax_antisymmetric_and_zero_on_ties(pairs):
    r, g = t([p[0] for p in pairs]), t([p[1] for p in pairs])
    close(compute_remax_advantages(r, g), -compute_remax_advantages(g, r))
    assert torch.all(compute_remax_advantages(r, r) == 0)


# --------------------------------------------------------------------------- whiten


def test_whiten_hand_cases():
    # [1, 2, 3, 4]: mean 2.5, unbiased var 5/3.
    s = math.sqrt(5 / 3)
    expected = [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]
    close(whiten(t([1.0, 2.0, 3.0, 4.0]), eps=0.0), expected)
    close(whiten(t([1.0, 2.0, 3.0, 4.0]), shift_mean=False, eps=0.0), [e + 2.5 for e in expected])
    # Masked: valid [1, 3] -> mean 2, unbiased var 2; the masked NaN is ignored and returned 0.
    out = whiten(t([[1.0, float("nan")], [3.0, 100.0]]), mask=t([[1, 0], [1, 0]]), eps=0.0)
    close(out, [[-1 / math.sqrt(2), 0.0], [1 / math.sqrt(2), 0.0]])


def test_whiten_single_and_empty():
    close(whiten(t([5.0])), [0.0])
    close(whiten(t([5.0]), shift_mean=False), [5.0])
    close(whiten(t([5.0, 6.0]), mask=t([0, 0])), [0.0, 0.0])


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_whiten_matches_numpy_reference(shift_mean, seed):
    rng = np.random.default_rng(600 + seed)
    x = rng.normal(loc=3.0, scale=2.0, size=(4, 6))
    mask = random_mask(rng, 4, 6)
    out = whiten(t(x), torch.from_numpy(mask), shift_mean)
    close(out, ref_whiten(x, mask, shift_mean, 1e-8))


@given(token_inputs(), st.floats(0.1, 10.0), finite)
def test_whiten_standardises_and_ignores_affine_maps(inputs, scale, shift):
    x, _, mask = inputs
    valid = x[mask]
    assume(valid.numel() >= 2 and float(valid.std()) > 1e-2)
    out = whiten(x, mask, eps=0.0)
    assert torch.all(out[~mask] == 0)
    close(out[mask].mean(), torch.tensor(0.0, dtype=F64), atol=1e-8)
    close(out[mask].std(), torch.tensor(1.0, dtype=F64), atol=1e-8)
    close(whiten(x * scale + shift, mask, eps=0.0), out, atol=1e-7)
    kept = whiten(x, mask, shift_mean=False, eps=0.0)
    close(kept[mask].mean(), valid.mean(), atol=1e-8)


# --------------------------------------------------------------------------- bad input

R4 = t([1.0, 2.0, 3.0, 4.0])
R23 = torch.zeros(2, 3, dtype=F64)
NAN4 = t([1.0, float("nan"), 3.0, 4.0])
INF23 = t([[0.0, float("inf"), 0.0], [0.0, 0.0, 0.0]])

BAD_INPUTS = [
    # (function, args, kwargs, exception, message pattern)
    (compute_grpo_advantages, (R4, 3), {}, ValueError, r"group_size.*divide.*4.*3"),
    (compute_grpo_advantages, (R4, 0), {}, ValueError, r"group_size.*>= 1.*got 0"),
    (compute_grpo_advantages, (R4, 2.0), {}, TypeError, r"group_size.*int.*float"),
    (compute_grpo_advantages, (NAN4, 2), {}, ValueError, r"rewards.*finite.*nan.*\(1,\)"),
    (compute_grpo_advantages, (R4, 2), {"scale": "std"}, ValueError, r"scale.*'std'"),
    (compute_grpo_advantages, (R4, 2), {"eps": -1.0}, ValueError, r"eps.*-1.0"),
    (compute_grpo_advantages, (R23, 2), {}, ValueError, r"rewards.*\[B\].*\(2, 3\)"),
    (compute_grpo_advantages, ([1.0, 2.0], 2), {}, TypeError, r"rewards.*Tensor.*list"),
    (compute_rloo_advantages, (R4, 3), {}, ValueError, r"group_size.*divide.*3"),
    (compute_rloo_advantages, (NAN4, 2), {}, ValueError, r"rewards.*nan"),
    (compute_reinforce_advantages, (R4,), {"baseline": "ema"}, ValueError, r"baseline.*'ema'"),
    (compute_reinforce_advantages, (R4,), {"baseline": "group"}, ValueError,
     r"group_size.*baseline='group'.*None"),
    (compute_reinforce_advantages, (R4, 3), {}, ValueError, r"group_size.*divide.*3"),
    (compute_reinforce_advantages, (R4,), {"mask": torch.ones(3, 2)}, ValueError,
     r"mask.*B=4.*\(3, 2\)"),
    (compute_reinforce_advantages, (t([float("inf"), 0.0]),), {}, ValueError, r"rewards.*inf"),
    (compute_remax_advantages, (R4, t([1.0, 2.0])), {}, ValueError,
     r"greedy_rewards.*\(4,\).*\(2,\)"),
    (compute_remax_advantages, (R4, NAN4), {}, ValueError, r"greedy_rewards.*nan"),
    (compute_discounted_returns, (R23, torch.ones(2, 4)), {}, ValueError,
     r"mask.*\(2, 3\).*\(2, 4\)"),
    (compute_discounted_returns, (R23, None, 1.5), {}, ValueError, r"gamma.*1.5"),
    (compute_discounted_returns, (R23, None, float("nan")), {}, ValueError, r"gamma.*nan"),
    (compute_discounted_returns, (INF23, None), {}, ValueError, r"rewards.*inf.*\(0, 1\)"),
    (compute_discounted_returns, (R4, None), {}, ValueError, r"rewards.*\[B, T\].*\(4,\)"),
    (compute_discounted_returns, (R23, torch.full((2, 3), 2.0)), {}, ValueError,
     r"mask.*0 and 1.*2.0"),
    (compute_gae, (R23, torch.zeros(2, 4), None), {}, ValueError, r"values.*\(2, 3\).*\(2, 4\)"),
    (compute_gae, (R23, R23, None, 0.9, -0.1), {}, ValueError, r"lam.*-0.1"),
    (compute_gae, (R23, R23, None, True), {}, TypeError, r"gamma.*bool"),
    (compute_gae, (INF23, R23, None), {}, ValueError, r"rewards.*inf"),
    (compute_gae, (R23, INF23, None), {}, ValueError, r"values.*inf"),
    (compute_ppo_advantages, (t([1.0]), R23, None, None, 0.1), {}, ValueError,
     r"rewards.*B=2.*\(1,\)"),
    (compute_ppo_advantages, (t([1.0, 2.0]), R23, torch.zeros(2, 2), None, 0.1), {}, ValueError,
     r"kl.*\(2, 3\).*\(2, 2\)"),
    (compute_ppo_advantages, (t([1.0, 2.0]), R23, None, None, -0.1), {}, ValueError,
     r"kl_coef.*-0.1"),
    (compute_ppo_advantages, (t([1.0, float("nan")]), R23, None, None, 0.1), {}, ValueError,
     r"rewards.*nan"),
    (compute_ppo_advantages, (t([1.0, 2.0]), R23, INF23, None, 0.1), {}, ValueError,
     r"kl.*inf"),
    (compute_ppo_advantages, (t([1.0, 2.0]), R23, None, None, 0.1, 2.0), {}, ValueError,
     r"gamma.*2.0"),
    (whiten, (R4, torch.ones(3)), {}, ValueError, r"mask.*\(4,\).*\(3,\)"),
    (whiten, (NAN4,), {}, ValueError, r"x.*finite.*nan"),
    (whiten, ("abc",), {}, TypeError, r"x.*Tensor.*str"),
    (whiten, (R4,), {"eps": float("inf")}, ValueError, r"eps.*inf"),
]


@pytest.mark.parametrize(
    "fn, args, kwargs, error, pattern",
    BAD_INPUTS,
    ids=[f"{case[0].__name__}-{i}" for i, case in enumerate(BAD_INPUTS)],
)
def test_bad_input_raises_naming_argument_and_value(fn, args, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        fn(*args, **kwargs)


def test_nan_at_masked_position_is_allowed_but_nan_at_valid_position_is_not():
    rewards = t([[1.0, float("nan")]])
    out = compute_discounted_returns(rewards, t([[1, 0]]), 1.0)
    close(out, [[1.0, 0.0]])
    with pytest.raises(ValueError, match=r"rewards.*nan.*\(0, 1\)"):
        compute_discounted_returns(rewards, t([[1, 1]]), 1.0)


def test_public_names_are_documented_with_a_paper_or_formula():
    expected = {
        "compute_discounted_returns", "compute_gae", "compute_grpo_advantages",
        "compute_rloo_advantages", "compute_reinforce_advantages", "compute_remax_advantages",
        "compute_ppo_advantages", "whiten",
    }
    assert set(advantages_module.__all__) == expected
    for name in expected:
        doc = getattr(advantages_module, name).__doc__
        assert doc and "Args:" in doc and "Returns:" in doc, name
        assert any(ch.isdigit() for ch in doc), f"{name} cites no paper year / equation"
