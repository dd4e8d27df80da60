"""Wall time of ``batch_generate`` (with ``hf_generator``) against a raw ``model.generate`` call.

Both sample the same tiny model on the same prompts with the same settings (left padding, KV
cache, temperature, top-p, ``num_samples`` rows per prompt, ``max_new_tokens``), interleaved in
one run and repeated; the medians are compared. ``batch_generate`` does more than the raw call —
it validates, tokenises, records the log-prob of every sampled token, trims padding and decodes
the texts — and the target is a median wall-time ratio ``<= 1.05``.

Usage: ``python benchmarks/bench_generation.py [--arch qwen2] [--prompts 16] [--samples 8]
[--new-tokens 32] [--repeats 7]``. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402

from rlprim.inference import batch_generate, hf_generator  # noqa: E402
from rlprim.testing import tiny_model, tiny_tokenizer  # noqa: E402
from rlprim.types import GenerationConfig  # noqa: E402


def _prompts(count: int) -> list[str]:
    # Different lengths, so left padding is exercised.
    return [f"Compute {i} + {3 * i + 7}. " + "Think step by step. " * (i % 4) for i in range(count)]


def _raw_generate(model, tokenizer, prompts, config: GenerationConfig) -> torch.Tensor:
    encoded = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    with torch.inference_mode():
        return model.generate(
            **encoded,
            do_sample=True,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            max_new_tokens=config.max_new_tokens,
            num_return_sequences=config.num_samples,
            pad_token_id=tokenizer.pad_token_id,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen2", choices=["qwen2", "llama", "gpt2"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    tokenizer = tiny_tokenizer()
    model = tiny_model(args.arch)
    prompts = _prompts(args.prompts)
    config = GenerationConfig(
        max_new_tokens=args.new_tokens,
        temperature=0.7,
        top_p=0.95,
        top_k=0,
        num_samples=args.samples,
    )

    def run_rlprim() -> int:
        generations = batch_generate(model, tokenizer, prompts, config, generator=hf_generator)
        return sum(len(g.token_ids) for g in generations)

    def run_raw() -> int:
        sequences = _raw_generate(model, tokenizer, prompts, config)
        return int(sequences.numel())

    run_rlprim()  # warm-up both paths (allocator, lazy imports)
    run_raw()
    rlprim_times, raw_times, rlprim_cpu, raw_cpu, rlprim_tokens = [], [], [], [], []
    for repeat in range(args.repeats):
        # Alternate which runs first so drift (thermal, allocator) hits both equally.
        order = (("rlprim", run_rlprim), ("raw", run_raw))
        for name, fn in order if repeat % 2 == 0 else order[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            result = fn()
            elapsed = time.perf_counter() - start
            elapsed_cpu = time.process_time() - start_cpu
            if name == "rlprim":
                rlprim_times.append(elapsed)
                rlprim_cpu.append(elapsed_cpu)
                rlprim_tokens.append(result)
            else:
                raw_times.append(elapsed)
                raw_cpu.append(elapsed_cpu)

    rlprim_median = statistics.median(rlprim_times)
    raw_median = statistics.median(raw_times)
    report = {
        "benchmark": "bench_generation",
        "arch": args.arch,
        "prompts": args.prompts,
        "samples_per_prompt": args.samples,
        "max_new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "batch_generate_median_s": round(rlprim_median, 4),
        "raw_generate_median_s": round(raw_median, 4),
        "ratio": round(rlprim_median / raw_median, 4),
        "target_ratio": 1.05,
        # Process CPU time is less sensitive than wall time to other load on a shared machine.
        "batch_generate_median_cpu_s": round(statistics.median(rlprim_cpu), 4),
        "raw_generate_median_cpu_s": round(statistics.median(raw_cpu), 4),
        "cpu_ratio": round(statistics.median(rlprim_cpu) / statistics.median(raw_cpu), 4),
        "batch_generate_times_s": [round(t, 4) for t in rlprim_times],
        "raw_generate_times_s": [round(t, 4) for t in raw_times],
        "mean_completion_tokens": statistics.mean(rlprim_tokens) / (args.prompts * args.samples),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
