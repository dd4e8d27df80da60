"""A complete custom pipeline: every extension point of ``train`` filled with your own function.

* **generator** — ``create_few_shot_generator``: wraps ``rp.hf_generator`` and puts solved
  examples in front of every prompt (the prompting strategy lives in the generator, so the
  rollouts, the ``Batch`` and the loss all see the prompt ids the model really conditioned on);
* **reward** — ``answer_reward``: 1 for the right answer, plus a small dense term for digits;
* **loss** — ``clipped_loss_with_entropy_bonus``: the PPO-clip surrogate plus an entropy bonus,
  reading the per-token entropy the training step passes in ``extras``;
* **logger** — a JSONL stats file (``rp.create_jsonl_logger``) and a console line of your own,
  combined with ``rp.combine_loggers``;
* **checkpointing** — ``rp.create_checkpoint_fn(directory, every=1, keep_last=2)``, and a
  resume: a run stopped half-way is reloaded into fresh objects with ``rp.load_checkpoint`` and
  continued; its final weights are compared with an uninterrupted run's (they are equal);
* **evaluation** — ``eval_fn(state)``: greedy accuracy on held-out problems, logged as
  ``eval/accuracy`` every ``eval_every`` iterations;
* a reward curve drawn from the stats file with ``rp.plot_training_stats``.

The policy is a tiny untrained model from ``rlprim.testing``, so accuracy stays near 0: the
point is the plumbing, which is the same for a real model.

Run it:
    python examples/custom_pipeline.py                    # 6 iterations, resumed after 3
    python examples/custom_pipeline.py --quick            # 2 iterations, resumed after 1 (tests)
    python examples/custom_pipeline.py --output-dir runs  # keep the files (default: a temp dir)
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny local models only: never reach a hub

import torch  # noqa: E402

import rlprim as rp  # noqa: E402
from rlprim.testing import tiny_model, tiny_tokenizer  # noqa: E402

SHOTS = [{"prompt": "2+2", "answer": "4"}, {"prompt": "10-3", "answer": "7"},
         {"prompt": "3*5", "answer": "15"}]
TRAIN = [{"prompt": f"{a}+{b}", "answer": str(a + b)} for a in range(1, 9) for b in (3, 6)]
HELD_OUT = [{"prompt": f"{a}*{b}", "answer": str(a * b)} for a, b in ((2, 3), (4, 5), (6, 7))]
ENTROPY_COEF = 0.01


# --- generator ---------------------------------------------------------------------------------
def create_few_shot_generator(shots, base_generator=rp.hf_generator) -> rp.Generator:
    """A ``Generator`` that samples with ``base_generator`` from few-shot prompts."""

    def few_shot_generator(model, tokenizer, prompts, config):
        # Token-id prompts (multi-turn rollouts) are used verbatim; texts get the examples.
        prompts = [rp.build_few_shot_prompt(shots, p) if isinstance(p, str) else p
                   for p in prompts]
        return base_generator(model, tokenizer, prompts, config)

    return few_shot_generator


# --- reward ------------------------------------------------------------------------------------
def answer_reward(rollout: rp.Rollout) -> float:
    """1 if the first number of the completion is the answer, plus 0.1 × the digit fraction."""
    text = rollout.generation.text
    numbers = re.findall(r"-?\d+", text)
    correct = float(bool(numbers) and numbers[0] == rollout.metadata["answer"])
    return correct + 0.1 * sum(c.isdigit() for c in text) / max(1, len(text))


# --- loss --------------------------------------------------------------------------------------
def clipped_loss_with_entropy_bonus(batch, new_logprobs, config, *, entropy=None, **extras):
    """A ``LossFn``: ``agg(PPO-clip) - c_H · agg(H)``; ``entropy [B, Tc]`` comes from the step."""
    old = new_logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs
    loss, metrics = rp.compute_ppo_loss(
        new_logprobs, old, batch.advantages, batch.completion_mask,
        clip_eps_low=config.clip_eps_low, clip_eps_high=config.clip_eps_high,
        loss_agg_mode=config.loss_agg_mode,
    )
    metrics = {"policy_loss": float(loss.detach()), **metrics}
    if entropy is not None:
        bonus, entropy_metrics = rp.compute_entropy_bonus(
            entropy, batch.completion_mask, ENTROPY_COEF, loss_agg_mode=config.loss_agg_mode
        )
        loss = loss + bonus
        metrics.update(entropy_metrics)
    return loss, metrics


# --- evaluation --------------------------------------------------------------------------------
def create_eval_fn(problems, generator) -> rp.EvalFn:
    """``eval_fn(state) -> {"accuracy", "mean_length"}`` with greedy decoding."""
    greedy = rp.GenerationConfig(max_new_tokens=6, do_sample=False, num_samples=1)

    def evaluate(state: rp.TrainingState) -> dict[str, float]:
        rollouts = rp.create_batch_rollouts(
            state.policy, state.tokenizer, problems, greedy, generator=generator
        )
        correct = [answer_reward(r) >= 1.0 for r in rollouts]
        lengths = [len(r.generation.token_ids) for r in rollouts]
        return {"accuracy": sum(correct) / len(correct), "mean_length": sum(lengths) / len(lengths)}

    return evaluate


# --- logger ------------------------------------------------------------------------------------
def console_logger(stats: rp.TrainingStats) -> None:
    """A ``Logger`` of one's own: one line per iteration, evaluation results when present."""
    extra = stats.extra or {}
    line = (f"iteration {extra.get('iteration', stats.step):.0f}: reward={stats.reward_mean:.3f} "
            f"entropy={stats.entropy:.3f} loss={stats.loss:+.4f}")
    if "eval/accuracy" in extra:
        line += f" | eval accuracy={extra['eval/accuracy']:.2f}"
    print(line, flush=True)


# --- the run -----------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A complete custom training pipeline.")
    parser.add_argument("--output-dir", default=None, help="where files go (default: temp dir)")
    parser.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("RLPRIM_EXAMPLE_QUICK") == "1",
        help="a reduced run (also set by RLPRIM_EXAMPLE_QUICK=1)",
    )
    return parser.parse_args()


def new_state(tokenizer, config) -> rp.TrainingState:
    torch.manual_seed(0)
    return rp.create_training_state(tiny_model("qwen2", seed=0), tokenizer, config,
                                    learning_rate=1e-3)


def main() -> None:
    args = parse_args()
    num_iterations = 2 if args.quick else 6
    stop_after = num_iterations // 2
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="rlprim-custom-pipeline-")
    os.makedirs(output_dir, exist_ok=True)

    tokenizer = tiny_tokenizer()
    config = rp.create_algorithm_config("grpo", kl_coef=0.0, loss_agg_mode="token-mean")
    generator = create_few_shot_generator(SHOTS)
    # Everything train needs, except the state, the number of iterations and the side effects.
    common = dict(
        prompt_loader=rp.create_prompt_loader(TRAIN, batch_size=2, seed=0),
        gen_config=rp.GenerationConfig(max_new_tokens=6, num_samples=4, seed=0),
        algorithm_config=config,
        reward_fn=answer_reward,
        generator=generator,
        eval_fn=create_eval_fn(HELD_OUT, generator),
        eval_every=2,
        progress=False,
        loss_fn=clipped_loss_with_entropy_bonus,  # passed on to training_iteration
    )

    # 1. A run that checkpoints every iteration and "crashes" after `stop_after` iterations.
    stats_path = os.path.join(output_dir, "stats.jsonl")
    checkpoint_dir = os.path.join(output_dir, "checkpoints")
    logger = rp.combine_loggers(rp.create_jsonl_logger(stats_path), console_logger)
    checkpoint_fn = rp.create_checkpoint_fn(checkpoint_dir, every=1, keep_last=2)
    print(f"run 1: {stop_after} iterations, then stop")
    rp.train(new_state(tokenizer, config), num_iterations=stop_after, logger=logger,
             checkpoint_fn=checkpoint_fn, **common)

    # 2. Resume: fresh objects, filled from the newest checkpoint (weights, optimizer moments,
    #    step, iteration, prompt-loader position, RNG), then the same train call to the end.
    latest = rp.latest_checkpoint(checkpoint_dir)
    resumed = rp.load_checkpoint(latest, new_state(tokenizer, config))
    print(f"resumed from {os.path.basename(latest)} at iteration {resumed.iteration}")
    resumed = rp.train(resumed, num_iterations=num_iterations, logger=logger,
                       checkpoint_fn=checkpoint_fn, **common)

    # 3. The same run without interruption, for comparison.
    print(f"run 2: {num_iterations} iterations without interruption")
    uninterrupted = rp.train(new_state(tokenizer, config), num_iterations=num_iterations,
                             logger=console_logger, **common)
    same = all(
        torch.equal(p, q)
        for p, q in zip(resumed.policy.parameters(), uninterrupted.policy.parameters(),
                        strict=True)
    )
    print(f"resumed run == uninterrupted run (every weight): {same}")

    records = rp.read_stats_jsonl(stats_path)
    png = rp.plot_training_stats(
        stats_path, os.path.join(output_dir, "reward_curve.png"),
        metrics=("reward_mean", "eval/accuracy", "entropy"),
    )
    kept = sorted(os.listdir(checkpoint_dir))
    print(f"files in {output_dir}: stats.jsonl ({len(records)} lines), {os.path.basename(png)}, "
          f"checkpoints {kept}")
    print(
        f"[custom_pipeline] done: iterations={num_iterations} resumed_at={stop_after} "
        f"resume_exact={same} stats_lines={len(records)} checkpoints_kept={len(kept)}"
    )


if __name__ == "__main__":
    main()
