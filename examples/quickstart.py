"""The demo as a readable script: GRPO teaches the bundled model arithmetic on a CPU.

``make demo`` runs ``python -m rlprim.demo``; this is the same run spelled out with the public
API. The bundled model ``rlprim/arith-tiny`` (in ``rlprim/assets``, no download) was trained
with supervision only part of the way on two-digit addition; reinforcement learning with an
exact-answer reward takes it the rest of the way, measured on held-out problems.

Run it:
    python examples/quickstart.py            # 40 iterations
    python examples/quickstart.py --quick    # 3 iterations (the tests)
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import rlprim as rp  # noqa: E402
from rlprim.tasks.arithmetic import arithmetic_split, evaluate_arithmetic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        default=os.environ.get("RLPRIM_EXAMPLE_QUICK") == "1")
    args = parser.parse_args()

    _, held_out = arithmetic_split(2000, 200, seed=0)  # what quick_start_training holds out
    policy = rp.load_model("rlprim/arith-tiny")
    tokenizer = rp.load_tokenizer("rlprim/arith-tiny")
    before = evaluate_arithmetic(policy, tokenizer, held_out)

    output_dir = tempfile.mkdtemp(prefix="rlprim-quickstart-") if args.quick else "runs/quickstart"
    state = rp.quick_start_training(          # every default is the bundled arithmetic task
        num_iterations=3 if args.quick else 40,
        algorithm="grpo",
        kl_coef=0.0,                          # an AlgorithmConfig override: no reference model
        output_dir=output_dir,
        progress=not args.quick,
    )
    after = evaluate_arithmetic(state.policy, state.tokenizer, held_out)
    print(f"[quickstart] done: accuracy_before={before:.3f} accuracy_after={after:.3f} "
          f"iterations={state.iteration} output={output_dir}")


if __name__ == "__main__":
    main()
