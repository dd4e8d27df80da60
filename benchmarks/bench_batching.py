"""Benchmark: padding in length-bucketed micro-batches (``pack_by_length``) against plain padding.

Setting (issue 4): 256 rollouts, completion lengths uniform in 8..512 tokens, prompt lengths
uniform in 16..64 (seeded NumPy generator), token ids random (the ids do not matter, only the
lengths). Two layouts of the prompts are measured: every rollout with its own prompt, and
GRPO-style groups of 8 samples sharing a prompt (32 prompts).

For each micro-batch budget ``max_tokens`` (positions, padding included) we report:

* ``packed``: ``pack_by_length(batch, max_tokens)`` with its default overhead (one more
  micro-batch is worth 256 padded positions);
* ``packed_fewest``: the same with ``overhead_tokens=inf`` (the fewest micro-batches that fit);
* ``plain_padded``: the batch padded to its longest prompt and completion and cut into the same
  number of micro-batches as ``packed`` (consecutive rows, sizes differing by at most one) —
  what a loop without bucketing computes (these may exceed ``max_tokens``);
* ``plain_trimmed``: those same-count micro-batches, each trimmed to its own longest rows.

The padding fraction is ``1 - real tokens / computed positions`` over all micro-batches
(``rlprim.padding_fraction``); target ≤ 10 % for ``packed``. Times are medians of 5 runs.

Run: ``.venv/bin/python benchmarks/bench_batching.py`` (prints one JSON object).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np

from rlprim.batching import (
    DEFAULT_OVERHEAD_TOKENS,
    pack_by_length,
    padding_fraction,
    rollouts_to_batch,
    select_batch,
    trim_padding,
)
from rlprim.types import Batch, Generation, Rollout

ROLLOUTS, COMPLETION_RANGE, PROMPT_RANGE, VOCAB = 256, (8, 512), (16, 64), 512
TARGET = 0.10


def make_rollouts(seed: int, group_size: int) -> list[Rollout]:
    rng = np.random.default_rng(seed)
    rollouts = []
    prompt: list[int] = []
    for row in range(ROLLOUTS):
        if row % group_size == 0:
            prompt = rng.integers(8, VOCAB, rng.integers(PROMPT_RANGE[0], PROMPT_RANGE[1] + 1))
            prompt = prompt.tolist()
        length = int(rng.integers(COMPLETION_RANGE[0], COMPLETION_RANGE[1] + 1))
        completion = rng.integers(8, VOCAB, length).tolist()
        generation = Generation(
            text="", prompt_ids=prompt, token_ids=completion, logprobs=[-1.0] * length
        )
        rollouts.append(
            Rollout(prompt="", generation=generation, rewards=0.0, group_id=row // group_size)
        )
    return rollouts


def _median_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _summary(micro: list[Batch]) -> dict:
    positions = [m.attention_mask.numel() for m in micro]
    return {
        "micro_batches": len(micro),
        "padding_fraction": round(padding_fraction(micro), 4),
        "real_tokens": int(sum(int(m.attention_mask.sum()) for m in micro)),
        "computed_positions": int(sum(positions)),
        "largest_micro_batch_positions": max(positions),
    }


def _plain_split(batch: Batch, count: int, trim: bool) -> list[Batch]:
    """``count`` micro-batches of consecutive rows (sizes differ by at most one)."""
    parts = np.array_split(np.arange(batch.prompt_ids.shape[0]), count)
    micro = [select_batch(batch, part.tolist()) for part in parts]
    return [trim_padding(m) for m in micro] if trim else micro


def run_scenario(seed: int, group_size: int, budgets: list[int]) -> dict:
    rollouts = make_rollouts(seed, group_size)
    batch = rollouts_to_batch(rollouts, pad_token_id=0)
    result = {
        "group_size": group_size,
        "rollouts_to_batch_seconds": round(
            _median_time(lambda: rollouts_to_batch(rollouts, pad_token_id=0)), 4
        ),
        "whole_batch_padding_fraction": round(padding_fraction(batch), 4),
        "budgets": [],
    }
    for max_tokens in budgets:
        packed = pack_by_length(batch, max_tokens)
        fewest = pack_by_length(batch, max_tokens, overhead_tokens=math.inf)
        seen = sorted(int(g) for m in packed for g in m.group_ids.tolist())
        assert seen == sorted(batch.group_ids.tolist()), "a row was lost or duplicated"
        assert all(m.attention_mask.numel() <= max_tokens for m in packed + fewest)
        assert all(m is trim_padding(m) for m in packed)
        entry = {
            "max_tokens": max_tokens,
            "packed": _summary(packed),
            "packed_fewest": _summary(fewest),
            "plain_padded": _summary(_plain_split(batch, len(packed), trim=False)),
            "plain_trimmed": _summary(_plain_split(batch, len(packed), trim=True)),
            "pack_by_length_seconds": round(
                _median_time(lambda mt=max_tokens: pack_by_length(batch, mt)), 4
            ),
        }
        entry["packed_meets_target"] = entry["packed"]["padding_fraction"] <= TARGET
        result["budgets"].append(entry)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4096, 8192, 16384])
    args = parser.parse_args()
    report = {
        "setting": {
            "rollouts": ROLLOUTS,
            "completion_lengths": list(COMPLETION_RANGE),
            "prompt_lengths": list(PROMPT_RANGE),
            "seed": args.seed,
            "target_padding_fraction": TARGET,
            "default_overhead_tokens": DEFAULT_OVERHEAD_TOKENS,
        },
        "scenarios": [run_scenario(args.seed, g, args.budgets) for g in (1, 8)],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
