"""Tests for rlprim.losses: hand-computed cases, independent NumPy references, hypothesis
properties, gradients through autograd, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rlprim.losses import (
    aggregate_loss,
    compute_cispo_loss,
    compute_dapo_loss,
    compute_dpo_loss,
    compute_dpo_pairs,
    compute_entropy_bonus,
    compute_grpo_loss,
    compute_gspo_loss,
    compute_ppo_loss,
    compute_reinforce_loss,
    compute_tis_weights,
    compute_value_loss,
)

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
NAN = float("nan")


def t(x, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, requires_grad=requires_grad)


# --------------------------------------------------------------------------- NumPy references


def np_aggregate(loss: np.ndarray, mask: np.ndarray, mode: str, norm_length=None) -> float:
    """Reference aggregation with explicit loops over rows and tokens."""
    batch, length = loss.shape
    if mode == "token-mean":
        total, count = 0.0, 0
        for b in range(batch):
            for i in range(length):
                if mask[b, i]:
                    total += loss[b, i]
                    count += 1
        return total / count if count else 0.0
    if mode == "seq-mean-token-mean":
        row_means = []
        for b in range(batch):
            values = [loss[b, i] for i in range(length) if mask[b, i]]
            if values:
                row_means.append(sum(values) / len(values))
        return sum(row_means) / len(row_means) if row_means else 0.0
    sums = [sum(loss[b, i] for i in range(length) if mask[b, i]) for b in range(batch)]
    if mode == "seq-mean-token-sum":
        return sum(sums) / batch
    norm = length if norm_length is None else norm_length
    return sum(sums) / (batch * norm)


def np_ppo_per_token(new, old, adv, eps_low, eps_high, dual_c=None) -> np.ndarray:
    ratio = np.exp(np.clip(new - old, -20, 20))
    out = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps_low, 1 + eps_high))
    if dual_c is not None:
        out = np.where(adv < 0, np.minimum(out, -dual_c * adv), out)
    return out


def random_policy_batch(seed: int, batch: int = 4, length: int = 6, scale: float = 0.5):
    rng = np.random.default_rng(seed)
    new = rng.normal(-1.0, 0.5, size=(batch, length))
    old = new + rng.normal(0.0, scale, size=(batch, length))
    adv = rng.normal(size=batch)
    mask = rng.random((batch, length)) < 0.7
    mask[0, 0] = True
    return new, old, adv, mask


# --------------------------------------------------------------------------- aggregate_loss


HAND_LOSS = [[1.0, 3.0, NAN], [5.0, NAN, NAN], [NAN, NAN, NAN]]
HAND_MASK = [[1, 1, 0], [1, 0, 0], [0, 0, 0]]


@pytest.mark.parametrize(
    "mode, norm_length, expected",
    [
        ("token-mean", None, (1 + 3 + 5) / 3),  # 3.0
        ("seq-mean-token-mean", None, (2.0 + 5.0) / 2),  # empty third row excluded: 3.5
        ("seq-mean-token-sum", None, (4.0 + 5.0 + 0.0) / 3),  # 3.0
        ("seq-mean-token-sum-norm", None, 9.0 / (3 * 3)),  # 1.0
        ("seq-mean-token-sum-norm", 6, 9.0 / (3 * 6)),  # 0.5
    ],
)
def test_aggregate_loss_hand_cases(mode, norm_length, expected):
    loss = aggregate_loss(t(HAND_LOSS), t(HAND_MASK), mode, norm_length)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_aggregate_loss_hand_case_two_rows():
    loss = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(7 / 3)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(2.75)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(3.5)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(7 / 6)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm", 4).item() == pytest.approx(7 / 8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(5))
def test_aggregate_loss_matches_numpy_reference(mode, seed):
    rng = np.random.default_rng(seed)
    loss = rng.normal(size=(5, 7))
    mask = rng.random((5, 7)) < 0.5
    mask[1] = False  # an empty row
    got = aggregate_loss(t(loss), torch.tensor(mask), mode, norm_length=9 if seed % 2 else None)
    expected = np_aggregate(loss, mask, mode, norm_length=9 if seed % 2 else None)
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_loss_gradient_weights(mode):
    # d loss / d l_bt: 1/N (token-mean), 1/(R·L_b), 1/B, 1/(B·L), and 0 on masked tokens.
    loss = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    mask = t([[1, 1, 0], [1, 0, 0]])
    aggregate_loss(loss, mask, mode).backward()
    expected = {
        "token-mean": [[1 / 3, 1 / 3, 0], [1 / 3, 0, 0]],
        "seq-mean-token-mean": [[1 / 4, 1 / 4, 0], [1 / 2, 0, 0]],
        "seq-mean-token-sum": [[1 / 2, 1 / 2, 0], [1 / 2, 0, 0]],
        "seq-mean-token-sum-norm": [[1 / 6, 1 / 6, 0], [1 / 6, 0, 0]],
    }[mode]
    torch.testing.assert_close(loss.grad, t(expected))


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_loss_empty_mask_is_zero_and_differentiable(mode):
    loss = t([[NAN, 1.0], [2.0, float("inf")]], requires_grad=True)
    out = aggregate_loss(loss, torch.zeros(2, 2, dtype=torch.bool), mode)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(loss.grad, torch.zeros(2, 2, dtype=torch.float64))


def test_aggregate_loss_float_and_bool_masks_agree_and_none_means_all():
    loss = t([[1.0, 2.0], [3.0, 5.0]])
    for mode in MODES:
        a = aggregate_loss(loss, torch.tensor([[True, False], [True, True]]), mode)
        b = aggregate_loss(loss, torch.tensor([[1.0, 0.0], [1.0, 1.0]]), mode)
        assert a.item() == b.item()
        full = aggregate_loss(loss, None, mode)
        assert full.item() == aggregate_loss(loss, torch.ones(2, 2), mode).item()


@given(
    st.integers(1, 4),
    st.integers(1, 5),
    st.floats(-5, 5, allow_nan=False),
    st.integers(0, 2**31 - 1),
)
def test_aggregate_loss_properties(batch, length, constant, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((batch, length)) < 0.6
    mask[0, 0] = True
    values = rng.normal(size=(batch, length))
    # A constant loss averages to itself under both mean modes.
    const = np.full((batch, length), constant)
    for mode in ("token-mean", "seq-mean-token-mean"):
        got = aggregate_loss(t(const), torch.tensor(mask), mode).item()
        assert got == pytest.approx(constant, abs=1e-9)
    # Every mode is linear in the loss.
    for mode in MODES:
        a = aggregate_loss(t(values), torch.tensor(mask), mode).item()
        b = aggregate_loss(t(3.0 * values + 1.0 * values), torch.tensor(mask), mode).item()
        assert b == pytest.approx(4.0 * a, abs=1e-9)
    # With full rows, token-mean = seq-mean-token-mean and token-sum-norm = token-sum / T.
    full = np.ones((batch, length), dtype=bool)
    tm = aggregate_loss(t(values), torch.tensor(full), "token-mean").item()
    sm = aggregate_loss(t(values), torch.tensor(full), "seq-mean-token-mean").item()
    ss = aggregate_loss(t(values), torch.tensor(full), "seq-mean-token-sum").item()
    sn = aggregate_loss(t(values), torch.tensor(full), "seq-mean-token-sum-norm").item()
    assert tm == pytest.approx(sm, abs=1e-9)
    assert sn == pytest.approx(ss / length, abs=1e-9)


def test_aggregate_loss_bad_input():
    loss = t([[1.0, 2.0]])
    with pytest.raises(ValueError, match="mode.*'mean'"):
        aggregate_loss(loss, None, "mean")
    with pytest.raises(ValueError, match=r"mask.*\(1, 2\).*\(1, 3\)"):
        aggregate_loss(loss, torch.ones(1, 3), "token-mean")
    with pytest.raises(ValueError, match="norm_length.*0"):
        aggregate_loss(loss, None, "seq-mean-token-sum-norm", norm_length=0)
    with pytest.raises(ValueError, match="mask.*0 and 1.*0.5"):
        aggregate_loss(loss, t([[1.0, 0.5]]), "token-mean")
    with pytest.raises(ValueError, match=r"per_token_loss.*\[B, T\].*\(2,\)"):
        aggregate_loss(t([1.0, 2.0]), None)
    with pytest.raises(TypeError, match="per_token_loss"):
        aggregate_loss([[1.0, 2.0]], None)


# --------------------------------------------------------------------------- PPO


@given(
    st.integers(1, 4),
    st.integers(1, 5),
    st.integers(0, 2**31 - 1),
    st.sampled_from(MODES),
)
def test_ppo_equals_plain_policy_gradient_where_nothing_clips(batch, length, seed, mode):
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.0, 0.5, size=(batch, length))
    log_ratio = rng.uniform(math.log(0.8) + 1e-3, math.log(1.2) - 1e-3, size=(batch, length))
    new = old + log_ratio
    adv = rng.normal(size=batch)
    mask = rng.random((batch, length)) < 0.7
    loss, metrics = compute_ppo_loss(t(new), t(old), t(adv), torch.tensor(mask), loss_agg_mode=mode)
    plain = -adv[:, None] * np.exp(log_ratio)
    assert loss.item() == pytest.approx(np_aggregate(plain, mask, mode), abs=1e-10)
    assert metrics["clip_fraction"] == 0.0


@given(st.integers(0, 2**31 - 1), st.floats(0.05, 0.4), st.floats(0.05, 0.4))
def test_ppo_gradient_is_zero_exactly_on_clipped_tokens(seed, eps_low, eps_high):
    rng = np.random.default_rng(seed)
    batch, length = 3, 8
    old = rng.normal(-1.0, 0.5, size=(batch, length))
    new = old + rng.normal(0.0, 0.6, size=(batch, length))
    adv = rng.normal(size=(batch, length))
    mask = rng.random((batch, length)) < 0.8
    new_t = t(new, requires_grad=True)
    loss, metrics = compute_ppo_loss(new_t, t(old), t(adv), torch.tensor(mask), eps_low, eps_high)
    loss.backward()
    ratio = np.exp(new - old)
    clipped = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
    count = mask.sum()
    grad = new_t.grad.numpy()
    assert np.all(grad[clipped | ~mask] == 0.0)
    free = ~clipped & mask
    np.testing.assert_allclose(grad[free], (-adv * ratio / count)[free], rtol=1e-10)
    assert metrics["clip_fraction"] == pytest.approx((clipped & mask).sum() / count)


@pytest.mark.parametrize("mode", MODES)
def test_ppo_at_ratio_one_is_minus_mean_advantage_with_reinforce_gradient(mode):
    logp = t([[-1.0, -2.0, -0.5], [-0.3, -4.0, -1.5]])
    adv = t([0.7, -1.3])
    mask = t([[1, 1, 0], [1, 1, 1]])
    new = logp.clone().requires_grad_(True)
    loss, metrics = compute_ppo_loss(new, logp, adv, mask, loss_agg_mode=mode)
    if mode == "token-mean":
        assert loss.item() == pytest.approx(-(2 * 0.7 + 3 * -1.3) / 5)  # -mean over tokens
    loss.backward()
    new_r = logp.clone().requires_grad_(True)
    loss_r, _ = compute_reinforce_loss(new_r, adv, mask, loss_agg_mode=mode)
    loss_r.backward()
    torch.testing.assert_close(new.grad, new_r.grad, rtol=1e-12, atol=1e-12)
    assert metrics["ratio_mean"] == 1.0 and metrics["approx_kl"] == 0.0


def test_ppo_dual_clip_hand_case():
    # Tokens: (A=-1, r=5): max(5, 1.2)=5 -> min(5, c=3)=3, dual clip, grad 0.
    #         (A=-1, r=2): max(2, 1.2)=2 -> 2 < 3, grad -A·r/3 = 2/3.
    #         (A=+1, r=5): max(-5, -1.2) = -1.2 clipped, grad 0.
    old = t([[0.0, 0.0, 0.0]])
    new = t([[math.log(5.0), math.log(2.0), math.log(5.0)]], requires_grad=True)
    adv = t([[-1.0, -1.0, 1.0]])
    loss, metrics = compute_ppo_loss(new, old, adv, None, dual_clip_c=3.0)
    assert loss.item() == pytest.approx((3.0 + 2.0 - 1.2) / 3)
    loss.backward()
    torch.testing.assert_close(new.grad, t([[0.0, 2.0 / 3.0, 0.0]]))
    assert metrics["dual_clip_fraction"] == pytest.approx(1 / 3)
    assert metrics["clip_fraction"] == pytest.approx(1 / 3)
    assert metrics["ratio_max"] == pytest.approx(5.0) and metrics["ratio_min"] == pytest.approx(2.0)
    # Without the dual clip the first token costs 5.
    plain, _ = compute_ppo_loss(new, old, adv, None)
    assert plain.item() == pytest.approx((5.0 + 2.0 - 1.2) / 3)


def test_ppo_asymmetric_clip_hand_case():
    # ε_low=0.2, ε_high=0.28: (A=+1, r=1.25) free: -1.25; (A=+1, r=1.4) clipped: -1.28;
    # (A=-1, r=0.7) clipped: 0.8; (A=-1, r=0.9) free: 0.9.
    ratios = [1.25, 1.4, 0.7, 0.9]
    old = t([[0.0] * 4])
    new = t([[math.log(r) for r in ratios]], requires_grad=True)
    adv = t([[1.0, 1.0, -1.0, -1.0]])
    loss, metrics = compute_ppo_loss(new, old, adv, None, clip_eps_low=0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.8 + 0.9) / 4)
    assert metrics["clip_fraction"] == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(new.grad, t([[-1.25 / 4, 0.0, 0.0, 0.9 / 4]]))
    # Symmetric 0.2 clips the first token too.
    sym, sym_metrics = compute_ppo_loss(new, old, adv, None, clip_eps_low=0.2)
    assert sym.item() == pytest.approx((-1.2 - 1.2 + 0.8 + 0.9) / 4)
    assert sym_metrics["clip_fraction"] == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", MODES)
def test_ppo_matches_numpy_reference(seed, mode):
    new, old, adv, mask = random_policy_batch(seed)
    loss, metrics = compute_ppo_loss(
        t(new), t(old), t(adv), torch.tensor(mask), 0.2, 0.28, 3.0, loss_agg_mode=mode
    )
    per_token = np_ppo_per_token(new, old, adv[:, None], 0.2, 0.28, 3.0)
    assert loss.item() == pytest.approx(np_aggregate(per_token, mask, mode), abs=1e-10)
    ratio = np.exp(new - old)[mask]
    assert metrics["ratio_mean"] == pytest.approx(ratio.mean())
    assert metrics["ratio_max"] == pytest.approx(ratio.max())
    assert metrics["approx_kl"] == pytest.approx(np.mean(ratio - 1 - np.log(ratio)))


def test_ppo_metrics_hand_case():
    # r = [2, 0.5] -> k3(old‖new) = r - 1 - log r = [1 - ln 2, ln 2 - 0.5].
    new = t([[math.log(2.0), math.log(0.5)]])
    loss, m = compute_ppo_loss(new, t([[0.0, 0.0]]), t([0.0]), None)
    assert loss.item() == 0.0 and m["clip_fraction"] == 0.0
    assert m["ratio_mean"] == pytest.approx(1.25)
    assert m["approx_kl"] == pytest.approx(((1 - math.log(2)) + (math.log(2) - 0.5)) / 2)


def test_ppo_masked_garbage_never_reaches_loss_or_gradient():
    new = t([[-1.0, NAN], [-0.5, float("-inf")]], requires_grad=True)
    old = t([[-1.2, NAN], [-0.4, 3.0]])
    adv = t([[1.0, NAN], [-2.0, float("inf")]])
    mask = t([[1, 0], [1, 0]])
    loss, metrics = compute_ppo_loss(new, old, adv, mask, dual_clip_c=3.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(new.grad).all()
    assert new.grad[0, 1] == 0 and new.grad[1, 1] == 0
    assert all(math.isfinite(v) for v in metrics.values())


def test_ppo_huge_log_ratio_is_clamped():
    new = t([[100.0]], requires_grad=True)
    loss, metrics = compute_ppo_loss(new, t([[0.0]]), t([-1.0]), None)
    loss.backward()
    assert loss.item() == pytest.approx(math.exp(20.0))
    assert torch.isfinite(new.grad).all()


def test_ppo_bad_input():
    x = t([[0.0, 0.0]])
    with pytest.raises(ValueError, match=r"old_logprobs.*new_logprobs.*\(1, 2\).*\(1, 3\)"):
        compute_ppo_loss(x, t([[0.0, 0.0, 0.0]]), t([1.0]), None)
    with pytest.raises(ValueError, match=r"advantages.*\(3,\)"):
        compute_ppo_loss(x, x, t([1.0, 2.0, 3.0]), None)
    with pytest.raises(ValueError, match=r"mask.*\(2, 2\)"):
        compute_ppo_loss(x, x, t([1.0]), torch.ones(2, 2))
    with pytest.raises(ValueError, match="clip_eps_low.*-0.1"):
        compute_ppo_loss(x, x, t([1.0]), None, clip_eps_low=-0.1)
    with pytest.raises(ValueError, match="clip_eps_high.*-0.2"):
        compute_ppo_loss(x, x, t([1.0]), None, clip_eps_high=-0.2)
    with pytest.raises(ValueError, match="dual_clip_c.*1.0"):
        compute_ppo_loss(x, x, t([1.0]), None, dual_clip_c=1.0)
    with pytest.raises(ValueError, match="loss_agg_mode.*'sum'"):
        compute_ppo_loss(x, x, t([1.0]), None, loss_agg_mode="sum")
    with pytest.raises(ValueError, match=r"new_logprobs.*\[B, T\]"):
        compute_ppo_loss(t([0.0]), t([0.0]), t([1.0]), None)
    with pytest.raises(TypeError, match="new_logprobs.*floating"):
        compute_ppo_loss(torch.zeros(1, 2, dtype=torch.long), x, t([1.0]), None)


# --------------------------------------------------------------------------- GRPO / DAPO


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_grpo_is_ppo_plus_beta_k3_numpy_reference(seed, mode):
    new, old, adv, mask = random_policy_batch(seed)
    ref = new + np.random.default_rng(seed + 100).normal(0.0, 0.3, size=new.shape)
    beta = 0.04
    loss, metrics = compute_grpo_loss(
        t(new), t(old), t(adv), torch.tensor(mask), t(ref), kl_coef=beta, loss_agg_mode=mode
    )
    d = new - ref
    k3 = np.exp(-d) + d - 1.0
    per_token = np_ppo_per_token(new, old, adv[:, None], 0.2, 0.2) + beta * k3
    assert loss.item() == pytest.approx(np_aggregate(per_token, mask, mode), abs=1e-10)
    assert metrics["kl"] == pytest.approx(k3[mask].mean())
    ppo_loss, _ = compute_ppo_loss(t(new), t(old), t(adv), torch.tensor(mask), loss_agg_mode=mode)
    assert metrics["policy_loss"] == pytest.approx(ppo_loss.item())


def test_grpo_hand_case_and_kl_gradient():
    # One token, r = 1, A = 0: loss = β·k3(d = ln 2) = β·(1/2 + ln 2 - 1); grad β·(1 - e^{-d}).
    new = t([[math.log(2.0)]], requires_grad=True)
    loss, metrics = compute_grpo_loss(new, new.detach(), t([0.0]), None, t([[0.0]]), kl_coef=0.1)
    assert loss.item() == pytest.approx(0.1 * (0.5 + math.log(2.0) - 1.0))
    assert metrics["kl"] == pytest.approx(0.5 + math.log(2.0) - 1.0)
    loss.backward()
    assert new.grad.item() == pytest.approx(0.1 * (1.0 - 0.5))


def test_grpo_kl_options():
    new, old, adv, mask = random_policy_batch(7)
    ref = new - 0.3
    args = (t(new), t(old), t(adv), torch.tensor(mask))
    base, _ = compute_ppo_loss(*args)
    zero_beta, m0 = compute_grpo_loss(*args, ref_logprobs=t(ref), kl_coef=0.0)
    assert zero_beta.item() == pytest.approx(base.item())
    assert m0["kl"] > 0.0  # still reported
    no_ref, m1 = compute_grpo_loss(*args)
    assert no_ref.item() == pytest.approx(base.item()) and m1["kl"] == 0.0
    # k1 of d = 0.3 everywhere: β·0.3 on top.
    k1, _ = compute_grpo_loss(*args, ref_logprobs=t(ref), kl_coef=0.5, kl_estimator="k1")
    assert k1.item() == pytest.approx(base.item() + 0.5 * 0.3)
    # A custom kl_fn is used instead of the estimator.
    custom, mc = compute_grpo_loss(
        *args, ref_logprobs=t(ref), kl_coef=0.5, kl_fn=lambda lp, rl: torch.full_like(lp, 2.0)
    )
    assert custom.item() == pytest.approx(base.item() + 1.0)
    assert mc["kl"] == pytest.approx(2.0)


def test_grpo_bad_input():
    x = t([[0.0, 0.0]])
    with pytest.raises(ValueError, match="ref_logprobs.*kl_coef=0.1"):
        compute_grpo_loss(x, x, t([1.0]), None, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_estimator.*'k4'"):
        compute_grpo_loss(x, x, t([1.0]), None, x, kl_coef=0.1, kl_estimator="k4")
    with pytest.raises(ValueError, match=r"ref_logprobs.*\(1, 2\).*\(2, 2\)"):
        compute_grpo_loss(x, x, t([1.0]), None, torch.zeros(2, 2, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="kl_coef.*-0.1"):
        compute_grpo_loss(x, x, t([1.0]), None, x, kl_coef=-0.1)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        compute_grpo_loss(x, x, t([1.0]), None, loss_agg_mode="bad")


def test_dapo_uses_clip_higher_defaults():
    # (A=+1, r=1.25): inside DAPO's 1.28, clipped by PPO's 1.2.
    new = t([[math.log(1.25), math.log(1.5)]])
    old = t([[0.0, 0.0]])
    loss, metrics = compute_dapo_loss(new, old, t([1.0]), None)
    assert loss.item() == pytest.approx((-1.25 - 1.28) / 2)
    assert metrics["clip_fraction"] == pytest.approx(0.5)
    for seed in range(3):
        new_np, old_np, adv_np, mask_np = random_policy_batch(seed)
        args = (t(new_np), t(old_np), t(adv_np), torch.tensor(mask_np))
        dapo, _ = compute_dapo_loss(*args)
        ppo, _ = compute_ppo_loss(*args, clip_eps_low=0.2, clip_eps_high=0.28)
        assert dapo.item() == ppo.item()


# --------------------------------------------------------------------------- GSPO


def np_gspo(new, old, adv, mask, eps_low, eps_high) -> float:
    losses = []
    for i in range(new.shape[0]):
        tokens = [new[i, j] - old[i, j] for j in range(new.shape[1]) if mask[i, j]]
        if not tokens:
            continue
        s = math.exp(sum(tokens) / len(tokens))
        losses.append(max(-adv[i] * s, -adv[i] * min(max(s, 1 - eps_low), 1 + eps_high)))
    return sum(losses) / len(losses) if losses else 0.0


def test_gspo_hand_case_and_sequence_ratio():
    # Row 0: log r = [0.1, 0.3] -> s = e^0.2 ≈ 1.2214, A=+1 -> clipped at 1.2: -1.2.
    # Row 1: log r = [-0.2] (second token masked) -> s = e^-0.2 ≈ 0.8187, A=-1: 0.8187.
    new = t([[0.1, 0.3], [-0.2, NAN]], requires_grad=True)
    old = t([[0.0, 0.0], [0.0, 0.0]])
    mask = t([[1, 1], [1, 0]])
    loss, m = compute_gspo_loss(new, old, t([1.0, -1.0]), mask, 0.2, 0.2)
    assert loss.item() == pytest.approx((-1.2 + math.exp(-0.2)) / 2)
    assert m["clip_fraction"] == pytest.approx(0.5)
    assert m["ratio_max"] == pytest.approx(math.exp(0.2))
    assert m["ratio_min"] == pytest.approx(math.exp(-0.2))
    assert m["ratio_mean"] == pytest.approx((math.exp(0.2) + math.exp(-0.2)) / 2)
    loss.backward()
    # Row 0 clipped: 0. Row 1: d(-A·s)/d new = -A·s/|y| / 2 = e^-0.2 / 2.
    torch.testing.assert_close(new.grad, t([[0.0, 0.0], [math.exp(-0.2) / 2, 0.0]]))


@pytest.mark.parametrize("seed", range(6))
def test_gspo_matches_numpy_reference_with_paper_defaults(seed):
    new, old, adv, mask = random_policy_batch(seed, scale=0.002)
    mask[2] = False  # an empty sequence is excluded
    loss, metrics = compute_gspo_loss(t(new), t(old), t(adv), torch.tensor(mask))
    assert loss.item() == pytest.approx(np_gspo(new, old, adv, mask, 3e-4, 4e-4), abs=1e-12)
    ratios = [np.exp((new - old)[i][mask[i]].mean()) for i in range(4) if mask[i].any()]
    assert metrics["ratio_mean"] == pytest.approx(np.mean(ratios))


@pytest.mark.parametrize("seed", range(4))
def test_gspo_token_variant_equals_gspo_with_sequence_advantages(seed):
    new, old, adv, mask = random_policy_batch(seed, scale=0.001)
    grads = []
    losses = []
    for variant, advantages in (("sequence", t(adv)), ("token", t(np.repeat(adv[:, None], 6, 1)))):
        new_t = t(new, requires_grad=True)
        loss, _ = compute_gspo_loss(new_t, t(old), advantages, torch.tensor(mask), variant=variant)
        loss.backward()
        losses.append(loss.item())
        grads.append(new_t.grad)
    assert losses[0] == pytest.approx(losses[1], abs=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_gspo_bad_input():
    x = t([[0.0, 0.0]])
    with pytest.raises(ValueError, match=r"advantages.*\[B\].*variant='token'.*\(1, 2\)"):
        compute_gspo_loss(x, x, t([[1.0, 1.0]]), None)
    with pytest.raises(ValueError, match="variant.*'tokens'"):
        compute_gspo_loss(x, x, t([1.0]), None, variant="tokens")
    with pytest.raises(ValueError, match="clip_eps_low.*-0.001"):
        compute_gspo_loss(x, x, t([1.0]), None, clip_eps_low=-1e-3)
    with pytest.raises(ValueError, match=r"old_logprobs.*\(1, 2\).*\(1, 1\)"):
        compute_gspo_loss(x, t([[0.0]]), t([1.0]), None)


# --------------------------------------------------------------------------- CISPO


def test_cispo_gradient_uses_detached_clipped_weight_even_where_clipped():
    # r = [2, 0.5, 7, 1.5], A = [1, -1, 1, -1], ε_high = 4 (cap 5), no lower bound:
    # w = [2, 0.5, 5, 1.5]; grad_t = -w·A/N with N = 4, nonzero on the clipped third token.
    old = t([[-1.0, -1.0, -3.0, -2.0]])
    ratios = [2.0, 0.5, 7.0, 1.5]
    new = t(
        [[o + math.log(r) for o, r in zip(old[0].tolist(), ratios, strict=True)]],
        requires_grad=True,
    )
    adv = t([[1.0, -1.0, 1.0, -1.0]])
    loss, metrics = compute_cispo_loss(new, old, adv, None, clip_eps_high=4.0)
    loss.backward()
    weights = np.array([2.0, 0.5, 5.0, 1.5])
    expected_grad = -weights * np.array([1.0, -1.0, 1.0, -1.0]) / 4
    np.testing.assert_allclose(new.grad.numpy()[0], expected_grad, rtol=1e-12)
    expected_loss = np.sum(-weights * adv.numpy()[0] * new.detach().numpy()[0]) / 4
    assert loss.item() == pytest.approx(expected_loss)
    assert metrics["clip_fraction"] == pytest.approx(0.25)
    # PPO would silence that clipped token; CISPO does not.
    new_p = new.detach().clone().requires_grad_(True)
    ppo, _ = compute_ppo_loss(new_p, old, adv, None, clip_eps_high=4.0)
    ppo.backward()
    assert new_p.grad[0, 2] == 0.0 and new.grad[0, 2] != 0.0


def test_cispo_lower_bound_when_given():
    new = t([[math.log(0.5)]], requires_grad=True)
    loss, m = compute_cispo_loss(new, t([[0.0]]), t([1.0]), None, clip_eps_low=0.2)
    loss.backward()
    assert new.grad.item() == pytest.approx(-0.8)  # w = clip(0.5, 0.8, 5) = 0.8
    assert m["clip_fraction"] == 1.0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_cispo_matches_numpy_reference(seed, mode):
    new, old, adv, mask = random_policy_batch(seed, scale=1.5)
    new_t = t(new, requires_grad=True)
    loss, _ = compute_cispo_loss(
        new_t, t(old), t(adv), torch.tensor(mask), clip_eps_high=0.5, loss_agg_mode=mode
    )
    weight = np.minimum(np.exp(new - old), 1.5)
    per_token = -weight * adv[:, None] * new
    assert loss.item() == pytest.approx(np_aggregate(per_token, mask, mode), abs=1e-10)
    loss.backward()
    count = mask.sum() if mode == "token-mean" else new.size
    expected = np.where(mask, -weight * adv[:, None] / count, 0.0)
    np.testing.assert_allclose(new_t.grad.numpy(), expected, rtol=1e-10, atol=1e-15)


def test_cispo_bad_input():
    x = t([[0.0]])
    with pytest.raises(ValueError, match="clip_eps_high.*-1"):
        compute_cispo_loss(x, x, t([1.0]), None, clip_eps_high=-1.0)
    with pytest.raises(ValueError, match="clip_eps_low.*-1"):
        compute_cispo_loss(x, x, t([1.0]), None, clip_eps_low=-1.0)
    with pytest.raises(ValueError, match=r"advantages.*\(2,\)"):
        compute_cispo_loss(x, x, t([1.0, 2.0]), None)


# --------------------------------------------------------------------------- REINFORCE


def test_reinforce_hand_case():
    # Per token -A·logp: [1, 2], [-1, masked] -> token-mean 2/3; grad -A/N.
    new = t([[-1.0, -2.0], [-0.5, NAN]], requires_grad=True)
    mask = t([[1, 1], [1, 0]])
    loss, metrics = compute_reinforce_loss(new, t([1.0, -2.0]), mask)
    assert loss.item() == pytest.approx(2 / 3)
    assert metrics["policy_loss"] == pytest.approx(2 / 3)
    loss.backward()
    torch.testing.assert_close(new.grad, t([[-1 / 3, -1 / 3], [2 / 3, 0.0]]))
    seq, _ = compute_reinforce_loss(new, t([1.0, -2.0]), mask, "seq-mean-token-sum")
    assert seq.item() == pytest.approx((3.0 - 1.0) / 2)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", MODES)
def test_reinforce_matches_numpy_reference(seed, mode):
    new, _, _, mask = random_policy_batch(seed)
    adv = np.random.default_rng(seed).normal(size=new.shape)  # [B, T] advantages
    loss, _ = compute_reinforce_loss(t(new), t(adv), torch.tensor(mask), mode)
    assert loss.item() == pytest.approx(np_aggregate(-adv * new, mask, mode), abs=1e-10)


def test_reinforce_bad_input():
    with pytest.raises(ValueError, match=r"advantages.*\(3,\)"):
        compute_reinforce_loss(t([[0.0]]), t([1.0, 2.0, 3.0]), None)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        compute_reinforce_loss(t([[0.0]]), t([1.0]), None, "nope")


# --------------------------------------------------------------------------- value loss


def test_value_loss_clipped_hand_case():
    # old=1, clip 0.2 for all:
    #   V=1.5, R=2: V_clip=1.2: max(0.25, 0.64) -> 0.32 (clipped, grad 0)
    #   V=1.5, R=0: V_clip=1.2: max(2.25, 1.44) -> 1.125 (grad V-R = 1.5)
    #   V=1.1, R=2: inside the range: 0.405 (grad -0.9)
    new = t([[1.5, 1.5, 1.1]], requires_grad=True)
    old = t([[1.0, 1.0, 1.0]])
    returns = t([[2.0, 0.0, 2.0]])
    loss, metrics = compute_value_loss(new, old, returns, None, value_clip=0.2)
    assert loss.item() == pytest.approx((0.32 + 1.125 + 0.405) / 3)
    assert metrics["value_clip_fraction"] == pytest.approx(1 / 3)
    loss.backward()
    torch.testing.assert_close(new.grad, t([[0.0, 1.5 / 3, -0.9 / 3]]))
    plain, m = compute_value_loss(new, old, returns, None, value_clip=None)
    assert plain.item() == pytest.approx((0.125 + 1.125 + 0.405) / 3)
    assert m["value_clip_fraction"] == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_value_loss_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    new, old, returns = (rng.normal(size=(3, 5)) for _ in range(3))
    mask = rng.random((3, 5)) < 0.7
    loss, _ = compute_value_loss(t(new), t(old), t(returns), torch.tensor(mask), 0.3)
    v_clip = old + np.clip(new - old, -0.3, 0.3)
    per_token = 0.5 * np.maximum((new - returns) ** 2, (v_clip - returns) ** 2)
    assert loss.item() == pytest.approx(np_aggregate(per_token, mask, "token-mean"), abs=1e-12)


def test_value_loss_bad_input():
    x = t([[0.0, 0.0]])
    with pytest.raises(ValueError, match=r"returns.*new_values.*\(1, 2\).*\(1, 3\)"):
        compute_value_loss(x, x, t([[0.0, 0.0, 0.0]]), None)
    with pytest.raises(ValueError, match="value_clip.*-0.2"):
        compute_value_loss(x, x, x, None, value_clip=-0.2)


# --------------------------------------------------------------------------- entropy


def test_entropy_bonus_sign_and_value():
    entropy = t([[1.0, 2.0], [3.0, NAN]], requires_grad=True)
    mask = t([[1, 1], [1, 0]])
    term, metrics = compute_entropy_bonus(entropy, mask, 0.01)
    assert term.item() == pytest.approx(-0.02)
    assert metrics["entropy"] == pytest.approx(2.0)
    term.backward()
    # Minimising the term raises entropy: its gradient w.r.t. entropy is negative.
    torch.testing.assert_close(entropy.grad, t([[-0.01 / 3, -0.01 / 3], [-0.01 / 3, 0.0]]))
    zero, _ = compute_entropy_bonus(entropy, mask, 0.0)
    assert zero.item() == 0.0
    with pytest.raises(ValueError, match="entropy_coef.*nan"):
        compute_entropy_bonus(entropy, mask, NAN)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        compute_entropy_bonus(entropy, mask, 0.1, "x")


# --------------------------------------------------------------------------- DPO


def test_dpo_pairs_hand_groups():
    rewards = t([1, 3, 2, 5, 5, 5, 0, 2, 2, 4, 1, 1])
    chosen, rejected = compute_dpo_pairs(rewards, group_size=3)
    # group 1 (all 5) skipped; ties: first max (7), first min (10).
    assert chosen.tolist() == [1, 7, 9]
    assert rejected.tolist() == [0, 6, 10]
    assert chosen.dtype == torch.long and rejected.dtype == torch.long
    none_c, none_r = compute_dpo_pairs(t([1.0, 1.0, 2.0, 2.0]), 2)
    assert none_c.shape == (0,) and none_r.shape == (0,)


@given(st.integers(1, 6), st.integers(0, 4), st.data())
def test_dpo_pairs_match_loop_reference(group_size, num_groups, data):
    size = group_size * num_groups
    values = data.draw(st.lists(st.integers(0, 3), min_size=size, max_size=size))
    chosen, rejected = compute_dpo_pairs(torch.tensor(values, dtype=torch.float32), group_size)
    exp_c, exp_r = [], []
    for start in range(0, len(values), group_size):
        group = values[start : start + group_size]
        if max(group) == min(group):
            continue
        exp_c.append(start + group.index(max(group)))
        exp_r.append(start + group.index(min(group)))
    assert chosen.tolist() == exp_c and rejected.tolist() == exp_r
    for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True):
        assert values[c] > values[r]


def test_dpo_pairs_bad_input():
    with pytest.raises(ValueError, match="group_size.*3"):
        compute_dpo_pairs(t([1.0, 2.0, 3.0, 4.0]), 3)
    with pytest.raises(ValueError, match="rewards.*nan.*index 2"):
        compute_dpo_pairs(t([1.0, 2.0, NAN, 4.0]), 2)
    with pytest.raises(ValueError, match="group_size.*0"):
        compute_dpo_pairs(t([1.0, 2.0]), 0)
    with pytest.raises(ValueError, match=r"rewards.*\[B\]"):
        compute_dpo_pairs(t([[1.0, 2.0]]), 1)


def np_dpo(pc, pr, rc, rr, beta, loss_type) -> float:
    out = []
    for i in range(len(pc)):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if loss_type == "sigmoid":
            out.append(math.log1p(math.exp(-beta * h)))
        elif loss_type == "ipo":
            out.append((h - 1 / (2 * beta)) ** 2)
        else:
            out.append(max(0.0, 1 - beta * h))
    return sum(out) / len(out)


@pytest.mark.parametrize(
    "loss_type, expected", [("sigmoid", math.log(2)), ("ipo", 25.0), ("hinge", 1.0)]
)
def test_dpo_loss_at_zero_margin(loss_type, expected):
    x = t([-3.0, -5.0])
    loss, metrics = compute_dpo_loss(x, x, x, x, beta=0.1, loss_type=loss_type)
    assert loss.item() == pytest.approx(expected)
    assert metrics["reward_accuracy"] == 0.0 and metrics["reward_margin"] == 0.0


def test_dpo_loss_hand_case_and_metrics():
    # h = (−1 − (−2)) − (−3 − (−2.5)) = 1 + 0.5 = 1.5; β = 0.5: -log σ(0.75).
    pc, pr, rc, rr = t([-1.0], True), t([-3.0], True), t([-2.0]), t([-2.5])
    loss, m = compute_dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.75)))
    assert m["chosen_reward"] == pytest.approx(0.5) and m["rejected_reward"] == pytest.approx(-0.25)
    assert m["reward_margin"] == pytest.approx(0.75) and m["reward_accuracy"] == 1.0
    loss.backward()
    # d/dπ_c = -β·σ(-βh) < 0 (raise the chosen), d/dπ_r = +β·σ(-βh).
    sig = 1 / (1 + math.exp(0.75))
    assert pc.grad.item() == pytest.approx(-0.5 * sig)
    assert pr.grad.item() == pytest.approx(0.5 * sig)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("seed", range(3))
def test_dpo_loss_matches_numpy_reference(loss_type, seed):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (rng.normal(-20, 3, size=7) for _ in range(4))
    loss, m = compute_dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=0.2, loss_type=loss_type)
    assert loss.item() == pytest.approx(np_dpo(pc, pr, rc, rr, 0.2, loss_type), rel=1e-10)
    h = (pc - rc) - (pr - rr)
    assert m["reward_accuracy"] == pytest.approx(np.mean(h > 0))


def test_dpo_loss_no_pairs_and_bad_input():
    empty = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    loss, metrics = compute_dpo_loss(empty, empty, empty, empty)
    assert loss.item() == 0.0 and all(v == 0.0 for v in metrics.values())
    loss.backward()
    x = t([0.0, 0.0])
    with pytest.raises(ValueError, match=r"ref_rejected_logps.*\(2,\).*\(3,\)"):
        compute_dpo_loss(x, x, x, t([0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="loss_type.*'kto'"):
        compute_dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="beta.*0"):
        compute_dpo_loss(x, x, x, x, beta=0.0)


# --------------------------------------------------------------------------- empty masks


def _empty_mask_losses(new, old, adv, mask):
    ref = old
    return [
        compute_ppo_loss(new, old, adv, mask, dual_clip_c=3.0),
        compute_grpo_loss(new, old, adv, mask, ref, kl_coef=0.1),
        compute_dapo_loss(new, old, adv, mask),
        compute_gspo_loss(new, old, adv, mask),
        compute_gspo_loss(new, old, adv, mask, variant="token"),
        compute_cispo_loss(new, old, adv, mask),
        compute_reinforce_loss(new, adv, mask),
        compute_value_loss(new, old, old, mask),
        compute_entropy_bonus(new, mask, 0.1),
    ]


@pytest.mark.parametrize("mode", MODES)
def test_no_nan_on_empty_masks(mode):
    new = t([[NAN, -1.0], [-2.0, float("-inf")]], requires_grad=True)
    old = t([[-1.0, NAN], [-2.0, -3.0]])
    adv = t([1.0, -1.0])
    mask = torch.zeros(2, 2, dtype=torch.bool)
    for loss, metrics in _empty_mask_losses(new, old, adv, mask):
        assert loss.item() == 0.0
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        loss.backward()
        assert torch.equal(new.grad, torch.zeros_like(new))
        new.grad = None
    agg = aggregate_loss(new, mask, mode)
    assert agg.item() == 0.0


# --------------------------------------------------------------------------- TIS


def test_tis_weights_token_level_by_hand():
    train = t([[-1.0, -2.0, -0.5, -1.0]])
    engine = t([[-1.0, -2.5, -3.0, -2.2]])
    mask = t([[1, 1, 0, 1]])
    w, m = compute_tis_weights(train, engine, mask, cap=2.0)
    # ratios exp(0) = 1, exp(0.5) = 1.6487, masked, exp(1.2) = 3.3201 → truncated to 2.
    torch.testing.assert_close(w, t([[1.0, math.exp(0.5), 0.0, 2.0]]))
    assert not w.requires_grad
    assert m["tis_weight_mean"] == pytest.approx((1 + math.exp(0.5) + 2) / 3)
    assert m["tis_clip_fraction"] == pytest.approx(1 / 3)
    assert m["tis_ratio_max"] == pytest.approx(math.exp(1.2))
    k3 = [math.expm1(d) - d for d in (0.0, 0.5, 1.2)]
    assert m["tis_mismatch_kl"] == pytest.approx(sum(k3) / 3)
    assert m["tis_logprob_abs_diff"] == pytest.approx(1.7 / 3)


def test_tis_weights_sequence_level_by_hand():
    train = t([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0], [-1.0, 0.0, 0.0]])
    engine = t([[-1.5, -1.0, -9.0], [-3.0, -4.0, -1.0], [-1.0, 0.0, 0.0]])
    mask = t([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    w, m = compute_tis_weights(train, engine, mask, cap=2.0, level="sequence")
    # row 0: mean log-ratio (0.5 + 0)/2 = 0.25; row 1: (2 + 3 + 0)/3 = 5/3 → exp > 2 → 2;
    # row 2 has no valid token → 0.
    torch.testing.assert_close(w, t([math.exp(0.25), 2.0, 0.0]))
    assert m["tis_clip_fraction"] == pytest.approx(0.5)
    assert m["tis_ratio_max"] == pytest.approx(math.exp(5 / 3))


@given(st.integers(0, 10_000), st.floats(0.5, 5.0))
def test_tis_weights_match_numpy_reference(seed, cap):
    rng = np.random.default_rng(seed)
    train = rng.normal(-2, 1, (4, 6))
    engine = train + rng.normal(0, 0.7, (4, 6))
    mask = (rng.random((4, 6)) > 0.3).astype(np.float64)
    w, _ = compute_tis_weights(t(train), t(engine), t(mask), cap=cap)
    expected = np.zeros_like(train)
    for i in range(4):
        for j in range(6):
            if mask[i, j]:
                expected[i, j] = min(math.exp(train[i, j] - engine[i, j]), cap)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("loss_name", ["ppo", "grpo", "dapo", "cispo", "reinforce"])
def test_token_weights_scale_each_tokens_loss(loss_name):
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 2
    new = (old + 0.1 * torch.randn(3, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(3, generator=g, dtype=torch.float64)
    mask = (torch.rand(3, 5, generator=g) > 0.3).double()
    mask[:, 0] = 1
    weights = torch.rand(3, 5, generator=g, dtype=torch.float64) * 2

    def run(token_weights):
        if loss_name == "reinforce":
            return compute_reinforce_loss(new, adv, mask, token_weights=token_weights)[0]
        fn = {"ppo": compute_ppo_loss, "grpo": compute_grpo_loss, "dapo": compute_dapo_loss,
              "cispo": compute_cispo_loss}[loss_name]
        return fn(new, old, adv, mask, token_weights=token_weights)[0]

    # Ones change nothing; a weight on a single token scales exactly that token's loss.
    assert run(torch.ones_like(new)).item() == run(None).item()
    total = run(weights)
    per_token = []
    for i in range(3):
        for j in range(5):
            one = torch.zeros_like(new)
            one[i, j] = 1.0
            per_token.append(float(weights[i, j]) * run(one).item())
    assert total.item() == pytest.approx(sum(per_token), rel=1e-10, abs=1e-12)
    # The weights are constants: no gradient flows into them.
    w = weights.clone().requires_grad_(True)
    run(w).backward()
    assert w.grad is None


def test_gspo_sequence_weights_scale_each_sequence():
    g = torch.Generator().manual_seed(2)
    old = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    new = old + 1e-4 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    adv = t([1.0, -0.5, 2.0])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    base, _ = compute_gspo_loss(new, old, adv, mask)
    w = t([0.5, 2.0, 0.0])
    weighted, _ = compute_gspo_loss(new, old, adv, mask, sequence_weights=w)
    per_seq = [compute_gspo_loss(new[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1])[0]
               for i in range(3)]
    assert weighted.item() == pytest.approx(sum(float(w[i]) * per_seq[i].item()
                                                for i in range(3)) / 3, rel=1e-10)
    assert base.item() == pytest.approx(sum(x.item() for x in per_seq) / 3, rel=1e-10)
    with pytest.raises(ValueError, match="sequence_weights must have shape"):
        compute_gspo_loss(new, old, adv, mask, sequence_weights=t([1.0, 1.0]))


def test_tis_corrects_the_engine_mismatch_bias_of_the_policy_gradient():
    # Tokens sampled from an engine distribution q ≠ π. The REINFORCE gradient of E_π[f] is
    # Σ_y π_y f_y (e_y - π) w.r.t. the logits; with importance weights π/q (cap large enough
    # never to bind) the sample estimate is unbiased, without them it is not.
    theta = torch.tensor([0.3, -0.2, 1.0, -1.0, 0.0], dtype=torch.float64)
    q_logits = theta + torch.tensor([0.6, -0.4, -0.5, 0.9, 0.1], dtype=torch.float64)
    f = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    pi, q = torch.softmax(theta, 0), torch.softmax(q_logits, 0)
    exact = pi * f - pi * (pi * f).sum()
    n = 200_000
    y = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(0))

    def estimate(with_tis: bool):
        logits = theta.clone().requires_grad_(True)
        logp = torch.log_softmax(logits, 0)[y].unsqueeze(1)  # [N, 1]
        weights = None
        if with_tis:
            weights, _ = compute_tis_weights(logp, torch.log(q)[y].unsqueeze(1), None, cap=1e6)
        loss, _ = compute_reinforce_loss(logp, f[y], None, token_weights=weights)
        loss.backward()
        return -logits.grad

    # Standard error of each coordinate of the importance-weighted estimate.
    score = torch.nn.functional.one_hot(y, 5).double() - pi
    w = (pi / q)[y]
    se = ((w * f[y])[:, None] * score).std(dim=0) / math.sqrt(n)
    corrected, biased = estimate(True), estimate(False)
    assert torch.all((corrected - exact).abs() < 5 * se)
    assert (biased - exact).abs().max() > 20 * se.max()


def test_tis_weights_bad_input():
    x = t([[-1.0, -2.0]])
    with pytest.raises(ValueError, match="cap"):
        compute_tis_weights(x, x, None, cap=0.0)
    with pytest.raises(ValueError, match="cap"):
        compute_tis_weights(x, x, None, cap=float("inf"))
    with pytest.raises(ValueError, match="level"):
        compute_tis_weights(x, x, None, level="batch")
    with pytest.raises(ValueError, match="engine_logprobs"):
        compute_tis_weights(x, t([[-1.0]]), None)
    with pytest.raises(ValueError, match="token_weights"):
        compute_ppo_loss(x, x, t([1.0]), None, token_weights=t([[1.0]]))
