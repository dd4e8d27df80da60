"""Overhead of ``training_iteration`` against the sum of its irreducible parts.

One GRPO iteration on a tiny Qwen2 (2 layers, hidden 128): 2 prompts × 4 samples of 16 new
tokens, β = 0.04 (so a reference forward is needed). The irreducible parts, measured in the same
run on the same model and tokens, are: one raw ``model.generate`` call for the same samples, one
reference forward, one policy forward + backward of the loss, and one optimizer step. The two
measurements alternate ``--repeats`` times and medians are compared.

Prints JSON: the median times, the breakdown and ``overhead_ratio`` (target ≤ 1.25).
usage: python benchmarks/bench_training.py [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import rlprim as rp  # noqa: E402
from rlprim.testing import tiny_model, tiny_tokenizer  # noqa: E402

PROMPTS = ["12+34=", "7*8="]


def reward(rollout):
    return float(sum(rollout.generation.token_ids) % 5)


def irreducible(state, gen: rp.GenerationConfig, config: rp.AlgorithmConfig) -> dict:
    """The parts no RL loop can avoid, timed one by one on the same inputs."""
    policy, tokenizer = state.policy, state.tokenizer
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ids = enc["input_ids"].repeat_interleave(gen.num_samples, dim=0)
    mask = enc["attention_mask"].repeat_interleave(gen.num_samples, dim=0)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = policy.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
            top_p=1.0, max_new_tokens=gen.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        )
    t_generate = time.perf_counter() - t0
    full_mask = torch.cat([mask, torch.ones_like(out[:, ids.shape[1]:])], dim=1)
    t0 = time.perf_counter()
    with torch.no_grad():
        state.ref_model(input_ids=out, attention_mask=full_mask)
    t_reference = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = policy(input_ids=out, attention_mask=full_mask).logits[:, ids.shape[1] - 1 : -1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, out[:, ids.shape[1]:, None])
    (-logp.mean()).backward()
    t_forward_backward = time.perf_counter() - t0
    t0 = time.perf_counter()
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    t_optimizer = time.perf_counter() - t0
    return {
        "generate": t_generate,
        "reference_forward": t_reference,
        "policy_forward_backward": t_forward_backward,
        "optimizer_step": t_optimizer,
        "total": t_generate + t_reference + t_forward_backward + t_optimizer,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = tiny_tokenizer()
    config = rp.create_algorithm_config("grpo", kl_coef=0.04)
    gen = rp.GenerationConfig(max_new_tokens=16, num_samples=4, seed=0)
    state = rp.create_training_state(
        tiny_model("qwen2", seed=0), tokenizer, config, learning_rate=1e-5
    )
    # Warm-up of both paths.
    state, _ = rp.training_iteration(state, PROMPTS, gen, config, reward)
    irreducible(state, gen, config)

    ours, parts, breakdowns = [], [], []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        state, stats = rp.training_iteration(
            state, PROMPTS, gen._replace(seed=i), config, reward
        )
        ours.append(time.perf_counter() - t0)
        breakdowns.append(
            {"generate": stats.time_generate, "reference": stats.time_reference,
             "train": stats.time_train}
        )
        p = irreducible(state, gen, config)
        parts.append(p)
    ours_median = statistics.median(ours)
    parts_median = statistics.median(p["total"] for p in parts)
    result = {
        "benchmark": "training_iteration vs irreducible parts (GRPO, tiny qwen2, 8×16 tokens)",
        "threads": args.threads,
        "repeats": args.repeats,
        "training_iteration_s": round(ours_median, 4),
        "irreducible_total_s": round(parts_median, 4),
        "overhead_ratio": round(ours_median / parts_median, 3),
        "target_ratio": 1.25,
        "training_iteration_breakdown_s": {
            k: round(statistics.median(b[k] for b in breakdowns), 4) for k in breakdowns[0]
        },
        "irreducible_breakdown_s": {
            k: round(statistics.median(p[k] for p in parts), 4) for k in parts[0] if k != "total"
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
