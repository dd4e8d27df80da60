"""The signatures of rlprim's extension points, as ``typing.Protocol`` s.

Any plain function (or lambda) with the matching signature satisfies a protocol; nothing needs
to inherit from these. They exist to document, and let type checkers verify, what a replacement
passed as ``reward_fn=``, ``kl_fn=``, ``generator=``, ``advantage_fn=``, ``loss_fn=``,
``ref_model_update_fn=`` (and so on) must look like.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from rlprim.types import (
    AlgorithmConfig,
    Batch,
    Generation,
    GenerationConfig,
    Rollout,
    TrainingState,
    TrainingStats,
)

__all__ = [
    "RewardFn",
    "Aggregator",
    "KLFn",
    "Generator",
    "AdvantageFn",
    "LossFn",
    "RefModelUpdateFn",
    "PromptLoader",
    "Logger",
    "EvalFn",
    "CheckpointFn",
    "OptimizerStepFn",
    "Scorer",
    "RefModelFn",
    "ToolTracker",
    "ValueFn",
]


class RewardFn(Protocol):
    """``reward_fn(rollout) -> float | Sequence[float]``: score one rollout.

    Return a float for a scalar reward or a sequence of floats for a vector reward (reduce it
    with an ``Aggregator``). Adapt TRL-style batch functions with ``from_trl_reward_fn``.
    """

    def __call__(self, rollout: Rollout) -> float | Sequence[float]: ...


class Aggregator(Protocol):
    """``aggregator(vectors [B, K]) -> rewards [B]``: reduce vector rewards to scalars."""

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor: ...


class KLFn(Protocol):
    """``kl_fn(logprobs [B, T], ref_logprobs [B, T]) -> per-token KL [B, T]``.

    Both inputs are log-probs of the *sampled* tokens (sampled from the policy); the result is a
    per-token estimate, masked and reduced by the caller.
    """

    def __call__(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor: ...


class Generator(Protocol):
    """``generator(model, tokenizer, prompts, config) -> list[Generation]``.

    ``prompts`` are texts or token-id lists (used verbatim as ``prompt_ids``; multi-turn
    rollouts pass the token ids so far, never re-tokenising the conversation).
    Returns ``len(prompts) * config.num_samples`` generations, the samples of each prompt
    consecutive, each with its prompt ids, sampled token ids, per-token sampling log-probs under
    ``softmax(logits / config.temperature)`` and a ``finish_reason``. A generator backed by an
    external engine (e.g. vLLM) receives the engine as ``model``.
    """

    def __call__(
        self,
        model: Any,
        tokenizer: Any,
        prompts: Sequence[str | Sequence[int]],
        config: GenerationConfig,
    ) -> list[Generation]: ...


class AdvantageFn(Protocol):
    """``advantage_fn(rewards [B], config, **extras) -> advantages [B] or [B, Tc]``.

    ``extras`` may hold ``group_size`` (int), ``mask`` ``[B, Tc]``, ``values`` ``[B, Tc]`` and
    ``kl`` ``[B, Tc]`` for algorithms that need them.
    """

    def __call__(
        self, rewards: torch.Tensor, config: AlgorithmConfig, **extras: Any
    ) -> torch.Tensor: ...


class LossFn(Protocol):
    """``loss_fn(batch, new_logprobs [B, Tc], config, **extras) -> (loss, metrics)``.

    ``loss`` is a differentiable scalar; ``metrics`` maps names to floats. ``extras`` may hold
    ``entropy`` ``[B, Tc]`` and ``new_values`` ``[B, Tc]``.
    """

    def __call__(
        self, batch: Batch, new_logprobs: torch.Tensor, config: AlgorithmConfig, **extras: Any
    ) -> tuple[torch.Tensor, Mapping[str, float]]: ...


class RefModelUpdateFn(Protocol):
    """``update_fn(ref_model, policy, step) -> ref_model``: refresh the reference model.

    Pure in its inputs: whatever it decides depends on ``step``, never on hidden counters.
    """

    def __call__(self, ref_model: Any, policy: Any, step: int) -> Any: ...


class PromptLoader(Protocol):
    """``prompt_loader(position) -> list[prompt item]``: the batch of prompts at ``position``.

    A pure function of the batch position (``create_prompt_loader`` builds one), so the
    position stored in ``TrainingState.loader_state`` is all a resumed run needs. A prompt item
    is a ``str`` or a mapping with a ``"prompt"`` key plus metadata (e.g. ``"answer"``).
    """

    def __call__(self, position: int) -> list[Any]: ...


class Logger(Protocol):
    """``logger(stats) -> None``: record one ``TrainingStats`` (or a mapping of metrics)."""

    def __call__(self, stats: TrainingStats | Mapping[str, Any]) -> None: ...


class EvalFn(Protocol):
    """``eval_fn(state) -> Mapping[str, float]``: evaluate the current policy.

    The returned metrics are added to the iteration's ``TrainingStats.extra``.
    """

    def __call__(self, state: TrainingState) -> Mapping[str, float]: ...


class CheckpointFn(Protocol):
    """``checkpoint_fn(state) -> path | None``: save ``state`` when it decides to.

    Decisions depend only on ``state`` (e.g. ``state.iteration % every == 0``).
    """

    def __call__(self, state: TrainingState) -> Any: ...


class OptimizerStepFn(Protocol):
    """``optimizer_step_fn(state) -> None``: apply the accumulated gradients.

    Called after gradients were computed, clipped and found finite. The default steps the
    optimizer and the scheduler (if any); a replacement may e.g. add weight averaging.
    """

    def __call__(self, state: TrainingState) -> None: ...


class Scorer(Protocol):
    """``scorer(model, input_ids [B, T], attention_mask [B, T]) -> scores [B] | [B, K]``.

    How a reward model scores one padded batch (``compute_reward_model_score(...,
    scorer=)``, ``create_reward_model_fn(..., scorer=)``). The default,
    ``score_with_reward_model``, reads a sequence-classification head's ``.logits`` or a plain
    module's output; a replacement may read anything, e.g. a judge LM's log-probabilities.
    """

    def __call__(
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor: ...


class RefModelFn(Protocol):
    """``ref_model_fn(policy) -> ref_model``: build the reference model π_ref.

    Called once by ``create_training_state`` when the algorithm needs a reference and none is
    given (default ``create_reference_model``, a frozen copy). It must return a module that
    shares no parameter storage with the policy, e.g. a separately loaded SFT checkpoint.
    """

    def __call__(self, policy: Any) -> Any: ...


class ToolTracker(Protocol):
    """``tool_tracker(rollouts) -> {name: value}``: summarise tool use in a batch.

    ``track_tool_calls`` is one; ``training_iteration(..., tool_tracker=)`` adds its numeric
    values to ``stats.extra`` as ``tools/<name>`` (the mean over ranks in data-parallel jobs).
    """

    def __call__(self, rollouts: Sequence[Rollout]) -> Mapping[str, Any]: ...


class ValueFn(Protocol):
    """``value_fn(value_model, input_ids [B, T], attention_mask [B, T], completion_length,
    completion_mask=None) -> values [B, Tc]``: the critic's per-token values ``V_t``.

    The default is ``get_values``; ``training_iteration(..., value_fn=)`` uses a replacement
    for the old values (advantages) and the new ones (the value loss). ``V_t`` must be the
    value of the state before completion token ``t``, differentiable for the value loss.
    """

    def __call__(
        self,
        value_model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_length: int,
        completion_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...
