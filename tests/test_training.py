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


def rows_loss_fn(batch, new_logprobs, config, **extras):
    """The registry's GRPO loss plus a metric of our own: the micro-batch's row count, and
    its trainable-token count (a mapping value that is not a number is ignored)."""
    loss, metrics = rp.ALGORITHMS["grpo"].loss_fn(batch, new_logprobs, config, **extras)
    rows = float(batch.completion_ids.shape[0])
    return loss, {**metrics, "my_rows": rows, "my_tokens": float(batch.completion_mask.sum()),
                  "my_note": "not a number"}


def test_custom_loss_metrics_reach_the_stats_averaged_over_micro_batches(tokenizer):
    # token-mean weights w_i = N_i / N: the weighted mean of a micro-batch's token count is
    # Σ_i N_i² / N, of its row count Σ_i N_i·B_i / N — computed here from the micro-batches.
    state, config = make_state(tokenizer, "grpo", kl_coef=0.0, micro_batch_size=3,
                               loss_agg_mode="token-mean")
    batch = make_batch_for(state, tokenizer)
    micro = rp.pack_by_length(batch, max_sequences=3)  # what training_step packs
    _, stats = rp.training_step(state, batch, config, loss_fn=rows_loss_fn)
    assert "my_note" not in stats.extra
    tokens = [float(m.completion_mask.sum()) for m in micro]
    rows = [float(m.completion_ids.shape[0]) for m in micro]
    total = sum(tokens)
    assert len(micro) == 3 and 2 in rows  # 8 rows in 3, 3, 2: the weights matter
    assert stats.extra["my_tokens"] == pytest.approx(sum(t * t for t in tokens) / total)
    assert stats.extra["my_rows"] == pytest.approx(
        sum(t * r for t, r in zip(tokens, rows, strict=True)) / total
    )
    whole_state, _ = make_state(tokenizer, "grpo", kl_coef=0.0, loss_agg_mode="token-mean")
    _, whole = rp.training_step(whole_state, batch, config._replace(micro_batch_size=None),
                                loss_fn=rows_loss_fn)
    assert whole.extra["my_rows"] == float(batch.completion_ids.shape[0])
    assert whole.extra["my_tokens"] == float(batch.completion_mask.sum())


def test_custom_loss_metrics_are_averaged_over_minibatches_and_reach_every_logger(
    tokenizer, tmp_path
):
    # 2 prompts x 4 samples, minibatches of 4 rows, 2 epochs: 4 updates of 4 rows each.
    state, config = make_state(tokenizer, "grpo", kl_coef=0.0, num_epochs=2, minibatch_size=4)
    loader = rp.create_prompt_loader(PROMPTS[:2], batch_size=2, seed=0)
    log, path = [], tmp_path / "stats.jsonl"
    rp.train(state, loader, 1, GEN, config, VARIED, loss_fn=rows_loss_fn, progress=False,
             logger=rp.combine_loggers(log.append, rp.create_jsonl_logger(path)))
    assert log[0].extra["my_rows"] == 4.0
    assert rp.read_stats_jsonl(path)[0]["my_rows"] == 4.0
    assert "my_rows" in rp.format_stats(log[0])


def test_progress_bar_shows_only_measured_numbers(tokenizer, capsys):
    # β = 0 and no reference model: the KL is not measured (nan) and must not be shown.
    state, config = make_state(tokenizer, "grpo", kl_coef=0.0)
    loader = rp.create_prompt_loader(PROMPTS[:2], batch_size=2, seed=0)
    log = []
    rp.train(state, loader, 2, GEN, config, VARIED, logger=log.append, progress=True)
    bar = capsys.readouterr().err
    assert math.isnan(log[-1].kl)
    assert f"reward={log[-1].reward_mean:.3f}" in bar and "s=" in bar
    assert "kl=" not in bar and "nan" not in bar
    state, config = make_state(tokenizer, "grpo", kl_coef=0.05)
    rp.train(state, loader, 1, GEN, config, VARIED, logger=log.append, progress=True)
    assert f"kl={log[-1].kl:.4f}" in capsys.readouterr().err


def test_seed_hook_forms_work_or_fail_at_entry_naming_the_right_form(tokenizer):
    loader = rp.create_prompt_loader(PROMPTS[:2], batch_size=2, seed=0)
    # Seed 003's two-argument updater fn(ref, policy) is called without the step.
    state, config = make_state(tokenizer, "grpo", kl_coef=0.05)
    state = state._replace(ref_model=rp.create_reference_model(state.policy))
    calls = []

    def copy_policy(ref, policy):
        calls.append(1)
        return rp.create_reference_model(policy)

    state = rp.train(state, loader, 2, GEN, config, VARIED, ref_model_update_fn=copy_policy,
                     progress=False)
    assert len(calls) == 2
    assert same_params(params_of(state.ref_model), params_of(state.policy))
    kept = rp.train(state, loader, 3, GEN, config, VARIED,
                    ref_model_update_fn=lambda ref, policy: ref, progress=False)
    assert kept.ref_model is state.ref_model
    # Forms that cannot be called as train calls them: a TypeError before any iteration.
    before = params_of(state.policy)
    bad = [
        ({"checkpoint_fn": rp.save_checkpoint}, r"checkpoint_fn\(state\).*create_checkpoint_fn"),
        ({"logger": rp.log_to_wandb}, r"logger\(stats\).*create_wandb_logger"),
        ({"eval_fn": lambda: {}}, r"eval_fn\(state\)"),
        ({"ref_model_update_fn": lambda ref: ref}, r"fn\(ref_model, policy, step\)"),
        ({"ref_model_update_fn": 3}, r"ref_model_update_fn must be callable"),
    ]
    for kwargs, match in bad:
        with pytest.raises(TypeError, match=match):
            rp.train(state, loader, 4, GEN, config, VARIED, progress=False, **kwargs)
    with pytest.raises(TypeError, match=r"prompt_loader\(position\)"):
        rp.train(state, PROMPTS, 4, GEN, config, VARIED, progress=False)
    assert same_params(before, params_of(state.policy)) and state.iteration == 2


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


# ---------------------------------------------------------------- the phases, one at a time
# Every phase runs here at a sampling temperature T ≠ 1, with a reference model that differs
# from the policy (another random initialisation: |log π − log π_ref| ≈ 0.3 per token, far
# from the ±20 clamp of the low-variance estimator and from any cap), and its numbers are
# recomputed in the test from the sampled tokens, one unpadded row at a time.

T_PHASES = 0.7
GEN_T = GEN._replace(temperature=T_PHASES)


def recording_generator(recorded):
    def generator(model, tokenizer, prompts, config):
        generations = rp.hf_generator(model, tokenizer, prompts, config)
        recorded.extend(generations)
        return generations

    return generator


def logprobs_by_hand(model, generation, temperature):
    """``log softmax(z / T)`` of each sampled token: one row, no padding, float64 softmax."""
    prompt = list(generation.prompt_ids)
    ids = torch.tensor([prompt + list(generation.token_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double() / temperature
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return logp[torch.arange(len(generation.token_ids)), torch.tensor(generation.token_ids)]


def phase_state(tokenizer, name, **overrides):
    """The policy (seed 0) and a reference that is another model (seed 1)."""
    config = rp.create_algorithm_config(name, overrides)
    state = rp.create_training_state(
        tiny_model("qwen2", seed=0), tokenizer, config, learning_rate=1e-3,
        ref_model=tiny_model("qwen2", seed=1),
    )
    return state, config


def k3_by_hand(policy, ref_model, generation, temperature):
    """Reverse KL(π ‖ π_ref) per token, k3 = exp(−d) + d − 1 with d = log π − log π_ref."""
    d = logprobs_by_hand(policy, generation, temperature) - logprobs_by_hand(
        ref_model, generation, temperature
    )
    return torch.exp(-d) + d - 1


def test_sample_and_score_pins_rewards_shaping_and_sampling_logprobs(tokenizer):
    # DAPO's overlong shaping away from its cap: L_max = 8 > max_new_tokens = 6, buffer 4, so a
    # completion of L tokens gets ((8 − 4) − L) / 4 ∈ [−0.5, 0] (never the −1 of L > L_max).
    state, config = make_state(
        tokenizer, "dapo", filter_groups=False, max_response_len=8, overlong_buffer_len=4
    )
    recorded = []
    samples = rp.sample_and_score(
        state, PROMPTS[:2], GEN_T, config, VARIED, recording_generator(recorded)
    )
    assert samples.row_counts == [8] and len(recorded) == 8 and samples.stats == {}
    assert [r.group_id for r in samples.rollouts] == [0, 0, 0, 0, 1, 1, 1, 1]
    penalties = []
    for generation, rollout, reward in zip(recorded, samples.rollouts, samples.rewards, strict=True):
        length = len(generation.token_ids)
        penalties.append(min(0.0, (4 - length) / 4))
        expected = VARIED(rollout) + penalties[-1]
        assert rollout.rewards == pytest.approx(expected, abs=1e-6)
        assert float(reward) == pytest.approx(expected, abs=1e-6)
    assert any(-1.0 < p < 0.0 for p in penalties)  # the test exercises the linear part
    for i, generation in enumerate(recorded):  # sampling log-probs at T, not at 1
        n = len(generation.token_ids)
        by_hand = logprobs_by_hand(state.policy, generation, T_PHASES)
        torch.testing.assert_close(
            samples.batch.old_logprobs[i, :n].double(), by_hand, atol=1e-4, rtol=0
        )
        assert (logprobs_by_hand(state.policy, generation, 1.0) - by_hand).abs().max() > 1e-2
    assert int(samples.completion_mask.sum()) == sum(len(g.token_ids) for g in recorded)


def test_sample_and_score_follows_the_data_parallel_argument(tokenizer):
    # Rank 1 of 2, written as collectives: the second half of the prompts (group ids 2, 3) with
    # the rank's own seed; the "other rank" sends 3 rows.
    state, config = make_state(tokenizer, "grpo", kl_coef=0.0)
    seeds = []

    def rank_seed(seed):
        seeds.append(seed)
        return seed + 1

    def gather_rows(tensor):
        other = torch.zeros((3, *tensor.shape[1:]), dtype=tensor.dtype)
        return torch.cat([other, tensor]), [3, int(tensor.shape[0])]

    parallel = rp.create_single_process_parallel()._replace(
        shard_prompts=lambda prompts: (list(prompts)[2:], 2), rank_seed=rank_seed,
        gather_rows=gather_rows,
    )
    samples = rp.sample_and_score(state, PROMPTS, GEN_T, config, VARIED, data_parallel=parallel)
    alone = rp.sample_and_score(state, PROMPTS[2:], GEN_T._replace(seed=GEN_T.seed + 1), config,
                                VARIED)
    assert seeds == [GEN_T.seed] and samples.row_counts == [3, 8]
    assert [r.group_id for r in samples.rollouts] == [2, 2, 2, 2, 3, 3, 3, 3]
    assert [r.generation.token_ids for r in samples.rollouts] == [
        r.generation.token_ids for r in alone.rollouts
    ]
    assert samples.rewards.shape == (11,) and torch.equal(samples.rewards[3:], alone.rewards)


def test_reference_and_kl_pins_reference_logprobs_and_the_kl_at_the_sampling_temperature(
    tokenizer,
):
    state, config = phase_state(tokenizer, "grpo", kl_coef=0.05, kl_estimator="k3")
    recorded = []
    samples = rp.sample_and_score(
        state, PROMPTS[:2], GEN_T, config, VARIED, recording_generator(recorded)
    )
    reference = rp.reference_and_kl(state, samples, config, T_PHASES)
    assert isinstance(samples, rp.SampleResult) and isinstance(reference, rp.ReferenceResult)
    rows = []
    for i, generation in enumerate(recorded):
        n = len(generation.token_ids)
        ref = logprobs_by_hand(state.ref_model, generation, T_PHASES)
        torch.testing.assert_close(
            reference.batch.ref_logprobs[i, :n].double(), ref, atol=1e-4, rtol=0
        )
        assert (reference.batch.ref_logprobs[i, n:] == 0).all()
        k3 = k3_by_hand(state.policy, state.ref_model, generation, T_PHASES)
        torch.testing.assert_close(reference.kl[i, :n].double(), k3, atol=2e-5, rtol=1e-4)
        # The test can tell the directions apart: KL(π_ref ‖ π)'s k3 is off by ≈ d³/3.
        swapped = k3_by_hand(state.ref_model, state.policy, generation, T_PHASES)
        assert (swapped - k3).abs().max() > 1e-3
        rows.append(k3)
    total = float(sum(k.sum() for k in rows))
    assert reference.kl_mean == pytest.approx(total / sum(len(k) for k in rows), rel=1e-4)
    assert reference.kl_sequence_mean == pytest.approx(total / len(rows), rel=1e-4)
    assert reference.batch.old_logprobs is None  # on-policy: π_old is the detached current
    assert torch.equal(reference.global_kl, reference.kl)


def test_reference_and_kl_keeps_sampling_logprobs_as_old_when_off_policy(tokenizer):
    state, config = phase_state(tokenizer, "grpo", kl_coef=0.0, num_epochs=2)
    samples = rp.sample_and_score(state, PROMPTS[:2], GEN_T, config, VARIED)
    reference = rp.reference_and_kl(state, samples, config, T_PHASES)
    assert reference.kl is None and math.isnan(reference.kl_mean)  # β = 0: no reference run
    assert torch.equal(reference.batch.old_logprobs, samples.batch.old_logprobs)


def gae_by_hand(rewards, values, gamma, lam):
    """``A_t = δ_t + γλ·A_{t+1}``, ``δ_t = r_t + γ·V_{t+1} − V_t`` over one row of valid tokens."""
    advantages, next_value, next_advantage = [0.0] * len(rewards), 0.0, 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_value - values[t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[t], next_value = next_advantage, values[t]
    return advantages


def test_values_and_advantages_put_the_policy_to_reference_kl_in_ppo_rewards(tokenizer):
    # PPO with the KL in the reward: r_t = −β·kl_t + [t = last]·R, kl = k1 = log π − log π_ref
    # at T; GAE with γ = 0.9, λ = 0.8; no whitening, so the numbers are the GAE's own.
    beta, gamma, lam = 0.3, 0.9, 0.8
    state, config = phase_state(
        tokenizer, "ppo", kl_coef=beta, gamma=gamma, gae_lambda=lam, whiten_advantages=False
    )
    assert config.kl_in_reward and config.kl_estimator == "k1"
    recorded = []
    samples = rp.sample_and_score(
        state, PROMPTS[:2], GEN_T, config, VARIED, recording_generator(recorded)
    )
    reference = rp.reference_and_kl(state, samples, config, T_PHASES)
    result = rp.values_and_advantages(state, samples, reference, config, 4)
    assert isinstance(result, rp.AdvantageResult)
    batch = result.batch
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    values = rp.get_values(state.value_model, input_ids, batch.attention_mask,
                           batch.completion_ids.shape[1], batch.completion_mask)
    torch.testing.assert_close(batch.values, values)
    for i, generation in enumerate(recorded):
        n = len(generation.token_ids)
        kl = logprobs_by_hand(state.policy, generation, T_PHASES) - logprobs_by_hand(
            state.ref_model, generation, T_PHASES
        )
        rewards = (-beta * kl).tolist()
        rewards[-1] += float(samples.rewards[i])
        row_values = batch.values[i, :n].double().tolist()
        expected = gae_by_hand(rewards, row_values, gamma, lam)
        torch.testing.assert_close(
            batch.advantages[i, :n].double(), torch.tensor(expected, dtype=torch.float64),
            atol=1e-4, rtol=0,
        )
        torch.testing.assert_close(
            batch.returns[i, :n].double(),
            torch.tensor(expected, dtype=torch.float64) + batch.values[i, :n].double(),
            atol=1e-4, rtol=0,
        )
        assert (batch.advantages[i, n:] == 0).all()
        # With the KL reversed the first token's advantage moves by ≥ 2β·|kl| ≫ the tolerance.
        assert 2 * beta * float(kl.abs().max()) > 1e-2


def test_values_and_advantages_group_relative_by_hand(tokenizer):
    state, config = phase_state(tokenizer, "grpo", kl_coef=0.0)
    samples = rp.sample_and_score(state, PROMPTS[:2], GEN_T, config, VARIED)
    reference = rp.reference_and_kl(state, samples, config, T_PHASES)
    result = rp.values_and_advantages(state, samples, reference, config, 4)
    rewards = samples.rewards.double().tolist()
    for g in range(2):
        group = rewards[4 * g : 4 * g + 4]
        mean = sum(group) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 3)  # unbiased
        for j, r in enumerate(group):
            assert float(result.batch.advantages[4 * g + j]) == pytest.approx(
                (r - mean) / (std + 1e-4), abs=1e-5
            )
    assert result.batch.values is None and result.batch.returns is None


def ratio_recording_loss(name, seen):
    """The registry's loss, recording ``max |log π_θ − log π_old|`` over the valid tokens."""
    loss_fn = rp.get_algorithm(name).loss_fn

    def recording(batch, new_logprobs, config, **extras):
        if batch.old_logprobs is None:
            seen.append(0.0)  # on-policy: π_old is the detached π_θ
        else:
            gap = (new_logprobs.detach() - batch.old_logprobs) * batch.completion_mask
            seen.append(float(gap.abs().max()))
        return loss_fn(batch, new_logprobs, config, **extras)

    return recording


def test_update_policy_is_epochs_times_minibatches_of_training_step(tokenizer):
    weights = []
    for manual in (False, True):
        state, config = phase_state(tokenizer, "grpo", kl_coef=0.05, num_epochs=2,
                                    minibatch_size=3)
        samples = rp.sample_and_score(state, PROMPTS[:2], GEN_T, config, VARIED)
        reference = rp.reference_and_kl(state, samples, config, T_PHASES)
        batch = rp.values_and_advantages(state, samples, reference, config, 4).batch
        if manual:  # the same updates, by hand: shuffled minibatches seeded by step·1009 + epoch
            for epoch in range(2):
                seed = state.step * 1009 + epoch
                for minibatch in rp.split_minibatches(batch, 3, shuffle_seed=seed):
                    state, _ = rp.training_step(state, minibatch, config, temperature=T_PHASES)
        else:
            update = rp.update_policy(state, batch, config, samples.row_counts,
                                      temperature=T_PHASES)
            state = update.state
            assert isinstance(update, rp.UpdateResult)
            assert len(update.step_stats) == 2 * 3 and state.step == 6  # 8 rows: 3 + 3 + 2
        weights.append(params_of(state.policy))
    assert same_params(*weights)


def test_a_later_ppo_epoch_sees_a_ratio_away_from_one(tokenizer):
    state, config = phase_state(tokenizer, "ppo", kl_coef=0.1, num_epochs=3)
    seen = []
    state, stats = rp.training_iteration(
        state, PROMPTS[:2], GEN_T, config, VARIED, loss_fn=ratio_recording_loss("ppo", seen)
    )
    # Epoch 1 starts at the sampling policy (ratio 1 up to the generator's float error); the
    # epochs after it see the updated policy against the sampling log-probs.
    assert len(seen) == 3 and seen[0] < 1e-4
    assert seen[1] > 1e-3 and seen[2] > seen[1]
    assert stats.approx_kl > 0


def test_refresh_reference_moves_beta_and_the_reference_by_hand(tokenizer):
    state, _ = phase_state(tokenizer, "grpo", kl_coef=0.1)
    state = state._replace(step=4)
    policy, ref = params_of(state.policy), params_of(state.ref_model)
    controller = rp.create_adaptive_kl_controller(0.1, target=0.5, horizon=100)
    new = rp.refresh_reference(
        state, rp.create_ema_updater(0.25), controller, observed_kl=0.55, num_sequences=8
    )
    # e = 0.55 / 0.5 − 1 = 0.1, inside the ±0.2 clip: β = 0.1 · (1 + 0.1 · 8 / 100)
    assert new.kl_coef == pytest.approx(0.1 * (1 + 0.1 * 8 / 100), rel=1e-12)
    for r, p, now in zip(ref, policy, new.ref_model.parameters(), strict=True):
        torch.testing.assert_close(now.detach(), 0.25 * r + 0.75 * p)
    unchanged = rp.refresh_reference(state, None, controller, observed_kl=float("nan"))
    assert unchanged.kl_coef == state.kl_coef


def test_training_iteration_feeds_the_controller_the_per_sequence_kl_at_temperature(tokenizer):
    seen = []

    def recording_controller(coef, observed_kl, n_steps):
        seen.append((coef, observed_kl, n_steps))
        return coef

    state, config = phase_state(tokenizer, "grpo", kl_coef=0.05, kl_estimator="k3")
    recorded = []
    _, stats = rp.training_iteration(
        state, PROMPTS[:2], GEN_T, config, VARIED, recording_generator(recorded),
        kl_controller=recording_controller,
    )
    rows = [k3_by_hand(tiny_model("qwen2", seed=0), state.ref_model, g, T_PHASES)
            for g in recorded]  # π before the update: the sampling policy
    total = float(sum(k.sum() for k in rows))
    per_sequence, per_token = total / len(rows), total / sum(len(k) for k in rows)
    assert len(seen) == 1 and seen[0][0] == 0.05 and seen[0][2] == 8
    assert seen[0][1] == pytest.approx(per_sequence, rel=1e-4)
    assert stats.kl == pytest.approx(per_token, rel=1e-4)
    assert stats.extra["kl_sequence"] == pytest.approx(per_sequence, rel=1e-4)
    # The real controller, away from its cap: a target 5% under the observed KL gives
    # e = 0.05, β = 0.05 · (1 + 0.05 · 8 / 100). The per-token mean (≈ 1/length of it)
    # would give the capped e = −0.2 instead.
    assert per_token < 0.8 * per_sequence / 1.05
    state, config = phase_state(tokenizer, "grpo", kl_coef=0.05, kl_estimator="k3")
    controller = rp.create_adaptive_kl_controller(0.05, target=per_sequence / 1.05, horizon=100)
    state, _ = rp.training_iteration(
        state, PROMPTS[:2], GEN_T, config, VARIED, kl_controller=controller
    )
    assert state.kl_coef == pytest.approx(0.05 * (1 + 0.05 * 8 / 100), rel=1e-5)


def test_training_iteration_puts_the_reverse_kl_at_temperature_into_ppo_rewards(tokenizer):
    seen = []

    def recording_advantages(rewards, config, **extras):
        seen.append(extras["kl"].clone())
        return rp.get_algorithm("ppo").advantage_fn(rewards, config, **extras)

    state, config = phase_state(tokenizer, "ppo", kl_coef=0.3)
    recorded = []
    rp.training_iteration(
        state, PROMPTS[:2], GEN_T, config, VARIED, recording_generator(recorded),
        advantage_fn=recording_advantages,
    )
    policy = tiny_model("qwen2", seed=0)  # the sampling policy (the state's was updated)
    for i, generation in enumerate(recorded):
        n = len(generation.token_ids)
        k1 = logprobs_by_hand(policy, generation, T_PHASES) - logprobs_by_hand(
            state.ref_model, generation, T_PHASES
        )
        torch.testing.assert_close(seen[0][i, :n].double(), k1, atol=1e-4, rtol=0)
        assert k1.abs().max() > 1e-2  # a swapped sign could not pass


# ---------------------------------------------------------------- write your own iteration


def examples_block(title):
    """The python block of EXAMPLES.md's section ``title``."""
    text = (Path(__file__).parent.parent / "EXAMPLES.md").read_text(encoding="utf-8")
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_write_your_own_iteration_gives_training_iterations_weights(tokenizer):
    namespace = {"rp": rp, "tiny_model": tiny_model, "tokenizer": tokenizer}
    exec(examples_block("Write your own iteration"), namespace)  # its own check runs too
    my_iteration = namespace["my_iteration"]
    for seed, temperature in ((5, 0.6), (6, 1.4)):
        gen = GEN._replace(seed=seed, temperature=temperature)
        config = rp.create_algorithm_config("grpo", kl_coef=0.1, num_epochs=2, minibatch_size=4)
        ema = rp.create_ema_updater(0.5)
        mine, theirs = (phase_state(tokenizer, "grpo")[0] for _ in range(2))
        for iteration in range(2):
            mine, kl, _ = my_iteration(mine, PROMPTS, gen._replace(seed=seed + iteration),
                                       config, VARIED, ema)
            theirs, stats = rp.training_iteration(
                theirs, PROMPTS, gen._replace(seed=seed + iteration), config, VARIED,
                ref_model_update_fn=ema,
            )
            assert kl == stats.kl and math.isfinite(kl)
        assert mine.step == theirs.step == 16  # 16 rows, minibatches of 4, 2 epochs, twice
        assert same_params(params_of(mine.policy), params_of(theirs.policy))
        assert same_params(params_of(mine.ref_model), params_of(theirs.ref_model))


# ---------------------------------------------------------------- seed 003's extension names


def test_value_fn_gives_the_old_values_and_the_value_losses_new_values(tokenizer):
    state, config = phase_state(tokenizer, "ppo", whiten_advantages=False)
    with torch.no_grad():  # the critic's head starts at zero: give it values to compare
        head = state.value_model.score.weight
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)))
    calls = []

    def doubled_values(value_model, input_ids, attention_mask, completion_length,
                       completion_mask=None):
        calls.append(completion_mask is None)
        return 2.0 * rp.get_values(value_model, input_ids, attention_mask, completion_length,
                                   completion_mask)

    samples = rp.sample_and_score(state, PROMPTS[:2], GEN_T, config, VARIED)
    reference = rp.reference_and_kl(state, samples, config, T_PHASES)
    plain = rp.values_and_advantages(state, samples, reference, config, 4).batch
    doubled = rp.values_and_advantages(
        state, samples, reference, config, 4, value_fn=doubled_values
    ).batch
    assert calls == [False]  # the old values: one call, with the completion mask
    torch.testing.assert_close(doubled.values, 2.0 * plain.values, rtol=0, atol=0)
    assert float(plain.values.abs().max()) > 1e-3  # the comparison is not 0 == 0
    # The new values of the value loss come from value_fn too (no completion mask there).
    _, stats = rp.training_iteration(
        state, PROMPTS[:2], GEN_T, config, VARIED, value_fn=doubled_values
    )
    assert calls[1] is False and True in calls[2:]
    assert math.isfinite(stats.value_loss)


def test_tool_tracker_values_join_the_stats(tokenizer):
    state, config = make_state(tokenizer, "grpo")
    rows = []

    def tracker(rollouts):
        rows.append(len(rollouts))
        lengths = [len(r.generation.token_ids) for r in rollouts]
        return {"rows": len(rollouts), "mean_length": sum(lengths) / len(lengths),
                "per_tool": {"calc": 1}, "flag": True}

    _, stats = rp.training_iteration(
        state, PROMPTS[:2], GEN, config, VARIED, tool_tracker=tracker
    )
    tools = {k: v for k, v in stats.extra.items() if k.startswith("tools/")}
    assert set(tools) == {"tools/rows", "tools/mean_length"}  # dicts and bools left out
    assert tools["tools/rows"] == 8.0 == rows[0]
    assert tools["tools/mean_length"] == stats.num_tokens / 8
    _, stats = rp.training_iteration(
        state, PROMPTS[:2], GEN, config, VARIED, tool_tracker=rp.track_tool_calls
    )
    assert stats.extra["tools/num_rollouts"] == 8.0 and stats.extra["tools/total_calls"] == 0.0
    with pytest.raises(TypeError, match="tool_tracker must return a mapping"):
        rp.training_iteration(state, PROMPTS[:2], GEN, config, VARIED, tool_tracker=len)


def test_ref_model_fn_builds_the_frozen_reference(tokenizer):
    config = rp.create_algorithm_config("grpo", kl_coef=0.1)
    policy, sft = tiny_model("qwen2", seed=0), tiny_model("qwen2", seed=1)
    state = rp.create_training_state(
        policy, tokenizer, config, ref_model_fn=lambda p: sft
    )
    assert state.ref_model is sft and not sft.training
    assert not any(p.requires_grad for p in sft.parameters())
    default = rp.create_training_state(tiny_model("qwen2", seed=0), tokenizer, config)
    assert same_params(params_of(default.ref_model), params_of(policy))  # a frozen copy
    with pytest.raises(ValueError, match="ref_model_fn returned a model that shares"):
        rp.create_training_state(policy, tokenizer, config, ref_model_fn=lambda p: p)
    with pytest.raises(TypeError, match="ref_model_fn must return the reference model"):
        rp.create_training_state(policy, tokenizer, config, ref_model_fn=lambda p: None)
    with pytest.raises(TypeError, match="ref_model_fn must be callable"):
        rp.create_training_state(policy, tokenizer, config, ref_model_fn="copy")
    assert all(p.requires_grad for p in policy.parameters())  # the failures froze nothing
