"""Tests for rlprim.algorithms: configs, the registry, and the registry's loss/advantage fns."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rlprim.algorithms import (
    ALGORITHMS,
    compute_advantages_by_algorithm,
    compute_loss_by_algorithm,
    create_algorithm_config,
    get_algorithm,
    group_size_from_ids,
    register_algorithm,
    requires_reference_model,
    validate_algorithm_config,
)
from rlprim.types import Algorithm, Batch

NAMES = ["grpo", "dr_grpo", "dapo", "gspo", "cispo", "ppo", "reinforce", "rloo", "dpo"]


def make_batch(B=6, T=5, G=3, seed=0, with_ref=True, with_values=False, token_adv=False):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    mask[:, 0] = 1.0
    old = -torch.rand(B, T, generator=g) * 2
    adv = torch.randn(B, T if token_adv else 1, generator=g).squeeze(-1)
    return Batch(
        prompt_ids=torch.zeros(B, 2, dtype=torch.long),
        completion_ids=torch.zeros(B, T, dtype=torch.long),
        attention_mask=torch.ones(B, 2 + T, dtype=torch.long),
        completion_mask=mask,
        old_logprobs=old,
        ref_logprobs=old + 0.3 * torch.randn(B, T, generator=g) if with_ref else None,
        advantages=adv,
        returns=torch.randn(B, T, generator=g) if with_values else None,
        values=torch.randn(B, T, generator=g) if with_values else None,
        rewards=torch.tensor([1.0, 0.0, 0.5, 0.2, 0.2, 0.9])[:B],
        group_ids=torch.arange(B) // G,
    )


# ---------------------------------------------------------------- configs


def test_published_defaults_by_hand():
    grpo = create_algorithm_config("grpo")
    assert (grpo.kl_coef, grpo.kl_estimator, grpo.loss_agg_mode) == (
        0.04, "k3", "seq-mean-token-mean")
    assert (grpo.clip_eps_low, grpo.clip_eps_high, grpo.scale_rewards) == (0.2, 0.2, "group")
    dapo = create_algorithm_config("dapo")
    assert (dapo.clip_eps_low, dapo.clip_eps_high, dapo.kl_coef) == (0.2, 0.28, 0.0)
    assert dapo.loss_agg_mode == "token-mean" and dapo.filter_groups and dapo.overlong_shaping
    dr = create_algorithm_config("dr_grpo")
    assert (dr.scale_rewards, dr.loss_agg_mode, dr.kl_coef) == (
        "none", "seq-mean-token-sum-norm", 0.0)
    gspo = create_algorithm_config("gspo")
    assert (gspo.clip_eps_low, gspo.clip_eps_high) == (3e-4, 4e-4)
    ppo = create_algorithm_config("ppo")
    assert ppo.kl_in_reward and ppo.whiten_advantages and ppo.gae_lambda == 0.95
    assert create_algorithm_config("dpo").beta == 0.1
    for name in NAMES:
        assert create_algorithm_config(name).name == name


def test_override_precedence():
    c = create_algorithm_config("grpo", {"kl_coef": 0.1, "clip_eps_high": 0.3}, clip_eps_high=0.4)
    assert (c.kl_coef, c.clip_eps_high, c.clip_eps_low) == (0.1, 0.4, 0.2)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="name='grpoo'.*dapo.*grpo"):
        create_algorithm_config("grpoo")


def test_unknown_field_lists_valid_ones():
    with pytest.raises(ValueError, match="kl_coeff.*valid fields.*kl_coef"):
        create_algorithm_config("grpo", {"kl_coeff": 0.1})


def test_name_override_conflict():
    with pytest.raises(ValueError, match="disagrees"):
        create_algorithm_config("grpo", {"name": "ppo"})


@pytest.mark.parametrize(
    "field,value",
    [
        ("clip_eps_low", -0.1),
        ("dual_clip_c", 1.0),
        ("kl_coef", -1.0),
        ("kl_estimator", "k4"),
        ("loss_agg_mode", "mean"),
        ("gamma", 1.5),
        ("gae_lambda", -0.1),
        ("num_epochs", 0),
        ("minibatch_size", 0),
        ("scale_rewards", "std"),
        ("reinforce_baseline", "median"),
        ("beta", 0.0),
        ("dpo_loss_type", "kto"),
        ("tis_cap", 0.0),
    ],
)
def test_validation_names_field_and_value(field, value):
    with pytest.raises(ValueError, match=f"AlgorithmConfig.{field}.*{value!r}"):
        create_algorithm_config("grpo", {field: value})


def test_validate_rejects_non_config():
    with pytest.raises(TypeError, match="AlgorithmConfig"):
        validate_algorithm_config({"name": "grpo"})


# ---------------------------------------------------------------- registry


def test_builtin_registry_is_read_only_and_complete():
    assert sorted(ALGORITHMS) == sorted(NAMES)
    with pytest.raises(TypeError):
        ALGORITHMS["x"] = None  # type: ignore[index]


def test_register_algorithm_returns_new_registry_and_is_used():
    calls = []

    def my_adv(rewards, config, **extras):
        return rewards * 2.0

    def my_loss(batch, new_logprobs, config, **extras):
        calls.append(config.name)
        return -(new_logprobs * batch.completion_mask).sum(), {"custom": 1.0}

    reg = register_algorithm("pg2", Algorithm(my_adv, my_loss, defaults={"kl_coef": 0.0}))
    assert "pg2" in reg and "pg2" not in ALGORITHMS
    config = create_algorithm_config("pg2", registry=reg)
    batch = make_batch()
    new = batch.old_logprobs.clone()
    loss, metrics = compute_loss_by_algorithm(config, batch, new, registry=reg)
    assert calls == ["pg2"] and metrics == {"custom": 1.0}
    assert loss.item() == pytest.approx(-(new * batch.completion_mask).sum().item())
    adv = compute_advantages_by_algorithm(config, torch.tensor([1.0, 2.0]), registry=reg)
    assert adv.tolist() == [2.0, 4.0]
    with pytest.raises(ValueError, match="unknown algorithm"):
        create_algorithm_config("pg2")
    with pytest.raises(ValueError, match="already registered"):
        register_algorithm("grpo", Algorithm(my_adv, my_loss))
    with pytest.raises(ValueError, match="unknown fields"):
        register_algorithm("pg3", Algorithm(my_adv, my_loss, defaults={"lr": 1.0}))
    with pytest.raises(TypeError, match="Algorithm"):
        register_algorithm("pg3", (my_adv, my_loss))


def test_loss_fn_override_takes_precedence():
    batch = make_batch()
    seen = []
    loss, _ = compute_loss_by_algorithm(
        create_algorithm_config("grpo"), batch, batch.old_logprobs,
        loss_fn=lambda b, lp, c, **kw: (seen.append(kw) or lp.sum() * 0, {}), kl_coef=0.5,
    )
    assert seen == [{"kl_coef": 0.5}] and loss.item() == 0.0


def test_requires_reference_model():
    assert requires_reference_model(create_algorithm_config("grpo"))
    assert not requires_reference_model(create_algorithm_config("dapo"))
    assert requires_reference_model(create_algorithm_config("dapo", kl_coef=0.1))
    assert requires_reference_model(create_algorithm_config("dpo"))
    assert not get_algorithm("dpo").needs_value and get_algorithm("ppo").needs_value


def test_group_size_from_ids():
    assert group_size_from_ids(torch.tensor([0, 0, 1, 1, 2, 2])) == 2
    assert group_size_from_ids(torch.tensor([5, 5, 5])) == 3
    with pytest.raises(ValueError, match="sizes"):
        group_size_from_ids(torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="consecutive"):
        group_size_from_ids(torch.tensor([0, 1, 0, 1]))


# ---------------------------------------------------------------- losses through the registry


def np_clip_loss(new, old, adv, mask, lo, hi):
    ratio = np.exp(new - old)
    a = adv[:, None] if adv.ndim == 1 else adv
    return np.maximum(-a * ratio, -a * np.clip(ratio, 1 - lo, 1 + hi))


def seq_mean_token_mean(x, mask):
    return float(np.mean([(x[i] * mask[i]).sum() / mask[i].sum() for i in range(len(x))]))


def test_grpo_loss_matches_numpy_reference():
    batch = make_batch(seed=3)
    config = create_algorithm_config("grpo")
    g = torch.Generator().manual_seed(7)
    new = batch.old_logprobs + 0.3 * torch.randn(batch.old_logprobs.shape, generator=g)
    loss, metrics = compute_loss_by_algorithm(config, batch, new)
    n, o, r, m = (t.numpy().astype(np.float64) for t in (
        new, batch.old_logprobs, batch.ref_logprobs, batch.completion_mask))
    a = batch.advantages.numpy().astype(np.float64)
    d = n - r
    k3 = np.exp(-d) + d - 1
    expected = seq_mean_token_mean(np_clip_loss(n, o, a, m, 0.2, 0.2), m) + 0.04 * (
        seq_mean_token_mean(k3, m))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["kl"] == pytest.approx(seq_mean_token_mean(k3, m), rel=1e-5)


def test_kl_coef_argument_overrides_config_and_kl_in_reward_removes_it():
    batch = make_batch(seed=4)
    new = batch.old_logprobs.clone()
    c = create_algorithm_config("grpo")
    base, _ = compute_loss_by_algorithm(c, batch, new, kl_coef=0.0)
    with_kl, m = compute_loss_by_algorithm(c, batch, new, kl_coef=1.0)
    assert with_kl.item() == pytest.approx(base.item() + m["kl"], rel=1e-5)
    in_reward, m2 = compute_loss_by_algorithm(c._replace(kl_in_reward=True), batch, new)
    assert in_reward.item() == pytest.approx(base.item()) and "kl" not in m2


def test_missing_ref_logprobs_is_a_clear_error():
    batch = make_batch(with_ref=False)
    with pytest.raises(ValueError, match="ref_logprobs is None"):
        compute_loss_by_algorithm(create_algorithm_config("grpo"), batch, batch.old_logprobs)


def test_on_policy_without_old_logprobs_equals_ratio_one():
    batch = make_batch(seed=5)
    new = batch.old_logprobs.clone().requires_grad_(True)
    c = create_algorithm_config("dapo")
    loss_a, _ = compute_loss_by_algorithm(c, batch._replace(old_logprobs=None), new)
    m = batch.completion_mask
    adv = batch.advantages[:, None].expand_as(m)
    assert loss_a.item() == pytest.approx(float(-(adv * m).sum() / m.sum()), rel=1e-6)
    loss_a.backward()
    torch.testing.assert_close(new.grad, -(adv * m) / m.sum())


def test_ppo_loss_is_policy_plus_value():
    batch = make_batch(seed=6, with_values=True, token_adv=True)
    c = create_algorithm_config("ppo", value_clip=None, value_coef=0.5)
    new = batch.old_logprobs.clone()
    new_values = batch.values + 0.5
    loss, metrics = compute_loss_by_algorithm(c, batch, new, new_values=new_values)
    m = batch.completion_mask.numpy()
    pol = -(batch.advantages.numpy() * m).sum() / m.sum()
    val = 0.5 * (((new_values - batch.returns).numpy() ** 2) * m).sum() / m.sum()
    assert loss.item() == pytest.approx(pol + 0.5 * val, rel=1e-5)
    assert metrics["value_loss"] == pytest.approx(val, rel=1e-5)
    with pytest.raises(ValueError, match="new_values"):
        compute_loss_by_algorithm(c, batch, new)


def test_dpo_loss_through_registry_matches_hand_formula():
    batch = make_batch(seed=8)
    new = batch.old_logprobs + 0.1
    loss, metrics = compute_loss_by_algorithm(create_algorithm_config("dpo"), batch, new)
    m = batch.completion_mask
    pol = (new * m).sum(-1)
    ref = (batch.ref_logprobs * m).sum(-1)
    # rewards [1.0, 0.0, 0.5 | 0.2, 0.2, 0.9]: pairs (0 vs 1) and (5 vs 3)
    terms = []
    for c, r in [(0, 1), (5, 3)]:
        h = (pol[c] - ref[c]) - (pol[r] - ref[r])
        terms.append(math.log1p(math.exp(-0.1 * h.item())))
    assert loss.item() == pytest.approx(sum(terms) / 2, rel=1e-5)
    assert metrics["dpo_pairs"] == 2.0


@pytest.mark.parametrize("name", NAMES)
def test_every_algorithm_gives_a_finite_differentiable_loss(name):
    c = create_algorithm_config(name)
    batch = make_batch(seed=9, with_values=(name == "ppo"), token_adv=(name == "ppo"))
    new = (batch.old_logprobs + 0.05).requires_grad_(True)
    extras = {"new_values": batch.values + 0.1} if name == "ppo" else {}
    loss, metrics = compute_loss_by_algorithm(c, batch, new, **extras)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in metrics.values())
    loss.backward()
    assert new.grad.abs().sum() > 0
    # The gradient never reaches padding.
    assert torch.all(new.grad[batch.completion_mask == 0] == 0)


def test_shape_mismatch_is_rejected():
    batch = make_batch()
    with pytest.raises(ValueError, match="new_logprobs"):
        compute_loss_by_algorithm(create_algorithm_config("grpo"), batch, batch.old_logprobs[:, :2])


# ---------------------------------------------------------------- advantages through the registry


@given(st.lists(st.floats(-5, 5), min_size=6, max_size=6))
def test_grpo_advantages_zero_mean_per_group(rewards):
    r = torch.tensor(rewards, dtype=torch.float64)
    adv = compute_advantages_by_algorithm(create_algorithm_config("grpo"), r, group_size=3)
    assert torch.allclose(adv.view(2, 3).sum(-1), torch.zeros(2, dtype=torch.float64), atol=1e-9)


def test_kl_in_reward_penalises_sequence_rewards():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    kl = torch.tensor([[0.5, 0.5], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    mask = torch.ones(4, 2)
    c = create_algorithm_config("rloo", kl_coef=0.5, kl_in_reward=True)
    adv = compute_advantages_by_algorithm(c, r, group_size=2, kl=kl, mask=mask)
    # penalised rewards [0.5, 0, 1, 0] -> RLOO with G = 2: r_i - r_other
    assert adv.tolist() == pytest.approx([0.5, -0.5, 1.0, -1.0])


def test_ppo_advantages_shapes_and_whitening():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 3, generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float32)
    c = create_algorithm_config("ppo")
    adv, ret = compute_advantages_by_algorithm(
        c, torch.tensor([1.0, 0.0, 2.0, -1.0]), values=values, mask=mask,
        kl=torch.zeros(4, 3), kl_coef=0.1)
    assert adv.shape == ret.shape == (4, 3)
    sel = adv[mask.bool()]
    assert sel.mean().abs() < 1e-5
    assert torch.all(adv[mask == 0] == 0)


# ---------------------------------------------------------------- TIS


@pytest.mark.parametrize("name", ["grpo", "dapo", "cispo", "ppo", "reinforce", "gspo"])
def test_tis_cap_weights_the_policy_loss_with_engine_logprobs(name):
    batch = make_batch(seed=11, with_values=True)
    g = torch.Generator().manual_seed(12)
    engine = batch.old_logprobs + 0.5 * torch.randn(batch.old_logprobs.shape, generator=g)
    new = batch.old_logprobs + 0.05 * torch.randn(batch.old_logprobs.shape, generator=g)
    config = create_algorithm_config(name, kl_coef=0.0)
    extras = {"new_values": torch.zeros_like(new)} if name == "ppo" else {}
    plain, plain_metrics = compute_loss_by_algorithm(config, batch, new, **extras)
    # Engine log-probs without tis_cap, or tis_cap without engine log-probs: no change.
    same, _ = compute_loss_by_algorithm(
        config, batch._replace(engine_logprobs=engine), new, **extras
    )
    assert same.item() == plain.item()
    capped = config._replace(tis_cap=2.0)
    same2, m2 = compute_loss_by_algorithm(capped, batch, new, **extras)
    assert same2.item() == plain.item() and "tis_weight_mean" not in m2
    # With both, the loss is the weighted one, computed here from the formula.
    loss, metrics = compute_loss_by_algorithm(
        capped, batch._replace(engine_logprobs=engine), new, **extras
    )
    old = batch.old_logprobs  # π_old: the stored log-probs (the current policy on-policy)
    m = batch.completion_mask.bool()
    d = (old - engine).masked_fill(~m, 0.0)
    if name == "gspo":
        ratio = torch.exp(d.sum(1) / m.sum(1)).clamp(max=2.0)
    else:
        ratio = torch.exp(d).clamp(max=2.0) * m
    assert metrics["tis_weight_mean"] == pytest.approx(
        float(ratio.mean() if name == "gspo" else ratio.sum() / m.sum()), rel=1e-5
    )
    if name != "gspo":  # sequence means of the log-ratio stay below log 2 in this batch
        assert 0.0 < metrics["tis_clip_fraction"] < 1.0
    assert loss.item() != pytest.approx(plain.item(), rel=1e-3)
    if name in ("dapo", "cispo"):  # token-mean, no KL or value term: check the value itself
        a = batch.advantages[:, None].expand_as(new)
        r = torch.exp(new - old)
        if name == "dapo":
            per = torch.maximum(-a * r, -a * r.clamp(0.8, 1.28))
        else:
            per = -r.clamp(max=5.0) * a * new
        expected = float((per * ratio * m).sum() / m.sum())
        assert loss.item() == pytest.approx(expected, rel=1e-5)
