"""``quick_start_training``: a whole GRPO run in one call.

``rp.quick_start_training(model_name, prompts, reward_fn, num_iterations, algorithm, ...)``
loads the model and tokenizer, builds the algorithm config (extra keyword arguments override its
fields, e.g. ``kl_coef=0.0``), an AdamW ``TrainingState`` and a shuffled prompt loader, and calls
``rp.train``. With ``output_dir`` it also writes ``stats.jsonl``, ``reward_curve.png`` and a
final ``checkpoint/`` there.

Here the model is a tiny random Qwen2 written to a temporary directory with
``rlprim.testing.save_tiny_model`` — any local directory (or hub name) works the same way — and
the prompts and reward function are given explicitly. rlprim will also ship a small model
trained on an arithmetic task (``"rlprim/arith-tiny"``, in ``rlprim/assets``); with it, the
call needs no arguments at all, ``rp.quick_start_training()``, and trains on the arithmetic
task with its own reward and held-out accuracy. That bundled model is not used here.

Run it:
    python examples/quick_start_oneliner.py            # 10 iterations
    python examples/quick_start_oneliner.py --quick    # 2 iterations (the tests)
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny local models only: never reach a hub

import rlprim as rp  # noqa: E402
from rlprim.testing import save_tiny_model  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The quick_start_training one-liner.")
    parser.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("RLPRIM_EXAMPLE_QUICK") == "1",
        help="a reduced run (also set by RLPRIM_EXAMPLE_QUICK=1)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    workdir = tempfile.mkdtemp(prefix="rlprim-quick-start-")
    model_dir = save_tiny_model(os.path.join(workdir, "tiny-qwen2"), arch="qwen2", seed=0)
    output_dir = os.path.join(workdir, "run")

    state = rp.quick_start_training(
        model_dir,
        prompts=["12+7=", "3*4=", "20-8=", "5+5=", "9*9=", "100-1=", "7+8=", "6*3="],
        reward_fn=rp.length_reward(target_length=12, scale=12, unit="chars"),
        num_iterations=2 if args.quick else 10,
        algorithm="grpo",
        prompts_per_iteration=4,
        num_samples=4,
        max_new_tokens=8,
        learning_rate=1e-3,
        output_dir=output_dir,
        logger=rp.log_to_console,
        progress=False,
        kl_coef=0.0,  # an AlgorithmConfig override
    )

    records = rp.read_stats_jsonl(os.path.join(output_dir, "stats.jsonl"))
    written = sorted(os.listdir(output_dir))
    print(f"state: step={state.step} iteration={state.iteration}")
    print(f"written to {output_dir}: {written}")
    print(
        f"[quick_start_oneliner] done: iterations={state.iteration} stats_lines={len(records)} "
        f"files={','.join(written)}"
    )


if __name__ == "__main__":
    main()
