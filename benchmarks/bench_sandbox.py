"""Benchmark: the per-call cost of the python tool's bubblewrap sandbox against the rlimits fallback.

Programs: ``busy_100ms`` spins the CPU for 100 ms (``time.perf_counter`` loop), ``sleep_100ms``
sleeps 100 ms, ``empty`` does nothing, ``numpy`` imports numpy (``site_packages=True``). Each is
run ``--repeats`` times through ``python_tool`` with ``isolation="bwrap"`` (the default) and with
``isolation="rlimits"`` (the fallback without bubblewrap), alternating, after one warm-up call
each. Reported per program and isolation: median, min and max wall seconds per call; per program:
``overhead_ms`` = median(bwrap) - median(rlimits) and ``ratio`` = median(bwrap) / median(rlimits).
The process runs as whoever starts it: as root both paths drop to a fresh uid; as another user
bwrap makes a user namespace.

Run: ``.venv/bin/python benchmarks/bench_sandbox.py [--repeats 20]`` (prints one JSON object).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

from rlprim.tools import python_tool

PROGRAMS = {
    "busy_100ms": ("import time\nt = time.perf_counter()\n"
                   "while time.perf_counter() - t < 0.1:\n    pass\nprint('done')\n", False),
    "sleep_100ms": ("import time\ntime.sleep(0.1)\nprint('done')\n", False),
    "empty": ("print('done')\n", False),
    "numpy": ("import numpy\nprint('done')\n", True),
}


def _call(code: str, isolation: str, site_packages: bool) -> float:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the rlimits fallback warns each time
        output = python_tool(code, isolation=isolation, site_packages=site_packages,
                             timeout=20.0)
    elapsed = time.perf_counter() - start
    if output != "done\n":
        raise RuntimeError(f"{isolation}: unexpected output {output!r}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    results = {}
    for name, (code, site_packages) in PROGRAMS.items():
        times: dict[str, list[float]] = {"bwrap": [], "rlimits": []}
        for isolation in times:
            _call(code, isolation, site_packages)  # warm the page cache
        for _ in range(args.repeats):
            for isolation in times:
                times[isolation].append(_call(code, isolation, site_packages))
        summary = {isolation: {"median_s": round(statistics.median(t), 4),
                               "min_s": round(min(t), 4), "max_s": round(max(t), 4)}
                   for isolation, t in times.items()}
        bwrap, rlimits = summary["bwrap"]["median_s"], summary["rlimits"]["median_s"]
        results[name] = {**summary, "overhead_ms": round(1000 * (bwrap - rlimits), 1),
                         "ratio": round(bwrap / rlimits, 3)}
    print(json.dumps({"benchmark": "python_tool isolation", "euid": os.geteuid(),
                      "repeats": args.repeats, "cpus": os.cpu_count(), "results": results},
                     indent=2))


if __name__ == "__main__":
    main()
