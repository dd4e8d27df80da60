"""DAPO on the countdown task: clip-higher, token-level loss, overlong shaping, dynamic sampling.

``create_algorithm_config("dapo")`` carries DAPO's published choices (ε_low 0.2, ε_high 0.28,
token-mean aggregation, no KL, ``filter_groups`` with re-sampling, soft overlong punishment).
Groups whose samples all got the same reward carry no gradient; DAPO drops them and samples
again (``sample_until_informative``), which the logged ``dynamic_sampling/*`` figures show.

The model here is an untrained tiny Qwen2 from ``rlprim.testing`` (countdown prompts are
English text, which the bundled character-level arithmetic model does not read), so it almost
never solves a problem; the partial ``format_reward`` for a well-formed expression gives it a
signal. Point ``--model`` at a real instruction-tuned model directory to train it for real.

Run it:
    python examples/countdown_dapo.py                    # 20 iterations, tiny model
    python examples/countdown_dapo.py --quick            # 2 iterations (the tests)
    python examples/countdown_dapo.py --model PATH       # a local HF model
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import rlprim as rp  # noqa: E402
from rlprim.tasks.countdown import create_countdown_reward, make_countdown_problems  # noqa: E402
from rlprim.testing import tiny_model, tiny_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        default=os.environ.get("RLPRIM_EXAMPLE_QUICK") == "1")
    parser.add_argument("--model", default=None, help="a local Hugging Face model directory")
    args = parser.parse_args()
    iterations = 2 if args.quick else 20

    if args.model:
        policy, tokenizer = rp.load_model(args.model), rp.load_tokenizer(args.model)
    else:
        policy, tokenizer = tiny_model("qwen2", seed=0), tiny_tokenizer()
    problems = make_countdown_problems(64, num_numbers=3, max_number=20, max_target=100, seed=0)
    config = rp.create_algorithm_config("dapo", max_sampling_rounds=2, overlong_buffer_len=4)
    state = rp.create_training_state(policy, tokenizer, config, learning_rate=1e-4)
    reward_fn = create_countdown_reward(correct_reward=1.0, format_reward=0.1)

    log = []
    state = rp.train(
        state,
        rp.create_prompt_loader(problems, batch_size=4, seed=0),
        iterations,
        rp.GenerationConfig(max_new_tokens=16, num_samples=4, seed=0),
        config,
        reward_fn,
        logger=log.append,
        progress=not args.quick,
    )
    rounds = sum((s.extra or {}).get("dynamic_sampling/rounds", 0.0) for s in log)
    # An iteration with no informative group at all makes no update (its stats say so).
    skipped = sum(1 for s in log if (s.extra or {}).get("no_informative_groups"))
    print(f"[countdown_dapo] done: iterations={state.iteration} updates={state.step} "
          f"sampling_rounds={rounds:.0f} iterations_without_informative_groups={skipped}")


if __name__ == "__main__":
    main()
