"""Constitutional AI with rlprim's functions: a judge, critique and revision, AI preferences.

The two stages of Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback", on
local models:

1. The constitution: principles as data, written to a YAML file and loaded back.
2. The AI judge: each sampled response scored against each principle, read from the judge's
   probability of answering " Yes" (no text is parsed).
3. SL-CAI: the policy critiques and revises its own responses; the (original, revised) pairs
   become groups of two rollouts and DPO trains the policy to prefer the revisions.
4. RL-CAI: the judge compares two samples of each prompt under every principle (both orders,
   so its position bias cancels); each sample's mean win probability is its reward, and GRPO
   trains on it (the ``constitutional`` task). At the end the judge compares the trained
   policy's greedy answers with the initial policy's: the RLAIF win rate.

The models are tiny and randomly initialised (``rlprim.testing``; nothing is downloaded), so
the judge's verdicts are arbitrary — fixed and deterministic, but weak: its preferences between
two samples stay within about 0.01 of 1/2, and 20 GRPO iterations do not move the win rate
measurably (0.502 in our full run). The example shows the mechanics end to end; load a real
instruction-tuned judge with ``rp.load_model`` for feedback worth learning from.

Run it:
    python examples/constitutional_ai.py            # 20 RL iterations, 10 DPO steps (minutes)
    python examples/constitutional_ai.py --quick    # 2 RL iterations, 2 DPO steps (the tests)
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny local models only: never reach a hub

import torch  # noqa: E402
import yaml  # noqa: E402

import rlprim as rp  # noqa: E402
from rlprim.tasks.constitutional import (  # noqa: E402
    HARMLESSNESS_PRINCIPLES,
    create_constitutional_task,
)
from rlprim.testing import tiny_model, tiny_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        default=os.environ.get("RLPRIM_EXAMPLE_QUICK") == "1")
    args = parser.parse_args()
    rl_iterations, dpo_steps = (2, 2) if args.quick else (20, 10)

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    policy = tiny_model("qwen2", seed=0)
    judge = tiny_model("qwen2", seed=1).requires_grad_(False)  # the feedback model, frozen
    initial_policy = copy.deepcopy(policy)

    # 1. The constitution as data: a YAML file, loaded back.
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "constitution.yaml")
        with open(path, "w", encoding="utf-8") as file:
            yaml.safe_dump({"principles": [p._asdict() for p in HARMLESSNESS_PRINCIPLES]}, file)
        principles = rp.load_constitution(path)
    assert principles == HARMLESSNESS_PRINCIPLES
    task = create_constitutional_task(judge, tokenizer, principles, feedback="preference")
    prompts = [item["prompt"] for item in task.prompts]
    humans = [item["human"] for item in task.prompts]

    # 2. The AI judge on one greedy response per prompt: [P prompts, 4 principles].
    greedy = rp.GenerationConfig(max_new_tokens=12, do_sample=False)
    responses = [g.text for g in rp.batch_generate(policy, tokenizer, prompts, greedy)]
    scores = rp.compute_judge_scores(judge, tokenizer, humans, responses, principles)
    print("judge P(Yes) per principle:", [p.name for p in principles])
    for human, row in zip(humans, scores.tolist(), strict=True):
        print(f"  {human[:48]:<48} " + " ".join(f"{s:.3f}" for s in row))

    # 3. SL-CAI: critique and revise, then DPO toward the revisions.
    pairs = rp.critique_and_revise(
        policy, tokenizer, prompts, responses, principles,
        rp.GenerationConfig(max_new_tokens=12, do_sample=False),
    )
    print(f"SL-CAI: {len(pairs)} pairs; first critique under {pairs[0].principles[0]!r}: "
          f"{pairs[0].critiques[0]!r}")
    dpo = rp.create_algorithm_config("dpo", beta=0.1)
    state = rp.create_training_state(policy, tokenizer, dpo, learning_rate=1e-3)
    state, margin_before, margin_after = dpo_on_revisions(state, tokenizer, pairs, dpo, dpo_steps)
    print(f"DPO on revisions: margin log π(revised) - log π(original) "
          f"{margin_before:.3f} -> {margin_after:.3f}")

    # 4. RL-CAI: GRPO on AI preferences between the samples of each prompt.
    grpo = rp.create_algorithm_config("grpo", kl_coef=0.0)
    state = rp.create_training_state(state.policy, tokenizer, grpo, learning_rate=3e-3)
    log = []
    state = rp.train(
        state,
        rp.create_prompt_loader(list(task.prompts), batch_size=4, seed=0),
        rl_iterations,
        rp.GenerationConfig(max_new_tokens=12, num_samples=4, seed=0),
        grpo,
        task.reward_fn,
        logger=log.append,
        progress=not args.quick,
    )
    # Within a group the win probabilities sum to G/2, so the mean reward is always 1/2; the
    # spread is what GRPO learns from.
    assert all(abs(stats.reward_mean - 0.5) < 1e-5 for stats in log)

    # The RLAIF evaluation: the judge compares trained and initial greedy answers.
    trained = [g.text for g in rp.batch_generate(state.policy, tokenizer, prompts, greedy)]
    initial = [g.text for g in rp.batch_generate(initial_policy, tokenizer, prompts, greedy)]
    win_rate = rp.compute_ai_preferences(
        judge, tokenizer, humans, trained, initial, principles
    ).mean().item()
    print(f"RL-CAI: {len(log)} iterations; judge prefers the trained policy's answers with "
          f"probability {win_rate:.3f}")
    print(f"[constitutional_ai] done: principles={len(principles)} prompts={len(prompts)} "
          f"judge_mean={scores.mean().item():.4f} sl_pairs={len(pairs)} "
          f"dpo_margin_before={margin_before:.4f} dpo_margin_after={margin_after:.4f} "
          f"rl_iterations={len(log)} reward_std_last={log[-1].reward_std:.4f} "
          f"win_rate={win_rate:.4f}")


def dpo_on_revisions(state, tokenizer, pairs, config, steps):
    """SL-CAI pairs -> groups of two rollouts -> DPO steps. Returns the state and the margins."""
    rollouts = rp.create_preference_rollouts(
        tokenizer,
        [p.prompt for p in pairs],
        chosen=[p.revised for p in pairs],
        rejected=[p.original for p in pairs],
    )
    batch = rp.rollouts_to_batch(rollouts, tokenizer)
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    tc = batch.completion_ids.shape[1]
    batch = batch._replace(
        ref_logprobs=rp.get_reference_logprobs(
            state.ref_model, input_ids, batch.attention_mask, batch.completion_mask,
            completion_length=tc,
        )
    )

    def mean_margin():  # log π(revised) - log π(original), averaged over pairs
        with torch.no_grad():
            seq = rp.get_logprobs(
                state.policy, input_ids, batch.attention_mask, batch.completion_mask,
                completion_length=tc,
            ).sum(-1)
        return (seq[0::2] - seq[1::2]).mean().item()

    before = mean_margin()
    for _ in range(steps):
        state, _ = rp.training_step(state, batch, config)
    return state, before, mean_margin()


if __name__ == "__main__":
    main()
