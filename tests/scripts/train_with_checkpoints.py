"""A small seeded training run used by the kill test (tests/test_training.py).

usage: train_with_checkpoints.py CKPT_DIR NUM_ITERATIONS OUT_WEIGHTS [--resume]
Trains GRPO on a tiny model, checkpointing every iteration; with --resume it starts from the
latest complete checkpoint in CKPT_DIR. Writes the final policy weights to OUT_WEIGHTS.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import rlprim as rp  # noqa: E402
from rlprim.testing import tiny_model, tiny_tokenizer  # noqa: E402

torch.set_num_threads(1)


def build_state():
    tokenizer = tiny_tokenizer()
    policy = tiny_model("qwen2", seed=0)
    config = rp.create_algorithm_config("grpo", kl_coef=0.05)
    return rp.create_training_state(policy, tokenizer, config, learning_rate=1e-3), config


def reward(rollout):
    return rollout.generation.text.count("7") / 8.0


def main():
    ckpt_dir, num_iterations, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    state, config = build_state()
    if "--resume" in sys.argv:
        latest = rp.latest_checkpoint(ckpt_dir)
        if latest is not None:
            state = rp.load_checkpoint(latest, state)
    loader = rp.create_prompt_loader(["1+1=", "2+3=", "7*8=", "9-4="], batch_size=2, seed=0)
    gen = rp.GenerationConfig(max_new_tokens=6, num_samples=4, seed=11)
    state = rp.train(
        state, loader, num_iterations, gen, config, reward,
        ref_model_update_fn=rp.create_ema_updater(0.5),
        checkpoint_fn=rp.create_checkpoint_fn(ckpt_dir, every=1, keep_last=2),
        progress=False,
    )
    save_file({k: v.detach().clone().contiguous() for k, v in state.policy.state_dict().items()}, out)


if __name__ == "__main__":
    main()
