"""Data-parallel ``training_iteration`` on CPU: time per iteration at 1 and 2 ranks, and the bytes
the ranks exchange per optimizer step.

Workload: GRPO (β = 0.04, so a reference forward too) on the tiny Qwen2 of ``rlprim.testing``
(2 layers, hidden 128), a global batch of 8 prompts × 4 samples of up to 16 tokens sampled with
``hf_generator``, micro-batches of 8 rows. The same global batch is trained in four set-ups,
each launched with ``torchrun`` (gloo on 127.0.0.1), alternating ``--repeats`` times:

  1 rank × 1 thread, 1 rank × 2 threads (the same two cores as below), 2 ranks × 1 thread
  (DDP), 2 ranks × 1 thread with the policy sharded by FSDP2 (``strategy="fsdp"``).

On this two-core machine (shared with other work) two ranks show the cost of data parallelism
— the collectives and their waits — next to the use of the second core; on real multi-GPU
machines the per-rank work halves. Each worker times ``--iterations`` iterations after one
warm-up and reports the median.

Bytes: every ``torch.distributed`` collective is wrapped to count the bytes it is handed per
rank (``all_reduce``: the tensor; ``all_gather``: the local input; ``all_gather_object``: the
pickle), split into the gradient all-reduce (``synchronize_gradients``: one flat buffer per
step, 4 bytes per trainable parameter plus a 4-byte flag each) and the rest (loss normalisers,
statistics, the rewards / masks / KL gathered for the advantages). FSDP2's own traffic
(``all_gather_single`` of weight shards, ``reduce_scatter_single`` of gradients) is
counted apart as ``fsdp_bytes_per_iteration``.

Prints JSON. usage: python benchmarks/bench_distributed.py [--iterations 4] [--repeats 2]
(the script launches its own workers; ``--worker`` is internal)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SETUPS = (
    ("1 rank x 1 thread", 1, 1, "ddp"),
    ("1 rank x 2 threads", 1, 2, "ddp"),
    ("2 ranks x 1 thread", 2, 1, "ddp"),
    ("2 ranks x 1 thread, FSDP2", 2, 1, "fsdp"),
)
PROMPTS = [f"{a}+{b}=" for a in range(4) for b in range(4)]


def _worker(out_path: str, iterations: int, threads: int, strategy: str) -> None:
    import torch
    import torch.distributed as dist

    import rlprim as rp
    from rlprim.distributed import (
        current_data_parallel,
        get_distributed_info,
        init_distributed,
        wrap_training_state,
    )
    from rlprim.testing import tiny_model, tiny_tokenizer

    torch.set_num_threads(threads)
    counts = {"gradient_bytes": 0, "other_bytes": 0, "steps": 0, "collectives": 0,
              "fsdp_bytes": 0}

    def counted(function, size):
        def wrapper(*args, **kwargs):
            counts["other_bytes"] += size(*args)
            counts["collectives"] += 1
            return function(*args, **kwargs)

        return wrapper

    tensor_bytes = lambda t, *rest: t.numel() * t.element_size()  # noqa: E731
    dist.all_reduce = counted(dist.all_reduce, tensor_bytes)
    dist.broadcast = counted(dist.broadcast, tensor_bytes)
    dist.all_gather = counted(dist.all_gather, lambda out, t, *r: tensor_bytes(t))
    dist.all_gather_object = counted(
        dist.all_gather_object, lambda out, obj, *r: len(pickle.dumps(obj))
    )

    def counted_fsdp(function):
        def wrapper(*args, **kwargs):
            source = args[1] if len(args) > 1 else kwargs["input"]  # (output, input, ...)
            counts["fsdp_bytes"] += tensor_bytes(source)
            return function(*args, **kwargs)

        return wrapper

    # FSDP2's weight all-gathers (local shard in) and gradient reduce-scatters (full grads in).
    dist.all_gather_single = counted_fsdp(dist.all_gather_single)
    dist.reduce_scatter_single = counted_fsdp(dist.reduce_scatter_single)

    def counted_synchronize(params, *args, **kwargs):
        before = counts["other_bytes"]
        nbytes = synchronize(params, *args, **kwargs)
        counts["other_bytes"] = before  # its all_reduces are the gradient's, not "other"
        counts["gradient_bytes"] += nbytes
        return nbytes

    info = init_distributed()
    # The loop's collectives, with gradient synchronisation counted apart.
    parallel = current_data_parallel()
    synchronize = parallel.synchronize_gradients
    parallel = parallel._replace(synchronize_gradients=counted_synchronize)
    policy = tiny_model("qwen2", seed=0)
    config = rp.create_algorithm_config("grpo", kl_coef=0.04, micro_batch_size=8)
    state = rp.create_training_state(policy, tiny_tokenizer(), config, learning_rate=1e-4)
    state = wrap_training_state(state, strategy=strategy)
    gen = rp.GenerationConfig(max_new_tokens=16, num_samples=4, seed=0)
    loader = rp.create_prompt_loader(PROMPTS, batch_size=8, seed=0)
    reward = lambda r: float(sum(r.generation.token_ids) % 5)  # noqa: E731
    times, records = [], []
    for iteration in range(iterations + 1):
        for key in counts:
            counts[key] = 0
        if info.world_size > 1:
            dist.barrier()  # start together; the barrier is outside the timed span
        start, step = time.perf_counter(), state.step
        state, stats = rp.training_iteration(
            state, loader(iteration), gen._replace(seed=iteration), config, reward,
            data_parallel=parallel,
        )
        elapsed = time.perf_counter() - start
        counts["steps"] = state.step - step
        if iteration:  # the first one is a warm-up
            times.append(elapsed)
            records.append({**counts, "generate": stats.time_generate,
                            "reference": stats.time_reference, "train": stats.time_train,
                            "num_sequences": stats.num_sequences})
    if get_distributed_info().rank == 0:
        trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        with open(out_path, "w") as file:
            json.dump({"times": times, "records": records, "trainable_parameters": trainable},
                      file)
    if info.world_size > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(ranks: int, threads: int, strategy: str, iterations: int, out_path: str) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        os.path.abspath(__file__), "--worker", out_path, "--iterations", str(iterations),
        "--threads", str(threads), "--strategy", strategy,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    with open(out_path) as file:
        return json.load(file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--worker", default=None)
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args.worker, args.iterations, args.threads, args.strategy)
        return

    runs: dict[str, list[dict]] = {name: [] for name, *_ in SETUPS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # alternate the set-ups: the machine's load drifts
            for name, ranks, threads, strategy in SETUPS:
                path = os.path.join(tmp, f"{ranks}_{threads}_{strategy}_{repeat}.json")
                runs[name].append(_launch(ranks, threads, strategy, args.iterations, path))
    summary: dict = {"iterations_timed_per_launch": args.iterations, "repeats": args.repeats}
    for name, results in runs.items():
        times = [t for r in results for t in r["times"]]
        records = [rec for r in results for rec in r["records"]]
        steps = statistics.median(rec["steps"] for rec in records)
        summary[name] = {
            "median_iteration_s": round(statistics.median(times), 4),
            "median_generate_s": round(statistics.median(r["generate"] for r in records), 4),
            "median_train_s": round(statistics.median(r["train"] for r in records), 4),
            "optimizer_steps_per_iteration": steps,
            "gradient_bytes_per_step": statistics.median(
                rec["gradient_bytes"] / max(rec["steps"], 1) for rec in records
            ),
            "other_bytes_per_iteration": statistics.median(r["other_bytes"] for r in records),
            "collectives_per_iteration": statistics.median(r["collectives"] for r in records),
            "fsdp_bytes_per_iteration": statistics.median(r["fsdp_bytes"] for r in records),
            "global_sequences": records[0]["num_sequences"],
        }
        summary["trainable_parameters"] = results[0]["trainable_parameters"]
    base = summary["1 rank x 1 thread"]["median_iteration_s"]
    for name, *_ in SETUPS:
        summary[name]["time_vs_1_rank_1_thread"] = round(
            summary[name]["median_iteration_s"] / base, 3
        )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
