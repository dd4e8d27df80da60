"""Training runs launched by tests/test_distributed.py, under torchrun or as one plain process.

usage: dist_train.py OUT_DIR JOB [JOB ...]

Jobs (each writes OUT_DIR/<job>_w<world>_r<rank>.safetensors with the final weights and
OUT_DIR/<job>_w<world>_r<rank>.json with the per-iteration stats):
  token_mean   GRPO, token-mean loss, KL in the loss with an adaptive β, batch-scaled
               advantages, micro-batches of 3 rows (uneven counts per rank), SGD.
  seq_mean     GRPO, seq-mean-token-mean loss, whitened advantages, 2 epochs of minibatches of
               3 rows (some ranks hold no row of some minibatch), micro-batches of 2, SGD.
  ppo          PPO: critic, GAE, KL in the reward, whitening, 2 epochs of minibatches, SGD.
  tis          GRPO, token-mean, TIS with cap 2 against "engine" log-probs lowered by
               0.2·(token id mod 5) (weights 1 to e^0.8, some cut at 2), 2 epochs, SGD.
  fsdp_ppo     ppo with the policy and the critic sharded by FSDP2.
  nan, fsdp_nan  GRPO (DDP / FSDP2) whose loss is NaN on rank 1 in the second iteration:
               every rank must skip that update (weights after it saved as <job>_it1).
  dapo         DAPO with dynamic sampling; prompts "0+b=" always score 0 (uninformative
               groups, re-sampled until max_sampling_rounds), only under torchrun.
  fsdp         token_mean with the policy sharded by FSDP2 (strategy="fsdp") and an EMA
               reference updated from it.
  ckpt_full    `train` for 3 iterations with AdamW, an EMA reference and a checkpoint after
               every iteration in OUT_DIR/ckpt.
  ckpt_resume  fresh objects, `load_checkpoint(OUT_DIR/ckpt/step_00000002)`, `train` to 3.
  fsdp_ckpt_full, fsdp_ckpt_resume   the same two with the policy sharded by FSDP2
               (OUT_DIR/fsdp_ckpt).
  fail         rank 1 raises in its reward function during the second iteration (after
               writing the time to OUT_DIR/raised_at).
  collectives  gather_rows and synchronize_gradients on small hand-made tensors
               (OUT_DIR/collectives_r<rank>.json).

The generator's completions depend only on the prompt (token ids drawn from a random.Random
seeded by the prompt's CRC32; their log-probs computed by the current policy), so one process
and two ranks train on the same global batch and their weights can be compared: a real sampler
would draw different tokens on each rank (seeds are offset per rank) and after a few updates
the runs would share no sample at all.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import rlprim as rp  # noqa: E402
from rlprim.distributed import (  # noqa: E402
    distributed_context,
    full_state_dict,
    gather_rows,
    get_distributed_info,
    synchronize_gradients,
    wrap_training_state,
)
from rlprim.logprobs import get_logprobs  # noqa: E402
from rlprim.testing import tiny_model, tiny_tokenizer  # noqa: E402

torch.set_num_threads(1)

PROMPTS = [f"{a}+{b}=" for a in range(3) for b in range(4)]  # 12 prompts
PROMPTS_PER_ITERATION = 5  # 3 on rank 0, 2 on rank 1
ITERATIONS = 3


def prompt_generator(model, tokenizer, prompts, config):
    """Completions that depend only on the prompt, with the policy's real log-probs."""
    vocab = model.config.vocab_size
    generations = []
    for prompt in prompts:
        prompt_ids = tokenizer.encode(prompt)
        rng = random.Random(zlib.crc32(prompt.encode()))
        for _ in range(config.num_samples):
            length = rng.randint(1, config.max_new_tokens)
            token_ids = [rng.randrange(8, vocab) for _ in range(length)]
            ids = torch.tensor([prompt_ids + token_ids])
            with torch.no_grad():
                logprobs = get_logprobs(
                    model, ids, torch.ones_like(ids), temperature=config.temperature,
                    completion_length=length,
                )[0]
            generations.append(
                rp.Generation(
                    text=tokenizer.decode(token_ids),
                    prompt_ids=prompt_ids,
                    token_ids=token_ids,
                    logprobs=logprobs.tolist(),
                    finish_reason="length" if length == config.max_new_tokens else "stop",
                )
            )
    return generations


def engine_generator(model, tokenizer, prompts, config):
    """``prompt_generator`` whose log-probs differ from the trainer's, token by token."""
    return [
        g._replace(
            logprobs=[x - 0.2 * (t % 5) for x, t in zip(g.logprobs, g.token_ids, strict=True)]
        )
        for g in prompt_generator(model, tokenizer, prompts, config)
    ]


def reward(rollout):
    ids = rollout.generation.token_ids
    return sum(1 for t in ids if t % 3 == 0) / len(ids)


POISON = {"on": False}  # the nan jobs: set around the iteration whose loss rank 1 poisons


def nan_on_rank_one(batch, new_logprobs, config, **extras):
    """The registry's loss, times NaN on rank 1 while ``POISON["on"]``."""
    loss, metrics = rp.ALGORITHMS[config.name].loss_fn(batch, new_logprobs, config, **extras)
    if POISON["on"] and get_distributed_info().rank == 1:
        loss = loss * float("nan")
    return loss, metrics


def rank_tracker(rollouts):
    """A tool tracker whose values differ by rank (the job reports their mean over ranks)."""
    return {"rank": get_distributed_info().rank, "rollouts": len(rollouts), "ids": [1, 2]}


def zero_for_zero_plus(rollout):
    """``reward``, except that prompts ``0+b=`` always score 0: their groups never vary."""
    return 0.0 if rollout.prompt.startswith("0+") else reward(rollout)


def _state(job: str):
    tokenizer = tiny_tokenizer()
    policy = tiny_model("qwen2", seed=0)
    if job in ("token_mean", "fsdp", "nan", "fsdp_nan"):
        config = rp.create_algorithm_config(
            "grpo", loss_agg_mode="token-mean", kl_coef=0.05, scale_rewards="batch",
            micro_batch_size=3,
        )
    elif job == "seq_mean":
        config = rp.create_algorithm_config(
            "grpo", loss_agg_mode="seq-mean-token-mean", kl_coef=0.0, whiten_advantages=True,
            minibatch_size=3, num_epochs=2, micro_batch_size=2,
        )
    elif job in ("ppo", "fsdp_ppo"):
        config = rp.create_algorithm_config(
            "ppo", num_epochs=2, minibatch_size=6, micro_batch_size=4
        )
    elif job == "dapo":
        config = rp.create_algorithm_config("dapo", max_sampling_rounds=3, micro_batch_size=3)
    elif job == "tis":
        config = rp.create_algorithm_config(
            "grpo", loss_agg_mode="token-mean", kl_coef=0.0, tis_cap=2.0, minibatch_size=10,
            num_epochs=2, micro_batch_size=3,
        )
    else:
        config = rp.create_algorithm_config("grpo", kl_coef=0.05, micro_batch_size=3)
    value_model = rp.create_value_model(policy) if job.endswith("ppo") else None
    if job in ("token_mean", "seq_mean", "ppo", "tis", "fsdp", "dapo", "fsdp_ppo", "nan",
               "fsdp_nan"):
        params = list(policy.parameters())
        if value_model is not None:
            params += list(value_model.parameters())
        # SGD: the update is linear in the gradient, so any error in the gradient's
        # normalisation shows in the weights (Adam's first step only sees its sign).
        optimizer = torch.optim.SGD(params, lr=0.1 if job.endswith("ppo") else 0.5)
        state = rp.create_training_state(
            policy, tokenizer, config, optimizer=optimizer, value_model=value_model
        )
    else:
        state = rp.create_training_state(policy, tokenizer, config, learning_rate=1e-3)
    strategy = "fsdp" if job.startswith("fsdp") else "ddp"
    return wrap_training_state(state, strategy=strategy), config


def _save(out_dir: str, job: str, state, stats: list[dict]) -> None:
    info = get_distributed_info()
    stem = os.path.join(out_dir, f"{job}_w{info.world_size}_r{info.rank}")
    tensors = {f"policy.{k}": v.detach().clone() for k, v in full_state_dict(state.policy).items()}
    if state.value_model is not None:
        tensors.update(
            {f"value.{k}": v.detach().clone() for k, v in full_state_dict(state.value_model).items()}
        )
    save_file(tensors, stem + ".safetensors")
    with open(stem + ".json", "w") as file:
        json.dump({"stats": stats, "kl_coef": state.kl_coef, "step": state.step}, file)


def _clean(stats) -> dict:
    out = stats._asdict()
    for key in ("time_generate", "time_reference", "time_train"):
        out.pop(key)
    out["extra"] = {k: v for k, v in (stats.extra or {}).items() if k != "wall_time"}
    return out


def run_iterations(out_dir: str, job: str) -> None:
    state, config = _state(job)
    loader = rp.create_prompt_loader(PROMPTS, batch_size=PROMPTS_PER_ITERATION, seed=0)
    gen = rp.GenerationConfig(max_new_tokens=6, num_samples=4, seed=3)
    controller = None
    if job in ("token_mean", "fsdp"):
        controller = rp.create_adaptive_kl_controller(0.05, target=0.01, horizon=10)
    ema = rp.create_ema_updater(0.5) if job == "fsdp" else None
    stats = []
    for iteration in range(ITERATIONS):
        scored = []  # this rank's rollouts scored in this iteration (dynamic sampling re-scores)

        def counted_reward(rollout, scored=scored):
            scored.append(rollout.prompt)
            return zero_for_zero_plus(rollout) if job == "dapo" else reward(rollout)

        POISON["on"] = job.endswith("nan") and iteration == 1
        state, s = rp.training_iteration(
            state, loader(iteration), gen._replace(seed=gen.seed + iteration), config,
            counted_reward, engine_generator if job == "tis" else prompt_generator,
            kl_controller=controller, ref_model_update_fn=ema,
            loss_fn=nan_on_rank_one if job.endswith("nan") else None,
            tool_tracker=rank_tracker if job == "token_mean" else None,
        )
        stats.append({**_clean(s), "local_rollouts_scored": len(scored)})
        if job.endswith("nan") and iteration in (0, 1):
            _save(out_dir, f"{job}_it{iteration}", state, stats)
    _save(out_dir, job, state, stats)


def run_checkpointed(out_dir: str, job: str) -> None:
    state, config = _state(job)
    prefix = "fsdp_" if job.startswith("fsdp") else ""
    full = job.endswith("ckpt_full")
    ckpt = os.path.join(out_dir, prefix + ("ckpt" if full else "ckpt_resumed"))
    if not full:
        state = rp.load_checkpoint(
            os.path.join(out_dir, prefix + "ckpt", "step_00000002"), state
        )
    stats: list[dict] = []
    state = rp.train(
        state,
        rp.create_prompt_loader(PROMPTS, batch_size=PROMPTS_PER_ITERATION, seed=0),
        ITERATIONS,
        rp.GenerationConfig(max_new_tokens=6, num_samples=4, seed=5),
        config,
        reward,
        ref_model_update_fn=rp.create_ema_updater(0.5),
        checkpoint_fn=rp.create_checkpoint_fn(ckpt, every=1),
        logger=lambda s: stats.append(_clean(s)),
        generator=prompt_generator,
        progress=False,
    )
    _save(out_dir, job, state, stats)


def run_failing(out_dir: str) -> None:
    state, config = _state("fail")
    calls = []
    rank = get_distributed_info().rank

    def failing_reward(rollout):
        calls.append(rollout.group_id)
        if rank == 1 and len(calls) > 8:  # rank 1 scores 8 rollouts per iteration
            with open(os.path.join(out_dir, "raised_at"), "w") as file:
                file.write(repr(time.time()))
            raise RuntimeError("rank 1 failed on purpose in its reward function")
        return reward(rollout)

    rp.train(
        state,
        rp.create_prompt_loader(PROMPTS, batch_size=PROMPTS_PER_ITERATION, seed=0),
        ITERATIONS,
        rp.GenerationConfig(max_new_tokens=6, num_samples=4, seed=5),
        config,
        failing_reward,
        generator=prompt_generator,
        progress=False,
    )


def run_collectives(out_dir: str) -> None:
    """gather_rows with uneven shapes and synchronize_gradients with missing gradients."""
    rank = get_distributed_info().rank
    rows = torch.arange((rank + 1) * (rank + 2), dtype=torch.float32).reshape(rank + 1, rank + 2)
    gathered, counts = gather_rows(rows + 100 * rank, pad_value=-1)
    vector, _ = gather_rows(torch.full((2 - rank,), float(rank)))
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.full((3,), rank + 1.0)  # 1 and 2: sum 3
    if rank == 1:
        b.grad = torch.tensor([1.0, 2.0, 3.0])  # None on rank 0: counted as zeros
    nbytes = synchronize_gradients([a, b, c])  # c has no gradient anywhere: stays None
    result = {
        "gathered": gathered.tolist(), "counts": counts, "vector": vector.tolist(),
        "a": a.grad.tolist(), "b": b.grad.tolist(), "c_is_none": c.grad is None,
        "bytes": nbytes,
    }
    with open(os.path.join(out_dir, f"collectives_r{rank}.json"), "w") as file:
        json.dump(result, file)


def main() -> None:
    out_dir, jobs = sys.argv[1], sys.argv[2:]
    # The context destroys the process group on the way out: leaving it to interpreter
    # shutdown can abort the process ("terminate called without an active exception").
    with distributed_context(timeout=120):
        for job in jobs:
            if job in ("token_mean", "seq_mean", "ppo", "tis", "fsdp", "dapo", "fsdp_ppo",
                       "nan", "fsdp_nan"):
                run_iterations(out_dir, job)
            elif job in ("ckpt_full", "ckpt_resume", "fsdp_ckpt_full", "fsdp_ckpt_resume"):
                run_checkpointed(out_dir, job)
            elif job == "fail":
                run_failing(out_dir)
            elif job == "collectives":
                run_collectives(out_dir)
            else:
                raise SystemExit(f"unknown job {job!r}")


if __name__ == "__main__":
    main()
