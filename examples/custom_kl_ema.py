"""A custom KL function inside a custom loss, with an EMA reference model, through ``train``.

Two extension points meet here:

* ``kl_fn`` — a ``KLFn`` maps the log-probs of the sampled tokens under the policy and the
  reference, ``[B, T]`` each, to a per-token KL estimate ``[B, T]``. Two are shown: the
  ready-made ``rp.create_truncated_kl(threshold)`` (k3 clamped at ``τ``) and a hand-written
  Huber-style k2,

      d = logπ_θ - logπ_ref,   kl = d²/2 if |d| ≤ δ else δ·(|d| - δ/2),

  which equals k2 near ``d = 0`` and grows linearly beyond ``δ``, so one outlier token cannot
  dominate the gradient (``|∂kl/∂d| ≤ δ``). Inside the training loop the built-in losses use
  ``config.kl_estimator`` (a name); to train with a ``KLFn`` you pass a ``loss_fn`` built on
  ``rp.compute_grpo_loss(kl_fn=...)``.
* ``ref_model_update_fn`` — ``rp.create_ema_updater(decay)`` moves the reference towards the
  policy after every update, ``θ_ref ← decay·θ_ref + (1 - decay)·θ``, so the KL anchor follows
  the policy instead of staying at the initial weights.

An ``eval_fn`` (it receives the whole ``TrainingState``) reports the parameter distance
``‖θ - θ_ref‖`` and the exact KL between the two models on a fixed probe text
(``rp.kl_from_logits``); the run with the EMA reference is compared with one whose reference
stays frozen.

Run it:
    python examples/custom_kl_ema.py                   # 6 iterations per run, Huber KL
    python examples/custom_kl_ema.py --kl truncated    # the ready-made truncated k3
    python examples/custom_kl_ema.py --quick           # 2 iterations per run (the tests)
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny local models only: never reach a hub

import torch  # noqa: E402

import rlprim as rp  # noqa: E402
from rlprim.testing import tiny_model, tiny_tokenizer  # noqa: E402

PROMPTS = ["12+7=", "3*4=", "20-8=", "5+5=", "9*9=", "100-1=", "7+8=", "6*3="]
PROBE_TEXT = "The answer to 12+7 is 19, and 3*4 is 12."


def create_huber_kl(delta: float = 1.0) -> rp.KLFn:
    """A hand-written ``KLFn``: k2 near zero, linear beyond ``|d| > delta``."""
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")

    def huber_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
        d = logprobs - ref_logprobs
        return torch.where(d.abs() <= delta, 0.5 * d**2, delta * (d.abs() - 0.5 * delta))

    return huber_kl


def create_grpo_loss_fn(kl_fn: rp.KLFn) -> rp.LossFn:
    """A ``LossFn``: the GRPO loss with ``kl_fn`` as its per-token KL penalty."""

    def grpo_loss_with_kl_fn(batch, new_logprobs, config, *, kl_coef=None, **extras):
        # With one epoch and one minibatch the loop passes old_logprobs=None: on-policy.
        old = new_logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs
        return rp.compute_grpo_loss(
            new_logprobs, old, batch.advantages, batch.completion_mask,
            ref_logprobs=batch.ref_logprobs,
            kl_coef=config.kl_coef if kl_coef is None else kl_coef,
            kl_fn=kl_fn,
            clip_eps_low=config.clip_eps_low, clip_eps_high=config.clip_eps_high,
            loss_agg_mode=config.loss_agg_mode, norm_length=config.norm_length,
        )

    return grpo_loss_with_kl_fn


def create_reference_eval_fn(tokenizer) -> rp.EvalFn:
    """``eval_fn(state)``: how far the reference is from the policy, in weights and in KL."""
    probe = tokenizer(PROBE_TEXT, return_tensors="pt")

    def reference_eval(state: rp.TrainingState) -> dict[str, float]:
        with torch.no_grad():
            squared = sum(
                float(((p - r) ** 2).sum())
                for p, r in zip(state.policy.parameters(), state.ref_model.parameters(),
                                strict=True)
            )
            logits = rp.get_logits(state.policy, probe.input_ids, probe.attention_mask)
            ref_logits = rp.get_logits(state.ref_model, probe.input_ids, probe.attention_mask)
        exact_kl = rp.kl_from_logits(logits, ref_logits).mean()  # KL(π_θ ‖ π_ref) per token
        return {"ref_distance": squared**0.5, "exact_kl": float(exact_kl)}

    return reference_eval


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A custom KL function and an EMA reference.")
    parser.add_argument("--kl", choices=["huber", "truncated"], default="huber")
    parser.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("RLPRIM_EXAMPLE_QUICK") == "1",
        help="a reduced run (also set by RLPRIM_EXAMPLE_QUICK=1)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    num_iterations = 2 if args.quick else 6
    kl_fns = {"huber": create_huber_kl(delta=1.0), "truncated": rp.create_truncated_kl(1.0)}

    # The KL functions side by side on a few log-ratios d = logπ_θ - logπ_ref.
    d = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0])
    zeros = torch.zeros_like(d)
    print("d          ", " ".join(f"{x:7.3f}" for x in d.tolist()))
    print("k3         ", " ".join(f"{x:7.3f}" for x in rp.kl_k3(d, zeros).tolist()))
    for name, kl_fn in kl_fns.items():
        print(f"{name:<11}", " ".join(f"{x:7.3f}" for x in kl_fn(d, zeros).tolist()))

    tokenizer = tiny_tokenizer()
    config = rp.create_algorithm_config("grpo", kl_coef=0.1)  # β > 0: a reference is kept
    loss_fn = create_grpo_loss_fn(kl_fns[args.kl])
    updaters = {"frozen": None, "ema": rp.create_ema_updater(decay=0.9)}
    final = {}
    for name, updater in updaters.items():
        state = rp.create_training_state(
            tiny_model("qwen2", seed=0), tokenizer, config, learning_rate=3e-3
        )
        initial_ref = [p.detach().clone() for p in state.ref_model.parameters()]
        history: list[rp.TrainingStats] = []
        state = rp.train(
            state,
            prompt_loader=rp.create_prompt_loader(PROMPTS, batch_size=2, seed=0),
            num_iterations=num_iterations,
            gen_config=rp.GenerationConfig(max_new_tokens=8, num_samples=4, seed=0),
            algorithm_config=config,
            reward_fn=rp.length_reward(target_length=12, scale=12, unit="chars"),
            ref_model_update_fn=updater,  # None: the reference stays frozen
            eval_fn=create_reference_eval_fn(tokenizer),
            logger=history.append,
            progress=False,
            loss_fn=loss_fn,  # passed on to training_iteration
        )
        reference_now = list(state.ref_model.parameters())
        moved = any(
            not torch.equal(p, q) for p, q in zip(reference_now, initial_ref, strict=True)
        )
        assert moved == (updater is not None)  # only the EMA run changes the reference
        print(f"{name} reference:")
        for stats in history:
            print(
                f"  iteration {stats.extra['iteration']:.0f}: reward={stats.reward_mean:+.3f} "
                f"kl(k3, sampled)={stats.kl:.5f} ‖θ-θ_ref‖={stats.extra['eval/ref_distance']:.4f} "
                f"exact KL(probe)={stats.extra['eval/exact_kl']:.6f}"
            )
        final[name] = history[-1].extra["eval/ref_distance"]

    print(
        f"[custom_kl_ema] done: kl_fn={args.kl} iterations={num_iterations} "
        f"distance_frozen={final['frozen']:.5f} distance_ema={final['ema']:.5f}"
    )


if __name__ == "__main__":
    main()
