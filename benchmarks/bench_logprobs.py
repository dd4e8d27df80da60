"""Benchmark: peak memory and time of ``get_logprobs`` against the naive log-softmax.

Setting (issue 3): B = 4 sequences of T = 512 tokens, a Qwen-sized vocabulary V = 151,936 on a
tiny qwen2 model (hidden 128, 1 layer), float32, CPU, temperature 0.7, forward only (no grad —
the reference-model / old-log-prob path). Optionally also forward + backward (``--backward``).

* naive:  ``log_softmax(model(...).logits[:, :-1] / τ, -1).gather(-1, targets)``
* rlprim: ``get_logprobs(model, input_ids, attention_mask, temperature=τ)``

How peak memory is measured. PyTorch's CPU allocator calls ``malloc``/``free`` directly (no
caching allocator, no per-device statistics) and ``tracemalloc`` only sees Python objects, so
neither sees tensor memory. We therefore measure the process's resident set: every variant runs
in a fresh subprocess which builds the model, runs one warm-up call, then resets the kernel's
peak-RSS counter (writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM``), records the
current ``VmRSS``, runs the measured call, and reports ``VmHWM - VmRSS_before``: the extra
resident memory at the peak of the call. Tensors of this size are ``mmap``-ed by glibc and
returned to the kernel on free, so the figure is the call's own high-water mark. Time is
measured separately, in one process that alternates naive and rlprim calls (median of
``--repeats``), so that load from other processes hits both alike. Both variants use the same
weights (seed) and inputs; the outputs of the memory runs are compared (max abs diff over
non-padding positions).

Run: ``.venv/bin/python benchmarks/bench_logprobs.py`` (prints one JSON object).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

BATCH, LENGTH, VOCAB, HIDDEN, LAYERS, TEMPERATURE = 4, 512, 151_936, 128, 1, 0.7


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _setup(backward: bool):
    """The model, inputs and the two ``call()`` functions (naive, rlprim) of one benchmark."""
    import torch

    from rlprim.logprobs import get_logprobs
    from rlprim.testing import tiny_model

    model = tiny_model("qwen2", seed=0, vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(8, VOCAB, (BATCH, LENGTH), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :37] = 0  # one left-padded row, like a real batch
    input_ids[attention_mask == 0] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)

    def naive():
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).logits
        logprobs = torch.log_softmax(logits[:, :-1] / TEMPERATURE, dim=-1)
        return logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)

    def chunked():
        return get_logprobs(model, input_ids, attention_mask, temperature=TEMPERATURE)

    def wrap(function):
        def call():
            if backward:
                model.zero_grad(set_to_none=True)
                result = function()
                result.sum().backward()
                return result.detach()
            with torch.no_grad():
                return function()

        return call

    return model, {"naive": wrap(naive), "rlprim": wrap(chunked)}


def _peak_memory(variant: str, backward: bool, output_path: str) -> dict:
    """Child process: extra resident memory at the peak of one call of ``variant``."""
    import torch

    model, calls = _setup(backward)
    call = calls[variant]
    call()  # warm-up: thread pools, lazy inits, first touch of the weights
    model.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    rss_before = _status_kib("VmRSS")
    result = call()
    peak_extra_mib = (_status_kib("VmHWM") - rss_before) / 1024
    torch.save(result, output_path)
    return {"peak_extra_mib": round(peak_extra_mib, 1)}


def _times(backward: bool, repeats: int) -> dict:
    """Wall time per call, both variants alternating in one process (fair under load)."""
    _, calls = _setup(backward)
    for call in calls.values():
        call()
    seconds: dict = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(values), 3) for name, values in seconds.items()}


def _spawn_memory(variant: str, backward: bool, output_path: str) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--output", output_path]
    command += ["--backward"] if backward else []
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=("naive", "rlprim"))
    parser.add_argument("--output")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backward", action="store_true", help="also measure forward+backward")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_peak_memory(args.child, args.backward, args.output)))
        return

    import torch

    from rlprim.logprobs import default_chunk_size

    report: dict = {
        "setting": {
            "B": BATCH,
            "T": LENGTH,
            "V": VOCAB,
            "hidden": HIDDEN,
            "layers": LAYERS,
            "temperature": TEMPERATURE,
            "chunk_size": default_chunk_size(VOCAB),
            "torch_threads": torch.get_num_threads(),
            "memory": "extra peak RSS of one call, fresh subprocess per variant (VmHWM reset)",
            "time": f"median of {args.repeats} alternating calls in one process",
        }
    }
    modes = [("forward", False)] + ([("forward_backward", True)] if args.backward else [])
    with tempfile.TemporaryDirectory() as directory:
        for mode, backward in modes:
            memory, outputs = {}, {}
            for variant in ("naive", "rlprim"):
                path = os.path.join(directory, f"{mode}-{variant}.pt")
                memory[variant] = _spawn_memory(variant, backward, path)["peak_extra_mib"]
                outputs[variant] = torch.load(path, weights_only=True)
            seconds = _times(backward, args.repeats)
            # Row 1's first 37 columns predict padding or from padding: rlprim returns 0 there.
            valid = torch.ones_like(outputs["naive"], dtype=torch.bool)
            valid[1, :37] = False
            diff = (outputs["naive"] - outputs["rlprim"])[valid].abs().max().item()
            report[mode] = {
                "peak_extra_mib": memory,
                "seconds": seconds,
                "peak_memory_ratio": round(memory["rlprim"] / memory["naive"], 4),
                "time_ratio": round(seconds["rlprim"] / seconds["naive"], 4),
                "max_abs_diff": diff,
            }
    forward = report["forward"]
    report["targets_met"] = {
        "peak_memory_ratio<=0.25": forward["peak_memory_ratio"] <= 0.25,
        "time_ratio<=1.2": forward["time_ratio"] <= 1.2,
        "max_abs_diff<=1e-5": forward["max_abs_diff"] <= 1e-5,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
