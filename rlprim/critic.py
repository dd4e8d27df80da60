"""Critics for PPO: a value model built from the policy's architecture, and per-token values.

A value model is any ``nn.Module`` mapping ``(input_ids, attention_mask)`` to per-position
scalars. ``create_value_model`` builds the usual one (Ziegler et al. 2019; Ouyang et al. 2022):
a copy of the policy's transformer trunk with a scalar head (Hugging Face
``AutoModelForTokenClassification`` with ``num_labels=1``), the head zero-initialised so the
first values are 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rlprim.model_wrappers import unwrap_model

__all__ = ["create_value_model", "get_values"]


def create_value_model(policy: nn.Module, init_from_policy: bool = True) -> nn.Module:
    """A critic with the policy's architecture: trunk + scalar head, ``V(s_t)`` per position.

    ``V = w · h_t + b`` on the trunk's last hidden state ``h_t``; ``w`` and ``b`` start at 0.
    The trunk starts as a copy of the policy's (``init_from_policy``) or freshly initialised.

    Args:
      policy: a Hugging Face causal LM (its ``config`` and ``base_model`` are used).
      init_from_policy: copy the policy's trunk weights into the critic.
    Returns:
      An ``AutoModelForTokenClassification`` (``num_labels=1``) on the policy's device and dtype,
      in eval mode (no dropout), like the policy during training.
    """
    from transformers import AutoModelForTokenClassification

    config = getattr(policy, "config", None)
    if config is None:
        raise TypeError(
            f"policy must be a Hugging Face model with a .config, got {type(policy).__name__}"
        )
    fields = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    # No dropout in the head: values at sampling and training time must agree.
    config = config.__class__.from_dict({**fields, "num_labels": 1, "classifier_dropout": 0.0})
    param = next(policy.parameters())
    value_model = AutoModelForTokenClassification.from_config(config).to(
        device=param.device, dtype=param.dtype
    )
    if init_from_policy:
        missing, unexpected = value_model.base_model.load_state_dict(
            policy.base_model.state_dict(), strict=False
        )
        if unexpected:
            raise ValueError(f"policy trunk has weights the critic lacks: {unexpected[:5]}")
    value_model.eval()
    head = _value_head(value_model)
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()
    return value_model


def _value_head(value_model: nn.Module) -> nn.Linear:
    for name in ("score", "classifier"):
        head = getattr(value_model, name, None)
        if isinstance(head, nn.Linear):
            return head
    raise TypeError(f"cannot find the scalar head of {type(value_model).__name__}")


def _per_position_values(output: Any, batch: int, length: int, hf: bool) -> torch.Tensor | None:
    """``[B, T]`` values from a critic's output; ``None`` for one value per row (``[B]``)."""
    values = getattr(output, "logits", None) if hf else output
    if isinstance(values, torch.Tensor) and values.shape[:1] == (batch,):
        if values.dim() == 3 and values.shape[1:] == (length, 1):
            return values[..., 0]
        if values.dim() == 2 and values.shape[1] == length:
            return values
        if not hf and (values.dim() == 1 or (values.dim() == 2 and values.shape[1] == 1)):
            return None
    got = (
        f"a tensor of shape {tuple(values.shape)}"
        if isinstance(values, torch.Tensor)
        else type(output).__name__
    )
    if hf:
        raise ValueError(
            f"a Hugging Face critic must return .logits of shape [B, T, 1] = [{batch}, {length}, "
            f"1] (a token-classification head with num_labels=1, as create_value_model builds), "
            f"got {got}"
        )
    raise ValueError(
        f"a value model must return [B, T] or [B, T, 1] values (one per position) or [B] / "
        f"[B, 1] (one per sequence, the value of its last position) for its [B, T] = "
        f"[{batch}, {length}] input_ids, got {got}"
    )


def get_values(
    value_model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    completion_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token values ``V_t`` of the completion tokens: ``[B, Tc]``.

    ``V_t`` is the value of the state *before* completion token ``t`` is emitted, i.e. the
    critic's output at position ``Tp + t - 1`` of the ``[prompt | completion]`` sequence — the
    same alignment as the log-prob of token ``t``. Hugging Face critics get position ids that
    follow the attention mask (left padding), as in generation.

    Three critic shapes are accepted:

    * a Hugging Face model (``create_value_model``, possibly DDP-wrapped) returning
      ``logits [B, T, 1]``;
    * any callable ``(input_ids, attention_mask) -> [B, T]`` (or ``[B, T, 1]``): one value per
      position, one forward;
    * a value-head module returning one value per sequence, ``[B]`` or ``[B, 1]`` — the value
      of the last position, as seed 004's ``ValueModel`` reads ``hidden_states[-1][:, -1]``.
      It is called on each prefix ``input_ids[:, :Tp + t]`` (``t = 0 … Tc-1``), so
      ``V_t = value_model(prefix ending at Tp + t - 1)``: ``Tc`` forward passes after the one
      on the full input that shows the output's shape (return ``[B, T]`` to need one). Prompts are left-padded, so every prefix ends in a real token
      on rows whose completion has not ended.

    Args:
      value_model: a critic of one of the shapes above.
      input_ids: ``[B, T]`` prompt and completion ids.
      attention_mask: ``[B, T]``.
      completion_length: ``Tc``, the number of completion columns at the end of ``input_ids``.
      completion_mask: optional ``[B, Tc]``; values are zeroed where it is 0.
    Returns:
      ``[B, Tc]`` float values.
    Raises:
      ValueError: a critic output of any other shape, naming the shapes expected.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            "input_ids and attention_mask must both be [B, T], got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    B, T = input_ids.shape
    value_model = unwrap_model(value_model)  # a DDP wrapper hides the HF signature
    if not 1 <= completion_length < T:
        raise ValueError(f"completion_length must be in [1, {T - 1}], got {completion_length}")
    hf = isinstance(value_model, nn.Module) and hasattr(value_model, "config")
    if hf:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = value_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        )
    else:
        out = value_model(input_ids, attention_mask)
    values = _per_position_values(out, B, T, hf)
    if values is None:
        # One value per sequence: V_t is the value of the prefix that ends before token t.
        columns = []
        for end in range(T - completion_length, T):
            value = value_model(input_ids[:, :end], attention_mask[:, :end])
            if not isinstance(value, torch.Tensor) or tuple(value.shape) not in ((B,), (B, 1)):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
                raise ValueError(
                    "a value model returning one value per sequence must return [B] or [B, 1] "
                    f"for every prefix, got {got} for [B, T] = [{B}, {end}]"
                )
            columns.append(value.reshape(B))
        values = torch.stack(columns, dim=1).float()
    else:
        values = values[:, T - completion_length - 1 : T - 1].float()
    if completion_mask is not None:
        values = values * completion_mask.to(values.dtype)
    return values
