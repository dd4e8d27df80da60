"""The data types of rlprim: NamedTuples only.

Every value that flows between rlprim functions is one of these immutable records (or a plain
tensor). Use ``._replace(field=value)`` to derive a changed copy. Shapes use ``B`` for the
batch (one row per sampled completion), ``Tp`` for the padded prompt length, ``Tc`` for the
padded completion length, ``T = Tp + Tc`` and ``V`` for the vocabulary size.

The one honest exception to immutability: ``TrainingState`` holds ``nn.Module`` weights and an
optimizer whose tensors the training step functions update in place; those functions then
return a new ``TrainingState`` (``step + 1``, new statistics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

__all__ = [
    "ModelConfig",
    "GenerationConfig",
    "Message",
    "Conversation",
    "ToolCall",
    "Generation",
    "Rollout",
    "Batch",
    "TrainingState",
    "TrainingStats",
    "AlgorithmConfig",
    "Algorithm",
    "Schedule",
]


class ModelConfig(NamedTuple):
    """How to load a model.

    Fields:
      name_or_path: a local directory, a bundled short name (e.g. ``"rlprim/arith-tiny"``) or a
        hub name (hubs are only reached when the user's machine can reach them).
      dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"``.
      device: a torch device string, e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
      revision: a hub revision (branch, tag or commit); ``None`` for the default.
      trust_remote_code: passed to ``from_pretrained``.
      lora: ``None`` for full fine-tuning, else keyword arguments of ``peft.LoraConfig``
        (e.g. ``{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}``).
      attn_implementation: passed to ``from_pretrained`` (``None`` lets transformers choose).
    """

    name_or_path: str
    dtype: str = "float32"
    device: str = "cpu"
    revision: str | None = None
    trust_remote_code: bool = False
    lora: Mapping[str, Any] | None = None
    attn_implementation: str | None = None


class GenerationConfig(NamedTuple):
    """How to sample completions.

    Fields:
      max_new_tokens: the most tokens sampled per completion (per turn in multi-turn rollouts).
      temperature: softmax temperature ``T``; sampling uses ``softmax(logits / T)`` and the
        returned log-probs are taken under that same distribution (training uses it too).
      top_p: nucleus sampling mass in ``(0, 1]``; 1.0 disables it.
      top_k: keep the ``k`` most likely tokens; 0 disables it.
      num_samples: completions per prompt (the group size ``G`` of group-relative methods).
        Samples of one prompt are consecutive in every output.
      stop: strings that end a completion when they appear in its decoded text.
      seed: makes sampling reproducible; ``None`` draws from torch's global generator.
      do_sample: ``False`` for greedy decoding (temperature is then ignored for sampling but still
        scales the returned log-probs).
      batch_size: prompts per generate call; ``None`` puts all prompts in one call.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1
    stop: Sequence[str] = ()
    seed: int | None = None
    do_sample: bool = True
    batch_size: int | None = None


class ToolCall(NamedTuple):
    """One tool invocation parsed from model output, and its outcome.

    Fields:
      name: the tool's name as the model wrote it.
      arguments: the parsed keyword arguments.
      result: the tool's output as text, ``None`` until executed or when it failed.
      error: an error message for the model (unknown tool, bad arguments, timeout, budget
        exhausted…), ``None`` on success.
    """

    name: str
    arguments: Mapping[str, Any] = {}
    result: str | None = None
    error: str | None = None


class Message(NamedTuple):
    """One chat message.

    Fields:
      role: ``"system"``, ``"user"``, ``"assistant"`` or ``"tool"``.
      content: the message text.
      tool_calls: tool calls the assistant made in this message.
      name: the tool's name for ``role="tool"`` messages (or a speaker name), else ``None``.
    """

    role: str
    content: str
    tool_calls: Sequence[ToolCall] = ()
    name: str | None = None


class Conversation(NamedTuple):
    """An ordered chat: ``messages`` is a tuple of ``Message``."""

    messages: Sequence[Message] = ()


class Generation(NamedTuple):
    """One sampled completion.

    Fields:
      text: the decoded completion (special tokens removed), cut at a stop string if one hit.
      prompt_ids: the prompt's token ids ``[Tp_i]`` without padding.
      token_ids: the sampled token ids ``[Tc_i]`` without padding, including EOS when sampled.
      logprobs: ``[Tc_i]`` log-prob of each sampled token under ``softmax(logits / T)`` at
        sampling time (``None`` when the generator does not provide them).
      finish_reason: ``"stop"`` (EOS or a stop string) or ``"length"`` (hit ``max_new_tokens``).
    """

    text: str
    prompt_ids: Sequence[int] = ()
    token_ids: Sequence[int] = ()
    logprobs: Sequence[float] | None = None
    finish_reason: str = "length"


class Rollout(NamedTuple):
    """A completion with everything needed to score and train on it.

    Fields:
      prompt: the prompt text (or the rendered conversation for chat prompts).
      generation: the sampled completion (for multi-turn rollouts, the last model turn).
      rewards: a scalar reward, a vector of reward components, or ``None`` until scored.
      kl_divergence: the sequence KL to the reference model (sum over action tokens of the
        per-token estimate), ``None`` when no reference was used.
      tool_calls: every tool call made during the rollout, in order.
      group_id: index of the prompt this sample came from; samples of a group share it.
      metadata: free-form extra information (task answer, timings…).
      completion_ids: for multi-turn rollouts, every token after the prompt: model tokens as
        sampled and tool/environment tokens as appended. ``None`` means ``generation.token_ids``.
      action_mask: ``[len(completion_ids)]``, 1 on model-produced tokens that train, 0 on tool
        or environment tokens. ``None`` means all ones.
      logprobs: sampling log-probs aligned with ``completion_ids`` (0.0 where the mask is 0).
        ``None`` means ``generation.logprobs`` when the completion is ``generation.token_ids``
        (single turn); for a multi-turn completion it means "unknown".
      ref_logprobs: reference-model log-probs aligned with ``completion_ids``, or ``None``.
      conversation: the full ``Conversation`` for multi-turn rollouts, else ``None``.
    """

    prompt: str
    generation: Generation
    rewards: float | Sequence[float] | None = None
    kl_divergence: float | None = None
    tool_calls: Sequence[ToolCall] = ()
    group_id: int = 0
    metadata: Mapping[str, Any] | None = None
    completion_ids: Sequence[int] | None = None
    action_mask: Sequence[int] | None = None
    logprobs: Sequence[float] | None = None
    ref_logprobs: Sequence[float] | None = None
    conversation: Conversation | None = None


class Batch(NamedTuple):
    """Tensors for one optimisation batch (``B`` sequences).

    Fields:
      prompt_ids: ``[B, Tp]`` long, left-padded prompts.
      completion_ids: ``[B, Tc]`` long, right-padded completions.
      attention_mask: ``[B, Tp + Tc]`` long, 1 on real (non-padding) tokens.
      completion_mask: ``[B, Tc]`` float, 1 on tokens that train: action mask ∧ not padding.
      old_logprobs: ``[B, Tc]`` log-probs of the completion tokens under the policy that
        sampled them (the behaviour policy of the PPO ratio).
      ref_logprobs: ``[B, Tc]`` reference-model log-probs, or ``None`` when no KL is used.
      advantages: ``[B]`` (one per sequence, broadcast over tokens) or ``[B, Tc]``.
      returns: ``[B, Tc]`` value targets for a critic, or ``None``.
      values: ``[B, Tc]`` critic values at sampling time (for value clipping), or ``None``.
      rewards: ``[B]`` scalar rewards.
      group_ids: ``[B]`` long, the prompt index of each row (rows of a group are consecutive).
      engine_logprobs: ``[B, Tc]`` log-probs reported by the inference engine (e.g. vLLM) when
        it differs from the trainer, for truncated importance sampling; else ``None``.
    """

    prompt_ids: torch.Tensor
    completion_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    values: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    engine_logprobs: torch.Tensor | None = None


class AlgorithmConfig(NamedTuple):
    """Every knob of a policy-optimisation algorithm. Build it with ``create_algorithm_config``.

    Fields:
      name: registry key (``"grpo"``, ``"dr_grpo"``, ``"dapo"``, ``"gspo"``, ``"cispo"``,
        ``"ppo"``, ``"reinforce"``, ``"rloo"``, ``"dpo"`` or a user-registered name).
      clip_eps_low / clip_eps_high: the PPO ratio is clipped to ``[1 - low, 1 + high]``
        (DAPO's clip-higher uses ``high > low``; CISPO clips its IS weight at ``1 + high``).
      dual_clip_c: dual-clip constant ``c > 1`` bounding the loss for negative advantages
        (Ye et al. 2020); ``None`` disables it.
      kl_coef: β, the KL penalty coefficient (in the loss, or in the reward when
        ``kl_in_reward``). 0 disables the reference model.
      kl_estimator: ``"k1"``, ``"k2"``, ``"k3"`` or ``"low_var"`` (see ``rlprim.kl``).
      kl_in_reward: fold ``-β·KL`` into the per-token reward (PPO style) instead of the loss.
      loss_agg_mode: ``"token-mean"``, ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"`` or
        ``"seq-mean-token-sum-norm"`` (see ``aggregate_loss``).
      norm_length: the constant length of ``seq-mean-token-sum-norm`` (Dr. GRPO); ``None`` uses
        the padded completion length ``Tc``.
      entropy_coef: weight of the entropy bonus (subtracted from the loss).
      gamma / gae_lambda: discount and GAE λ for critic-based advantages.
      value_coef: weight of the value loss. value_clip: clip range of the value update
        (``None`` disables clipping).
      num_epochs: passes over each rollout batch. minibatch_size: sequences per optimizer step
        (``None``: the whole batch). micro_batch_size: sequences per forward/backward in
        gradient accumulation (``None``: the whole minibatch).
      max_grad_norm: global gradient-norm clip (``None`` disables it).
      scale_rewards: group advantage scaling: ``"group"`` (GRPO), ``"batch"``, ``"none"``
        (Dr. GRPO).
      adv_eps: ε added to the std in advantage normalisation.
      whiten_advantages: whiten advantages over the batch (REINFORCE++, PPO).
      reinforce_baseline: ``"none"``, ``"group"`` or ``"batch"`` mean baseline for REINFORCE.
      beta: DPO temperature β. dpo_loss_type: ``"sigmoid"``, ``"ipo"`` or ``"hinge"``.
      filter_groups: drop groups whose rewards are all equal (DAPO dynamic sampling) and
        re-sample until every prompt has an informative group or ``max_sampling_rounds`` ran.
      max_sampling_rounds: the cap on dynamic-sampling rounds per iteration.
      overlong_shaping: apply DAPO's soft overlong punishment to rewards.
      overlong_buffer_len / overlong_penalty: completions within ``overlong_buffer_len`` tokens
        of ``max_response_len`` lose up to ``overlong_penalty`` (``None``: a fifth of
        ``max_response_len``, DAPO's 4096 of 20480).
      max_response_len: the completion length cap of overlong shaping (``None``: the
        generation config's ``max_new_tokens``).
      tis_cap: truncated importance-sampling cap ``C`` for the engine/trainer mismatch: each
        token's policy loss is weighted by ``min(exp(logπ_old - logπ_engine), C)``
        (``compute_tis_weights``) when the batch carries ``engine_logprobs``; ``None`` disables
        it.
    """

    name: str = "grpo"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip_c: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    loss_agg_mode: str = "token-mean"
    norm_length: int | None = None
    entropy_coef: float = 0.0
    gamma: float = 1.0
    gae_lambda: float = 1.0
    value_coef: float = 0.5
    value_clip: float | None = 0.2
    num_epochs: int = 1
    minibatch_size: int | None = None
    micro_batch_size: int | None = None
    max_grad_norm: float | None = 1.0
    scale_rewards: str = "group"
    adv_eps: float = 1e-4
    whiten_advantages: bool = False
    reinforce_baseline: str = "none"
    beta: float = 0.1
    dpo_loss_type: str = "sigmoid"
    filter_groups: bool = False
    max_sampling_rounds: int = 3
    overlong_shaping: bool = False
    overlong_buffer_len: int | None = None
    overlong_penalty: float = 1.0
    max_response_len: int | None = None
    tis_cap: float | None = None


class Algorithm(NamedTuple):
    """A registry entry: the functions and needs that define an algorithm.

    Fields:
      advantage_fn: ``fn(rewards [B], config, **extras) -> advantages [B] or [B, Tc]``
        (see ``rlprim.protocols.AdvantageFn``).
      loss_fn: ``fn(batch, new_logprobs [B, Tc], config, **extras) -> (loss, metrics)``
        (see ``rlprim.protocols.LossFn``).
      needs_ref: whether the algorithm needs reference log-probs even when ``kl_coef == 0``
        (DPO); any algorithm needs them when ``kl_coef > 0``.
      needs_value: whether the algorithm trains a critic.
      defaults: the algorithm's published hyper-parameters, as ``AlgorithmConfig`` field values.
    """

    advantage_fn: Any
    loss_fn: Any
    needs_ref: bool = False
    needs_value: bool = False
    defaults: Mapping[str, Any] = {}


class TrainingState(NamedTuple):
    """Everything a training run carries from one step to the next.

    Fields:
      policy: the trained ``nn.Module`` (a causal LM), updated in place by the step functions.
      tokenizer: its tokenizer.
      optimizer: a ``torch.optim.Optimizer`` over the policy (and value model) parameters.
      ref_model: a frozen reference model, or ``None`` when no KL is used.
      value_model: a critic returning per-token values, or ``None``.
      step: optimizer updates made so far.
      kl_coef: the current KL coefficient β (changes under an adaptive controller).
      rng_state: RNG states for exact resume (a mapping of torch / numpy / python states).
      config: the ``AlgorithmConfig`` (or any user config) the run started with.
      scheduler: an optional learning-rate scheduler.
      iteration: completed training iterations (rollout + update rounds).
      loader_state: the prompt loader's resumable position.
    """

    policy: Any
    tokenizer: Any
    optimizer: Any
    ref_model: Any = None
    value_model: Any = None
    step: int = 0
    kl_coef: float = 0.0
    rng_state: Mapping[str, Any] | None = None
    config: Any = None
    scheduler: Any = None
    iteration: int = 0
    loader_state: Mapping[str, Any] | None = None


class TrainingStats(NamedTuple):
    """Scalar statistics of one training step or iteration (``nan`` when not measured).

    Fields:
      step: the optimizer step (or iteration) these stats belong to.
      loss: total loss. policy_loss / value_loss / entropy: its parts (entropy in nats/token).
      kl: mean per-token KL to the reference. kl_coef: β in force.
      reward_mean / reward_std: over the batch's sequences.
      clip_fraction: fraction of action tokens whose ratio was clipped.
      approx_kl: mean of ``k3(old, new)``, the policy's drift during the update.
      grad_norm: the global gradient norm before clipping.
      num_tokens: action tokens trained on. num_sequences: sequences trained on.
      skipped_updates: updates skipped because the loss or a gradient was not finite.
      response_length: mean completion length in tokens.
      time_generate / time_reference / time_train: seconds spent in each phase.
      extra: any further named metrics (a mapping of str to float).
    """

    step: int = 0
    loss: float = float("nan")
    policy_loss: float = float("nan")
    value_loss: float = float("nan")
    kl: float = float("nan")
    kl_coef: float = float("nan")
    entropy: float = float("nan")
    reward_mean: float = float("nan")
    reward_std: float = float("nan")
    clip_fraction: float = float("nan")
    approx_kl: float = float("nan")
    grad_norm: float = float("nan")
    num_tokens: int = 0
    num_sequences: int = 0
    skipped_updates: int = 0
    response_length: float = float("nan")
    time_generate: float = 0.0
    time_reference: float = 0.0
    time_train: float = 0.0
    extra: Mapping[str, float] | None = None


class Schedule(NamedTuple):
    """A value that changes with the training iteration: ``fn(iteration) -> value``.

    ``train`` resolves a ``Schedule`` given as ``algorithm_config`` or ``reward_fn`` at every
    iteration, e.g. ``Schedule(lambda it: grpo if it < 30 else dapo)``. Wrapping makes the
    intent explicit: a reward function is itself callable, so it could not be told apart
    from a schedule otherwise.
    """

    fn: Any
