"""Learned reward models: modules that score a completion (Hugging Face or plain ``nn.Module``).

A reward model ``r_φ(x, y)`` maps a prompt ``x`` and a completion ``y`` to a scalar, read from
a classification head at the sequence's last token — the Bradley–Terry reward model of RLHF
(Ouyang et al. 2022, "Training language models to follow instructions with human feedback";
Stiennon et al. 2020). rlprim does not train reward models; it loads and applies them. A
reward model is a Hugging Face sequence-classification model, or any ``nn.Module`` with
``forward(input_ids, attention_mask) -> [B]`` (or ``[B, K]`` for vector rewards):

* ``load_reward_model`` — an ``AutoModelForSequenceClassification`` (a local path, bundled
  name or hub name), like ``rlprim.inference.load_model``.
* ``compute_reward_model_score`` — batched scores ``[B]`` (or ``[B, K]``) for
  prompt/completion pairs.
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
from rlprim.inference import _pad_id as _tokenizer_pad_id
from rlprim.types import ModelConfig, Rollout

__all__ = [
    "load_reward_model",
    "compute_reward_model_score",
    "create_reward_model_fn",
    "create_batch_reward_model_fn",
    "score_with_reward_model",
]

TemplateFn = Callable[[str, str], str]
Scorer = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]


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


def _is_hf_model(model: Any) -> bool:
    """A Hugging Face model (possibly peft-wrapped) carries a ``PretrainedConfig``."""
    from transformers import PretrainedConfig

    return isinstance(getattr(model, "config", None), PretrainedConfig)


def _model_device(model: Any) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def score_with_reward_model(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The default ``scorer``: a reward model's raw scores on one padded batch.

    * A Hugging Face sequence-classification model (its ``.config`` is a ``PretrainedConfig``)
      is called with keywords and its ``.logits`` ``[B, L]`` are returned: ``head(h_i)``,
      ``h_i`` the final hidden state at row ``i``'s last non-pad token (Ouyang et al. 2022).
    * Any other module is called positionally, ``model(input_ids, attention_mask)``, and its
      output returned — ``[B]`` or ``[B, K]`` for seed 004's reward-model interface.

    Args:
      model: the reward model.
      input_ids: ``[B, T]`` padded token ids. attention_mask: ``[B, T]`` (1 = real token).
    Returns:
      ``[B, L]`` logits (Hugging Face) or the module's output.
    Raises:
      ValueError: a Hugging Face model whose output has no ``.logits`` of shape ``[B, L]``.
    """
    if not _is_hf_model(model):
        return model(input_ids, attention_mask)
    rows = input_ids.shape[0]
    output = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != rows:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else None
        raise ValueError(
            f"a Hugging Face reward model must return .logits of shape [B, L] = [{rows}, L] "
            f"(a sequence-classification head), got {type(output).__name__} with logits "
            f"of shape {shape}"
        )
    return logits


def _reward_columns(
    scores: Any, rows: int, hf_head: bool, label_index: int | None, source: str
) -> torch.Tensor:
    """``[rows]`` or ``[rows, K]`` rewards from a scorer's output.

    ``hf_head``: the scores are a Hugging Face classification head's ``[B, L]`` logits, whose
    single column is the reward (several need ``label_index``)."""
    if hf_head and label_index is None:
        if scores.shape[-1] != 1:
            raise ValueError(
                f"the reward model has {scores.shape[-1]} outputs; pass label_index "
                "to choose the reward column"
            )
        return scores[:, 0]
    if not hf_head and (
        not isinstance(scores, torch.Tensor) or scores.dim() not in (1, 2) or scores.shape[0] != rows
    ):
        got = (
            f"a tensor of shape {tuple(scores.shape)}"
            if isinstance(scores, torch.Tensor)
            else type(scores).__name__
        )
        hint = (
            "; a Hugging Face model must have a PretrainedConfig as .config and return .logits"
            if source == "a reward model module" else ""
        )
        raise ValueError(
            f"{source} must return a tensor of shape [B] (one reward per row) or [B, K] "
            f"(K reward components) for its [B, T] input_ids with B = {rows}, got {got}{hint}"
        )
    if label_index is None:
        return scores
    if scores.dim() != 2 or not -scores.shape[-1] <= label_index < scores.shape[-1]:
        width = scores.shape[-1] if scores.dim() == 2 else 1
        raise ValueError(
            f"label_index must index the model's {width} outputs, got {label_index}"
        )
    return scores[:, label_index]


def _check_scorer(scorer: Any) -> None:
    if scorer is not None and not callable(scorer):
        raise TypeError(
            "scorer must be None or callable as scorer(model, input_ids, attention_mask) -> "
            f"[B] or [B, K], got {type(scorer).__name__}"
        )


def compute_reward_model_score(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 8,
    template_fn: TemplateFn | None = None,
    label_index: int | None = None,
    padding_side: str | None = None,
    scorer: Scorer | None = None,
) -> torch.Tensor:
    """Score prompt/completion pairs with a reward model, batched.

    ``score_i = r_φ(text_i)`` with ``text_i = template_fn(prompts[i], completions[i])``
    (Ouyang et al. 2022). Two kinds of reward model are accepted:

    * a Hugging Face sequence-classification model (its ``.config`` is a ``PretrainedConfig``):
      ``score_i = head(h_i)[label]``, ``h_i`` the final hidden state at the last token; it
      returns an output with ``.logits [B, L]``.
    * any other ``nn.Module`` with ``forward(input_ids [B, T], attention_mask [B, T])``
      returning a tensor ``[B]`` (one reward per row) or ``[B, K]`` (a vector reward of ``K``
      components, as ``compute_vector_reward`` and the aggregators take) — the reward-model
      interface of seed 004's Constitutional-AI PPO.

    Texts are sorted by length and run ``batch_size`` at a time. Hugging Face models get
    right padding with ``model.config.pad_token_id`` (transformers reads each row at its last
    token whose id differs from the pad id, and right padding keeps position ids those of the
    unpadded text), so a batched score equals the score of the text alone. Plain modules get
    left padding with the tokenizer's pad id by default, so column ``-1`` is each row's last
    real token (a module that reads ``hidden[:, -1]`` is right); they see the mask, and
    batched scores equal unbatched ones exactly when the module ignores masked positions.
    Runs in eval mode under ``torch.inference_mode`` and restores the model's previous mode.

    Args:
      model: a Hugging Face sequence-classification model with ``config.pad_token_id``, or a
        module ``forward(input_ids, attention_mask) -> [B] | [B, K]``.
      tokenizer: its tokenizer; texts get its special tokens, without a second BOS when the text
        already starts with the BOS token.
      prompts: ``B`` prompt texts. completions: ``B`` completion texts.
      batch_size: rows per forward pass.
      template_fn: ``template_fn(prompt, completion) -> str``, the text the model scores;
        ``None`` concatenates ``prompt + completion``. For a chat reward model render both turns,
        e.g. with ``rlprim.inference.apply_chat_template(tokenizer, [{"role": "user", ...},
        {"role": "assistant", ...}], add_generation_prompt=False)``.
      label_index: which output column is the reward; ``None`` requires a single-output head
        (Hugging Face) or keeps all ``K`` columns (a plain module returning ``[B, K]``).
      padding_side: ``"left"`` or ``"right"``; ``None`` = right for Hugging Face models, left
        for plain modules.
      scorer: ``scorer(model, input_ids [b, T], attention_mask [b, T]) -> [b] | [b, K]``, how
        a padded batch is scored (seed 003's ``scorer``); ``None`` is
        ``score_with_reward_model``. A replacement may read any output of any model, e.g. a
        judge LM's log-probability of "Yes"; ``label_index`` then picks one of its columns.

    Returns:
      ``[B]`` float32 scores on the CPU, in the order of the inputs (``[0]`` for empty inputs),
      or ``[B, K]`` for a plain module returning ``K`` columns without ``label_index``.
    Raises:
      ValueError: a forward output of another shape, naming the shape expected.
    """
    prompts, completions = _check_texts(prompts, completions)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if label_index is not None and not isinstance(label_index, int):
        raise TypeError(f"label_index must be None or an int, got {type(label_index).__name__}")
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be None, 'left' or 'right', got {padding_side!r}")
    _check_scorer(scorer)
    if not callable(model) or not hasattr(model, "parameters"):
        raise TypeError(
            "model must be an nn.Module: a Hugging Face sequence-classification model or a "
            f"module forward(input_ids, attention_mask) -> [B] or [B, K], got "
            f"{type(model).__name__}"
        )
    if not prompts:
        return torch.zeros(0, dtype=torch.float32)
    texts = _scored_texts(prompts, completions, template_fn)
    token_ids = _encode_prompts(tokenizer, texts)
    _check_scored_lengths(token_ids, _context_length(model, tokenizer))
    hf = _is_hf_model(model)
    if hf:
        pad_id = _pad_id(model)
        if pad_id is None and min(batch_size, len(texts)) > 1:
            raise ValueError(
                "model.config.pad_token_id is None, so transformers cannot find each row's last "
                "token in a batch; set model.config.pad_token_id = tokenizer.pad_token_id (or "
                "use load_reward_model, or batch_size=1)"
            )
    else:
        pad_id = _tokenizer_pad_id(tokenizer)
    left = (padding_side or ("right" if hf else "left")) == "left"

    device = _model_device(model)
    source = "a reward model module" if scorer is None else "scorer"
    order = sorted(range(len(texts)), key=lambda i: len(token_ids[i]), reverse=True)
    scores: torch.Tensor | None = None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                input_ids, attention_mask = _padded_batch(
                    [token_ids[i] for i in rows], pad_id, device, left=left
                )
                output = (scorer or score_with_reward_model)(model, input_ids, attention_mask)
                column = _reward_columns(
                    output, len(rows), hf and scorer is None, label_index, source
                ).float().cpu()
                if scores is None:
                    scores = torch.empty((len(texts), *column.shape[1:]), dtype=torch.float32)
                elif column.shape[1:] != scores.shape[1:]:
                    raise ValueError(
                        f"the reward model returned {tuple(column.shape[1:])} columns for one "
                        f"batch and {tuple(scores.shape[1:])} for another"
                    )
                scores[torch.tensor(rows)] = column
    finally:
        model.train(was_training)
    assert scores is not None
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


def _padded_batch(
    token_ids: list[list[int]], pad_id: int | None, device: torch.device, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [b, T], attention_mask [b, T])``: rows padded to the longest (first) row,
    on the left or the right."""
    width = len(token_ids[0])
    filler = 0 if pad_id is None else pad_id
    padded, mask = [], []
    for ids in token_ids:
        fill, ones = [filler] * (width - len(ids)), [1] * len(ids)
        zeros = [0] * (width - len(ids))
        padded.append(fill + ids if left else ids + fill)
        mask.append(zeros + ones if left else ones + zeros)
    input_ids = torch.tensor(padded, dtype=torch.long, device=device)
    return input_ids, torch.tensor(mask, dtype=torch.long, device=device)


def create_batch_reward_model_fn(
    model: Any,
    tokenizer: Any,
    batch_size: int = 8,
    template_fn: TemplateFn | None = None,
    label_index: int | None = None,
    padding_side: str | None = None,
    scorer: Scorer | None = None,
) -> Callable[..., list[Any]]:
    """A TRL-style batch reward function backed by a reward model.

    Returns ``fn(prompts, completions, **kwargs) -> list[float]`` computing
    ``compute_reward_model_score(model, tokenizer, prompts, completions, ...)`` in one batched
    pass (extra keyword arguments, such as dataset columns, are ignored): a float per pair, or a
    list of ``K`` floats for a module returning ``[B, K]``. Wrap it with the rewards module's
    TRL adapter to use it as a per-rollout ``reward_fn``.
    """
    _check_scorer(scorer)

    def reward_model_batch_fn(
        prompts: Sequence[str], completions: Sequence[str], **kwargs: Any
    ) -> list[Any]:
        del kwargs  # dataset columns a TRL-style caller may pass along
        scores = compute_reward_model_score(
            model, tokenizer, prompts, completions, batch_size, template_fn, label_index,
            padding_side, scorer,
        )
        return scores.tolist()

    return reward_model_batch_fn


def create_reward_model_fn(
    model: Any,
    tokenizer: Any,
    batch_size: int = 8,
    template_fn: TemplateFn | None = None,
    label_index: int | None = None,
    padding_side: str | None = None,
    scorer: Scorer | None = None,
) -> Callable[[Rollout], Any]:
    """A ``reward_fn(rollout) -> float`` scoring ``rollout.prompt`` + ``rollout.generation.text``.

    ``reward_fn(rollout)`` runs one forward pass. It also carries
    ``reward_fn.batched(rollouts) -> list[float]`` (built with
    ``rlprim.rewards.create_batched_reward_fn``), which ``compute_batch_rewards`` calls once
    for a whole batch: ``compute_reward_model_score`` over all rollouts, ``batch_size`` rows
    per forward. Both paths give the same scores (within float32 round-off). A plain module
    returning ``[B, K]`` gives vector rewards (a list of ``K`` floats per rollout). Same
    arguments as ``compute_reward_model_score``.
    """
    from rlprim.rewards import create_batched_reward_fn

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    _check_scorer(scorer)

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
            padding_side,
            scorer,
        )
        return scores.tolist()

    return create_batched_reward_fn(score_rollouts)
