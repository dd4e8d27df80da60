"""Switching algorithm and KL coefficient mid-training with ``rp.Schedule``.

``train`` accepts, as ``algorithm_config``, a ``Schedule(fn)`` with ``fn(iteration) ->
AlgorithmConfig`` and resolves it at every iteration. Anything an ``AlgorithmConfig`` holds can
change this way: the algorithm itself, β (``kl_coef``), the clip range, the loss aggregation…
This run goes through three phases:

    phase 1  GRPO, β = 0.04                   (KL penalty to the frozen reference)
    phase 2  GRPO, β annealed linearly towards 0
    phase 3  DAPO (its published defaults: β = 0, clip-higher ε = 0.2 / 0.28, token-mean
             aggregation, dynamic sampling, overlong shaping)

and the switch is visible in the logged statistics: ``train`` writes the algorithm's name into
``stats.extra["algorithm"]`` and the β in force into ``stats.kl_coef``. With β = 0 the reference
model is not run at all, so ``stats.kl`` is ``nan`` (not measured) in phase 3.

The reward schedule works the same way: ``train(..., reward_fn=rp.Schedule(fn))``.

Run it:
    python examples/switch_algorithm.py            # 3 iterations per phase
    python examples/switch_algorithm.py --quick    # 1 iteration per phase (the tests)
"""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny local models only: never reach a hub

import rlprim as rp  # noqa: E402
from rlprim.testing import tiny_model, tiny_tokenizer  # noqa: E402

PROMPTS = ["12+7=", "3*4=", "20-8=", "5+5=", "9*9=", "100-1=", "7+8=", "6*3="]
GRPO = rp.create_algorithm_config("grpo", kl_coef=0.04)
DAPO = rp.create_algorithm_config("dapo")


def create_schedule(phase_length: int) -> rp.Schedule:
    """GRPO with β = 0.04, then GRPO with β annealed to 0, then DAPO."""

    def config_at(iteration: int) -> rp.AlgorithmConfig:
        if iteration < phase_length:
            return GRPO
        if iteration < 2 * phase_length:
            k = iteration - phase_length  # 0 … L-1: β = 0.04 · (1 - (k + 1) / (L + 1))
            return GRPO._replace(kl_coef=GRPO.kl_coef * (1 - (k + 1) / (phase_length + 1)))
        return DAPO

    return rp.Schedule(config_at)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Switch algorithm and β mid-training.")
    parser.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("RLPRIM_EXAMPLE_QUICK") == "1",
        help="a reduced run (also set by RLPRIM_EXAMPLE_QUICK=1)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    phase_length = 1 if args.quick else 3
    num_iterations = 3 * phase_length
    schedule = create_schedule(phase_length)

    tokenizer = tiny_tokenizer()
    # The state is built with the first phase's config: β > 0, so it holds a frozen reference.
    state = rp.create_training_state(
        tiny_model("qwen2", seed=0), tokenizer, schedule.fn(0), learning_rate=1e-3
    )
    assert state.ref_model is not None

    history: list[rp.TrainingStats] = []
    console_keys = ["algorithm", "kl_coef", "reward_mean", "kl", "clip_fraction", "loss"]
    state = rp.train(
        state,
        prompt_loader=rp.create_prompt_loader(PROMPTS, batch_size=2, seed=0),
        num_iterations=num_iterations,
        gen_config=rp.GenerationConfig(max_new_tokens=8, num_samples=4, seed=0),
        algorithm_config=schedule,
        # Closeness to 12 characters: varied enough that DAPO's dynamic sampling finds groups
        # whose samples differ.
        reward_fn=rp.length_reward(target_length=12, scale=12, unit="chars"),
        logger=rp.combine_loggers(
            history.append, lambda stats: rp.log_to_console(stats, keys=console_keys)
        ),
        progress=False,
    )

    print("iteration | algorithm | kl_coef | kl (mean per token)")
    for stats in history:
        print(
            f"{stats.extra['iteration']:9.0f} | {stats.extra['algorithm']:>9} | "
            f"{stats.kl_coef:7.4f} | {stats.kl:.5f}"
        )
    # The logged statistics follow the schedule.
    for iteration, stats in enumerate(history):
        expected = schedule.fn(iteration)
        assert stats.extra["algorithm"] == expected.name
        assert math.isclose(stats.kl_coef, expected.kl_coef)
        assert math.isnan(stats.kl) == (expected.kl_coef == 0)
    algorithms = [stats.extra["algorithm"] for stats in history]
    betas = [f"{stats.kl_coef:g}" for stats in history]
    print(
        f"[switch_algorithm] done: iterations={num_iterations} "
        f"algorithms={','.join(algorithms)} kl_coefs={','.join(betas)}"
    )


if __name__ == "__main__":
    main()
