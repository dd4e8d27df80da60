"""Vector rewards: several objectives per completion, reduced to one scalar by an aggregator.

A reward function may return ``K`` floats instead of one. Before advantages are computed the
batch of vectors ``[B, K]`` is reduced to scalar rewards ``[B]`` by an *aggregator*
``fn(vectors [B, K]) -> rewards [B]``. This example scores completions on two objectives that
pull against each other — the fraction of digit characters (more is better) and brevity (fewer
characters is better) — and compares three aggregators:

* ``rp.weighted_sum([0.7, 0.3])``: linear scalarisation ``r = Σ_k w_k · v_k``;
* a custom lambda: the worst objective, ``r = min_k v_k`` (a Chebyshev scalarisation: a
  completion is only as good as its weakest objective);
* ``rp.create_pareto_aggregator(group_size=G)``: Pareto ranking within each group of ``G``
  samples of a prompt (NSGA-II fronts, front 1 → 1.0, last front → 0.0), which needs no weights
  and is invariant to rescaling any objective.

It first shows the three on one batch, then trains a tiny model with each through
``rp.train(..., aggregator=...)`` (``train`` passes the extra keyword to
``training_iteration``) and measures both objectives of the trained policies. In the default
run the aggregators lead to different trade-offs: the weighted sum mostly buys brevity (it is
cheap to earn), while the worst-case aggregator must raise the digit fraction, the weaker
objective. (The aggregated reward curves are on different scales and cannot be compared with
each other; the objectives can.)

Run it:
    python examples/vector_rewards.py            # 25 iterations per aggregator
    python examples/vector_rewards.py --quick    # 2 iterations per aggregator (the tests)
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny local models only: never reach a hub

import torch  # noqa: E402

import rlprim as rp  # noqa: E402
from rlprim.testing import tiny_model, tiny_tokenizer  # noqa: E402

PROMPTS = ["12+7=", "3*4=", "20-8=", "5+5=", "9*9=", "100-1=", "7+8=", "6*3="]
MAX_CHARS = 40


def digits_and_brevity(rollout: rp.Rollout) -> tuple[float, float]:
    """A vector reward, K = 2, both components in [0, 1] (higher is better)."""
    text = rollout.generation.text
    digits = sum(c.isdigit() for c in text) / max(1, len(text))
    brevity = 1.0 - min(len(text), MAX_CHARS) / MAX_CHARS
    return (digits, brevity)


def worst_objective(vectors: torch.Tensor) -> torch.Tensor:
    """The lambda below, written out: ``[B, K] -> [B]``."""
    return vectors.min(dim=1).values


AGGREGATORS = {
    "weighted_sum": rp.weighted_sum([0.7, 0.3]),
    "worst_case": lambda vectors: vectors.min(dim=1).values,  # a custom aggregator
    "pareto": None,  # built below: it needs the group size
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Vector rewards with custom aggregation.")
    parser.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("RLPRIM_EXAMPLE_QUICK") == "1",
        help="a reduced run (also set by RLPRIM_EXAMPLE_QUICK=1)",
    )
    return parser.parse_args()


def mean_objectives(policy, tokenizer, prompts, gen_config) -> tuple[float, float]:
    """Both objectives averaged over fresh samples of ``policy``."""
    rollouts = rp.create_batch_rollouts(policy, tokenizer, prompts, gen_config)
    vectors = torch.tensor([digits_and_brevity(r) for r in rollouts])  # [B, K]
    digits, brevity = vectors.mean(dim=0).tolist()
    return digits, brevity


def main() -> None:
    args = parse_args()
    num_iterations = 2 if args.quick else 25
    prompts_per_iteration = 2 if args.quick else 4
    tokenizer = tiny_tokenizer()
    gen_config = rp.GenerationConfig(max_new_tokens=8, num_samples=4, seed=0)
    group_size = gen_config.num_samples
    aggregators = {**AGGREGATORS, "pareto": rp.create_pareto_aggregator(group_size=group_size)}

    # --- 1. The three aggregators on one batch -------------------------------------------
    policy = tiny_model("qwen2", seed=0)
    rollouts = rp.create_batch_rollouts(policy, tokenizer, PROMPTS[:2], gen_config)
    vectors = torch.tensor([digits_and_brevity(r) for r in rollouts])  # [B, K]
    scalars = {
        name: rp.compute_batch_rewards(rollouts, digits_and_brevity, aggregator=aggregator)
        for name, aggregator in aggregators.items()
    }  # each [B]
    assert torch.allclose(scalars["worst_case"], worst_objective(vectors))
    assert torch.allclose(scalars["weighted_sum"], vectors @ torch.tensor([0.7, 0.3]))
    print("group 0 (one prompt, G samples):")
    print(f"  {'digits':>7} {'brevity':>7} | {'weighted':>8} {'worst':>6} {'pareto':>6}")
    for i in range(group_size):
        print(
            f"  {vectors[i, 0]:7.3f} {vectors[i, 1]:7.3f} | {scalars['weighted_sum'][i]:8.3f} "
            f"{scalars['worst_case'][i]:6.3f} {scalars['pareto'][i]:6.3f}"
        )

    # --- 2. Training with each aggregator --------------------------------------------------
    eval_config = gen_config._replace(seed=12345)
    results = {}
    for name, aggregator in aggregators.items():
        config = rp.create_algorithm_config("grpo", kl_coef=0.0)
        state = rp.create_training_state(
            tiny_model("qwen2", seed=0), tokenizer, config, learning_rate=3e-3
        )
        history: list[rp.TrainingStats] = []
        state = rp.train(
            state,
            prompt_loader=rp.create_prompt_loader(PROMPTS, prompts_per_iteration, seed=0),
            num_iterations=num_iterations,
            gen_config=gen_config,
            algorithm_config=config,
            reward_fn=digits_and_brevity,
            logger=history.append,  # any fn(stats) -> None is a logger
            progress=False,
            aggregator=aggregator,  # passed on to training_iteration
        )
        assert state.iteration == num_iterations and len(history) == num_iterations
        results[name] = mean_objectives(state.policy, tokenizer, PROMPTS[:4], eval_config)
        curve = " ".join(f"{s.reward_mean:.3f}" for s in history)
        print(f"{name:>12}: aggregated reward per iteration {curve}")

    print("objectives of the trained policies (fresh samples):")
    for name, (digits, brevity) in results.items():
        print(f"  {name:>12}: digits={digits:.3f} brevity={brevity:.3f}")
    print(
        f"[vector_rewards] done: runs={','.join(results)} iterations={num_iterations} "
        f"pareto_range={float(scalars['pareto'].min()):.2f}..{float(scalars['pareto'].max()):.2f}"
    )


if __name__ == "__main__":
    main()
