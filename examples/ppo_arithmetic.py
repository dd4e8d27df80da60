"""PPO with a critic on the arithmetic task.

``create_training_state`` builds the critic (``create_value_model``: a copy of the policy's
trunk with a zero-initialised scalar head) because the ``ppo`` algorithm needs values; the KL to
the reference goes into the per-token reward (``kl_in_reward``), advantages come from GAE and
are whitened, and the loss adds the clipped value loss (see ARCHITECTURE.md §6).

Run it:
    python examples/ppo_arithmetic.py            # 40 iterations
    python examples/ppo_arithmetic.py --quick    # 2 iterations (the tests)
"""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import rlprim as rp  # noqa: E402
from rlprim.tasks.arithmetic import (  # noqa: E402
    arithmetic_reward,
    arithmetic_split,
    create_arithmetic_eval_fn,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        default=os.environ.get("RLPRIM_EXAMPLE_QUICK") == "1")
    args = parser.parse_args()
    iterations = 2 if args.quick else 40

    torch.manual_seed(0)
    policy = rp.load_model("rlprim/arith-tiny")
    tokenizer = rp.load_tokenizer("rlprim/arith-tiny")
    train_problems, held_out = arithmetic_split(2000, 200, seed=0)
    config = rp.create_algorithm_config(
        "ppo", kl_coef=0.01, num_epochs=2, minibatch_size=64, gae_lambda=0.95
    )
    state = rp.create_training_state(policy, tokenizer, config, learning_rate=3e-4)
    assert state.value_model is not None and state.ref_model is not None

    log = []
    state = rp.train(
        state,
        rp.create_prompt_loader(train_problems, batch_size=16, seed=0),
        iterations,
        rp.GenerationConfig(max_new_tokens=6, num_samples=4, seed=0),
        config,
        arithmetic_reward,
        eval_fn=create_arithmetic_eval_fn(held_out),
        eval_every=max(1, iterations // 4),
        logger=log.append,
        progress=not args.quick,
    )
    last = log[-1]
    assert math.isfinite(last.value_loss) and math.isfinite(last.kl)
    print(f"[ppo_arithmetic] done: iterations={state.iteration} value_loss={last.value_loss:.4f} "
          f"kl={last.kl:.5f} heldout_accuracy={last.extra['eval/heldout_accuracy']:.3f}")


if __name__ == "__main__":
    main()
