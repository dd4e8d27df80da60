"""GRPO on the arithmetic task, data-parallel over several processes with ``torchrun``.

The training code is the one-process code: ``init_distributed`` joins the process group that
``torchrun`` set up (gloo on CPU, NCCL on GPUs) and ``wrap_training_state`` wraps the policy in
DistributedDataParallel; ``train`` then shards each iteration's global prompts over the ranks
(every prompt's group on one rank), normalises the loss over the global batch, sums the
gradients over ranks, reduces the statistics, and writes checkpoints from rank 0. Each rank ends
with the same weights; rank 0 logs.

Run it:
    torchrun --nproc_per_node 2 examples/distributed_grpo.py            # 40 iterations
    torchrun --nproc_per_node 2 examples/distributed_grpo.py --quick    # 3 iterations (tests)
    torchrun --nproc_per_node 2 examples/distributed_grpo.py --strategy fsdp   # FSDP2 shards
    python examples/distributed_grpo.py --quick                         # the same, one process
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import rlprim as rp  # noqa: E402
from rlprim.distributed import (  # noqa: E402
    all_gather_objects,
    barrier,
    distributed_context,
    full_state_dict,
    is_main_process,
    shard_prompts,
    wrap_training_state,
)
from rlprim.tasks.arithmetic import (  # noqa: E402
    arithmetic_reward,
    arithmetic_split,
    create_arithmetic_eval_fn,
)


def weights_digest(model: torch.nn.Module) -> str:
    """A short SHA-256 of every weight's bytes: equal digests mean bit-identical weights.

    ``full_state_dict`` gathers FSDP2 shards (a collective: every rank calls it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(full_state_dict(model).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        default=os.environ.get("RLPRIM_EXAMPLE_QUICK") == "1")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp",
                        help="DDP replicas, or FSDP2 shards of weights and optimizer state")
    args = parser.parse_args()
    iterations = 3 if args.quick else 40
    prompts_per_iteration = 8 if args.quick else 32  # the global batch, over all ranks
    torch.set_num_threads(1)  # one core per rank

    with distributed_context() as info:
        # Rank 0 picks the scratch directory; every rank must use the same one.
        workdir = all_gather_objects(
            tempfile.mkdtemp(prefix="rlprim-dist-grpo-") if is_main_process() else None
        )[0]

        torch.manual_seed(0)  # the same initial weights everywhere (DDP broadcasts rank 0's too)
        policy = rp.load_model(rp.ModelConfig("rlprim/arith-tiny", dtype="float32",
                                              device=str(info.device)))
        tokenizer = rp.load_tokenizer("rlprim/arith-tiny")
        train_problems, held_out = arithmetic_split(2000, 200, seed=0)
        config = rp.create_algorithm_config("grpo", {"kl_coef": 0.0, "max_grad_norm": 1.0})
        state = rp.create_training_state(policy, tokenizer, config, learning_rate=3e-4)
        # The one distributed line of the training setup:
        state = wrap_training_state(state, strategy=args.strategy)

        loader = rp.create_prompt_loader(train_problems, batch_size=prompts_per_iteration,
                                         seed=0)
        stats_path = os.path.join(workdir, "stats.jsonl")
        state = rp.train(
            state,
            loader,
            iterations,
            rp.GenerationConfig(max_new_tokens=6, num_samples=8, seed=0),
            config,
            reward_fn=arithmetic_reward,
            checkpoint_fn=rp.create_checkpoint_fn(os.path.join(workdir, "ckpt"), every=1,
                                                  keep_last=1),
            eval_fn=create_arithmetic_eval_fn(held_out[:50] if args.quick else held_out),
            eval_every=iterations,
            logger=rp.create_jsonl_logger(stats_path),  # called on rank 0 only
            progress=not args.quick,
        )

        share = len(shard_prompts(loader(0), info.rank, info.world_size))
        shares = all_gather_objects(share)
        digests = all_gather_objects(weights_digest(state.policy))
        if is_main_process():
            records = rp.read_stats_jsonl(stats_path)
            checkpoint = rp.latest_checkpoint(os.path.join(workdir, "ckpt"))
            print(
                f"[distributed_grpo] done: world_size={info.world_size} "
                f"strategy={args.strategy} "
                f"iterations={state.iteration} "
                f"prompts_per_rank={','.join(map(str, shares))} "
                f"weights_identical={len(set(digests)) == 1} "
                f"reward_first={records[0]['reward_mean']:.3f} "
                f"reward_last={records[-1]['reward_mean']:.3f} "
                f"heldout_accuracy={records[-1]['eval/heldout_accuracy']:.3f} "
                f"num_sequences={records[-1]['num_sequences']} "
                f"checkpoint={os.path.basename(checkpoint)}"
            )
        barrier()  # nobody deletes the scratch directory while another rank still reads it
        if is_main_process():
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
