"""Rollouts to ``Batch`` tensors, and the row operations of training: select, concatenate,
shuffle, trim, minibatches, length-bucketed micro-batches and their loss weights.

Layout of a ``Batch`` (``B`` rows, ``Tp`` prompt columns, ``Tc`` completion columns)::

    prompt_ids      [B, Tp]       left-padded   pad … pad p_1 … p_n
    completion_ids  [B, Tc]       right-padded  c_1 … c_m pad … pad
    attention_mask  [B, Tp + Tc]  1 on the real tokens of both parts
    completion_mask [B, Tc]       action mask ∧ not padding (what trains)
    old_logprobs, ref_logprobs, engine_logprobs  [B, Tc]   0 on padding
    advantages, returns, values   [B] or [B, Tc]            0 on padding when [B, Tc]
    rewards [B], group_ids [B]

So ``cat([prompt_ids, completion_ids], 1)`` is the model input: every prompt ends at column
``Tp - 1`` and every completion starts at column ``Tp``.

Padding is always known from lengths (the attention mask), never from token values: the pad id
may equal the EOS id, and an EOS the model sampled is a real token that trains. Every function
here that needs row lengths checks that the prompt part of ``attention_mask`` is left-padded and
the completion part right-padded, and raises otherwise.

Micro-batches and gradient accumulation. Splitting a minibatch into micro-batches changes each
aggregated loss's normaliser, so the micro-batch losses must be weighted by their share of the
minibatch's normaliser before their gradients are summed (``microbatch_loss_weights``): tokens
for ``token-mean``, sequences with at least one trainable token for ``seq-mean-token-mean``,
sequences for the two ``seq-mean-token-sum`` modes. For ``seq-mean-token-sum-norm`` the
constant ``L`` must also be the same in every micro-batch: pass ``norm_length = L`` of the whole
minibatch (``config.norm_length``, or the minibatch's ``Tc`` when that is ``None``), because a
trimmed micro-batch has a smaller ``Tc`` of its own. Then::

    Σ_i w_i · aggregate_loss(l_i, m_i, mode, L) == aggregate_loss(l, m, mode, L)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from rlprim.checks import check_int
from rlprim.losses import LOSS_AGG_MODES
from rlprim.types import Batch, Rollout

__all__ = [
    "rollouts_to_batch",
    "decode_batch",
    "sequence_lengths",
    "padding_fraction",
    "select_batch",
    "concatenate_batches",
    "shuffle_batch",
    "trim_padding",
    "split_minibatches",
    "pack_by_length_indices",
    "pack_by_length",
    "microbatch_loss_weights",
    "microbatch_loss_totals",
    "batch_to_device",
]

# Fields by layout. Fields a future ``Batch`` may add are classified by shape (see _field_kind).
_PROMPT_FIELDS = ("prompt_ids",)
_COMPLETION_FIELDS = (
    "completion_ids",
    "completion_mask",
    "old_logprobs",
    "ref_logprobs",
    "engine_logprobs",
)
_ROW_OR_COMPLETION_FIELDS = ("advantages", "returns", "values")
_ROW_FIELDS = ("rewards", "group_ids")
_REQUIRED_FIELDS = ("prompt_ids", "completion_ids", "attention_mask", "completion_mask")
# What one more micro-batch costs, in padded positions, when max_tokens is set (see
# pack_by_length_indices): keeps mixed 8..512-token batches under 10 % padding at any budget.
DEFAULT_OVERHEAD_TOKENS = 256.0


# --------------------------------------------------------------------------- input checks


def _check_seed(name: str, seed: object) -> int:
    seed = check_int(name, seed, 0)
    if seed >= 2**64:
        raise ValueError(f"{name} must be < 2**64, got {seed}")
    return seed


def _field_kind(name: str, value: torch.Tensor, tp: int, tc: int) -> str:
    """``"prompt"``, ``"full"`` (attention mask), ``"completion"`` ([B, Tc]) or ``"row"`` ([B])."""
    if name in _PROMPT_FIELDS:
        return "prompt"
    if name == "attention_mask":
        return "full"
    if name in _COMPLETION_FIELDS:
        return "completion"
    if name in _ROW_FIELDS:
        return "row"
    if value.dim() == 1:
        return "row"
    if value.dim() == 2 and value.shape[1] == tc:
        return "completion"
    raise ValueError(
        f"batch.{name} must have shape [B] or [B, Tc] = [*, {tc}], got {tuple(value.shape)}"
    )


def _check_batch(batch: object, name: str = "batch") -> tuple[int, int, int]:
    """Checks field types and shapes; returns ``(B, Tp, Tc)``."""
    if not isinstance(batch, Batch):
        raise TypeError(f"{name} must be an rlprim Batch, got {type(batch).__name__}")
    for field in _REQUIRED_FIELDS:
        if not isinstance(getattr(batch, field), torch.Tensor):
            raise TypeError(
                f"{name}.{field} must be a torch.Tensor, got {type(getattr(batch, field)).__name__}"
            )
    prompt_ids, completion_ids = batch.prompt_ids, batch.completion_ids
    if prompt_ids.dim() != 2 or completion_ids.dim() != 2:
        raise ValueError(
            f"{name}.prompt_ids and {name}.completion_ids must be 2-D [B, Tp] and [B, Tc], got "
            f"{tuple(prompt_ids.shape)} and {tuple(completion_ids.shape)}"
        )
    rows, tp = prompt_ids.shape
    tc = completion_ids.shape[1]
    expected = {
        "completion_ids": (rows, tc),
        "attention_mask": (rows, tp + tc),
        "completion_mask": (rows, tc),
    }
    for field, value in zip(batch._fields, batch, strict=True):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{name}.{field} must be a torch.Tensor or None, got {type(value).__name__}"
            )
        kind = _field_kind(field, value, tp, tc)
        shape = (
            expected.get(field)
            or {
                "prompt": (rows, tp),
                "completion": (rows, tc),
                "row": (rows,),
            }[kind]
        )
        if field in _ROW_OR_COMPLETION_FIELDS and value.dim() == 1:
            shape = (rows,)
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{name}.{field} must have shape {list(shape)} (B={rows}, Tp={tp}, Tc={tc}), "
                f"got {list(value.shape)}"
            )
    return rows, tp, tc


def _check_padding_sides(batch: Batch, tp: int, name: str) -> None:
    """The prompt part of the attention mask must be 0…0 1…1, the completion part 1…1 0…0."""
    mask = batch.attention_mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name}.attention_mask must contain only 0 and 1")
    prompt, completion = mask[:, :tp], mask[:, tp:]
    if prompt.shape[1] > 1 and not bool((prompt[:, 1:] >= prompt[:, :-1]).all()):
        row = int((prompt[:, 1:] < prompt[:, :-1]).any(dim=1).nonzero()[0])
        raise ValueError(
            f"{name}.prompt_ids must be left-padded: row {row} of attention_mask[:, :Tp] has a "
            f"padding position after a real token ({prompt[row].tolist()})"
        )
    if completion.shape[1] > 1 and not bool((completion[:, 1:] <= completion[:, :-1]).all()):
        row = int((completion[:, 1:] > completion[:, :-1]).any(dim=1).nonzero()[0])
        raise ValueError(
            f"{name}.completion_ids must be right-padded: row {row} of attention_mask[:, Tp:] "
            f"has a real token after a padding position ({completion[row].tolist()})"
        )


def _checked_lengths(batch: Batch, name: str = "batch") -> tuple[torch.Tensor, torch.Tensor]:
    _, tp, _ = _check_batch(batch, name)
    _check_padding_sides(batch, tp, name)
    mask = batch.attention_mask.long()
    return mask[:, :tp].sum(dim=1), mask[:, tp:].sum(dim=1)


def _as_id_tensor(name: str, ids: object) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        tensor = ids.detach().cpu()
    else:
        try:
            tensor = torch.as_tensor(np.asarray(list(ids)))
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"{name} must be a sequence of ints, got {type(ids).__name__}"
            ) from error
    if tensor.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name} must hold integer token ids, got dtype {tensor.dtype}")
    if bool((tensor < 0).any()):
        raise ValueError(f"{name} must hold token ids >= 0, got {int(tensor.min())}")
    return tensor.long()


def _as_float_row(name: str, values: object, length: int) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        tensor = values.detach().cpu()
    else:
        try:
            tensor = torch.as_tensor(np.asarray(list(values), dtype=np.float64))
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"{name} must be a sequence of floats, got {type(values).__name__}"
            ) from error
    if tensor.dim() != 1 or tensor.shape[0] != length:
        raise ValueError(
            f"{name} must have one value per completion token ({length}), got shape "
            f"{tuple(tensor.shape)}"
        )
    return tensor.to(torch.float32)


def _scalar_reward(index: int, reward: object) -> float:
    if isinstance(reward, torch.Tensor):
        if reward.numel() != 1 or reward.dim() > 0:
            raise ValueError(
                f"rollouts[{index}].rewards is a vector (shape {tuple(reward.shape)}); "
                "rollouts_to_batch needs scalar rewards: aggregate the components first "
                "(e.g. rlprim.aggregate_vector_rewards)"
            )
        return float(reward)
    if isinstance(reward, np.ndarray) and reward.ndim == 0:
        return float(reward)
    if isinstance(reward, (str, bytes)):
        raise TypeError(f"rollouts[{index}].rewards must be a number, got {type(reward).__name__}")
    if isinstance(reward, (Sequence, np.ndarray)):
        raise ValueError(
            f"rollouts[{index}].rewards is a vector of {len(reward)} components; "
            "rollouts_to_batch needs scalar rewards: aggregate the components first "
            "(e.g. rlprim.aggregate_vector_rewards)"
        )
    if isinstance(reward, (int, float, np.number)):
        return float(reward)
    raise TypeError(f"rollouts[{index}].rewards must be a number, got {type(reward).__name__}")


def _resolve_pad_token_id(tokenizer: Any, pad_token_id: object) -> int:
    from_tokenizer = None
    if tokenizer is not None:
        from_tokenizer = getattr(tokenizer, "pad_token_id", None)
        if from_tokenizer is None:
            from_tokenizer = getattr(tokenizer, "eos_token_id", None)
        if from_tokenizer is None and pad_token_id is None:
            raise ValueError(
                "tokenizer has neither pad_token_id nor eos_token_id; pass pad_token_id="
            )
    if pad_token_id is None:
        if from_tokenizer is None:
            raise ValueError("rollouts_to_batch needs a pad id: pass tokenizer= or pad_token_id=")
        pad_token_id = from_tokenizer
    pad_token_id = check_int("pad_token_id", pad_token_id, 0)
    if from_tokenizer is not None and pad_token_id != from_tokenizer:
        raise ValueError(
            f"pad_token_id={pad_token_id} disagrees with the tokenizer's pad id {from_tokenizer}; "
            "pass only one of them"
        )
    return pad_token_id


def _per_row_or_token(
    name: str, values: object, rows: int, tc: int, real: torch.Tensor, device: Any
) -> torch.Tensor | None:
    """``[B]`` or ``[B, Tc]`` float tensor; ``[B, Tc]`` values are set to 0 on padding."""
    if values is None:
        return None
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    if tensor.dtype == torch.bool or not (tensor.is_floating_point() or _is_int(tensor)):
        raise TypeError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    if tuple(tensor.shape) == (rows, tc):
        tensor = torch.where(real.to(tensor.device), tensor, torch.zeros_like(tensor))
    elif tuple(tensor.shape) != (rows,):
        raise ValueError(
            f"{name} must have shape [B] = [{rows}] or [B, Tc] = [{rows}, {tc}], got "
            f"{list(tensor.shape)}"
        )
    return tensor.to(device)


def _is_int(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


# --------------------------------------------------------------------------- rollouts -> Batch


def rollouts_to_batch(
    rollouts: Sequence[Rollout],
    tokenizer: Any = None,
    *,
    pad_token_id: int | None = None,
    advantages: torch.Tensor | Sequence[float] | None = None,
    returns: torch.Tensor | Sequence[float] | None = None,
    values: torch.Tensor | Sequence[float] | None = None,
    device: str | torch.device | None = None,
) -> Batch:
    """Pads rollouts into one training ``Batch``: prompts left-padded, completions right-padded.

    For row ``b`` with prompt ids ``p`` (length ``n_b``), completion ids ``c`` (length ``m_b``;
    ``rollout.completion_ids``, else ``generation.token_ids``) and action mask ``a`` (``None`` =
    all ones), with ``Tp = max_b n_b`` and ``Tc = max_b m_b``::

        prompt_ids[b]      = [pad] * (Tp - n_b) + p
        completion_ids[b]  = c + [pad] * (Tc - m_b)
        attention_mask[b]  = [0] * (Tp - n_b) + [1] * (n_b + m_b) + [0] * (Tc - m_b)
        completion_mask[b] = a + [0] * (Tc - m_b)          (action mask ∧ not padding)

    Padding comes from the lengths, never from token values, so ``pad_token_id`` may equal the
    EOS id (a sampled EOS stays a real, trainable token).

    Args:
      rollouts: a non-empty sequence of ``Rollout``.
      tokenizer: a tokenizer whose ``pad_token_id`` (else ``eos_token_id``) is the pad id.
      pad_token_id: the pad id, instead of (or agreeing with) ``tokenizer``.
      advantages / returns / values: ``[B]`` or ``[B, Tc]`` (tensors or nested sequences),
        passed through; non-float input becomes float32 and ``[B, Tc]`` values are set to 0 on
        padding.
      device: where the tensors go (``None``: CPU).
    Returns:
      a ``Batch``: ids and ``attention_mask`` long, ``completion_mask`` float32;
      ``old_logprobs [B, Tc]`` float32 from ``rollout.logprobs`` (else
      ``generation.logprobs`` when the completion is ``generation.token_ids``), ``None`` when
      any rollout has none; ``ref_logprobs`` likewise
      from ``rollout.ref_logprobs`` (both 0 on padding); ``rewards [B]`` float32 (``None`` when
      every rollout is unscored); ``group_ids [B]`` long; ``engine_logprobs`` ``None``.
    Raises:
      ValueError / TypeError: empty ``rollouts``, a non-``Rollout`` item, ids that are not
        non-negative ints, an action mask or log-probs of another length than the completion,
        an action mask that is not 0/1, vector rewards (aggregate them first), some rollouts
        scored and others not, advantages/returns/values of another shape than ``[B]`` or
        ``[B, Tc]``, no pad id.
    """
    _check_rollouts(rollouts)
    pad = _resolve_pad_token_id(tokenizer, pad_token_id)
    rows = [_row_tensors(index, rollout) for index, rollout in enumerate(rollouts)]
    scored = [row.reward is not None for row in rows]
    if any(scored) and not all(scored):
        raise ValueError(
            f"rollouts {[i for i, s in enumerate(scored) if not s]} have rewards=None while "
            "others are scored: score every rollout (or none) before batching"
        )
    padded = _pad_rows(rows, pad)
    size, tp, tc = len(rows), padded.prompt_ids.shape[1], padded.completion_ids.shape[1]
    real = padded.attention_mask[:, tp:].bool()
    device = torch.device("cpu") if device is None else torch.device(device)
    batch = padded._replace(
        old_logprobs=None if any(row.old is None for row in rows) else padded.old_logprobs,
        ref_logprobs=None if any(row.ref is None for row in rows) else padded.ref_logprobs,
        advantages=_per_row_or_token("advantages", advantages, size, tc, real, device),
        returns=_per_row_or_token("returns", returns, size, tc, real, device),
        values=_per_row_or_token("values", values, size, tc, real, device),
        rewards=torch.tensor([row.reward for row in rows], dtype=torch.float32)
        if all(scored) else None,
        group_ids=torch.tensor([r.group_id for r in rollouts], dtype=torch.long),
    )
    return batch_to_device(batch, device)


# The steps of rollouts_to_batch.


class _Row(NamedTuple):
    """One rollout's checked 1-D tensors (``old`` / ``ref`` / ``reward`` may be ``None``)."""

    prompt: torch.Tensor  # [n] long
    completion: torch.Tensor  # [m] long
    action: torch.Tensor  # [m] float32, 0/1
    old: torch.Tensor | None  # [m] float32 sampling log-probs
    ref: torch.Tensor | None  # [m] float32 reference log-probs
    reward: float | None


def _check_rollouts(rollouts: object) -> None:
    if isinstance(rollouts, Rollout) or not isinstance(rollouts, Sequence):
        raise TypeError(f"rollouts must be a sequence of Rollout, got {type(rollouts).__name__}")
    if len(rollouts) == 0:
        raise ValueError("rollouts must not be empty: there is nothing to batch")
    for index, rollout in enumerate(rollouts):
        if not isinstance(rollout, Rollout):
            raise TypeError(f"rollouts[{index}] must be a Rollout, got {type(rollout).__name__}")


def _row_tensors(index: int, rollout: Rollout) -> _Row:
    """``rollouts[index]``'s ids, action mask, log-probs and reward, each checked."""
    generation = rollout.generation
    prompt = _as_id_tensor(f"rollouts[{index}].generation.prompt_ids", generation.prompt_ids)
    if rollout.completion_ids is not None:
        completion = _as_id_tensor(f"rollouts[{index}].completion_ids", rollout.completion_ids)
    else:
        completion = _as_id_tensor(f"rollouts[{index}].generation.token_ids", generation.token_ids)
    length = completion.shape[0]
    if rollout.action_mask is None:
        action = torch.ones(length, dtype=torch.float32)
    else:
        action = _as_float_row(f"rollouts[{index}].action_mask", rollout.action_mask, length)
        if not bool(((action == 0) | (action == 1)).all()):
            raise ValueError(
                f"rollouts[{index}].action_mask must contain only 0 and 1, got "
                f"{sorted(set(action.tolist()))}"
            )
    sampled = rollout.logprobs
    if sampled is None and (
        rollout.completion_ids is None
        or list(rollout.completion_ids) == list(generation.token_ids)
    ):
        # generation.logprobs align with generation.token_ids only, never with a multi-turn
        # completion that holds more tokens.
        sampled = generation.logprobs
    old = None if sampled is None else _as_float_row(f"rollouts[{index}].logprobs", sampled, length)
    ref = None
    if rollout.ref_logprobs is not None:
        ref = _as_float_row(f"rollouts[{index}].ref_logprobs", rollout.ref_logprobs, length)
    reward = None if rollout.rewards is None else _scalar_reward(index, rollout.rewards)
    return _Row(prompt, completion, action, old, ref, reward)


def _pad_rows(rows: Sequence[_Row], pad: int) -> Batch:
    """The padded tensors: prompts left-padded, completions right-padded with ``pad``; the
    log-probs are 0 on padding and on rows without them (the caller sets those to ``None``)."""
    size = len(rows)
    tp = max(row.prompt.shape[0] for row in rows)
    tc = max(row.completion.shape[0] for row in rows)
    prompt_ids = torch.full((size, tp), pad, dtype=torch.long)
    completion_ids = torch.full((size, tc), pad, dtype=torch.long)
    attention_mask = torch.zeros((size, tp + tc), dtype=torch.long)
    completion_mask = torch.zeros((size, tc), dtype=torch.float32)
    old_logprobs = torch.zeros((size, tc), dtype=torch.float32)
    ref_logprobs = torch.zeros((size, tc), dtype=torch.float32)
    for index, row in enumerate(rows):
        n, m = row.prompt.shape[0], row.completion.shape[0]
        prompt_ids[index, tp - n :] = row.prompt
        completion_ids[index, :m] = row.completion
        attention_mask[index, tp - n : tp + m] = 1
        completion_mask[index, :m] = row.action
        if row.old is not None:
            old_logprobs[index, :m] = row.old
        if row.ref is not None:
            ref_logprobs[index, :m] = row.ref
    return Batch(
        prompt_ids=prompt_ids,
        completion_ids=completion_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
    )


def decode_batch(
    batch: Batch, tokenizer: Any, skip_special_tokens: bool = False
) -> list[tuple[str, str]]:
    """Decodes each row's real tokens back to ``(prompt_text, completion_text)``.

    Real tokens are those where ``attention_mask`` is 1, so the pad id is never consulted.
    The inverse of ``rollouts_to_batch`` for text: with a tokenizer that round-trips,
    ``decode_batch(rollouts_to_batch(rs, tok), tok)[b] == (decode(p_b), decode(c_b))``.

    Args:
      batch: a ``Batch``.
      tokenizer: anything with ``decode(ids, skip_special_tokens=...)``.
      skip_special_tokens: passed to ``decode`` (``True`` drops a sampled EOS, like
        ``Generation.text``).
    Returns:
      one ``(prompt_text, completion_text)`` per row.
    """
    prompt_lengths, completion_lengths = _checked_lengths(batch)
    tp = batch.prompt_ids.shape[1]
    texts = []
    for row in range(batch.prompt_ids.shape[0]):
        prompt = batch.prompt_ids[row, tp - int(prompt_lengths[row]) :].tolist()
        completion = batch.completion_ids[row, : int(completion_lengths[row])].tolist()
        texts.append(
            (
                tokenizer.decode(prompt, skip_special_tokens=skip_special_tokens),
                tokenizer.decode(completion, skip_special_tokens=skip_special_tokens),
            )
        )
    return texts


def sequence_lengths(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Real prompt and completion lengths of each row, from the attention mask.

    ``prompt_lengths[b] = Σ_{t<Tp} attention_mask[b, t]``, ``completion_lengths[b] =
    Σ_{t≥Tp} attention_mask[b, t]``.

    Returns:
      ``(prompt_lengths [B], completion_lengths [B])``, long, on the batch's device.
    Raises:
      ValueError: a malformed batch (shapes, or padding on the wrong side).
    """
    return _checked_lengths(batch)


def padding_fraction(batches: Batch | Sequence[Batch]) -> float:
    """The fraction of padding positions in the model inputs of one or more batches.

    ``1 - Σ_i Σ attention_mask_i / Σ_i B_i · (Tp_i + Tc_i)`` — the share of the computed tokens
    that are padding. 0.0 for batches with no positions.
    """
    if isinstance(batches, Batch):
        batches = [batches]
    real = total = 0
    for index, batch in enumerate(batches):
        _check_batch(batch, f"batches[{index}]")
        real += int(batch.attention_mask.long().sum())
        total += batch.attention_mask.numel()
    return 0.0 if total == 0 else 1.0 - real / total


# --------------------------------------------------------------------------- row operations


def _map_fields(batch: Batch, fn: Any) -> Batch:
    return Batch(*(None if value is None else fn(value) for value in batch))


def _check_indices(indices: object, rows: int) -> torch.Tensor:
    if isinstance(indices, torch.Tensor):
        tensor = indices.detach().cpu()
    else:
        try:
            tensor = torch.as_tensor(np.asarray(list(indices)))
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"indices must be a sequence of ints, got {type(indices).__name__}"
            ) from error
    if tensor.dim() != 1 or tensor.numel() == 0:
        raise ValueError(
            f"indices must be a non-empty 1-D sequence, got shape {list(tensor.shape)}"
        )
    if not _is_int(tensor):
        raise TypeError(f"indices must be integers, got dtype {tensor.dtype}")
    tensor = tensor.long()
    bad = (tensor < 0) | (tensor >= rows)
    if bool(bad.any()):
        raise ValueError(
            f"indices must be in [0, {rows}) for a batch of {rows} rows, got {int(tensor[bad][0])}"
        )
    return tensor


def select_batch(batch: Batch, indices: Sequence[int] | torch.Tensor) -> Batch:
    """The rows ``indices`` of ``batch``, in that order (repeats allowed): ``out.x = x[indices]``.

    Widths are kept (call ``trim_padding`` to drop columns that became all padding).

    Args:
      batch: a ``Batch`` of ``B`` rows.
      indices: a non-empty 1-D sequence or tensor of ints in ``[0, B)``.
    Returns:
      a ``Batch`` of ``len(indices)`` rows.
    """
    rows, _, _ = _check_batch(batch)
    index = _check_indices(indices, rows)
    return _map_fields(batch, lambda x: x.index_select(0, index.to(x.device)))


def _pad_columns(x: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    missing = width - x.shape[1]
    if missing == 0:
        return x
    fill = torch.full((x.shape[0], missing), value, dtype=x.dtype, device=x.device)
    return torch.cat([fill, x] if left else [x, fill], dim=1)


def concatenate_batches(batches: Sequence[Batch], pad_token_id: int = 0) -> Batch:
    """Stacks the rows of several batches, re-padding to the widest prompt and completion.

    With ``Tp = max_i Tp_i`` and ``Tc = max_i Tc_i``: prompts are padded on the left with
    ``pad_token_id`` to ``Tp``, completions and every ``[B, Tc]`` field on the right (ids with
    ``pad_token_id``, masks and floats with 0) to ``Tc``; ``[B]`` fields are concatenated.

    Args:
      batches: a non-empty sequence of ``Batch``. A field that is ``None`` must be ``None`` in
        every batch, and ``advantages`` / ``returns`` / ``values`` must be ``[B]`` in all or
        ``[B, Tc]`` in all.
      pad_token_id: the id written in new padding positions (only the masks say what is real,
        so this only matters for comparing ids; use the tokenizer's pad id).
    Returns:
      a ``Batch`` of ``Σ_i B_i`` rows.
    """
    if isinstance(batches, Batch) or not isinstance(batches, Sequence):
        raise TypeError(f"batches must be a sequence of Batch, got {type(batches).__name__}")
    if len(batches) == 0:
        raise ValueError("batches must not be empty")
    pad = check_int("pad_token_id", pad_token_id, 0)
    shapes = []
    for index, batch in enumerate(batches):
        shape = _check_batch(batch, f"batches[{index}]")
        _check_padding_sides(batch, shape[1], f"batches[{index}]")
        shapes.append(shape)
    tp = max(s[1] for s in shapes)
    tc = max(s[2] for s in shapes)

    fields = {}
    for field_index, field in enumerate(Batch._fields):
        values = [batch[field_index] for batch in batches]
        present = [v is not None for v in values]
        if not any(present):
            fields[field] = None
            continue
        if not all(present):
            raise ValueError(
                f"batch field {field!r} is None in batches "
                f"{[i for i, p in enumerate(present) if not p]} but not in the others: it must "
                "be None in all or none"
            )
        dims = {v.dim() for v in values}
        if len(dims) != 1:
            raise ValueError(
                f"batch field {field!r} is [B] in some batches and [B, Tc] in others; "
                "give it one shape everywhere"
            )
        devices = {v.device for v in values}
        if len(devices) != 1:
            raise ValueError(
                f"batch field {field!r} is on several devices: {sorted(map(str, devices))}"
            )
        padded = []
        for (_, tp_i, tc_i), value in zip(shapes, values, strict=True):
            kind = _field_kind(field, value, tp_i, tc_i)
            fill = pad if field in ("prompt_ids", "completion_ids") else 0
            if kind == "prompt":
                value = _pad_columns(value, tp, fill, left=True)
            elif kind == "completion":
                value = _pad_columns(value, tc, fill, left=False)
            elif kind == "full":
                value = torch.cat(
                    [
                        _pad_columns(value[:, :tp_i], tp, 0, left=True),
                        _pad_columns(value[:, tp_i:], tc, 0, left=False),
                    ],
                    dim=1,
                )
            padded.append(value)
        fields[field] = torch.cat(padded, dim=0)
    return Batch(**fields)


def shuffle_batch(batch: Batch, seed: int) -> Batch:
    """The rows of ``batch`` in a random order that depends only on ``seed``.

    ``perm = torch.randperm(B, generator=torch.Generator().manual_seed(seed))`` and
    ``out = select_batch(batch, perm)``; a local generator, so the global RNG is untouched.

    Args:
      batch: a ``Batch``. seed: an int in ``[0, 2**64)``.
    """
    rows, _, _ = _check_batch(batch)
    seed = _check_seed("seed", seed)
    return select_batch(batch, _permutation(rows, seed))


def _permutation(size: int, seed: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))


def trim_padding(batch: Batch) -> Batch:
    """Drops the prompt columns that are padding in every row (on the left) and the completion
    columns that are padding in every row (on the right).

    Afterwards ``Tp = max_b n_b`` and ``Tc = max_b m_b`` (real lengths); every ``[B, Tc]``
    field is cut like ``completion_ids``. Returns ``batch`` itself when nothing is dropped.
    """
    prompt_lengths, completion_lengths = _checked_lengths(batch)
    tp, tc = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    keep_prompt = int(prompt_lengths.max()) if prompt_lengths.numel() else 0
    keep_completion = int(completion_lengths.max()) if completion_lengths.numel() else 0
    if keep_prompt == tp and keep_completion == tc:
        return batch
    start = tp - keep_prompt
    fields = {}
    for field, value in zip(batch._fields, batch, strict=True):
        if value is None:
            fields[field] = None
            continue
        kind = _field_kind(field, value, tp, tc)
        if kind == "prompt":
            value = value[:, start:]
        elif kind == "completion":
            value = value[:, :keep_completion]
        elif kind == "full":
            value = value[:, start : tp + keep_completion]
        fields[field] = value
    return Batch(**fields)


def _group_runs(group_ids: torch.Tensor) -> list[list[int]]:
    """Rows of each group in order of first appearance (rows of a group need not be adjacent)."""
    order: dict[int, list[int]] = {}
    for row, group in enumerate(group_ids.tolist()):
        order.setdefault(group, []).append(row)
    return list(order.values())


def split_minibatches(
    batch: Batch,
    size: int,
    shuffle_seed: int | None = None,
    *,
    keep_groups: bool = False,
) -> list[Batch]:
    """Cuts ``batch`` into minibatches of ``size`` rows (the last may be smaller), each trimmed.

    With ``shuffle_seed`` the rows are first permuted by ``torch.randperm(B, generator=
    Generator().manual_seed(shuffle_seed))``; otherwise they keep their order. Rows of a group
    may land in different minibatches: that is fine when advantages were computed on the whole
    batch first (as ``rlprim`` does). With ``keep_groups=True`` whole groups stay together:
    every group (rows sharing a ``group_id``) must have the same size ``G``, ``size`` must be a
    multiple of ``G``, and the seed permutes groups instead of rows.

    Args:
      batch: a ``Batch`` of ``B`` rows.
      size: rows per minibatch, ``>= 1``.
      shuffle_seed: ``None`` (keep order) or an int seed.
      keep_groups: keep each group's rows in one minibatch.
    Returns:
      ``ceil(B / size)`` batches, each passed through ``trim_padding``; every row appears in
      exactly one of them.
    """
    rows, _, _ = _check_batch(batch)
    size = check_int("size", size, 1)
    if shuffle_seed is not None:
        shuffle_seed = _check_seed("shuffle_seed", shuffle_seed)
    if keep_groups:
        if batch.group_ids is None:
            raise ValueError("keep_groups=True needs batch.group_ids, got None")
        groups = _group_runs(batch.group_ids)
        group_sizes = sorted({len(g) for g in groups})
        if len(group_sizes) != 1:
            raise ValueError(f"keep_groups=True needs groups of one size, got sizes {group_sizes}")
        if size % group_sizes[0]:
            raise ValueError(
                f"keep_groups=True needs size to be a multiple of the group size "
                f"{group_sizes[0]}, got size={size}"
            )
        if shuffle_seed is not None:
            groups = [groups[i] for i in _permutation(len(groups), shuffle_seed).tolist()]
        order = [row for group in groups for row in group]
    elif shuffle_seed is not None:
        order = _permutation(rows, shuffle_seed).tolist()
    else:
        order = list(range(rows))
    return [
        trim_padding(select_batch(batch, order[start : start + size]))
        for start in range(0, rows, size)
    ]


# --------------------------------------------------------------------------- length packing


def pack_by_length_indices(
    prompt_lengths: Sequence[int] | torch.Tensor,
    completion_lengths: Sequence[int] | torch.Tensor,
    max_tokens: int | None = None,
    max_sequences: int | None = None,
    overhead_tokens: float | None = None,
) -> list[list[int]]:
    """Plans length-bucketed micro-batches: which rows go together so little padding is computed.

    A micro-batch ``S`` trimmed to its own lengths computes ``|S| · (max_{b∈S} n_b +
    max_{b∈S} m_b)`` positions (prompt length ``n``, completion length ``m``). Rows are sorted
    by completion length, then prompt length (both descending; ties by index), and cut into
    contiguous runs that minimise, exactly by dynamic programming,

        Σ_S |S| · (max n + max m)  +  λ · (number of micro-batches)

    subject to ``|S| · (max n + max m) ≤ max_tokens`` and ``|S| ≤ max_sequences``. ``λ =
    overhead_tokens`` is what one more forward/backward call costs, in padded positions: a
    larger ``λ`` gives fewer, fuller micro-batches with more padding; ``λ = inf`` gives the
    fewest micro-batches the limits allow (and the least padding among those).

    Args:
      prompt_lengths / completion_lengths: ``[B]`` real lengths (see ``sequence_lengths``).
      max_tokens: memory budget per micro-batch in positions (padding included); every single
        row must fit (``n_b + m_b ≤ max_tokens``).
      max_sequences: most rows per micro-batch. At least one of the two limits is required.
      overhead_tokens: λ ≥ 0. ``None`` gives ``DEFAULT_OVERHEAD_TOKENS`` (256) when
        ``max_tokens`` is set — an extra call is worth it when it saves more than 256 padded
        positions, so ``max_tokens`` only caps memory and the split follows the lengths — and
        ``inf`` when only ``max_sequences`` is set (``ceil(B / max_sequences)`` micro-batches,
        as a fixed micro-batch size promises). ``0`` gives no padding at all (equal-length
        rows share a micro-batch, others do not).
    Returns:
      a list of micro-batches, longest first, each a sorted list of row indices; every row in
      ``range(B)`` appears exactly once.
    Raises:
      ValueError / TypeError: lengths of different sizes or negative, no rows, no limit, a
        limit < 1, a row longer than ``max_tokens``, a negative ``overhead_tokens``.
    """
    prompt, completion, max_tokens, max_sequences, overhead = _check_pack_arguments(
        prompt_lengths, completion_lengths, max_tokens, max_sequences, overhead_tokens
    )
    rows = prompt.shape[0]
    order = np.lexsort((np.arange(rows), -prompt, -completion))
    window = rows if max_sequences is None else min(rows, max_sequences)
    start_of = _cheapest_runs(prompt[order], completion[order], window, max_tokens, overhead)
    plan = []
    end = rows
    while end > 0:
        start = int(start_of[end])
        plan.append(sorted(int(i) for i in order[start:end]))
        end = start
    return plan[::-1]


def _check_pack_arguments(
    prompt_lengths: object,
    completion_lengths: object,
    max_tokens: object,
    max_sequences: object,
    overhead_tokens: object,
) -> tuple[np.ndarray, np.ndarray, int | None, int | None, float]:
    """``pack_by_length_indices``' arguments checked, and λ resolved from its default."""
    prompt = _check_lengths("prompt_lengths", prompt_lengths)
    completion = _check_lengths("completion_lengths", completion_lengths)
    if prompt.shape != completion.shape:
        raise ValueError(
            f"prompt_lengths and completion_lengths must have the same size, got "
            f"{prompt.shape[0]} and {completion.shape[0]}"
        )
    rows = prompt.shape[0]
    if rows == 0:
        raise ValueError("there are no rows to pack (empty lengths)")
    if max_tokens is None and max_sequences is None:
        raise ValueError("give max_tokens and/or max_sequences, got neither")
    if max_tokens is not None:
        max_tokens = check_int("max_tokens", max_tokens, 1)
        widths = prompt + completion
        longest = int(np.argmax(widths))
        if widths[longest] > max_tokens:
            raise ValueError(
                f"max_tokens={max_tokens} is smaller than row {longest}, which has "
                f"{int(widths[longest])} tokens ({int(prompt[longest])} prompt + "
                f"{int(completion[longest])} completion); raise max_tokens"
            )
    if max_sequences is not None:
        max_sequences = check_int("max_sequences", max_sequences, 1)
    if overhead_tokens is None:
        overhead = DEFAULT_OVERHEAD_TOKENS if max_tokens is not None else math.inf
    else:
        if isinstance(overhead_tokens, bool) or not isinstance(overhead_tokens, (int, float)):
            raise TypeError(
                f"overhead_tokens must be a number, got {type(overhead_tokens).__name__}"
            )
        if not overhead_tokens >= 0:  # also rejects NaN
            raise ValueError(f"overhead_tokens must be >= 0, got {overhead_tokens}")
        overhead = float(overhead_tokens)
    return prompt, completion, max_tokens, max_sequences, overhead


def _cheapest_runs(
    sorted_prompt: np.ndarray,
    sorted_completion: np.ndarray,
    window: int,
    max_tokens: int | None,
    overhead: float,
) -> np.ndarray:
    """``start_of[j]``: where the last run of the best plan of the first ``j`` sorted rows
    starts (dynamic programming over contiguous runs of at most ``window`` rows)."""
    rows = sorted_prompt.shape[0]
    # best[j]: the best plan of the first j sorted rows as (micro-batches, padded positions).
    count = np.zeros(rows + 1, dtype=np.int64)
    area = np.zeros(rows + 1, dtype=np.float64)
    start_of = np.zeros(rows + 1, dtype=np.int64)
    for end in range(1, rows + 1):
        lo = max(0, end - window)
        starts = np.arange(lo, end)
        # Completions are sorted descending, so a run's longest completion is its first row's.
        prompt_max = np.maximum.accumulate(sorted_prompt[lo:end][::-1])[::-1]
        cost = (end - starts) * (prompt_max + sorted_completion[lo:end])
        if max_tokens is not None:
            # cost only grows as the run extends to the left: the feasible starts are a suffix.
            feasible = cost <= max_tokens
            first = int(np.argmax(feasible))
            starts, cost = starts[first:], cost[first:]
        total_count = count[starts] + 1
        total_area = area[starts] + cost
        if math.isinf(overhead):
            best = int(np.lexsort((total_area, total_count))[0])
        else:
            best = int(np.lexsort((total_count, total_area + overhead * total_count))[0])
        count[end], area[end], start_of[end] = total_count[best], total_area[best], starts[best]
    return start_of


def _check_lengths(name: str, lengths: object) -> np.ndarray:
    if isinstance(lengths, torch.Tensor):
        array = lengths.detach().cpu().numpy()
    else:
        try:
            array = np.asarray(list(lengths))
        except TypeError as error:
            raise TypeError(
                f"{name} must be a sequence of ints, got {type(lengths).__name__}"
            ) from error
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must be a 1-D sequence of ints, got {array.dtype} {array.shape}")
    if (array < 0).any():
        raise ValueError(f"{name} must be >= 0, got {int(array.min())}")
    return array.astype(np.int64)


def pack_by_length(
    batch: Batch,
    max_tokens: int | None = None,
    max_sequences: int | None = None,
    overhead_tokens: float | None = None,
) -> list[Batch]:
    """Length-bucketed micro-batches of ``batch``, so long and short rows are not padded together.

    ``[trim_padding(select_batch(batch, rows)) for rows in pack_by_length_indices(
    *sequence_lengths(batch), max_tokens, max_sequences, overhead_tokens)]`` — see
    ``pack_by_length_indices`` for the plan and its objective. Call that function directly to
    know which rows went where. Each micro-batch has at most ``max_tokens`` positions
    (``B_i · (Tp_i + Tc_i)``) and at most ``max_sequences`` rows.

    In gradient accumulation, weight micro-batch ``i``'s loss by
    ``microbatch_loss_weights(micro_batches, mode)[i]`` (and, for ``seq-mean-token-sum-norm``,
    pass the whole batch's ``norm_length``) so the summed gradient equals the full batch's.

    Returns:
      micro-batches, longest first; each row of ``batch`` is in exactly one of them.
    """
    prompt_lengths, completion_lengths = _checked_lengths(batch)
    plan = pack_by_length_indices(
        prompt_lengths, completion_lengths, max_tokens, max_sequences, overhead_tokens
    )
    return [trim_padding(select_batch(batch, rows)) for rows in plan]


def _loss_shares(micro_batches: Sequence[Batch], mode: str) -> tuple[list[float], list[float]]:
    """Per micro-batch ``(normaliser share, rows)``: ``N_i``, ``S_i`` or ``B_i`` by ``mode``."""
    if isinstance(micro_batches, Batch) or not isinstance(micro_batches, Sequence):
        raise TypeError(
            f"micro_batches must be a sequence of Batch, got {type(micro_batches).__name__}"
        )
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"mode must be one of {LOSS_AGG_MODES}, got {mode!r}")
    row_counts, shares = [], []
    for index, batch in enumerate(micro_batches):
        rows, _, _ = _check_batch(batch, f"micro_batches[{index}]")
        trainable = batch.completion_mask != 0
        row_counts.append(float(rows))
        if mode == "token-mean":
            shares.append(float(trainable.sum()))
        elif mode == "seq-mean-token-mean":
            shares.append(float(trainable.any(dim=1).sum()))
        else:
            shares.append(float(rows))
    return shares, row_counts


def microbatch_loss_totals(micro_batches: Sequence[Batch], mode: str) -> tuple[float, float]:
    """``(Σ_i share_i, Σ_i B_i)``: the loss normaliser of ``micro_batches`` and their row count.

    ``share_i`` is ``N_i`` (trainable tokens) for ``token-mean``, ``S_i`` (rows with a trainable
    token) for ``seq-mean-token-mean`` and ``B_i`` (rows) for the ``seq-mean-token-sum`` modes.
    In data-parallel training every rank computes its own totals, they are summed over ranks,
    and the sums are the ``global_totals`` of ``microbatch_loss_weights``. Empty input: (0, 0).
    """
    shares, row_counts = _loss_shares(micro_batches, mode)
    return float(sum(shares)), float(sum(row_counts))


def microbatch_loss_weights(
    micro_batches: Sequence[Batch],
    mode: str,
    global_totals: tuple[float, float] | None = None,
) -> list[float]:
    """Weights ``w_i`` that make the accumulated micro-batch loss equal the full-batch loss.

    For micro-batches partitioning the rows of a batch, with ``N_i`` = trainable tokens
    (``Σ completion_mask``), ``S_i`` = rows with at least one trainable token and ``B_i`` = rows
    of micro-batch ``i``::

        token-mean               w_i = N_i / Σ_j N_j
        seq-mean-token-mean      w_i = S_i / Σ_j S_j
        seq-mean-token-sum       w_i = B_i / Σ_j B_j
        seq-mean-token-sum-norm  w_i = B_i / Σ_j B_j   (with the same norm_length L everywhere)

    so that ``Σ_i w_i · aggregate_loss(l_i, m_i, mode, L) == aggregate_loss(l, m, mode, L)``
    (and likewise for the gradients). In ``seq-mean-token-sum-norm`` the constant ``L`` must be
    the whole batch's (``norm_length`` or its ``Tc``), not each trimmed micro-batch's own ``Tc``.
    When the normaliser is 0 (no trainable token at all) the full loss is 0 and the weights
    fall back to ``B_i / Σ_j B_j``.

    Data parallelism: when the batch is spread over ranks, ``Σ_j`` must run over *every
    rank's* micro-batches. Pass ``global_totals = (Σ_j share_j, Σ_j B_j)`` summed over all
    ranks (each rank's ``microbatch_loss_totals``, all-reduced): then ``w_i = share_i /
    global_totals[0]`` (or ``B_i / global_totals[1]`` when the global normaliser is 0), the
    weights of all ranks together sum to 1, and summing the ranks' weighted gradients gives the
    gradient of the global batch's loss — e.g. the token-mean over all ranks' tokens, not a
    mean of rank means. A rank may then hold no micro-batch at all (``[]`` gives ``[]``).

    Args:
      micro_batches: a sequence of ``Batch`` (e.g. from ``pack_by_length`` or
        ``split_minibatches``); non-empty unless ``global_totals`` is given.
      mode: one of ``"token-mean"``, ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"``,
        ``"seq-mean-token-sum-norm"``.
      global_totals: ``(normaliser, rows)`` of the global batch, or ``None`` when
        ``micro_batches`` are the whole batch.
    Returns:
      one float per micro-batch; they sum to 1 (over all ranks with ``global_totals``).
    """
    shares, row_counts = _loss_shares(micro_batches, mode)
    if global_totals is None:
        if len(shares) == 0:
            raise ValueError("micro_batches must not be empty")
        total = sum(shares)
        if total == 0:
            shares, total = row_counts, sum(row_counts)
        return [share / total for share in shares]
    if (
        not isinstance(global_totals, (tuple, list))
        or len(global_totals) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in global_totals)
    ):
        raise TypeError(
            f"global_totals must be a pair of numbers (normaliser, rows), got {global_totals!r}"
        )
    normaliser, rows = float(global_totals[0]), float(global_totals[1])
    if normaliser < sum(shares) or rows < sum(row_counts) or not math.isfinite(normaliser + rows):
        raise ValueError(
            f"global_totals {tuple(global_totals)} must be at least this rank's own totals "
            f"({sum(shares)}, {sum(row_counts)})"
        )
    if normaliser == 0:
        return [count / rows for count in row_counts]
    return [share / normaliser for share in shares]


# --------------------------------------------------------------------------- devices


def batch_to_device(batch: Batch, device: str | torch.device) -> Batch:
    """Every tensor of ``batch`` on ``device`` (dtypes unchanged; ``None`` fields stay ``None``).

    Returns ``batch`` itself when everything already lives there.
    """
    _check_batch(batch)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch device or its name, got {device!r}") from error
    if all(value is None or value.device == device for value in batch):
        return batch
    return _map_fields(batch, lambda x: x.to(device))
