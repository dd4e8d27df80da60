"""A GRPO training loop written out step by step with rlprim's primitives (no ``train``).

Every iteration does, by hand, what ``rp.training_iteration`` does for you:

    prompts ──create_batch_rollouts──> rollouts ──compute_batch_rewards──> rewards [B]
            ──rollouts_to_batch──> Batch ──get_reference_logprobs──> ref log-probs [B, Tc]
            ──compute_grpo_advantages──> A [B]
            ──get_logprobs──> new log-probs [B, Tc] ──compute_grpo_loss──> loss ──> optimizer step

The policy is a tiny randomly initialised Qwen2 model from ``rlprim.testing`` (built locally,
nothing is downloaded), so its completions start as gibberish; the reward, the fraction of
digit characters in the completion, is one such a model learns to raise within a few dozen
updates. Each iteration takes two optimizer steps on its batch (``NUM_EPOCHS = 2``), so the
second step's ratio ``exp(logπ_θ - logπ_old)`` is no longer 1 and PPO clipping can act.

Run it:
    python examples/basic_grpo_loop.py            # 30 iterations: the reward climbs from ~0 to ~0.5
    python examples/basic_grpo_loop.py --quick    # 2 iterations (what the tests run)
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny local models only: never reach a hub

import torch  # noqa: E402

import rlprim as rp  # noqa: E402
from rlprim.testing import tiny_model, tiny_tokenizer  # noqa: E402

PROMPTS = ["12+7=", "3*4=", "20-8=", "5+5=", "9*9=", "100-1=", "7+8=", "6*3="]
KL_COEF = 0.04  # β of the KL penalty to the frozen reference
CLIP_EPS = 0.2  # PPO clip range ε
NUM_EPOCHS = 2  # optimizer steps per batch of rollouts
LEARNING_RATE = 3e-3


def digit_fraction(rollout: rp.Rollout) -> float:
    """The reward: the fraction of the completion's characters that are digits, in [0, 1]."""
    text = rollout.generation.text
    return sum(c.isdigit() for c in text) / max(1, len(text))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A GRPO loop written with rlprim's primitives.")
    parser.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("RLPRIM_EXAMPLE_QUICK") == "1",
        help="a reduced run (also set by RLPRIM_EXAMPLE_QUICK=1)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    num_iterations = 2 if args.quick else 30
    torch.manual_seed(0)

    tokenizer = tiny_tokenizer()
    policy = tiny_model("qwen2", seed=0)
    ref_model = rp.create_reference_model(policy)  # a frozen copy: π_ref
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LEARNING_RATE)
    prompt_loader = rp.create_prompt_loader(PROMPTS, batch_size=4, seed=0)
    gen_config = rp.GenerationConfig(max_new_tokens=8, num_samples=4, temperature=1.0, seed=0)
    group_size = gen_config.num_samples

    history = []
    for iteration in range(num_iterations):
        # 1. Sample G completions per prompt (one generator call). The seed changes with the
        #    iteration so every iteration sees new samples, reproducibly.
        prompts = prompt_loader(iteration)
        config = gen_config._replace(seed=gen_config.seed + iteration)
        rollouts = rp.create_batch_rollouts(policy, tokenizer, prompts, config)

        # 2. Score them, and store the reward on each rollout (a Rollout is immutable).
        rewards = rp.compute_batch_rewards(rollouts, digit_fraction)  # [B]
        rollouts = [r._replace(rewards=float(x)) for r, x in zip(rollouts, rewards, strict=True)]

        # 3. Pad them into one Batch: prompts left-padded, completions right-padded.
        batch = rp.rollouts_to_batch(rollouts, tokenizer)
        input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)  # [B, Tp + Tc]
        completion_length = batch.completion_ids.shape[1]  # Tc
        mask = batch.completion_mask  # [B, Tc], 1 on tokens that train

        # 4. Reference log-probs at the sampling temperature (no gradient, eval mode).
        ref_logprobs = rp.get_reference_logprobs(
            ref_model, input_ids, batch.attention_mask,
            temperature=gen_config.temperature, completion_length=completion_length,
        ) * mask  # [B, Tc]

        # 5. Group-relative advantages: (r - mean_group) / (std_group + 1e-4), one per sequence.
        advantages = rp.compute_grpo_advantages(batch.rewards, group_size=group_size)  # [B]

        # 6. NUM_EPOCHS optimizer steps on this batch. The "old" log-probs are those recorded
        #    at sampling time (batch.old_logprobs); the new ones carry the gradient.
        for epoch in range(NUM_EPOCHS):
            new_logprobs = rp.get_logprobs(
                policy, input_ids, batch.attention_mask,
                temperature=gen_config.temperature, completion_length=completion_length,
            )  # [B, Tc]
            if epoch == 0:
                # Sampling and training compute log-probs the same way: before the first
                # update the ratio is exactly 1 (up to float error).
                drift = ((new_logprobs.detach() - batch.old_logprobs) * mask).abs().max()
                assert drift < 1e-3, f"sampling/training log-prob mismatch {float(drift)}"
            loss, metrics = rp.compute_grpo_loss(
                new_logprobs, batch.old_logprobs, advantages, mask,
                ref_logprobs=ref_logprobs, kl_coef=KL_COEF,
                clip_eps_low=CLIP_EPS, clip_eps_high=CLIP_EPS,
                loss_agg_mode="seq-mean-token-mean",
            )
            optimizer.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm=1.0)
            optimizer.step()  # the policy's weights change in place

        history.append(float(rewards.mean()))
        print(
            f"iteration {iteration}: reward_mean={rewards.mean():.3f} "
            f"loss={loss.item():+.4f} kl={metrics['kl']:.5f} "
            f"clip_fraction={metrics['clip_fraction']:.3f} grad_norm={float(grad_norm):.3f}"
        )
        print(f"    sample: {prompts[0]!r} -> {rollouts[0].generation.text!r}")

    print(
        f"[basic_grpo_loop] done: iterations={num_iterations} "
        f"reward_first={history[0]:.4f} reward_last={history[-1]:.4f}"
    )


if __name__ == "__main__":
    main()
