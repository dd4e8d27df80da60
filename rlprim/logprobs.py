"""Token log-probabilities, logits and entropies from a causal LM, without the [B, T, V] blow-up.

Policy-gradient losses need ``log π(y_t | x, y_<t)`` for the sampled tokens only. Taking a full
``log_softmax`` over the vocabulary materialises ``B·T·V`` floats (4 × 512 × 151,936 × 4 bytes
= 1.2 GB for one Qwen-sized batch, twice over with the logits). Here we instead

1. run the model's backbone once to get the final hidden states ``h`` ``[B, T, H]``;
2. apply the LM head ``W`` to a chunk of positions at a time, ``z = (h W^T + b) / τ`` ``[C, V]``;
3. keep only ``log softmax(z)[y] = z[y] - logsumexp(z)`` (the *selective* log-softmax) and, on
   request, the entropy ``-Σ_v p_v log p_v``, in float32;

so only the ``[C, V]`` buffers of one chunk (its logits and log-softmax) are alive at a time.
When gradients are needed every chunk runs under ``torch.utils.checkpoint``: the backward pass
recomputes the chunk's logits instead of storing them, so training memory also stays at one
chunk (at the cost of one extra head matmul). ``benchmarks/bench_logprobs.py`` measures it.

Conventions. ``input_ids`` ``[B, T]`` is ``[left-padded prompt | right-padded completion]``;
``attention_mask`` marks real tokens. Positions follow Hugging Face ``generate`` exactly:
``position_ids = cumsum(attention_mask) - 1``, set to 0 on padding, so the log-probs equal those
seen at sampling time. Output column ``j`` holds ``log p(target_j | everything before it)``:
with ``completion_length=None`` the targets are ``input_ids[:, 1:]`` (``N = T - 1`` columns);
with ``completion_length=Tc`` they are the last ``Tc`` tokens (``N = Tc``) and the LM head runs
only on the ``Tc`` positions that predict them. Entries whose target is padding, whose context
position is padding, or where ``completion_mask`` is 0 are exactly 0 (and are not computed).

Log-probs are taken at the sampling temperature τ (``softmax(logits / τ)``), the same in
generation and training (cf. the temperature handling of DAPO, Yu et al. 2025, and the
importance-ratio requirement of PPO, Schulman et al. 2017).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rlprim.model_wrappers import is_fsdp_module, unwrap_model

__all__ = [
    "FUSED_HEAD_MODEL_TYPES",
    "get_logprobs",
    "get_logits",
    "get_reference_logprobs",
    "gather_logprobs",
    "compute_entropy",
    "default_chunk_size",
]

# Architectures whose logits are exactly ``lm_head(base_model(...).last_hidden_state)`` with
# ``lm_head`` an ``nn.Linear``: get_logprobs runs backbone and head separately for these. Others
# (e.g. Gemma 2/3 soft-capping, Cohere's logit_scale, Granite's logits_scaling) take the
# fallback: one full forward, then the same chunked selective log-softmax on its logits.
FUSED_HEAD_MODEL_TYPES = (
    "qwen2",
    "qwen3",
    "qwen2_moe",
    "qwen3_moe",
    "llama",
    "mistral",
    "mixtral",
    "gpt2",
    "gpt_neox",
    "phi",
    "phi3",
    "olmo",
    "olmo2",
    "starcoder2",
    "stablelm",
    "smollm3",
)

# Target logits elements per chunk when chunk_size is None: 2**24 floats = 64 MB in float32.
_DEFAULT_CHUNK_ELEMENTS = 1 << 24


def default_chunk_size(vocab_size: int) -> int:
    """Positions per chunk used when ``chunk_size=None``: ``max(1, 2**24 // V)``.

    One chunk's logits then take about 64 MB in float32 whatever the vocabulary (110 positions
    at V = 151,936; 32,768 at V = 512, i.e. small models run in one chunk).
    """
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    return max(1, _DEFAULT_CHUNK_ELEMENTS // vocab_size)


# --- validation ---------------------------------------------------------------------------------


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_inputs(
    input_ids: Any,
    attention_mask: Any,
    completion_length: int | None,
    completion_mask: Any,
) -> int:
    """Validates the batch and returns N, the number of output columns."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    batch, length = input_ids.shape
    if batch < 1 or length < 2:
        raise ValueError(
            f"input_ids must have B >= 1 rows and T >= 2 tokens, got {tuple(input_ids.shape)}"
        )
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}"
        )
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    if completion_length is None:
        num_columns = length - 1
    else:
        if isinstance(completion_length, bool) or not isinstance(completion_length, int):
            raise TypeError(
                f"completion_length must be an int or None, got {type(completion_length).__name__}"
            )
        if not 1 <= completion_length <= length - 1:
            raise ValueError(
                f"completion_length must be in [1, T - 1] = [1, {length - 1}], "
                f"got {completion_length}"
            )
        num_columns = completion_length
    if completion_mask is not None:
        if not isinstance(completion_mask, torch.Tensor):
            raise TypeError(
                f"completion_mask must be a torch.Tensor or None, "
                f"got {type(completion_mask).__name__}"
            )
        if tuple(completion_mask.shape) != (batch, num_columns):
            raise ValueError(
                f"completion_mask must have the output shape [B, N] = {(batch, num_columns)} "
                f"(N = completion_length, or T - 1 without it), got {tuple(completion_mask.shape)}"
            )
    return num_columns


def _check_logits(logits: Any, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")


# --- the chunked selective log-softmax ----------------------------------------------------------


def _chunk_statistics(
    rows: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module | None,
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` and (optionally) entropy for one chunk of ``[C, H]`` or ``[C, V]``.

    ``rows`` are hidden states when ``head`` is given, else logits already.
    """
    logits = rows if head is None else head(rows)
    # Upcast like HF generate does before its temperature warper; scale in place when that is
    # safe (a fresh tensor) to keep one [C, V] buffer instead of two.
    scaled = logits.float()
    fresh = scaled is not rows
    if temperature != 1.0:
        scaled = scaled.div_(temperature) if fresh else scaled / temperature
    # The fused log-softmax kernel on one [C, V] chunk is about twice as fast on CPU as
    # logsumexp (which runs max, subtract, exp, sum and log as separate passes).
    chunk_log_probs = torch.log_softmax(scaled, dim=-1)
    logprobs = chunk_log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logprobs, logprobs.new_zeros(())
    # -Σ p log p from log-probs: no cancellation between two large terms.
    entropy = -(chunk_log_probs.exp() * chunk_log_probs).sum(-1)
    return logprobs, entropy


def _chunked_statistics(
    rows: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module | None,
    temperature: float,
    chunk_size: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs ``_chunk_statistics`` over ``rows`` ``[R, ·]`` in chunks; returns ``[R]`` tensors."""
    needs_grad = torch.is_grad_enabled() and (
        rows.requires_grad or (head is not None and any(p.requires_grad for p in head.parameters()))
    )
    logprob_chunks, entropy_chunks = [], []
    for start in range(0, rows.shape[0], chunk_size):
        args = (rows[start : start + chunk_size], targets[start : start + chunk_size])
        if needs_grad:
            # Recompute the chunk's logits in backward instead of keeping all [R, V] of them.
            logprobs, entropy = checkpoint(
                _chunk_statistics,
                *args,
                head,
                temperature,
                with_entropy,
                use_reentrant=False,
                preserve_rng_state=False,
            )
        else:
            logprobs, entropy = _chunk_statistics(*args, head, temperature, with_entropy)
        logprob_chunks.append(logprobs)
        entropy_chunks.append(entropy)
    if not logprob_chunks:
        empty = rows.new_zeros((0,), dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    logprobs = torch.cat(logprob_chunks)
    return logprobs, (torch.cat(entropy_chunks) if with_entropy else None)


def gather_logprobs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Selective log-softmax: ``log softmax(logits / τ)[..., token_ids]`` without ``[..., V]`` output.

    ``out[i] = z_i[y_i] - log Σ_v exp(z_{i,v})`` with ``z = logits / τ``, computed in float32 over
    chunks of ``chunk_size`` rows (a log-softmax of one ``[chunk, V]`` block at a time,
    checkpointed when gradients are needed so backward also holds one block).

    Args:
      logits: ``[..., V]`` unnormalised scores.
      token_ids: ``[...]`` integer ids in ``[0, V)``.
      temperature: τ > 0.
      chunk_size: rows per chunk; ``None`` = ``default_chunk_size(V)``.

    Returns:
      ``[...]`` float32 log-probs (differentiable w.r.t. ``logits``).
    """
    _check_logits(logits)
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    if not isinstance(token_ids, torch.Tensor) or token_ids.shape != logits.shape[:-1]:
        shape = tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor) else token_ids
        raise ValueError(
            f"token_ids must be a tensor of shape {tuple(logits.shape[:-1])} (logits without "
            f"the vocab dim), got {shape}"
        )
    vocab = logits.shape[-1]
    chunk = default_chunk_size(vocab) if chunk_size is None else chunk_size
    logprobs, _ = _chunked_statistics(
        logits.reshape(-1, vocab), token_ids.reshape(-1).long(), None, temperature, chunk, False
    )
    return logprobs.reshape(token_ids.shape)


def compute_entropy(
    logits: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-position entropy of ``softmax(logits / τ)``, chunked over positions.

    ``H = -Σ_v p_v log p_v`` with ``p = softmax(z)``, ``z = logits / τ``, computed from
    ``log p = log_softmax(z)`` (no cancellation between large terms). Float32; at most
    ``chunk_size`` rows of ``[V]`` temporaries at a time (checkpointed under autograd). The
    entropy bonus of PPO (Schulman et al. 2017) and the entropy monitoring of DAPO use it.

    Args:
      logits: ``[..., V]``.
      temperature: τ > 0.
      chunk_size: rows per chunk; ``None`` = ``default_chunk_size(V)``.

    Returns:
      ``[...]`` float32 entropies in nats, in ``[0, log V]``.
    """
    _check_logits(logits)
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    vocab = logits.shape[-1]
    chunk = default_chunk_size(vocab) if chunk_size is None else chunk_size
    flat = logits.reshape(-1, vocab)
    dummy_targets = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
    _, entropy = _chunked_statistics(flat, dummy_targets, None, temperature, chunk, True)
    return entropy.reshape(logits.shape[:-1])


# --- running the model ---------------------------------------------------------------------------


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Exactly HF generate's rule (GenerationMixin._prepare_position_ids_for_generation).
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _unwrap_peft(model: nn.Module) -> nn.Module:
    # A peft model injects its adapters in place; its base transformers model runs them.
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """``(backbone, lm_head)`` when logits are exactly ``lm_head(backbone(...)[0])``, else None."""
    inner = _unwrap_peft(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type not in FUSED_HEAD_MODEL_TYPES or is_fsdp_module(inner):
        # FSDP2: the root unit gathers the embeddings and head only in the model's own forward.
        return None
    backbone = getattr(inner, "base_model", None)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if backbone is None or backbone is inner or not isinstance(head, nn.Linear):
        return None
    return backbone, head


def _model_kwargs(module: nn.Module, input_ids, attention_mask) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if _accepts(module, "position_ids"):
        kwargs["position_ids"] = _position_ids(attention_mask)
    if _accepts(module, "use_cache"):
        kwargs["use_cache"] = False  # a KV cache would only cost memory here
    return kwargs


def _vocab_size(model: nn.Module, parts: tuple[nn.Module, nn.Linear] | None) -> int | None:
    if parts is not None:
        return parts[1].out_features
    config = getattr(_unwrap_peft(model), "config", None)
    return getattr(config, "vocab_size", None)


def _hidden_or_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_columns: int,
) -> tuple[torch.Tensor, nn.Linear | None]:
    """``[B, N, H]`` hidden states predicting the last N tokens and the head, or ``[B, N, V]``
    logits and None on the fallback path."""
    length = input_ids.shape[1]
    # A DDP wrapper's forward hides the HF signature (position_ids, logits_to_keep); rlprim
    # synchronises gradients itself, once per step (rlprim.distributed.synchronize_gradients).
    model = unwrap_model(model)
    parts = _backbone_and_head(model)
    vocab = _vocab_size(model, parts)
    if vocab is not None:
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(
                f"input_ids must lie in [0, vocab_size) = [0, {vocab}), got values in "
                f"[{low}, {high}]"
            )
    if parts is not None:
        backbone, head = parts
        output = backbone(**_model_kwargs(backbone, input_ids, attention_mask))
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        return hidden[:, length - num_columns - 1 : length - 1], head
    kwargs = _model_kwargs(model, input_ids, attention_mask)
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = num_columns + 1
    output = model(**kwargs)
    logits = output[0] if isinstance(output, tuple) else output.logits
    return logits[:, logits.shape[1] - num_columns - 1 : logits.shape[1] - 1], None


def get_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    completion_length: int | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs ``log softmax(logits / τ)[y_t]`` of the given tokens, memory-efficiently.

    ``logp_t = z_{t-1}[y_t] - logsumexp(z_{t-1})`` with ``z = lm_head(h) / τ`` (float32), where
    ``h`` are the backbone's hidden states computed with HF-generate position ids. Never
    materialises a ``[B, T, V]`` log-softmax nor (for ``FUSED_HEAD_MODEL_TYPES``) ``[B, T, V]``
    logits: the head runs on ``chunk_size`` positions at a time, checkpointed under autograd so
    backward keeps one chunk too. Other architectures fall back to one full forward (logits
    materialised, limited to the last ``Tc + 1`` positions when the model accepts
    ``logits_to_keep``), then the same chunked selective log-softmax. With ``return_entropy``,
    also the entropy ``-Σ_v p_v log p_v`` (``p = softmax(z)``) of the same positions, from the
    same chunks (no second pass). Used for the importance ratio of PPO (Schulman et al. 2017)
    and its descendants (GRPO, Shao et al. 2024; DAPO, Yu et al. 2025).

    Args:
      model: a Hugging Face causal LM (optionally peft- or DDP-wrapped: a
        ``DistributedDataParallel`` wrapper is unwrapped, its gradients are synchronised by
        ``training_step``); used in its current train/eval mode, gradients flow when enabled.
      input_ids: ``[B, T]`` token ids, ``[left-padded prompt | right-padded completion]``.
      attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding.
      completion_mask: ``[B, N]`` (the output shape); entries where it is 0 are 0 in the output
        and skipped; the output is multiplied by it.
      temperature: τ > 0, the sampling temperature.
      chunk_size: positions per head chunk; ``None`` = ``default_chunk_size(V)`` (≈ 64 MB of
        float32 logits per chunk).
      completion_length: ``Tc``: return log-probs of the last ``Tc`` tokens only (``N = Tc``),
        running the head on those positions only. ``None``: all tokens after the first
        (``N = T - 1``; column ``t - 1`` holds ``log p(input_ids[:, t] | input_ids[:, :t])``).
      return_entropy: also return the ``[B, N]`` per-position entropies.

    Returns:
      ``[B, N]`` float32 log-probs, or ``(logprobs, entropy)`` when ``return_entropy``. An entry
      is 0 when its target token or its context position is padding, or ``completion_mask`` is 0.
    """
    num_columns = _check_inputs(input_ids, attention_mask, completion_length, completion_mask)
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    batch, length = input_ids.shape
    start = length - num_columns
    valid = attention_mask[:, start:].bool() & attention_mask[:, start - 1 : length - 1].bool()
    if completion_mask is not None:
        valid = valid & (completion_mask != 0)

    states, head = _hidden_or_logits(model, input_ids, attention_mask, num_columns)
    width = states.shape[-1]
    vocab = head.out_features if head is not None else width
    chunk = default_chunk_size(vocab) if chunk_size is None else chunk_size
    rows_index = valid.reshape(-1).nonzero().squeeze(1)
    rows = states.reshape(batch * num_columns, width).index_select(0, rows_index)
    targets = input_ids[:, start:].reshape(-1).index_select(0, rows_index).long()
    row_logprobs, row_entropy = _chunked_statistics(
        rows, targets, head, temperature, chunk, return_entropy
    )

    def scatter(values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros(batch * num_columns).index_copy(0, rows_index, values)
        out = out.reshape(batch, num_columns)
        return out if completion_mask is None else out * completion_mask.to(out.dtype)

    logprobs = scatter(row_logprobs)
    if return_entropy:
        assert row_entropy is not None
        return logprobs, scatter(row_entropy)
    return logprobs


def get_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    completion_length: int | None = None,
) -> torch.Tensor:
    """Temperature-scaled logits aligned with ``get_logprobs``: ``[B, N, V]`` float32.

    ``out[:, j] = logits / τ`` at the position that predicts ``get_logprobs``' column ``j``, so
    ``log_softmax(out, -1).gather(-1, targets)`` equals ``get_logprobs`` on real tokens. Same
    position ids as HF generate. This materialises ``[B, N, V]``: use it for small batches or
    exact-KL computations; with ``completion_length`` only the last ``Tc`` positions are formed.
    Padding positions are not masked.

    Args:
      model, input_ids, attention_mask, temperature, completion_length: as in ``get_logprobs``.

    Returns:
      ``[B, N, V]`` float32, ``N = completion_length`` or ``T - 1``.
    """
    num_columns = _check_inputs(input_ids, attention_mask, completion_length, None)
    _check_temperature(temperature)
    states, head = _hidden_or_logits(model, input_ids, attention_mask, num_columns)
    logits = (states if head is None else head(states)).float()
    return logits / temperature if temperature != 1.0 else logits


def get_reference_logprobs(
    ref_model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    completion_length: int | None = None,
) -> torch.Tensor:
    """``get_logprobs`` of a frozen reference policy π_ref: no gradients, eval mode.

    Runs under ``torch.no_grad()`` with ``ref_model`` switched to eval mode for the call and
    restored to its previous mode afterwards, so the result is detached and dropout-free. The
    KL penalty ``KL(π_θ ‖ π_ref)`` of RLHF (Ouyang et al. 2022) compares these with the policy's
    log-probs of the same tokens at the same temperature.

    Args:
      ref_model, input_ids, attention_mask, completion_mask, temperature, chunk_size,
      completion_length: as in ``get_logprobs``.

    Returns:
      ``[B, N]`` float32 log-probs with ``requires_grad=False``.
    """
    # Validate before touching the model's mode.
    _check_inputs(input_ids, attention_mask, completion_length, completion_mask)
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    was_training = ref_model.training
    try:
        ref_model.eval()
        with torch.no_grad():
            return get_logprobs(
                ref_model,
                input_ids,
                attention_mask,
                completion_mask=completion_mask,
                temperature=temperature,
                chunk_size=chunk_size,
                completion_length=completion_length,
            )
    finally:
        ref_model.train(was_training)
