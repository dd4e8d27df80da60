"""Samples per second of ``vllm_generator`` against ``hf_generator``, and the time of one ``sync_weights``.

Both generators sample the same tiny model (the same weights: the engine is built from the
directory the Hugging Face model is loaded from) on the same prompts with the same settings
(``num_samples`` per prompt, temperature, top-p, ``max_new_tokens``), interleaved in one run
and repeated; the medians are compared. The sync is timed on the policy the HF side samples
from, after perturbing its weights so every call moves real numbers.

Needs vLLM, so it runs in the vLLM venv that ``make test-vllm`` builds::

    .venv-vllm/bin/python benchmarks/bench_vllm.py [--model qwen2|llama|rlprim/arith-tiny|DIR]
        [--prompts 16] [--samples 8] [--new-tokens 32] [--repeats 5]
        [--hidden-size 128 --layers 2 --heads 4]   # sizes of the tiny qwen2 / llama

Prints one JSON object. Where vLLM is not installed (e.g. ``make bench`` in ``.venv``) it prints
``{"benchmark": "bench_vllm", "skipped": ...}`` and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _prompts(count: int, arithmetic: bool) -> list[str]:
    if arithmetic:
        return [f"{(7 * i) % 100}+{(13 * i + 5) % 100}=" for i in range(count)]
    # Different lengths, as in bench_generation.py.
    return [f"Compute {i} + {3 * i + 7}. " + "Think step by step. " * (i % 4) for i in range(count)]


def _timed(fn) -> tuple[float, float, object]:
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - start, time.process_time() - start_cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2",
                        help="qwen2 | llama (tiny models of rlprim.testing) or a path / bundled name")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden-size", type=int, default=128, help="tiny models only")
    parser.add_argument("--layers", type=int, default=2, help="tiny models only")
    parser.add_argument("--heads", type=int, default=4, help="tiny models only (head size "
                        "hidden/heads must be one vLLM's CPU backend accepts, e.g. 32 or 64)")
    args = parser.parse_args()

    if importlib.util.find_spec("vllm") is None:
        print(json.dumps({
            "benchmark": "bench_vllm",
            "skipped": "vLLM is not installed in this environment; run "
            "`.venv-vllm/bin/python benchmarks/bench_vllm.py` (`make test-vllm` builds .venv-vllm)",
        }, indent=2))
        return

    import torch
    import transformers
    import vllm

    from rlprim.inference import hf_generator, load_model, load_tokenizer, resolve_model_path
    from rlprim.testing import save_tiny_model
    from rlprim.types import GenerationConfig
    from rlprim.vllm_engine import create_vllm_engine, sync_weights, vllm_generator

    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as directory:
        if args.model in ("qwen2", "llama"):
            path = save_tiny_model(
                directory, args.model, seed=0, hidden_size=args.hidden_size,
                num_layers=args.layers, num_heads=args.heads,
            )
        else:
            path = resolve_model_path(args.model)
        os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(directory, "vllm-cache"))
        start = time.perf_counter()
        engine = create_vllm_engine(path)
        engine_seconds = time.perf_counter() - start
        model = load_model(path)
        tokenizer = load_tokenizer(path)
        prompts = _prompts(args.prompts, arithmetic="arith" in args.model)
        config = GenerationConfig(
            max_new_tokens=args.new_tokens, temperature=0.7, top_p=0.95,
            num_samples=args.samples, seed=0,
        )
        runs = {
            "hf": lambda cfg: hf_generator(model, tokenizer, prompts, cfg),
            "vllm": lambda cfg: vllm_generator(engine, tokenizer, prompts, cfg),
        }
        for fn in runs.values():  # warm-up both paths (vLLM's first call is slow)
            fn(config)
        times = {name: [] for name in runs}
        cpu = {name: [] for name in runs}
        tokens = {name: [] for name in runs}
        for repeat in range(args.repeats):
            cfg = config._replace(seed=repeat)
            # Alternate which runs first so drift hits both equally.
            order = list(runs.items()) if repeat % 2 == 0 else list(runs.items())[::-1]
            for name, fn in order:
                elapsed, elapsed_cpu, generations = _timed(lambda fn=fn, cfg=cfg: fn(cfg))
                times[name].append(elapsed)
                cpu[name].append(elapsed_cpu)
                tokens[name].append(sum(len(g.token_ids) for g in generations))

        sync_times = []
        for _ in range(args.repeats):
            with torch.no_grad():  # a real change each time
                for parameter in model.parameters():
                    parameter.add_(1e-3 * torch.randn_like(parameter))
            elapsed, _, _ = _timed(lambda: sync_weights(engine, model))
            sync_times.append(elapsed)

    samples = args.prompts * args.samples
    median = {name: statistics.median(values) for name, values in times.items()}
    report = {
        "benchmark": "bench_vllm",
        "model": args.model,
        "hidden_size": model.config.hidden_size,
        "layers": model.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompts": args.prompts,
        "samples_per_prompt": args.samples,
        "max_new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "hf_median_s": round(median["hf"], 4),
        "vllm_median_s": round(median["vllm"], 4),
        "hf_samples_per_s": round(samples / median["hf"], 1),
        "vllm_samples_per_s": round(samples / median["vllm"], 1),
        "vllm_speedup": round(median["hf"] / median["vllm"], 3),
        "hf_tokens_per_s": round(statistics.median(tokens["hf"]) / median["hf"], 1),
        "vllm_tokens_per_s": round(statistics.median(tokens["vllm"]) / median["vllm"], 1),
        # Process CPU time is less sensitive than wall time to other load on a shared machine.
        "hf_median_cpu_s": round(statistics.median(cpu["hf"]), 4),
        "vllm_median_cpu_s": round(statistics.median(cpu["vllm"]), 4),
        "sync_weights_median_s": round(statistics.median(sync_times), 4),
        "sync_weights_times_s": [round(t, 4) for t in sync_times],
        "engine_creation_s": round(engine_seconds, 2),
        "hf_times_s": [round(t, 4) for t in times["hf"]],
        "vllm_times_s": [round(t, 4) for t in times["vllm"]],
        "mean_completion_tokens": {
            name: round(statistics.mean(values) / samples, 2) for name, values in tokens.items()
        },
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
