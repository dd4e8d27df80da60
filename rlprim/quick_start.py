"""``quick_start_training``: the one-liner on top of the loop, with the bundled default task.

It sits above the loop (``rlprim.training``) and the tasks (``rlprim.tasks``) because its default
— the bundled ``rlprim/arith-tiny`` model on the arithmetic task — needs both; the loop itself
knows no task.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from rlprim.algorithms import create_algorithm_config
from rlprim.checkpoint import save_checkpoint
from rlprim.data import create_prompt_loader
from rlprim.inference import hf_generator, load_model, load_tokenizer
from rlprim.logging import combine_loggers, create_jsonl_logger, plot_training_stats
from rlprim.training import create_training_state, train
from rlprim.types import GenerationConfig, TrainingState

__all__ = ["quick_start_training"]

BUNDLED_MODEL = "rlprim/arith-tiny"


def _default_task(
    model_name: str,
    prompts: Sequence[Any] | None,
    reward_fn: Callable[..., Any] | None,
    eval_fn: Callable[[TrainingState], Mapping[str, float]] | None,
    seed: int,
) -> tuple[Sequence[Any], Callable[..., Any], Any]:
    """The bundled model's arithmetic task fills what is missing of prompts, reward and eval."""
    if model_name != BUNDLED_MODEL:
        raise ValueError(
            f"prompts and reward_fn are required for model_name={model_name!r}; only the "
            f"bundled {BUNDLED_MODEL!r} has a default task (arithmetic)"
        )
    from rlprim.tasks.arithmetic import (
        arithmetic_reward,
        arithmetic_split,
        create_arithmetic_eval_fn,
    )

    train_problems, held_out = arithmetic_split(2000, 200, seed=seed)
    prompts = train_problems if prompts is None else prompts
    reward_fn = arithmetic_reward if reward_fn is None else reward_fn
    if eval_fn is None:
        eval_fn = create_arithmetic_eval_fn(held_out)
    return prompts, reward_fn, eval_fn


def quick_start_training(
    model_name: str = BUNDLED_MODEL,
    prompts: Sequence[Any] | None = None,
    reward_fn: Callable[..., Any] | None = None,
    num_iterations: int = 100,
    algorithm: str = "grpo",
    *,
    eval_fn: Callable[[TrainingState], Mapping[str, float]] | None = None,
    prompts_per_iteration: int = 32,
    num_samples: int = 8,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    learning_rate: float = 3e-4,
    seed: int = 0,
    output_dir: str | None = None,
    eval_every: int = 5,
    logger: Callable[..., None] | None = None,
    progress: bool = True,
    generator: Callable[..., Any] = hf_generator,
    **overrides: Any,
) -> TrainingState:
    """Train ``model_name`` with ``algorithm`` on ``prompts`` in one call; return the final state.

    Everything is the public primitives: ``load_model`` / ``load_tokenizer``,
    ``create_algorithm_config(algorithm, overrides)``, ``create_training_state`` (AdamW),
    ``create_prompt_loader`` (``prompts_per_iteration`` prompts, shuffled by ``seed``) and
    ``train`` with ``num_samples`` completions per prompt. With the bundled model
    (``"rlprim/arith-tiny"``) and no ``prompts`` it trains on the arithmetic task's training
    split with ``arithmetic_reward`` and reports held-out greedy accuracy (``eval_fn``) every
    ``eval_every`` iterations. With ``output_dir`` it writes ``stats.jsonl``, a
    ``reward_curve.png`` and a final checkpoint there.

    Args:
      model_name: a bundled short name, a local directory or a hub name.
      prompts: prompt items; ``None`` only with the bundled model (the arithmetic task).
      reward_fn: ``reward_fn(rollout) -> float``; ``None`` only with the bundled model.
      num_iterations: training iterations.
      algorithm: a registered algorithm name.
      eval_fn: ``fn(state) -> {name: value}``; defaults to held-out accuracy for the bundled
        model.
      prompts_per_iteration, num_samples, max_new_tokens, temperature: sampling settings.
      learning_rate: AdamW's learning rate.
      seed: seeds sampling, shuffling and torch.
      output_dir: where to write stats, plot and checkpoint (``None``: nothing written).
      eval_every: iterations between evaluations.
      logger: an extra ``Logger``.
      progress: show the tqdm bar.
      generator: the ``Generator``.
      **overrides: ``AlgorithmConfig`` fields, e.g. ``kl_coef=0.0``.
    Returns:
      The final ``TrainingState``.
    """
    if prompts is None or reward_fn is None:
        prompts, reward_fn, eval_fn = _default_task(model_name, prompts, reward_fn, eval_fn, seed)
    torch.manual_seed(seed)
    policy = load_model(model_name)
    tokenizer = load_tokenizer(model_name)
    config = create_algorithm_config(algorithm, overrides)
    state = create_training_state(policy, tokenizer, config, learning_rate=learning_rate)
    loader = create_prompt_loader(
        list(prompts), batch_size=min(prompts_per_iteration, len(prompts)), seed=seed
    )
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        num_samples=num_samples,
        seed=seed,
    )
    stats_path = None
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        stats_path = os.path.join(output_dir, "stats.jsonl")
        if os.path.exists(stats_path):
            os.remove(stats_path)
        logger = combine_loggers(create_jsonl_logger(stats_path), logger)
    state = train(
        state,
        loader,
        num_iterations,
        gen_config,
        config,
        reward_fn,
        eval_fn=eval_fn,
        logger=logger,
        generator=generator,
        eval_every=eval_every,
        progress=progress,
    )
    if output_dir is not None:
        save_checkpoint(state, os.path.join(output_dir, "checkpoint"))
        metrics = ["reward_mean", "eval/heldout_accuracy", "kl", "entropy"]
        if os.path.getsize(stats_path) > 0:
            plot_training_stats(
                stats_path, os.path.join(output_dir, "reward_curve.png"), metrics=metrics,
                x="time",
            )
    return state
