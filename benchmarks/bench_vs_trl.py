"""Seconds per GRPO step: one rlprim ``training_iteration`` against one step of TRL's ``GRPOTrainer``.

Both libraries do the same work in one process, taking turns:

- the same model directory: a tiny Qwen2 from ``rlprim.testing`` (2 layers, hidden 128, vocab
  384, float32) and its tokenizer, saved to a temporary directory; each library loads it from
  there (rlprim with ``load_model`` / ``load_tokenizer``, TRL from the path);
- the same prompts (``--prompts`` texts, each sampled ``G`` = samples-per-prompt times), the same
  reward (sum of the completion's token ids mod 5), temperature 1, no top-k / top-p;
- exactly ``N`` new tokens per completion on both sides: the model directory's generation config
  suppresses the EOS token (``suppress_tokens``), which both ``generate`` calls inherit, so no
  completion stops early. The tokens each side actually generated are counted inside the reward
  functions and reported per step next to the expected ``prompts * G * N``;
- GRPO with β = 0.04 and the k3 KL estimator, clip ε = 0.2, group-std scaled advantages,
  token-mean loss aggregation (TRL ``loss_type="bnpo"``: sum over the batch's tokens / their
  count, which for one process and one micro-batch is also what TRL's default ``"dapo"`` gives),
  one optimisation pass per batch, gradient-norm clip 1.0, AdamW at lr 1e-5 with a constant
  schedule, float32, no gradient checkpointing, ``--threads`` torch threads.

A TRL step is timed the way its trainer runs it (``trainer.train()``: fetch the prompts, generate,
score, reference forward, loss, backward, clip, optimizer and scheduler step), from the end of one
``on_step_end`` callback to the next; the rlprim iteration runs inside that callback, so the two
alternate: TRL, rlprim, TRL, rlprim… The first ``--warmup`` steps of each are not counted.

Prints one JSON object: per grid point the median seconds per step of each library, the ratio
rlprim / TRL (target ≤ 0.8, issue 18), the tokens generated per step, rlprim's own phase times, and
the load average (``os.getloadavg``) before and after. Grid: ``--tokens`` × ``--samples``.

Needs TRL, so it runs in the venv that ``make bench-trl`` builds::

    make bench-trl BENCH_TRL_ARGS="--tokens 16 --samples 4 --rounds 3"
    .venv-trl/bin/python benchmarks/bench_vs_trl.py [--tokens 16 64 256] [--samples 4 8 16]
        [--prompts 2] [--rounds 8] [--warmup 1] [--threads 2] [--output FILE]

Where TRL is not installed (e.g. ``make bench`` in ``.venv``) it prints
``{"benchmark": "bench_vs_trl", "skipped": ...}`` and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

# Offline, and no experiment tracker: set before transformers / TRL are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

PROMPTS = ["12+34=", "7*8=", "Compute 5 + 9. ", "3-1=", "99+1=", "6*7=", "Add 2 and 40. ", "8/2="]
VOCAB_SIZE = 384
KL_COEF = 0.04
LEARNING_RATE = 1e-5
TARGET_RATIO = 0.8


def reward_of_ids(token_ids: Sequence[int]) -> float:
    """The reward both libraries use: the sum of the completion's token ids mod 5."""
    return float(sum(int(t) for t in token_ids) % 5)


def build_model_dir(root: str) -> str:
    """Save the tiny Qwen2 and its tokenizer to ``root``; EOS is suppressed in its generation config."""
    from rlprim.testing import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer(VOCAB_SIZE)
    model = tiny_model("qwen2", seed=0, vocab_size=VOCAB_SIZE, hidden_size=128, num_layers=2)
    # Both libraries call transformers' generate, which fills the unset fields of the generation
    # config it is given from the model's own: every completion then runs to max_new_tokens.
    model.generation_config.suppress_tokens = [tokenizer.eos_token_id]
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def rlprim_side(model_dir: str, lengths: list[int]) -> dict[str, Any]:
    """rlprim's training state, algorithm config and reward function for ``model_dir``."""
    import rlprim as rp

    def reward(rollout: Any) -> float:
        lengths.append(len(rollout.generation.token_ids))
        return reward_of_ids(rollout.generation.token_ids)

    policy = rp.load_model(rp.ModelConfig(model_dir, dtype="float32"))
    tokenizer = rp.load_tokenizer(model_dir)
    config = rp.create_algorithm_config(
        "grpo", kl_coef=KL_COEF, kl_estimator="k3", loss_agg_mode="token-mean",
        clip_eps_low=0.2, clip_eps_high=0.2, scale_rewards="group", num_epochs=1,
        max_grad_norm=1.0,
    )
    state = rp.create_training_state(policy, tokenizer, config, learning_rate=LEARNING_RATE)
    return {"state": state, "config": config, "reward": reward}


def trl_trainer(
    model_dir: str, output_dir: str, prompts: Sequence[str], tokens: int, samples: int, steps: int,
    lengths: list[int], callback: Any,
) -> Any:
    """A TRL ``GRPOTrainer`` on ``model_dir`` that runs ``steps`` steps of ``len(prompts) * samples``."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def token_sum_mod_5(prompts: list, completions: list, completion_ids: list, **kwargs: Any):
        lengths.extend(len(ids) for ids in completion_ids)
        return [reward_of_ids(ids) for ids in completion_ids]

    args = GRPOConfig(
        output_dir=output_dir,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": "float32"},
        seed=0,
        max_steps=steps,
        per_device_train_batch_size=len(prompts) * samples,
        gradient_accumulation_steps=1,
        num_generations=samples,
        max_completion_length=tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=KL_COEF,
        epsilon=0.2,
        num_iterations=1,
        scale_rewards="group",
        loss_type="bnpo",
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        # torch.optim.AdamW's default, the optimizer rlprim builds (TRL keeps its own AdamW class).
        weight_decay=0.01,
        max_grad_norm=1.0,
        shuffle_dataset=False,
        log_completions=False,
    )
    # The same prompts in the same order at every step (no shuffling, one epoch for all steps).
    dataset = Dataset.from_dict({"prompt": list(prompts) * steps})
    return GRPOTrainer(
        model=model_dir, reward_funcs=token_sum_mod_5, args=args, train_dataset=dataset,
        callbacks=[callback],
    )


def run_point(
    model_dir: str, prompts: Sequence[str], tokens: int, samples: int, rounds: int, warmup: int
) -> dict[str, Any]:
    """Alternate TRL steps and rlprim iterations at one grid point; medians and the ratio."""
    import torch
    from transformers import TrainerCallback

    import rlprim as rp

    trl_lengths: list[int] = []
    rl_lengths: list[int] = []
    rl = rlprim_side(model_dir, rl_lengths)
    gen = rp.GenerationConfig(max_new_tokens=tokens, num_samples=samples, temperature=1.0)
    record: dict[str, list] = {
        "trl_s": [], "rlprim_s": [], "trl_tokens": [], "rlprim_tokens": [], "load_1min": [],
        "rlprim_phases": [], "threads": [],
    }
    marks = {"steps": 0, "resume": time.perf_counter()}

    def between_trl_steps() -> None:
        trl_seconds = time.perf_counter() - marks["resume"]
        marks["steps"] += 1
        counted = marks["steps"] > warmup
        if counted:
            record["trl_s"].append(trl_seconds)
            record["trl_tokens"].append(sum(trl_lengths))
        trl_lengths.clear()
        start = time.perf_counter()
        rl["state"], stats = rp.training_iteration(
            rl["state"], list(prompts), gen._replace(seed=marks["steps"]), rl["config"],
            rl["reward"],
        )
        rl_seconds = time.perf_counter() - start
        if counted:
            record["rlprim_s"].append(rl_seconds)
            record["rlprim_tokens"].append(sum(rl_lengths))
            record["load_1min"].append(os.getloadavg()[0])
            record["threads"].append(torch.get_num_threads())
            record["rlprim_phases"].append(
                {k: getattr(stats, k) for k in ("time_generate", "time_reference", "time_train")
                 if isinstance(getattr(stats, k, None), float)}
            )
        rl_lengths.clear()
        marks["resume"] = time.perf_counter()

    class Alternate(TrainerCallback):  # TRL's way to run code between its steps
        def on_step_end(self, args, state, control, **kwargs):
            between_trl_steps()
            return control

    load_before = os.getloadavg()
    # The trainer prints its end-of-training metrics; stdout is kept for this script's JSON.
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-out-") as output_dir, \
            contextlib.redirect_stdout(sys.stderr):
        trainer = trl_trainer(
            model_dir, output_dir, prompts, tokens, samples, warmup + rounds, trl_lengths,
            Alternate(),
        )
        marks["resume"] = time.perf_counter()
        trainer.train()
    load_after = os.getloadavg()
    checkpointing = getattr(trainer.model, "is_activation_checkpointing", False)
    checks = {
        "trl_activation_checkpointing": bool(checkpointing),
        "dtypes": {"rlprim": str(next(rl["state"].policy.parameters()).dtype),
                   "trl": str(next(trainer.model.parameters()).dtype)},
        "optimizers": {"rlprim": _describe_optimizer(rl["state"].optimizer),
                       "trl": _describe_optimizer(trainer.optimizer)},
    }
    if len(record["trl_s"]) != rounds:
        raise RuntimeError(f"TRL ran {len(record['trl_s'])} counted steps, expected {rounds}")

    expected_tokens = len(prompts) * samples * tokens
    trl_median = statistics.median(record["trl_s"])
    rl_median = statistics.median(record["rlprim_s"])
    phases = record["rlprim_phases"]
    return {
        "new_tokens": tokens,
        "samples_per_prompt": samples,
        "prompts": len(prompts),
        "completions_per_step": len(prompts) * samples,
        "rounds": rounds,
        "warmup": warmup,
        "rlprim_s_per_step": round(rl_median, 4),
        "trl_s_per_step": round(trl_median, 4),
        "ratio_rlprim_over_trl": round(rl_median / trl_median, 3),
        "paired_ratios": [round(a / b, 3) for a, b in zip(record["rlprim_s"], record["trl_s"], strict=True)],
        "rlprim_s_all": [round(x, 4) for x in record["rlprim_s"]],
        "trl_s_all": [round(x, 4) for x in record["trl_s"]],
        "tokens_per_step": {
            "expected": expected_tokens,
            "rlprim": record["rlprim_tokens"],
            "trl": record["trl_tokens"],
            "all_equal": all(
                n == expected_tokens for n in record["rlprim_tokens"] + record["trl_tokens"]
            ),
        },
        "rlprim_phase_median_s": {
            k: round(statistics.median(p[k] for p in phases), 4) for k in (phases[0] if phases else {})
        },
        "torch_threads_seen": sorted(set(record["threads"])),
        **checks,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "load_1min_per_round": [round(x, 2) for x in record["load_1min"]],
    }


def _describe_optimizer(optimizer: Any) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps TRL's
    group = inner.param_groups[0]
    knobs = ", ".join(f"{k}={group.get(k)}" for k in ("lr", "weight_decay", "foreach", "fused"))
    return f"{type(inner).__name__}({knobs}), {len(inner.param_groups)} param group(s)"


def _versions() -> dict[str, str]:
    import torch
    import transformers
    import trl

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "rlprim_commit": commit,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256],
                        help="new tokens per completion (grid)")
    parser.add_argument("--samples", type=int, nargs="+", default=[4, 8, 16],
                        help="samples per prompt, the group size (grid)")
    parser.add_argument("--prompts", type=int, default=2, help=f"prompts per step (≤ {len(PROMPTS)})")
    parser.add_argument("--rounds", type=int, default=8, help="counted steps of each library")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted first steps of each")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--output", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    for name in ("prompts", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.prompts > len(PROMPTS):
        parser.error(f"--warmup must be >= 0 and --prompts <= {len(PROMPTS)}")
    if min(args.tokens) < 1 or min(args.samples) < 2:
        parser.error("--tokens must be >= 1 and --samples >= 2 (GRPO needs a group)")

    if importlib.util.find_spec("trl") is None:
        print(json.dumps({"benchmark": "bench_vs_trl",
                         "skipped": "TRL is not installed here; run `make bench-trl`"}))
        return 0

    import torch
    import transformers

    # transformers' deprecation notices about TrainingArguments field names TRL still uses.
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    prompts = PROMPTS[: args.prompts]
    result: dict[str, Any] = {
        "benchmark": "bench_vs_trl: seconds per GRPO step, rlprim training_iteration vs TRL "
                     "GRPOTrainer, same model dir / prompts / reward / tokens",
        "versions": _versions(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "setting": {
            "model": f"tiny qwen2 (rlprim.testing), 2 layers, hidden 128, vocab {VOCAB_SIZE}, fp32",
            "beta": KL_COEF, "kl_estimator": "k3", "clip_eps": 0.2,
            "loss_aggregation": "token-mean (TRL loss_type='bnpo')",
            "learning_rate": LEARNING_RATE, "optimizer": "AdamW, constant lr, grad clip 1.0",
            "eos": "suppressed in the model dir's generation_config: every completion has N tokens",
            "prompts": prompts,
        },
        "target_ratio": TARGET_RATIO,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "points": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-model-") as model_dir:
        build_model_dir(model_dir)
        for tokens in args.tokens:
            for samples in args.samples:
                point = run_point(model_dir, prompts, tokens, samples, args.rounds, args.warmup)
                result["points"].append(point)
                print(f"# {tokens} tokens × {samples} samples: ratio "
                      f"{point['ratio_rlprim_over_trl']}", file=sys.stderr, flush=True)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=2)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
