"""Learned reward models: Hugging Face sequence-classification models that score a completion.

A reward model ``r_φ(x, y)`` maps a prompt ``x`` and a completion ``y`` to a scalar, read from
a classification head at the sequence's last token — the Bradley–Terry reward model of RLHF
(Ouyang et al. 2022, "Training language models to follow instructions with human feedback";
Stiennon et al. 2020). rlprim does not train reward models; it loads and applies them:

* ``load_reward_model`` — an ``AutoModelForSequenceClassification`` (a local path, bundled
  name or hub name), like ``rlprim.inference.load_model``.
* ``compute_reward_model_score`` — batched scores ``[B]`` for prompt/completion pairs.
* ``create_reward_model_fn`` — a ``reward_fn(rollout) -> float`` (the ``RewardFn`` protocol)
  carrying ``reward_fn.batched(rollouts)``, so ``compute_batch_rewards`` scores a whole batch in
  batched forward passes.
* ``create_batch_reward_model_fn`` — ``fn(prompts, completions, **kwargs) -> list[float]``, the
  TRL-style batch signature (one batched pass per call), for batch reward computation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlprim.inference import (
    _apply_lora,
    _as_model_config,
    _check_model_config,
    _context_length,
    _encode_prompts,
    _from_pretrained_kwargs,
    resolve_model_path,
)
from rlprim.types import ModelConfig, Rollout

__all__ = [
    "load_reward_model",
    "compute_reward_model_score",
    "create_reward_model_fn",
    "create_batch_reward_model_fn",
]

TemplateFn = Callable[[str, str], str]


def load_reward_model(
    config: ModelConfig | str,
    model_loader: Callable[..., Any] | None = None,
) -> Any:
    """Load a sequence-classification reward model.

    Returns only the model (load its tokenizer with ``rlprim.inference.load_tokenizer``, as for
    a policy). When ``model.config.pad_token_id`` is missing it is set to the model's eos id,
    because transformers reads each row's score at its last non-pad token and cannot batch
    without a pad id.

    Args:
      config: a ``ModelConfig`` or its ``name_or_path`` (bundled names resolve through
        ``resolve_model_path``); ``dtype``, ``revision``, ``trust_remote_code`` and
        ``attn_implementation`` go to ``from_pretrained``, then the model moves to ``device``.
        ``lora`` wraps it with ``peft`` (``task_type`` ``"SEQ_CLS"``; ``pip install
        rlprim[peft]``).
      model_loader: ``model_loader(name_or_path, **kwargs) -> nn.Module``; ``None`` uses
        ``transformers.AutoModelForSequenceClassification.from_pretrained``.

    Returns:
      the model on ``config.device`` (eval mode when loaded by ``from_pretrained``).
    """
    config = _as_model_config(config, "config")
    _check_model_config(config)
    if model_loader is None:
        from transformers import AutoModelForSequenceClassification

        model_loader = AutoModelForSequenceClassification.from_pretrained
    model = model_loader(resolve_model_path(config.name_or_path), **_from_pretrained_kwargs(config))
    model = model.to(config.device)
    model_config = getattr(model, "config", None)
    if model_config is not None and getattr(model_config, "pad_token_id", 0) is None:
        eos = getattr(model_config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        model_config.pad_token_id = eos
    if config.lora is not None:
        model = _apply_lora(model, config.lora, "SEQ_CLS")
    return model


def _check_texts(prompts: Any, completions: Any) -> tuple[list[str], list[str]]:
    for name, values in (("prompts", prompts), ("completions", completions)):
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise TypeError(f"{name} must be a list of str, got {type(values).__name__}")
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise TypeError(f"{name}[{i}] must be a str, got {type(value).__name__}")
    if len(prompts) != len(completions):
        raise ValueError(
            f"prompts and completions must have the same length, got {len(prompts)} and "
            f"{len(completions)}"
        )
    return list(prompts), list(completions)


def _pad_id(model: Any) -> int | None:
    model_config = getattr(model, "config", None)
    get_text_config = getattr(model_config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else model_config
    return getattr(text_config, "pad_token_id", None)


def compute_reward_model_score(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 8,
    template_fn: TemplateFn | None = None,
    label_index: int | None = None,
) -> torch.Tensor:
    """Score prompt/completion pairs with a sequence-classification reward model, batched.

    ``score_i = head(h_i)[label]`` where ``h_i`` is the final hidden state at the last token of
    ``text_i = template_fn(prompts[i], completions[i])`` (Ouyang et al. 2022). Texts are sorted
    by length and run ``batch_size`` at a time, right-padded with ``model.config.pad_token_id``
    (transformers reads each row at its last token whose id differs from the pad id, and right
    padding keeps position ids those of the unpadded text), so a batched score equals the
    score of the text alone. Runs in eval mode under ``torch.inference_mode`` and restores the
    model's previous mode.

    Args:
      model: an ``AutoModelForSequenceClassification``-style model with ``config.pad_token_id``.
      tokenizer: its tokenizer; texts get its special tokens, without a second BOS when the text
        already starts with the BOS token.
      prompts: ``B`` prompt texts. completions: ``B`` completion texts.
      batch_size: rows per forward pass.
      template_fn: ``template_fn(prompt, completion) -> str``, the text the model scores;
        ``None`` concatenates ``prompt + completion``. For a chat reward model render both turns,
        e.g. with ``rlprim.inference.apply_chat_template(tokenizer, [{"role": "user", ...},
        {"role": "assistant", ...}], add_generation_prompt=False)``.
      label_index: which output column is the reward; ``None`` requires a single-output head.

    Returns:
      ``[B]`` float32 scores on the CPU, in the order of the inputs (``[0]`` for empty inputs).
    """
    prompts, completions = _check_texts(prompts, completions)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if label_index is not None and not isinstance(label_index, int):
        raise TypeError(f"label_index must be None or an int, got {type(label_index).__name__}")
    if not prompts:
        return torch.zeros(0, dtype=torch.float32)
    texts = _scored_texts(prompts, completions, template_fn)
    token_ids = _encode_prompts(tokenizer, texts)
    _check_scored_lengths(token_ids, _context_length(model, tokenizer))
    pad_id = _pad_id(model)
    if pad_id is None and min(batch_size, len(texts)) > 1:
        raise ValueError(
            "model.config.pad_token_id is None, so transformers cannot find each row's last "
            "token in a batch; set model.config.pad_token_id = tokenizer.pad_token_id (or use "
            "load_reward_model, or batch_size=1)"
        )

    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(token_ids[i]), reverse=True)
    scores = torch.empty(len(texts), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                logits = _score_logits(model, [token_ids[i] for i in rows], pad_id, device)
                scores[torch.tensor(rows)] = _reward_column(logits, label_index).float().cpu()
    finally:
        model.train(was_training)
    return scores


def _scored_texts(
    prompts: list[str], completions: list[str], template_fn: TemplateFn | None
) -> list[str]:
    """``template_fn(prompt, completion)`` per pair (``prompt + completion`` without one)."""
    if template_fn is None:
        return [p + c for p, c in zip(prompts, completions, strict=True)]
    texts = [template_fn(p, c) for p, c in zip(prompts, completions, strict=True)]
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(
                f"template_fn must return a str, returned {type(text).__name__} for pair {i}"
            )
    return texts


def _check_scored_lengths(token_ids: list[list[int]], context: int | None) -> None:
    for i, ids in enumerate(token_ids):
        if not ids:
            raise ValueError(f"prompts[{i}] + completions[{i}] encode to no tokens")
        if context is not None and len(ids) > context:
            raise ValueError(
                f"prompts[{i}] + completions[{i}] is {len(ids)} tokens long, more than the "
                f"reward model's context of {context} tokens"
            )


def _score_logits(
    model: Any, token_ids: list[list[int]], pad_id: int | None, device: torch.device
) -> torch.Tensor:
    """``[b, labels]`` head outputs of one batch, right-padded to its longest (first) row."""
    width = len(token_ids[0])
    filler = 0 if pad_id is None else pad_id
    padded = [ids + [filler] * (width - len(ids)) for ids in token_ids]
    mask = [[1] * len(ids) + [0] * (width - len(ids)) for ids in token_ids]
    return model(
        input_ids=torch.tensor(padded, dtype=torch.long, device=device),
        attention_mask=torch.tensor(mask, dtype=torch.long, device=device),
    ).logits


def _reward_column(logits: torch.Tensor, label_index: int | None) -> torch.Tensor:
    """The reward column of ``logits [b, labels]``; the only one when ``label_index`` is None."""
    if label_index is None:
        if logits.shape[-1] != 1:
            raise ValueError(
                f"the reward model has {logits.shape[-1]} outputs; pass label_index "
                "to choose the reward column"
            )
        return logits[:, 0]
    if not -logits.shape[-1] <= label_index < logits.shape[-1]:
        raise ValueError(
            f"label_index must index the model's {logits.shape[-1]} outputs, "
            f"got {label_index}"
        )
    return logits[:, label_index]


def create_batch_reward_model_fn(
    model: Any,
    tokenizer: Any,
    batch_size: int = 8,
    template_fn: TemplateFn | None = None,
    label_index: int | None = None,
) -> Callable[..., list[float]]:
    """A TRL-style batch reward function backed by a reward model.

    Returns ``fn(prompts, completions, **kwargs) -> list[float]`` computing
    ``compute_reward_model_score(model, tokenizer, prompts, completions, ...)`` in one batched
    pass (extra keyword arguments, such as dataset columns, are ignored). Wrap it with the
    rewards module's TRL adapter to use it as a per-rollout ``reward_fn``.
    """

    def reward_model_batch_fn(
        prompts: Sequence[str], completions: Sequence[str], **kwargs: Any
    ) -> list[float]:
        del kwargs  # dataset columns a TRL-style caller may pass along
        scores = compute_reward_model_score(
            model, tokenizer, prompts, completions, batch_size, template_fn, label_index
        )
        return scores.tolist()

    return reward_model_batch_fn


def create_reward_model_fn(
    model: Any,
    tokenizer: Any,
    batch_size: int = 8,
    template_fn: TemplateFn | None = None,
    label_index: int | None = None,
) -> Callable[[Rollout], float]:
    """A ``reward_fn(rollout) -> float`` scoring ``rollout.prompt`` + ``rollout.generation.text``.

    ``reward_fn(rollout)`` runs one forward pass. It also carries
    ``reward_fn.batched(rollouts) -> list[float]`` (built with
    ``rlprim.rewards.create_batched_reward_fn``), which ``compute_batch_rewards`` calls once
    for a whole batch: ``compute_reward_model_score`` over all rollouts, ``batch_size`` rows
    per forward. Both paths give the same scores (within float32 round-off). Same arguments as
    ``compute_reward_model_score``.
    """
    from rlprim.rewards import create_batched_reward_fn

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")

    def score_rollouts(rollouts: Sequence[Rollout]) -> list[float]:
        for i, rollout in enumerate(rollouts):
            if not isinstance(rollout, Rollout):
                raise TypeError(f"rollouts[{i}] must be a Rollout, got {type(rollout).__name__}")
        scores = compute_reward_model_score(
            model,
            tokenizer,
            [r.prompt for r in rollouts],
            [r.generation.text for r in rollouts],
            batch_size,
            template_fn,
            label_index,
        )
        return scores.tolist()

    return create_batched_reward_fn(score_rollouts)
