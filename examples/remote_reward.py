"""GRPO on the arithmetic task with the reward computed by a separate server process.

The reward function runs behind HTTP (FastAPI + uvicorn) in its own process — as a reward
model, a sandbox or a judge would on another machine — and the trainer gets back an ordinary
``reward_fn`` from ``remote_reward_fn``: nothing else in the training code changes. The script
then checks that the remote rewards equal the local function's on the same rollouts, measures
the round trip of one request, and shows the error a stopped server gives.

Run it (needs ``pip install 'rlprim[remote]'``):
    python examples/remote_reward.py            # 30 iterations
    python examples/remote_reward.py --quick    # 3 iterations (the tests)

The same server from a shell, for another machine:
    python -m rlprim.remote reward rlprim.tasks.arithmetic:arithmetic_reward --port 8000
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import rlprim as rp  # noqa: E402
from rlprim.remote import remote_reward_fn, start_reward_server, wait_for_server  # noqa: E402
from rlprim.tasks.arithmetic import arithmetic_reward, arithmetic_split  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        default=os.environ.get("RLPRIM_EXAMPLE_QUICK") == "1")
    args = parser.parse_args()
    iterations = 3 if args.quick else 30

    # The server: a spawned process serving a module-level (importable) reward function.
    server = start_reward_server(arithmetic_reward, in_subprocess=True)
    try:
        health = wait_for_server(server.url, timeout=30.0)
        reward_fn = remote_reward_fn(server.url, timeout=30.0, retries=2, batch_size=16)

        torch.manual_seed(0)
        policy = rp.load_model(rp.ModelConfig("rlprim/arith-tiny", dtype="float32",
                                              device="cpu"))
        tokenizer = rp.load_tokenizer("rlprim/arith-tiny")
        train_problems, _ = arithmetic_split(2000, 200, seed=0)
        config = rp.create_algorithm_config("grpo", {"kl_coef": 0.0, "max_grad_norm": 1.0})
        state = rp.create_training_state(policy, tokenizer, config, learning_rate=3e-4)
        loader = rp.create_prompt_loader(train_problems, batch_size=8, shuffle=True, seed=0)
        gen_config = rp.GenerationConfig(max_new_tokens=6, temperature=1.0, num_samples=4,
                                         seed=0)
        log: list[rp.TrainingStats] = []
        state = rp.train(state, loader, iterations, gen_config, config, reward_fn,
                         logger=log.append, progress=not args.quick)

        # The remote function scores exactly like the local one.
        rollouts = rp.create_batch_rollouts(state.policy, tokenizer, loader(iterations),
                                            gen_config)
        remote = reward_fn.batched(rollouts)
        local = [arithmetic_reward(r) for r in rollouts]

        # One request of 8 rollouts on this machine, median of 20.
        seconds = []
        for _ in range(20):
            start = time.perf_counter()
            reward_fn.batched(rollouts[:8])
            seconds.append(time.perf_counter() - start)
        latency_ms = 1000 * statistics.median(seconds)
    finally:
        server.stop()

    # A stopped server: a clear error after the retries, naming the URL and the rollouts.
    try:
        remote_reward_fn(server.url, timeout=1.0, retries=1, backoff=0.05).batched(rollouts)
        after_stop = "none"
    except ConnectionError as error:
        print(f"after stop: {error}")
        after_stop = type(error).__name__

    print(f"[remote_reward] done: iterations={state.iteration} server={health['kind']} "
          f"reward_first={log[0].reward_mean:.3f} reward_last={log[-1].reward_mean:.3f} "
          f"remote_equals_local={remote == local} rollouts={len(rollouts)} "
          f"latency_ms={latency_ms:.2f} after_stop={after_stop}")


if __name__ == "__main__":
    main()
