"""The quick-start demo: GRPO teaches the bundled model arithmetic on a CPU in minutes.

Run it with ``make demo`` or ``python -m rlprim.demo [--iterations N] [--output runs/demo]``.
It measures held-out greedy accuracy of the bundled ``rlprim/arith-tiny`` model, trains it with
``quick_start_training`` (GRPO, β = 0, 32 prompts × 8 samples per iteration, 40 iterations), and writes
``stats.jsonl``, ``reward_curve.png`` and a final checkpoint to the output directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["main"]


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the demo; print before/after held-out accuracy and a one-line summary.

    ``accuracy_after`` is the held-out greedy accuracy of the final policy, measured on 200
    problems the model never trains on (``arithmetic_split(2000, 200, seed)``).

    Args:
      argv: command-line arguments (``--iterations``, ``--output``, ``--seed``,
        ``--threads``, ``--no-progress``); ``None`` reads ``sys.argv``.
    Returns:
      ``{"accuracy_before", "accuracy_after", "seconds"}``.
    """
    parser = argparse.ArgumentParser(prog="python -m rlprim.demo", description=__doc__)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--output", default=os.path.join("runs", "demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from tqdm import tqdm
    from transformers.utils import logging as transformers_logging

    # transformers' own "Loading weights" bars would interleave with the demo's lines.
    transformers_logging.disable_progress_bar()

    from rlprim.inference import load_model, load_tokenizer
    from rlprim.quick_start import BUNDLED_MODEL, quick_start_training
    from rlprim.tasks.arithmetic import arithmetic_split, evaluate_arithmetic

    if args.threads:
        torch.set_num_threads(args.threads)
    _, held_out = arithmetic_split(2000, 200, seed=args.seed)
    before = evaluate_arithmetic(
        load_model(BUNDLED_MODEL), load_tokenizer(BUNDLED_MODEL), held_out
    )
    print(f"held-out greedy accuracy before: {before:.1%}", flush=True)

    def log_eval(stats):
        extra = stats.extra or {}
        if "eval/heldout_accuracy" in extra:
            # tqdm.write prints above the progress bar instead of breaking it mid-line.
            tqdm.write(
                f"  iteration {int(extra['iteration']) + 1:3d}: held-out accuracy "
                f"{extra['eval/heldout_accuracy']:.1%}, reward {stats.reward_mean:.3f}, "
                f"{extra['wall_time']:.0f}s"
            )

    start = time.perf_counter()
    state = quick_start_training(
        num_iterations=args.iterations,
        algorithm="grpo",
        kl_coef=0.0,
        seed=args.seed,
        output_dir=args.output,
        eval_every=args.eval_every,
        logger=log_eval,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    after = evaluate_arithmetic(state.policy, state.tokenizer, held_out)
    print(f"held-out greedy accuracy after: {after:.1%}")
    print(f"wrote {args.output}/stats.jsonl, reward_curve.png and checkpoint/")
    print(f"accuracy {before:.0%} → {after:.0%} in {_format_duration(seconds)}")
    return {"accuracy_before": before, "accuracy_after": after, "seconds": seconds}


if __name__ == "__main__":
    main(sys.argv[1:])
