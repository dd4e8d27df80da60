"""Tests for rlprim.training on real tiny transformers models."""

import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rlprim as rp
from rlprim.testing import tiny_model, tiny_tokenizer

NAMES = ["grpo", "dr_grpo", "dapo", "gspo", "cispo", "ppo", "reinforce", "rloo", "dpo"]
PROMPTS = ["1+1=", "2+3=", "7*8=", "9-4="]
SCRIPT = Path(__file__).parent / "scripts" / "train_with_checkpoints.py"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def seven_id(tokenizer):
    (token_id,) = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("7"))
    return token_id


def fraction_reward(token_id):
    def reward(rollout):
        ids = rollout.generation.token_ids
        return sum(1 for t in ids if t == token_id) / max(1, len(ids))

    return reward


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def same_params(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def make_state(tokenizer, name="grpo", lr=1e-3, seed=0, **overrides):
    config = rp.create_algorithm_config(name, overrides)
    state = rp.create_training_state(
        tiny_model("qwen2", seed=seed), tokenizer, config, learning_rate=lr
    )
    return state, config


GEN = rp.GenerationConfig(max_new_tokens=6, num_samples=4, seed=3)


def VARIED(rollout):  # noqa: N802 - a reward with variance inside every group
    return float(sum(rollout.generation.token_ids) % 7)


# ---------------------------------------------------------------- every algorithm


@pytest.mark.parametrize("name", NAMES)
def test_every_algorithm_runs_three_iterations_and_changes_weights(tokenizer, name):
    state, config = make_state(tokenizer, name)
    before = params_of(state.policy)
    loader = rp.create_prompt_loader(PROMPTS, batch_size=2, seed=0)
    log = []
    # A reward with variance inside (nearly) every group so no algorithm skips its update:
    # four samples tie mod 7 with probability 7^-3, every group of 3 iterations ~1e-15.
    state = rp.train(state, loader, 3, GEN, config, VARIED, logger=log.append, progress=False)
    assert state.iteration == 3 and len(log) == 3
    assert not same_params(before, params_of(state.policy))
    assert all(s.extra["algorithm"] == name for s in log)
    assert all(math.isfinite(s.loss) for s in log if s.skipped_updates == 0)
    if name == "ppo":
        assert state.value_model is not None and math.isfinite(log[-1].value_loss)


# ---------------------------------------------------------------- learning


@pytest.mark.slow
@pytest.mark.parametrize("name,iterations", [("grpo", 25), ("ppo", 30)])
def test_grpo_and_ppo_raise_reward_on_a_toy_task(tokenizer, name, iterations):
    torch.manual_seed(0)
    state, config = make_state(tokenizer, name, lr=3e-3, kl_coef=0.0)
    loader = rp.create_prompt_loader(PROMPTS, batch_size=4, seed=0)
    gen = rp.GenerationConfig(max_new_tokens=8, num_samples=8, seed=1)
    log = []
    rp.train(state, loader, iterations, gen, config, fraction_reward(seven_id(tokenizer)),
             logger=log.append, progress=False)
    first = sum(s.reward_mean for s in log[:3]) / 3
    last = sum(s.reward_mean for s in log[-3:]) / 3
    assert first < 0.05 and last > first + 0.5, [round(s.reward_mean, 3) for s in log]


# ---------------------------------------------------------------- schedules


def test_schedules_switch_algorithm_kl_and_reward(tokenizer):
    state, _ = make_state(tokenizer, "grpo", kl_coef=0.2)
    grpo = rp.create_algorithm_config("grpo", kl_coef=0.2)
    grpo_low = grpo._replace(kl_coef=0.05)
    dapo = rp.create_algorithm_config("dapo", filter_groups=False)
    algo = rp.Schedule(lambda it: grpo if it < 1 else grpo_low if it < 2 else dapo)
    rewards = rp.Schedule(lambda it: (lambda r: 1.0 + 0.01 * len(r.generation.token_ids))
                          if it < 2 else (lambda r: -5.0 + 0.01 * len(r.generation.token_ids)))
    loader = rp.create_prompt_loader(PROMPTS, batch_size=2)
    log = []
    rp.train(state, loader, 3, GEN, algo, rewards, logger=log.append, progress=False)
    assert [s.extra["algorithm"] for s in log] == ["grpo", "grpo", "dapo"]
    assert [s.kl_coef for s in log] == [0.2, 0.05, 0.0]
    assert log[0].reward_mean > 1.0 and log[2].reward_mean < -4.0
    assert math.isfinite(log[0].kl) and math.isnan(log[2].kl)  # dapo: no reference run


def test_plain_function_schedule_and_bad_schedule(tokenizer):
    state, config = make_state(tokenizer, "reinforce")
    loader = rp.create_prompt_loader(PROMPTS, batch_size=2)
    log = []
    rp.train(state, loader, 1, GEN, lambda it: config, lambda r: 1.0, logger=log.append,
             progress=False)
    assert log[0].extra["algorithm"] == "reinforce"
    with pytest.raises(TypeError, match="iteration 0 must be an AlgorithmConfig"):
        rp.train(state, loader, 1, GEN, lambda it: "grpo", lambda r: 1.0, progress=False)


# ---------------------------------------------------------------- guards


def test_nan_reward_is_an_error_before_any_change(tokenizer):
    state, config = make_state(tokenizer)
    before = params_of(state.policy)
    bad = lambda r: float("nan")  # noqa: E731
    with pytest.raises(ValueError, match="rollout 0"):
        rp.training_iteration(state, PROMPTS[:2], GEN, config, bad)
    assert same_params(before, params_of(state.policy))


def test_nan_loss_skips_the_update_and_keeps_optimizer_state(tokenizer):
    state, config = make_state(tokenizer, "grpo", kl_coef=0.0)
    reward = VARIED
    state, _ = rp.training_iteration(state, PROMPTS[:2], GEN, config, reward)
    before = params_of(state.policy)
    opt_before = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                  for k, s in state.optimizer.state_dict()["state"].items()}

    def nan_loss(batch, new_logprobs, config, **extras):
        return (new_logprobs * float("nan")).sum(), {}

    state2, stats = rp.training_iteration(state, PROMPTS[:2], GEN, config, reward,
                                          loss_fn=nan_loss)
    assert stats.skipped_updates == 1 and state2.step == state.step + 1
    assert same_params(before, params_of(state.policy))
    opt_after = state.optimizer.state_dict()["state"]
    for k, s in opt_before.items():
        for n, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt_after[k][n]))
    assert all(p.grad is None for p in state.policy.parameters())


def test_nan_gradient_skips_the_update(tokenizer):
    state, config = make_state(tokenizer, "grpo", kl_coef=0.0)
    batch = make_batch_for(state, tokenizer)
    before = params_of(state.policy)

    def inf_grad_loss(batch, new_logprobs, config, **extras):
        # finite value, infinite gradient
        return (new_logprobs.sum() * 0.0) + torch.sqrt(new_logprobs.sum() * 0.0), {}

    state2, stats = rp.training_step(state, batch, config, loss_fn=inf_grad_loss)
    assert stats.skipped_updates == 1 and not math.isfinite(stats.grad_norm)
    assert same_params(before, params_of(state.policy))


def make_batch_for(state, tokenizer, prompts=PROMPTS[:2], gen=GEN):
    rollouts = rp.create_batch_rollouts(state.policy, tokenizer, prompts, gen)
    rollouts = [r._replace(rewards=float(i % 3)) for i, r in enumerate(rollouts)]
    batch = rp.rollouts_to_batch(rollouts, tokenizer)
    adv = rp.compute_grpo_advantages(batch.rewards, gen.num_samples)
    return batch._replace(advantages=adv, old_logprobs=None)


# ---------------------------------------------------------------- no redundant forwards


def counting_extractor(calls):
    def extract(model, *args, **kwargs):
        calls.append(kwargs.get("completion_length"))
        return rp.get_logprobs(model, *args, **kwargs)

    return extract


def test_on_policy_beta_zero_runs_one_policy_forward_and_no_reference(tokenizer):
    state, config = make_state(tokenizer, "dapo", filter_groups=False)
    assert state.ref_model is None  # β = 0: the reference need not exist
    calls = []
    state, stats = rp.training_iteration(
        state, PROMPTS[:2], GEN, config, VARIED,
        logprob_extractor=counting_extractor(calls),
    )
    assert len(calls) == 1 and math.isnan(stats.kl) and stats.time_reference < 0.05


def test_reference_runs_once_per_iteration_when_beta_positive(tokenizer):
    state, config = make_state(tokenizer, "grpo", kl_coef=0.1)
    ref_calls = []
    # get_logprobs runs the trunk and the head separately: count trunk forwards.
    state.ref_model.base_model.register_forward_hook(lambda *a: ref_calls.append(1))
    policy_calls = []
    state, stats = rp.training_iteration(
        state, PROMPTS[:2], GEN, config, VARIED,
        logprob_extractor=counting_extractor(policy_calls),
    )
    assert len(policy_calls) == 1 and math.isfinite(stats.kl)
    # one batched reference forward, never one per sample
    assert len(ref_calls) == 1


def test_multi_epoch_uses_sampling_logprobs_without_extra_forward(tokenizer):
    state, config = make_state(tokenizer, "grpo", kl_coef=0.0, num_epochs=2, minibatch_size=4)
    calls = []
    state, stats = rp.training_iteration(
        state, PROMPTS[:2], GEN, config, VARIED,
        logprob_extractor=counting_extractor(calls),
    )
    # 8 samples, minibatches of 4, 2 epochs: 4 updates, 4 training forwards, no old-logprob pass
    assert len(calls) == 4 and state.step == 4
    assert stats.approx_kl >= 0.0


def test_micro_batches_accumulate_to_the_full_batch_gradient(tokenizer):
    results = []
    for micro in (None, 3):
        state, config = make_state(tokenizer, "grpo", kl_coef=0.0, micro_batch_size=micro)
        batch = make_batch_for(state, tokenizer)
        state, stats = rp.training_step(state, batch, config)
        results.append((params_of(state.policy), stats))
    (a, sa), (b, sb) = results
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    assert sa.loss == pytest.approx(sb.loss, abs=1e-6)
    assert sa.grad_norm == pytest.approx(sb.grad_norm, rel=1e-4)


def test_gradient_clipping_bounds_the_update(tokenizer):
    state, config = make_state(tokenizer, "grpo", kl_coef=0.0, max_grad_norm=1e-3)
    batch = make_batch_for(state, tokenizer)
    params = list(state.policy.parameters())
    state.optimizer.zero_grad()
    seen = []

    def sgd_step(state):
        seen.append(torch.sqrt(sum((p.grad ** 2).sum() for p in params if p.grad is not None)))
        state.optimizer.step()

    _, stats = rp.training_step(state, batch, config, optimizer_step_fn=sgd_step)
    assert stats.grad_norm > 1e-3 and float(seen[0]) == pytest.approx(1e-3, rel=1e-4)


# ---------------------------------------------------------------- KL control and references


def test_adaptive_kl_controller_moves_beta(tokenizer):
    state, config = make_state(tokenizer, "grpo", kl_coef=0.1, )
    state = state._replace(kl_coef=0.1)
    controller = rp.create_adaptive_kl_controller(0.1, target=1e-9, horizon=10)
    reward = VARIED
    state, _ = rp.training_iteration(state, PROMPTS[:2], GEN, config, reward)
    state, stats = rp.training_iteration(state, PROMPTS[:2], GEN, config, reward,
                                         kl_controller=controller)
    # KL above a tiny target: β grows by the clipped 20% · n / horizon
    assert stats.kl > 0 and state.kl_coef == pytest.approx(0.1 * (1 + 0.2 * 8 / 10))


def test_kl_in_reward_for_ppo_changes_advantages_not_loss(tokenizer):
    state, config = make_state(tokenizer, "ppo", kl_coef=0.5)
    assert config.kl_in_reward
    state, stats = rp.training_iteration(state, PROMPTS[:2], GEN, config,
                                         VARIED)
    assert math.isfinite(stats.kl) and math.isfinite(stats.value_loss)


def test_ema_reference_update_moves_the_reference(tokenizer):
    state, config = make_state(tokenizer, "grpo", kl_coef=0.1)
    ref_before = params_of(state.ref_model)
    state, _ = rp.training_iteration(state, PROMPTS[:2], GEN, config,
                                     VARIED,
                                     ref_model_update_fn=rp.create_ema_updater(0.0))
    # decay 0 copies the updated policy into the reference
    assert same_params(params_of(state.policy), params_of(state.ref_model))
    assert not same_params(ref_before, params_of(state.ref_model))


def test_missing_reference_is_a_clear_error(tokenizer):
    state, config = make_state(tokenizer, "grpo", kl_coef=0.1)
    state = state._replace(ref_model=None)
    with pytest.raises(ValueError, match="needs state.ref_model"):
        rp.training_iteration(state, PROMPTS[:2], GEN, config, lambda r: 1.0)


# ---------------------------------------------------------------- resume


def run_train(tokenizer, state, config, n, ckpt_fn=None):
    loader = rp.create_prompt_loader(PROMPTS, batch_size=2, seed=0)
    return rp.train(state, loader, n, GEN, config,
                    lambda r: r.generation.text.count("7") / 6.0,
                    ref_model_update_fn=rp.create_ema_updater(0.5),
                    checkpoint_fn=ckpt_fn, progress=False)


def test_save_load_continue_equals_uninterrupted_run(tokenizer, tmp_path):
    state, config = make_state(tokenizer, "grpo", kl_coef=0.05)
    full = run_train(tokenizer, state, config, 4)
    expected = params_of(full.policy)

    state, config = make_state(tokenizer, "grpo", kl_coef=0.05)
    half = run_train(tokenizer, state, config, 2, rp.create_checkpoint_fn(tmp_path))
    fresh, _ = make_state(tokenizer, "grpo", kl_coef=0.05)
    resumed = rp.load_checkpoint(rp.latest_checkpoint(tmp_path), fresh)
    assert resumed.iteration == 2 and resumed.loader_state == {"position": 2}
    final = run_train(tokenizer, resumed, config, 4)
    assert same_params(expected, params_of(final.policy))
    assert same_params(params_of(full.ref_model), params_of(final.ref_model))
    del half


@pytest.mark.slow
def test_kill_and_resume_gives_the_uninterrupted_weights(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    n = 6
    ref_out = tmp_path / "uninterrupted.safetensors"
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "full"), str(n), str(ref_out)],
                   check=True, env=env, timeout=300)
    expected = load_file(ref_out)
    rng = random.Random(1234)
    for trial in range(3):
        ckpt = tmp_path / f"run{trial}"
        out = tmp_path / f"out{trial}.safetensors"
        proc = subprocess.Popen([sys.executable, str(SCRIPT), str(ckpt), str(n), str(out)],
                                env=env)
        # Kill at a random moment once at least one checkpoint exists.
        deadline = time.time() + 120
        while rp.latest_checkpoint(ckpt) is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        subprocess.run([sys.executable, str(SCRIPT), str(ckpt), str(n), str(out), "--resume"],
                       check=True, env=env, timeout=300)
        got = load_file(out)
        assert sorted(got) == sorted(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected), f"trial {trial}"


# ---------------------------------------------------------------- input checks


def test_bad_inputs(tokenizer):
    state, config = make_state(tokenizer)
    with pytest.raises(ValueError, match="prompts must not be empty"):
        rp.training_iteration(state, [], GEN, config, lambda r: 1.0)
    with pytest.raises(ValueError, match="num_iterations"):
        rp.train(state, lambda p: PROMPTS, -1, GEN, config, lambda r: 1.0, progress=False)
    with pytest.raises(TypeError, match="Batch"):
        rp.training_step(state, {"x": 1}, config)
    with pytest.raises(ValueError, match="learning_rate"):
        rp.create_training_state(tiny_model("qwen2"), tokenizer, config, learning_rate=0.0)


def test_resolve_schedule():
    assert rp.resolve_schedule(rp.Schedule(lambda i: i * 2), 3) == 6
    f = lambda r: 1.0  # noqa: E731
    assert rp.resolve_schedule(f, 3) is f


def test_custom_kl_fn_reaches_stats_and_loss(tokenizer):
    state, config = make_state(tokenizer, "grpo", kl_coef=0.1)

    def constant_kl(logprobs, ref_logprobs):
        return torch.full_like(logprobs, 0.5)

    _, stats = rp.training_iteration(state, PROMPTS[:2], GEN, config, VARIED, kl_fn=constant_kl)
    assert stats.kl == pytest.approx(0.5)  # the statistics use it
    batch = make_batch_for(state, tokenizer)
    batch = batch._replace(ref_logprobs=torch.zeros_like(batch.completion_mask))
    _, step_stats = rp.training_step(state, batch, config, kl_fn=constant_kl)
    assert step_stats.kl == pytest.approx(0.5)  # and so does the loss's KL term


def test_pair_selector_reaches_the_dpo_loss(tokenizer):
    state, config = make_state(tokenizer, "dpo")
    calls = []

    def first_vs_last(rewards, group_size):
        calls.append(group_size)
        starts = torch.arange(0, rewards.numel(), group_size)
        return starts, starts + group_size - 1

    state, stats = rp.training_iteration(state, PROMPTS[:2], GEN, config, VARIED,
                                         pair_selector=first_vs_last)
    assert calls == [GEN.num_samples] and stats.skipped_updates == 0


# ---------------------------------------------------------------- truncated importance sampling


def offset_logprob_generator(delta):
    """hf_generator whose reported ("engine") log-probs are the true ones minus ``delta``."""

    def generate(model, tokenizer, prompts, config):
        generations = rp.hf_generator(model, tokenizer, prompts, config)
        return [g._replace(logprobs=tuple(x - delta for x in g.logprobs)) for g in generations]

    return generate


@pytest.mark.parametrize(("delta", "weight"), [(0.5, math.exp(0.5)), (1.0, 2.0)])
def test_tis_weights_scale_the_policy_loss_and_gradient(tokenizer, delta, weight):
    # Engine log-probs lower by δ everywhere: every token's weight is min(e^δ, C=2), so the
    # on-policy GRPO loss and its gradient are exactly that multiple of the uncorrected ones.
    results = {}
    for cap in (None, 2.0):
        state, config = make_state(tokenizer, "grpo", kl_coef=0.0, tis_cap=cap)
        _, stats = rp.training_iteration(
            state, PROMPTS[:2], GEN, config, VARIED, generator=offset_logprob_generator(delta)
        )
        results[cap] = stats
    plain, tis = results[None], results[2.0]
    # (group advantages sum to zero, so the loss value is ~0 at ratio 1; its gradient is not)
    assert plain.grad_norm > 1e-3
    assert tis.policy_loss == pytest.approx(weight * plain.policy_loss, abs=1e-6)
    assert tis.grad_norm == pytest.approx(weight * plain.grad_norm, rel=1e-4)
    assert plain.extra is None or not any(k.startswith("tis_") for k in plain.extra)
    assert tis.extra["tis_weight_mean"] == pytest.approx(weight, rel=1e-4)
    assert tis.extra["tis_clip_fraction"] == (1.0 if delta == 1.0 else 0.0)
    assert tis.extra["tis_ratio_max"] == pytest.approx(math.exp(delta), rel=1e-4)
    assert tis.extra["tis_logprob_abs_diff"] == pytest.approx(delta, abs=1e-4)
    k3 = math.exp(delta) - 1 - delta  # r - 1 - log r at r = e^δ
    assert tis.extra["tis_mismatch_kl"] == pytest.approx(k3, rel=1e-4)


def test_tis_recomputes_old_logprobs_with_the_trainer(tokenizer):
    # Multi-epoch: without TIS π_old is the generator's log-probs (no extra forward); with TIS
    # the generator's are the engine's and π_old takes one no-grad trainer forward.
    state, config = make_state(
        tokenizer, "grpo", kl_coef=0.0, num_epochs=2, minibatch_size=4, tis_cap=2.0
    )
    calls = []
    state, stats = rp.training_iteration(
        state, PROMPTS[:2], GEN, config, VARIED, generator=offset_logprob_generator(0.25),
        logprob_extractor=counting_extractor(calls),
    )
    assert len(calls) == 5 and state.step == 4
    assert stats.extra["tis_logprob_abs_diff"] == pytest.approx(0.25, abs=1e-4)


def test_tis_without_generator_logprobs_is_a_clear_error(tokenizer):
    def no_logprobs(model, tokenizer, prompts, config):
        generations = rp.hf_generator(model, tokenizer, prompts, config)
        return [g._replace(logprobs=None) for g in generations]

    state, config = make_state(tokenizer, "grpo", kl_coef=0.0, tis_cap=2.0)
    before = params_of(state.policy)
    with pytest.raises(ValueError, match="tis_cap"):
        rp.training_iteration(state, PROMPTS[:2], GEN, config, VARIED, generator=no_logprobs)
    assert same_params(before, params_of(state.policy)) and state.step == 0
