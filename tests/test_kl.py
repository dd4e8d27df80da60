"""Tests for rlprim.kl: estimators, KL functions, factories, the controller, reference models."""

from __future__ import annotations

import copy
import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from rlprim.kl import (
    compute_batch_kl,
    compute_forward_kl,
    compute_per_token_kl,
    compute_reverse_kl,
    create_adaptive_kl,
    create_adaptive_kl_controller,
    create_ema_updater,
    create_periodic_updater,
    create_reference_model,
    create_truncated_kl,
    kl_from_logits,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_low_var,
    update_reference_model,
)

ESTIMATORS = ("k1", "k2", "k3", "low_var")
F64 = torch.float64

log_probs = st.floats(min_value=-15.0, max_value=0.0, allow_nan=False)


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def _pair_arrays(max_len: int = 12):
    """Hypothesis strategy: two equal-length float64 arrays of log-probs."""
    return st.integers(1, max_len).flatmap(
        lambda n: st.tuples(
            hnp.arrays(np.float64, n, elements=log_probs),
            hnp.arrays(np.float64, n, elements=log_probs),
        )
    )


# --------------------------------------------------------------------------- per-token estimators


def test_estimators_hand_values():
    # d = logp - ref_logp = 0, 1, -1, 2
    logp = _t([-1.0, -0.5, -2.0, -0.1])
    ref = _t([-1.0, -1.5, -1.0, -2.1])
    torch.testing.assert_close(kl_k1(logp, ref), _t([0.0, 1.0, -1.0, 2.0]))
    torch.testing.assert_close(kl_k2(logp, ref), _t([0.0, 0.5, 0.5, 2.0]))
    # exp(-d) + d - 1: 0; e^-1 = 0.36787944; e^1 - 2 = 0.71828183; e^-2 + 1 = 1.13533528
    torch.testing.assert_close(
        kl_k3(logp, ref), _t([0.0, 0.36787944117144233, 0.7182818284590451, 1.1353352832366128])
    )
    torch.testing.assert_close(kl_low_var(logp, ref), kl_k3(logp, ref))


def test_estimators_match_numpy_reference_on_random_inputs():
    rng = np.random.default_rng(0)
    logp = -rng.exponential(2.0, size=(5, 7))
    ref = -rng.exponential(2.0, size=(5, 7))
    expected = {"k1": np.zeros_like(logp), "k2": np.zeros_like(logp), "k3": np.zeros_like(logp)}
    for i in range(5):
        for j in range(7):
            d = logp[i, j] - ref[i, j]
            expected["k1"][i, j] = d
            expected["k2"][i, j] = d * d / 2
            expected["k3"][i, j] = math.exp(-d) + d - 1
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        np.testing.assert_allclose(fn(_t(logp), _t(ref)).numpy(), expected[name], rtol=1e-12)
        np.testing.assert_allclose(
            compute_per_token_kl(_t(logp), _t(ref), estimator=name).numpy(),
            expected[name],
            rtol=1e-12,
        )


def _categorical_pair(seed: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    policy = torch.softmax(2.0 * torch.randn(vocab, generator=generator, dtype=F64), dim=0)
    ref = torch.softmax(2.0 * torch.randn(vocab, generator=generator, dtype=F64), dim=0)
    return policy, ref


CATEGORICAL_PAIRS = [
    (_t([0.6, 0.25, 0.1, 0.05]), _t([0.1, 0.2, 0.3, 0.4])),
    _categorical_pair(seed=3, vocab=6),
]


def _sample_logprobs(policy: torch.Tensor, ref: torch.Tensor, n: int, seed: int):
    """Log-probs under both distributions of ``n`` tokens sampled from ``policy``."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.multinomial(policy, n, replacement=True, generator=generator)
    return policy.log()[tokens], ref.log()[tokens]


def _z_score(samples: torch.Tensor, exact: float) -> float:
    standard_error = samples.std().item() / math.sqrt(samples.numel())
    return (samples.mean().item() - exact) / standard_error


@pytest.mark.parametrize("pair_index", [0, 1])
def test_k1_k3_unbiased_and_k2_biased_for_reverse_kl(pair_index):
    policy, ref = CATEGORICAL_PAIRS[pair_index]
    exact = float((policy * (policy.log() - ref.log())).sum())  # KL(π_θ ‖ π_ref)
    logp, ref_logp = _sample_logprobs(policy, ref, n=100_000, seed=pair_index)
    assert abs(_z_score(kl_k1(logp, ref_logp), exact)) < 5.0
    assert abs(_z_score(kl_k3(logp, ref_logp), exact)) < 5.0
    assert abs(_z_score(compute_reverse_kl(logp, ref_logp, estimator="k3"), exact)) < 5.0
    # k2's bias is dozens of standard errors on these distributions: the test can tell.
    assert abs(_z_score(kl_k2(logp, ref_logp), exact)) > 10.0


@pytest.mark.parametrize("pair_index", [0, 1])
def test_forward_k1_k3_unbiased_and_k2_biased_for_forward_kl(pair_index):
    policy, ref = CATEGORICAL_PAIRS[pair_index]
    exact = float((ref * (ref.log() - policy.log())).sum())  # KL(π_ref ‖ π_θ)
    # Tokens come from the policy: the estimators importance-weight them to π_ref.
    logp, ref_logp = _sample_logprobs(policy, ref, n=100_000, seed=10 + pair_index)
    k1 = compute_forward_kl(logp, ref_logp, estimator="k1")
    k3 = compute_forward_kl(logp, ref_logp, estimator="k3")
    k2 = compute_forward_kl(logp, ref_logp, estimator="k2")
    assert abs(_z_score(k1, exact)) < 5.0
    assert abs(_z_score(k3, exact)) < 5.0
    assert abs(_z_score(k2, exact)) > 10.0
    assert bool((k3 >= 0).all())


def test_reverse_and_forward_kl_differ_on_asymmetric_distributions():
    policy, ref = CATEGORICAL_PAIRS[0]
    logp, ref_logp = _sample_logprobs(policy, ref, n=100_000, seed=7)
    reverse = compute_reverse_kl(logp, ref_logp, estimator="k3").mean().item()
    forward = compute_forward_kl(logp, ref_logp, estimator="k3").mean().item()
    assert reverse == pytest.approx(0.9170083, abs=0.02)
    assert forward == pytest.approx(0.9375556, abs=0.05)
    # Swapping the roles of the models turns forward into reverse (exact identity for k1):
    # KL(π_ref‖π_θ) estimated on π_θ samples with weights = direct estimate on π_ref samples.
    ref_samples_logp, ref_samples_ref = _sample_logprobs(ref, policy, n=100_000, seed=8)
    assert compute_reverse_kl(ref_samples_logp, ref_samples_ref).mean().item() == pytest.approx(
        forward, abs=0.05
    )


def test_low_var_equals_k3_inside_clamp_and_is_clamped_outside():
    # d = 5: k3 = e^-5 + 4 = 4.006737947 (inside); d = -3: e^3 - 4 = 16.0855 -> 10;
    # d = 30: c = clamp(-30) = -20 -> e^-20 + 19 -> 10; d = -30: c = 20 -> e^20 - 21 -> 10.
    logp = _t([-5.0, -4.0, -1.0, -31.0])
    ref = _t([-10.0, -1.0, -31.0, -1.0])
    torch.testing.assert_close(kl_low_var(logp, ref), _t([4.006737946999085, 10.0, 10.0, 10.0]))
    assert kl_k3(logp, ref)[1].item() == pytest.approx(math.exp(3.0) - 4.0)


@given(_pair_arrays())
def test_low_var_is_min_of_k3_and_ten_where_log_ratio_within_20(pair):
    logp, ref = _t(pair[0]), _t(pair[1])  # |d| <= 15 here
    torch.testing.assert_close(kl_low_var(logp, ref), torch.clamp(kl_k3(logp, ref), max=10.0))


@given(
    hnp.arrays(np.float64, 8, elements=st.floats(-200.0, 0.0)),
    hnp.arrays(np.float64, 8, elements=st.floats(-200.0, 0.0)),
)
def test_low_var_is_finite_and_in_zero_ten_for_any_log_ratio(logp, ref):
    out = kl_low_var(_t(logp), _t(ref))
    assert bool(torch.isfinite(out).all())
    assert bool(((out >= 0) & (out <= 10)).all())


@given(_pair_arrays())
def test_k3_is_nonnegative_and_k1_k3_agree_to_second_order(pair):
    logp, ref = _t(pair[0]), _t(pair[1])
    assert bool((kl_k3(logp, ref) >= 0).all())
    assert bool((kl_k2(logp, ref) >= 0).all())
    # k3 = d²/2 + O(d³): close to k2 for tiny log-ratios.
    small = ref + 1e-3 * (logp - ref) / 15.0
    torch.testing.assert_close(kl_k3(small, ref), kl_k2(small, ref), rtol=1e-3, atol=1e-12)


def test_compute_per_token_kl_uses_a_custom_kl_fn():
    logp, ref = _t([[-1.0, -2.0]]), _t([[-1.5, -1.0]])

    def scaled_abs(lp, rp):
        return 3.0 * (lp - rp).abs()

    torch.testing.assert_close(compute_per_token_kl(logp, ref, kl_fn=scaled_abs), _t([[1.5, 3.0]]))


def test_compute_per_token_kl_rejects_a_kl_fn_with_the_wrong_shape():
    logp = _t([[-1.0, -2.0]])
    with pytest.raises(ValueError, match="kl_fn must return"):
        compute_per_token_kl(logp, logp, kl_fn=lambda a, b: (a - b).sum())


# --------------------------------------------------------------------------- reverse / forward


def test_compute_reverse_kl_masks_to_exact_zero_even_over_nan_padding():
    logp = _t([[-0.5, -2.0, float("nan")]])
    ref = _t([[-1.5, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0]])
    out = compute_reverse_kl(logp, ref, mask=mask, estimator="k1")
    torch.testing.assert_close(out, _t([[1.0, -1.0, 0.0]]))
    out_k3 = compute_reverse_kl(logp, ref, mask=mask.bool())
    torch.testing.assert_close(out_k3, _t([[0.36787944117144233, 0.7182818284590451, 0.0]]))


def test_compute_reverse_kl_without_mask_equals_the_estimator():
    generator = torch.Generator().manual_seed(1)
    logp = -torch.rand(3, 5, generator=generator, dtype=F64) * 4
    ref = -torch.rand(3, 5, generator=generator, dtype=F64) * 4
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3), ("low_var", kl_low_var)):
        torch.testing.assert_close(compute_reverse_kl(logp, ref, estimator=name), fn(logp, ref))


def test_compute_reverse_kl_with_custom_kl_fn():
    logp, ref = _t([[-1.0, -2.0]]), _t([[-1.5, -1.0]])
    out = compute_reverse_kl(logp, ref, mask=_t([[0.0, 1.0]]), kl_fn=lambda a, b: b - a + 7.0)
    torch.testing.assert_close(out, _t([[0.0, 8.0]]))


def test_compute_forward_kl_hand_values():
    # u = ref_logp - logp = 1, -1, 0; w = e^u.
    logp = _t([-2.0, -1.0, -0.7])
    ref = _t([-1.0, -2.0, -0.7])
    e = math.e
    torch.testing.assert_close(
        compute_forward_kl(logp, ref, estimator="k1"), _t([e * 1.0, -1.0 / e, 0.0])
    )
    torch.testing.assert_close(
        compute_forward_kl(logp, ref, estimator="k2"), _t([e / 2, 0.5 / e, 0.0])
    )
    # 1 + (u - 1) e^u: 1; 1 - 2/e; 0.
    torch.testing.assert_close(
        compute_forward_kl(logp, ref, estimator="k3"), _t([1.0, 1.0 - 2.0 / e, 0.0])
    )
    torch.testing.assert_close(
        compute_forward_kl(logp, ref, estimator="low_var"), _t([1.0, 1.0 - 2.0 / e, 0.0])
    )
    torch.testing.assert_close(
        compute_forward_kl(logp, ref, mask=torch.tensor([True, False, True]), estimator="k3"),
        _t([1.0, 0.0, 0.0]),
    )


def test_compute_forward_kl_numpy_reference_on_random_inputs():
    rng = np.random.default_rng(5)
    logp = -rng.exponential(2.0, size=(4, 6))
    ref = -rng.exponential(2.0, size=(4, 6))
    mask = rng.integers(0, 2, size=(4, 6))
    expected = np.zeros_like(logp)
    for i in range(4):
        for j in range(6):
            if mask[i, j]:
                ratio = math.exp(logp[i, j] - ref[i, j])  # π_θ / π_ref under π_ref samples
                weight = 1.0 / ratio
                expected[i, j] = weight * (ratio - 1.0 - math.log(ratio))
    out = compute_forward_kl(_t(logp), _t(ref), mask=torch.from_numpy(mask), estimator="k3")
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)


@given(_pair_arrays())
def test_forward_named_estimators_equal_the_swapped_kl_fn_form(pair):
    logp, ref = _t(pair[0]), _t(pair[1])  # |u| <= 15: inside the ±20 log-weight clamp
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        torch.testing.assert_close(
            compute_forward_kl(logp, ref, estimator=name),
            compute_forward_kl(logp, ref, kl_fn=fn),
            rtol=1e-9,
            atol=1e-9,
        )


@given(
    hnp.arrays(np.float64, 6, elements=st.floats(-500.0, 0.0)),
    hnp.arrays(np.float64, 6, elements=st.floats(-500.0, 0.0)),
)
def test_forward_kl_is_finite_and_k3_nonnegative_for_extreme_log_ratios(logp, ref):
    for name in ESTIMATORS:
        out = compute_forward_kl(_t(logp), _t(ref), estimator=name)
        assert bool(torch.isfinite(out).all()), name
    assert bool((compute_forward_kl(_t(logp), _t(ref), estimator="k3") >= 0).all())
    low_var = compute_forward_kl(_t(logp), _t(ref), estimator="low_var")
    assert bool(((low_var >= 0) & (low_var <= 10)).all())


def test_forward_kl_clamps_the_log_weight_at_20():
    # u = 30 is clamped to 20: k1 = 20 e^20, k3 = 1 + 19 e^20.
    logp, ref = _t([-31.0]), _t([-1.0])
    torch.testing.assert_close(
        compute_forward_kl(logp, ref, estimator="k1"), _t([20.0 * math.exp(20.0)])
    )
    torch.testing.assert_close(
        compute_forward_kl(logp, ref, estimator="k3"), _t([1.0 + 19.0 * math.exp(20.0)])
    )
    torch.testing.assert_close(compute_forward_kl(logp, ref, estimator="low_var"), _t([10.0]))


def test_compute_forward_kl_custom_kl_fn_is_called_with_roles_swapped():
    logp, ref = _t([-2.0]), _t([-1.0])  # u = 1
    calls = []

    def recording_fn(first, second):
        calls.append((first.item(), second.item()))
        return torch.ones_like(first)

    out = compute_forward_kl(logp, ref, kl_fn=recording_fn)
    assert calls == [(-1.0, -2.0)]
    torch.testing.assert_close(out, _t([math.e]))  # w · 1


# --------------------------------------------------------------------------- batch KL


def test_compute_batch_kl_hand_values():
    logp = _t([[-0.5, -2.0, -1.0], [-1.0, -1.0, -3.0]])
    ref = _t([[-1.5, -1.0, -9.0], [-1.0, -2.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    kl_seq, kl_mean = compute_batch_kl(logp, ref, mask, estimator="k1")
    # row 0: 1 - 1 (third masked) = 0; row 1: 0 + 1 - 2 = -1
    torch.testing.assert_close(kl_seq, _t([0.0, -1.0]))
    torch.testing.assert_close(kl_mean, _t(-0.5))
    kl_seq_k2, kl_mean_k2 = compute_batch_kl(logp, ref, mask, estimator="k2")
    torch.testing.assert_close(kl_seq_k2, _t([1.0, 2.5]))
    torch.testing.assert_close(kl_mean_k2, _t(1.75))


def test_compute_batch_kl_matches_a_loop_reference_in_both_directions():
    rng = np.random.default_rng(2)
    logp = -rng.exponential(1.5, size=(4, 5))
    ref = -rng.exponential(1.5, size=(4, 5))
    mask = rng.integers(0, 2, size=(4, 5))
    reverse, forward = [], []
    for i in range(4):
        rev_sum = fwd_sum = 0.0
        for j in range(5):
            if mask[i, j]:
                d = logp[i, j] - ref[i, j]
                rev_sum += math.exp(-d) + d - 1
                fwd_sum += math.exp(-d) * (math.exp(d) - 1 - d)
        reverse.append(rev_sum)
        forward.append(fwd_sum)
    kl_seq, kl_mean = compute_batch_kl(_t(logp), _t(ref), torch.from_numpy(mask))
    np.testing.assert_allclose(kl_seq.numpy(), reverse, rtol=1e-10)
    assert kl_mean.item() == pytest.approx(np.mean(reverse), rel=1e-10)
    kl_seq_f, kl_mean_f = compute_batch_kl(
        _t(logp), _t(ref), torch.from_numpy(mask), direction="forward"
    )
    np.testing.assert_allclose(kl_seq_f.numpy(), forward, rtol=1e-10)
    assert kl_mean_f.item() == pytest.approx(np.mean(forward), rel=1e-10)


def test_compute_batch_kl_with_custom_kl_fn():
    logp = torch.zeros(2, 3, dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    kl_seq, kl_mean = compute_batch_kl(logp, logp, mask, kl_fn=lambda a, b: torch.ones_like(a))
    torch.testing.assert_close(kl_seq, _t([3.0, 1.0]))
    torch.testing.assert_close(kl_mean, _t(2.0))


@given(_pair_arrays(max_len=6), st.integers(0, 2**31 - 1))
def test_compute_batch_kl_sequence_sums_add_up_to_masked_total(pair, seed):
    logp, ref = _t(pair[0]).reshape(1, -1), _t(pair[1]).reshape(1, -1)
    logp, ref = torch.cat([logp, ref]), torch.cat([ref, logp])
    mask = torch.randint(0, 2, logp.shape, generator=torch.Generator().manual_seed(seed))
    kl_seq, kl_mean = compute_batch_kl(logp, ref, mask)
    total = (kl_k3(logp, ref) * mask).sum()
    torch.testing.assert_close(kl_seq.sum(), total)
    torch.testing.assert_close(kl_mean, total / 2)
    assert bool((kl_seq >= 0).all())


# --------------------------------------------------------------------------- exact KL from logits


def test_kl_from_logits_hand_values():
    # p = softmax([0, 0]) = [0.5, 0.5]; q = softmax([log 3, 0]) = [0.75, 0.25].
    logits = _t([[0.0, 0.0]])
    ref_logits = _t([[math.log(3.0), 0.0]])
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # 0.14384104
    forward = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.13081204
    torch.testing.assert_close(kl_from_logits(logits, ref_logits), _t([reverse]))
    torch.testing.assert_close(kl_from_logits(logits, ref_logits, "forward"), _t([forward]))
    assert reverse == pytest.approx(0.1438410362258904)
    # Temperature 2 halves the ref logit: q = softmax([log 3 / 2, 0]) = [√3, 1] / (√3 + 1).
    q0 = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)
    tempered = 0.5 * math.log(0.5 / q0) + 0.5 * math.log(0.5 / (1.0 - q0))
    torch.testing.assert_close(kl_from_logits(logits, ref_logits, temperature=2.0), _t([tempered]))


def _numpy_kl(logits: np.ndarray, ref_logits: np.ndarray, temperature: float) -> np.ndarray:
    out = np.zeros(logits.shape[:-1])
    for index in np.ndindex(*logits.shape[:-1]):
        a = logits[index] / temperature
        b = ref_logits[index] / temperature
        p = np.exp(a - a.max())
        p /= p.sum()
        q = np.exp(b - b.max())
        q /= q.sum()
        out[index] = sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in range(len(p)))
    return out


def test_kl_from_logits_matches_numpy_reference():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 3, 7)) * 3
    ref_logits = rng.normal(size=(2, 3, 7)) * 3
    for temperature in (1.0, 0.7):
        np.testing.assert_allclose(
            kl_from_logits(_t(logits), _t(ref_logits), temperature=temperature).numpy(),
            _numpy_kl(logits, ref_logits, temperature),
            rtol=1e-10,
        )
        np.testing.assert_allclose(
            kl_from_logits(_t(logits), _t(ref_logits), "forward", temperature).numpy(),
            _numpy_kl(ref_logits, logits, temperature),
            rtol=1e-10,
        )


def test_kl_from_logits_float32_input_matches_float64_and_handles_masked_vocab():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(4, 9)).astype(np.float32)
    ref_logits = rng.normal(size=(4, 9)).astype(np.float32)
    out32 = kl_from_logits(torch.from_numpy(logits), torch.from_numpy(ref_logits))
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(
        out32.numpy(),
        _numpy_kl(logits.astype(np.float64), ref_logits.astype(np.float64), 1.0),
        rtol=1e-4,
    )
    # A token the policy gives zero mass to contributes 0 to the reverse KL ...
    masked = _t([[0.0, 0.0, float("-inf")]])
    ref = _t([[0.0, 0.0, 0.0]])
    torch.testing.assert_close(kl_from_logits(masked, ref), _t([math.log(1.5)]))
    # ... and the forward KL is infinite when the reference puts mass where the policy has none.
    assert kl_from_logits(masked, ref, "forward").item() == math.inf


def test_kl_from_logits_never_returns_negative_rounding_error_in_float32():
    # Shifted logits are the same distribution; a raw float32 sum over 1000 tokens rounds to
    # about -3e-7 on some rows here. The exact KL is 0, and so is the result.
    logits = torch.randn(50, 1000, generator=torch.Generator().manual_seed(0)) * 3
    log_p = torch.log_softmax(logits, dim=-1)
    raw = (log_p.exp() * (log_p - torch.log_softmax(logits + 4.0, dim=-1))).sum(-1)
    assert raw.min().item() < 0  # the rounding this guards against does occur
    out = kl_from_logits(logits, logits + 4.0)
    assert bool((out >= 0).all()) and out.max().item() < 1e-5


def test_kl_from_logits_is_differentiable_and_zero_gradient_at_equality():
    logits = torch.tensor([[0.3, -1.0, 2.0]], dtype=F64, requires_grad=True)
    ref = logits.detach().clone()
    kl_from_logits(logits, ref).sum().backward()
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits))
    shifted = torch.tensor([[1.0, -1.0, 0.0]], dtype=F64, requires_grad=True)
    kl_from_logits(shifted, ref).sum().backward()
    assert shifted.grad.abs().sum().item() > 0


@given(
    st.integers(1, 8).flatmap(
        lambda v: st.tuples(
            hnp.arrays(np.float64, (3, v), elements=st.floats(-30, 30)),
            hnp.arrays(np.float64, (3, v), elements=st.floats(-30, 30)),
        )
    ),
    st.floats(0.1, 5.0),
)
def test_kl_from_logits_is_nonnegative_and_zero_for_equal_distributions(pair, temperature):
    logits, ref_logits = _t(pair[0]), _t(pair[1])
    for direction in ("reverse", "forward"):
        out = kl_from_logits(logits, ref_logits, direction, temperature)
        assert bool((out >= 0).all())
        same = kl_from_logits(logits, logits + 4.0, direction, temperature)  # shift-invariant
        torch.testing.assert_close(same, torch.zeros_like(same), atol=1e-10, rtol=0)
    torch.testing.assert_close(
        kl_from_logits(logits, ref_logits, "forward", temperature),
        kl_from_logits(ref_logits, logits, "reverse", temperature),
    )


# --------------------------------------------------------------------------- truncated / adaptive


def test_truncated_kl_caps_per_token_estimates():
    # d = 0.5, 3, -3: k3 = 0.10653066, 2.04978707, 16.08553692.
    logp = _t([-1.0, -1.0, -4.0])
    ref = _t([-1.5, -4.0, -1.0])
    truncated = create_truncated_kl(1.0)
    torch.testing.assert_close(truncated(logp, ref), _t([0.10653065971263342, 1.0, 1.0]))
    # k1 is capped on both sides.
    torch.testing.assert_close(create_truncated_kl(2.0, "k1")(logp, ref), _t([0.5, 2.0, -2.0]))
    # Usable wherever a KLFn is accepted.
    torch.testing.assert_close(
        compute_reverse_kl(logp, ref, kl_fn=truncated), _t([0.10653065971263342, 1.0, 1.0])
    )


def test_truncated_kl_passes_no_gradient_through_capped_tokens():
    logp = torch.tensor([-1.0, -4.0], dtype=F64, requires_grad=True)
    ref = _t([-1.5, -1.0])
    create_truncated_kl(1.0)(logp, ref).sum().backward()
    # d(k3)/d(logp) = 1 - exp(-d) at the uncapped token, 0 at the capped one.
    torch.testing.assert_close(logp.grad, _t([1.0 - math.exp(-0.5), 0.0]))


@given(_pair_arrays(), st.floats(0.01, 20.0), st.sampled_from(ESTIMATORS))
def test_truncated_kl_equals_the_clamped_estimator(pair, threshold, estimator):
    logp, ref = _t(pair[0]), _t(pair[1])
    out = create_truncated_kl(threshold, estimator)(logp, ref)
    base = compute_per_token_kl(logp, ref, estimator)
    torch.testing.assert_close(out, torch.clamp(base, -threshold, threshold))
    assert bool((out.abs() <= threshold).all())


def test_adaptive_kl_penalises_only_confident_tokens():
    # policy probabilities 0.9, 0.5, 0.2; threshold 0.5: the first two are penalised.
    logp = _t([math.log(0.9), math.log(0.5), math.log(0.2)])
    ref = _t([math.log(0.3), math.log(0.6), math.log(0.01)])
    adaptive = create_adaptive_kl(0.5)
    expected_k3 = [0.3 / 0.9 + math.log(0.9 / 0.3) - 1, 0.6 / 0.5 + math.log(0.5 / 0.6) - 1, 0.0]
    torch.testing.assert_close(adaptive(logp, ref), _t(expected_k3))
    torch.testing.assert_close(
        create_adaptive_kl(0.5, "k1")(logp, ref), _t([math.log(3.0), math.log(0.5 / 0.6), 0.0])
    )
    # Threshold 1 penalises only certain tokens; a tiny threshold penalises everything.
    torch.testing.assert_close(create_adaptive_kl(1.0)(logp, ref), _t([0.0, 0.0, 0.0]))
    torch.testing.assert_close(create_adaptive_kl(1e-6)(logp, ref), kl_k3(logp, ref))


def test_adaptive_kl_gate_is_not_differentiated():
    logp = torch.tensor([math.log(0.9), math.log(0.2)], dtype=F64, requires_grad=True)
    ref = _t([math.log(0.3), math.log(0.01)])
    create_adaptive_kl(0.5)(logp, ref).sum().backward()
    torch.testing.assert_close(logp.grad, _t([1.0 - 0.3 / 0.9, 0.0]))


@given(_pair_arrays(), st.floats(1e-4, 1.0), st.sampled_from(ESTIMATORS))
def test_adaptive_kl_matches_a_loop_reference(pair, threshold, estimator):
    logp, ref = _t(pair[0]), _t(pair[1])
    out = create_adaptive_kl(threshold, estimator)(logp, ref)
    base = compute_per_token_kl(logp, ref, estimator)
    for i in range(len(pair[0])):
        expected = base[i].item() if math.exp(pair[0][i]) >= threshold else 0.0
        assert out[i].item() == pytest.approx(expected, rel=1e-12, abs=1e-300)


# --------------------------------------------------------------------------- adaptive controller


def test_adaptive_controller_hand_numbers():
    update = create_adaptive_kl_controller(init_coef=0.1, target=6.0, horizon=10_000)
    # KL 6.6 -> error 0.1 -> 0.1 · (1 + 0.1 · 256 / 10000) = 0.100256
    assert update(0.1, 6.6, 256) == pytest.approx(0.100256, rel=1e-12)
    # KL 3 -> error -0.5 clipped to -0.2 -> 0.2 · (1 - 0.2 · 1000 / 10000) = 0.196
    assert update(0.2, 3.0, 1000) == pytest.approx(0.196, rel=1e-12)
    # KL 60 -> error 9 clipped to 0.2 -> 0.5 · (1 + 0.2 · 5000 / 10000) = 0.55
    assert update(0.5, torch.tensor(60.0), 5000) == pytest.approx(0.55, rel=1e-12)
    # None starts from init_coef; at the target or with n_steps 0 nothing changes.
    assert update(None, 6.6, 256) == update(0.1, 6.6, 256)
    assert update(0.3, 6.0, 100) == pytest.approx(0.3)
    assert update(0.3, 1.0, 0) == 0.3
    assert update(0.3, 1.0) == pytest.approx(0.3 * (1 - 0.2 / 10_000))


@given(
    st.floats(0.0, 10.0),
    st.floats(-100.0, 100.0),
    st.floats(0.01, 10.0),
    st.integers(0, 999),
)
def test_adaptive_controller_moves_towards_target_by_at_most_the_clip(coef, kl, target, n_steps):
    update = create_adaptive_kl_controller(0.1, target, horizon=1000)
    new = update(coef, kl, n_steps)
    bound = 0.2 * n_steps / 1000
    assert coef * (1 - bound) - 1e-12 <= new <= coef * (1 + bound) + 1e-12
    if kl > target:
        assert new >= coef
    elif kl < target:
        assert new <= coef
    assert new >= 0


def test_adaptive_controller_rejects_steps_that_would_make_the_coefficient_nonpositive():
    update = create_adaptive_kl_controller(0.1, 1.0, horizon=10)
    assert update(0.1, 0.0, 49) == pytest.approx(0.1 * (1 - 0.2 * 4.9))
    with pytest.raises(ValueError, match="n_steps"):
        update(0.1, 0.0, 50)


# --------------------------------------------------------------------------- reference models


def _small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_create_reference_model_is_a_frozen_independent_copy():
    policy = _small_model(0).double()
    policy.train()
    policy(torch.randn(5, 3, dtype=F64)).sum().backward()  # policy has grads
    ref = create_reference_model(policy)
    assert ref is not policy and not ref.training
    for (name, p), (_, r) in zip(policy.named_parameters(), ref.named_parameters(), strict=True):
        assert not r.requires_grad and r.grad is None, name
        assert p.requires_grad and p.grad is not None, name  # the policy is untouched
        assert r.dtype == p.dtype == F64 and r.device == p.device
        torch.testing.assert_close(r, p)
        assert r.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
    assert policy.training
    before = _state(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(value, before[name], msg=name)
    # Eval mode: dropout is off, so the reference is deterministic.
    x = torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close(ref(x), ref(x))


def test_update_reference_model_calls_a_custom_update_fn_with_the_step():
    policy, ref = _small_model(0), create_reference_model(_small_model(1))
    seen = []

    def fresh_copy_on_even_steps(ref_model, policy_model, step):
        seen.append(step)
        return copy.deepcopy(policy_model) if step % 2 == 0 else ref_model

    out = update_reference_model(ref, policy, fresh_copy_on_even_steps, 3)
    assert out is ref and seen == [3]
    out = update_reference_model(ref, policy, fresh_copy_on_even_steps, 4)
    assert out is not ref and seen == [3, 4]
    # The fresh copy came back trainable; update_reference_model froze it.
    assert not out.training and not any(p.requires_grad for p in out.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    for name, value in out.state_dict().items():
        torch.testing.assert_close(value, policy.state_dict()[name], msg=name)


def test_update_reference_model_rejects_bad_updater_results():
    policy, ref = _small_model(0), create_reference_model(_small_model(1))
    with pytest.raises(TypeError, match="update_fn must return"):
        update_reference_model(ref, policy, lambda r, p, s: None, 1)
    with pytest.raises(ValueError, match="shares parameters with the policy"):
        update_reference_model(ref, policy, lambda r, p, s: p, 1)
    with pytest.raises(ValueError, match="shares parameters with the policy"):
        update_reference_model(ref, policy, lambda r, p, s: copy.copy(p), 1)
    assert all(p.requires_grad for p in policy.parameters())  # never frozen by mistake
    with pytest.raises(TypeError, match="update_fn must be callable"):
        update_reference_model(ref, policy, "ema", 1)
    with pytest.raises(ValueError, match="step must be >= 0"):
        update_reference_model(ref, policy, create_ema_updater(0.5), -1)
    with pytest.raises(TypeError, match="policy must be a torch.nn.Module"):
        update_reference_model(ref, {"w": 1}, create_ema_updater(0.5), 1)


def test_ema_updater_decay_zero_copies_one_keeps_half_averages():
    policy = _small_model(0)
    policy.train()
    policy(torch.randn(8, 3))  # moves BatchNorm running statistics (buffers)
    policy_state = _state(policy)

    ref = create_reference_model(_small_model(1))
    old_ref = _state(ref)
    assert update_reference_model(ref, policy, create_ema_updater(1.0), 1) is ref
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(value, old_ref[name], msg=name)

    half = create_ema_updater(0.5)(ref, policy, 1)
    for name, value in half.state_dict().items():
        if name.endswith(("weight", "bias")):
            torch.testing.assert_close(value, 0.5 * old_ref[name] + 0.5 * policy_state[name])
        else:  # buffers are copied
            torch.testing.assert_close(value, policy_state[name], msg=name)

    copied = update_reference_model(ref, policy, create_ema_updater(0.0), 2)
    for name, value in copied.state_dict().items():
        assert torch.equal(value, policy_state[name]), name
    assert not any(p.requires_grad for p in copied.parameters())


def test_ema_updater_hand_numbers_and_update_schedule():
    policy = nn.Linear(2, 1, bias=False)
    ref = create_reference_model(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        policy.weight.copy_(torch.tensor([[1.0, 2.0]]))
        ref.weight.copy_(torch.tensor([[3.0, -2.0]]))
    ema = create_ema_updater(0.9, update_every=2)
    for step in (0, 1, 3):  # not a positive multiple of 2: unchanged
        ema(ref, policy, step)
        torch.testing.assert_close(ref.weight, torch.tensor([[3.0, -2.0]]))
    ema(ref, policy, 2)  # 0.9·3 + 0.1·1 = 2.8; 0.9·(-2) + 0.1·2 = -1.6
    torch.testing.assert_close(ref.weight, torch.tensor([[2.8, -1.6]]))
    ema(ref, policy, 4)  # 0.9·2.8 + 0.1 = 2.62; 0.9·(-1.6) + 0.2 = -1.24
    torch.testing.assert_close(ref.weight, torch.tensor([[2.62, -1.24]]))
    # No hidden state: a second updater with the same arguments does the same thing.
    ref2 = copy.deepcopy(ref)
    create_ema_updater(0.9, update_every=2)(ref2, policy, 6)
    ema(ref, policy, 6)
    torch.testing.assert_close(ref.weight, ref2.weight)


@given(st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_ema_updater_matches_a_numpy_reference(decay, seed):
    torch.manual_seed(seed)
    policy, ref = nn.Linear(3, 2).double(), create_reference_model(nn.Linear(3, 2).double())
    expected = {
        name: decay * r.detach().numpy() + (1 - decay) * p.detach().numpy()
        for (name, r), (_, p) in zip(ref.named_parameters(), policy.named_parameters(), strict=True)
    }
    create_ema_updater(decay)(ref, policy, 1)
    for name, r in ref.named_parameters():
        np.testing.assert_allclose(r.detach().numpy(), expected[name], rtol=1e-12, atol=1e-15)


def test_ema_updater_rejects_mismatched_models_before_changing_anything():
    ref = create_reference_model(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    before = _state(ref)
    # Same first layer, different second: the first must not be half-updated.
    other = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="shape of '1.weight'"):
        create_ema_updater(0.5)(ref, other, 1)
    with pytest.raises(ValueError, match="same parameters"):
        create_ema_updater(0.5)(ref, nn.Sequential(nn.Linear(3, 4)), 1)
    for name, value in ref.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_periodic_updater_copies_on_positive_multiples_only():
    policy = _small_model(0)
    policy.train()
    policy(torch.randn(8, 3))
    ref = create_reference_model(_small_model(1))
    old_ref = _state(ref)
    periodic = create_periodic_updater(3)
    for step in (0, 1, 2, 4):
        assert periodic(ref, policy, step) is ref
        for name, value in ref.state_dict().items():
            assert torch.equal(value, old_ref[name]), (step, name)
    out = update_reference_model(ref, policy, periodic, 6)
    assert out is ref
    for name, value in ref.state_dict().items():
        assert torch.equal(value, policy.state_dict()[name]), name
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    # An independent copy: later policy changes don't reach the reference.
    with torch.no_grad():
        policy[0].weight.add_(1.0)
    assert not torch.equal(ref[0].weight, policy[0].weight)


def test_periodic_updater_keeps_the_reference_dtype():
    policy = nn.Linear(2, 2).double()
    ref = create_reference_model(nn.Linear(2, 2))  # float32
    create_periodic_updater(1)(ref, policy, 1)
    assert ref.weight.dtype == torch.float32
    torch.testing.assert_close(ref.weight, policy.weight.float())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda x: compute_per_token_kl(x, x, estimator="k4"), ValueError, "estimator.*'k4'"),
        (lambda x: compute_reverse_kl(x, x, estimator="kl"), ValueError, "estimator.*'kl'"),
        (lambda x: compute_forward_kl(x, x, estimator="k5"), ValueError, "estimator.*'k5'"),
        (lambda x: compute_batch_kl(x, x, x < 0, estimator="x"), ValueError, "estimator.*'x'"),
        (lambda x: compute_batch_kl(x, x, x < 0, direction="up"), ValueError, "direction.*'up'"),
        (lambda x: compute_batch_kl(x, x, x), ValueError, "mask must contain only 0"),
        (lambda x: compute_batch_kl(x[:0], x[:0], x[:0]), ValueError, "B = 0"),
        (lambda x: compute_batch_kl(x, x, None), ValueError, "mask is required"),
        (lambda x: compute_batch_kl(x[0], x[0], x[0]), ValueError, r"2 dimensions.*\(3,\)"),
        (lambda x: kl_from_logits(x, x, "sideways"), ValueError, "direction.*'sideways'"),
        (lambda x: kl_from_logits(x, x, temperature=0.0), ValueError, "temperature.*0.0"),
        (lambda x: kl_from_logits(x, x[:, :2]), ValueError, r"same shape.*\(2, 3\).*\(2, 2\)"),
        (lambda x: kl_from_logits(x, x.tolist()), TypeError, "ref_logits.*list"),
        (lambda x: kl_k3(x, x[:, :2]), ValueError, r"same shape.*\(2, 3\).*\(2, 2\)"),
        (lambda x: compute_reverse_kl(x, x[:1]), ValueError, r"same shape.*\(2, 3\).*\(1, 3\)"),
        (lambda x: compute_forward_kl(x, x[:1]), ValueError, r"same shape.*\(2, 3\).*\(1, 3\)"),
        (lambda x: compute_reverse_kl(x, x, mask=x[:1]), ValueError, r"mask.*\(2, 3\).*\(1, 3\)"),
        (lambda x: compute_forward_kl(x, x, mask=x + 3), ValueError, "mask must contain only 0"),
        (lambda x: compute_reverse_kl(x, x, mask=[[1]]), TypeError, "mask.*list"),
        (lambda x: kl_k1(x.tolist(), x), TypeError, "list"),
    ],
)
def test_bad_tensor_inputs_raise(call, error, pattern):
    x = torch.full((2, 3), -1.0)
    with pytest.raises(error, match=pattern):
        call(x)


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda: create_truncated_kl(0.0), ValueError, "threshold.*0.0"),
        (lambda: create_truncated_kl(-1.0), ValueError, "threshold.*-1.0"),
        (lambda: create_truncated_kl(float("nan")), ValueError, "threshold.*nan"),
        (lambda: create_truncated_kl(1.0, "k9"), ValueError, "estimator.*'k9'"),
        (lambda: create_adaptive_kl(0.0), ValueError, "confidence_threshold.*0.0"),
        (lambda: create_adaptive_kl(1.5), ValueError, r"confidence_threshold.*\(0, 1\].*1.5"),
        (lambda: create_adaptive_kl(0.5, "k0"), ValueError, "estimator.*'k0'"),
        (lambda: create_adaptive_kl("high"), TypeError, "confidence_threshold.*str"),
        (lambda: create_adaptive_kl_controller(-0.1, 6.0, 100), ValueError, "init_coef.*-0.1"),
        (lambda: create_adaptive_kl_controller(0.1, 0.0, 100), ValueError, "target.*0.0"),
        (lambda: create_adaptive_kl_controller(0.1, 6.0, 0), ValueError, "horizon.*0"),
        (
            lambda: create_adaptive_kl_controller(0.1, 6.0, 10)(0.1, math.nan, 1),
            ValueError,
            "observed_kl.*nan",
        ),
        (
            lambda: create_adaptive_kl_controller(0.1, 6.0, 10)(-1.0, 1.0, 1),
            ValueError,
            "coef.*-1.0",
        ),
        (
            lambda: create_adaptive_kl_controller(0.1, 6.0, 10)(0.1, 1.0, -1),
            ValueError,
            "n_steps.*-1",
        ),
        (
            lambda: create_adaptive_kl_controller(0.1, 6.0, 10)(0.1, 1.0, 1.5),
            TypeError,
            "n_steps.*float",
        ),
        (lambda: create_ema_updater(1.5), ValueError, "decay.*1.5"),
        (lambda: create_ema_updater(-0.1), ValueError, "decay.*-0.1"),
        (lambda: create_ema_updater(float("nan")), ValueError, "decay.*nan"),
        (lambda: create_ema_updater(0.5, update_every=0), ValueError, "update_every.*0"),
        (lambda: create_periodic_updater(0), ValueError, "update_every.*0"),
        (lambda: create_periodic_updater(2.0), TypeError, "update_every.*float"),
        (lambda: create_reference_model("gpt2"), TypeError, "model.*str"),
        (
            lambda: create_ema_updater(0.5)(nn.Linear(2, 2), nn.Linear(2, 2), -1),
            ValueError,
            "step.*-1",
        ),
        (
            lambda: create_periodic_updater(2)(nn.Linear(2, 2), None, 2),
            TypeError,
            "policy.*NoneType",
        ),
    ],
)
def test_bad_arguments_raise(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
