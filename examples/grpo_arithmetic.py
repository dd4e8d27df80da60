"""GRPO on the arithmetic task through ``train``, with every piece passed explicitly.

The same run as the demo, but nothing is left to defaults: the model and tokenizer loaders,
the algorithm config, the optimizer, the prompt loader, the reward, the evaluation, the logger
and the checkpoints are each built with a public function and handed to ``rp.train``.

Run it:
    python examples/grpo_arithmetic.py            # 60 iterations
    python examples/grpo_arithmetic.py --quick    # 3 iterations (the tests)
"""

from __future__ import annotations

import argparse
import os
import tempfile

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
    iterations = 3 if args.quick else 60
    workdir = tempfile.mkdtemp(prefix="rlprim-grpo-arith-")

    torch.manual_seed(0)
    policy = rp.load_model(rp.ModelConfig("rlprim/arith-tiny", dtype="float32", device="cpu"))
    tokenizer = rp.load_tokenizer("rlprim/arith-tiny")
    train_problems, held_out = arithmetic_split(2000, 200, seed=0)

    config = rp.create_algorithm_config("grpo", {"kl_coef": 0.0, "max_grad_norm": 1.0})
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-4)
    state = rp.create_training_state(policy, tokenizer, config, optimizer=optimizer)
    loader = rp.create_prompt_loader(train_problems, batch_size=32, shuffle=True, seed=0)
    gen_config = rp.GenerationConfig(max_new_tokens=6, temperature=1.0, num_samples=8, seed=0)
    stats_path = os.path.join(workdir, "stats.jsonl")

    state = rp.train(
        state,
        loader,
        iterations,
        gen_config,
        config,
        reward_fn=arithmetic_reward,
        ref_model_update_fn=None,
        checkpoint_fn=rp.create_checkpoint_fn(os.path.join(workdir, "ckpt"), every=10,
                                              keep_last=1),
        eval_fn=create_arithmetic_eval_fn(held_out),
        logger=rp.combine_loggers(rp.create_jsonl_logger(stats_path)),
        generator=rp.hf_generator,
        eval_every=max(1, iterations // 6),
        progress=not args.quick,
    )
    records = rp.read_stats_jsonl(stats_path)
    accuracy = [r["eval/heldout_accuracy"] for r in records if "eval/heldout_accuracy" in r]
    print(f"[grpo_arithmetic] done: iterations={state.iteration} "
          f"heldout_accuracy={accuracy[-1]:.3f} records={len(records)}")


if __name__ == "__main__":
    main()
