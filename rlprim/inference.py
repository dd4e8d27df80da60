"""Models, tokenizers, chat templates and generation: everything that samples tokens.

The centre is the **generator** protocol (``rlprim.protocols.Generator``)::

    generator(model, tokenizer, prompts: Sequence[str | Sequence[int]], config: GenerationConfig)
        -> list[Generation]      # len(prompts) * config.num_samples, groups consecutive

Output order: ``result[i * G + j]`` is sample ``j`` of ``prompts[i]`` (``G = num_samples``), so
the samples of a group are consecutive and ``result[i * G + j].prompt_ids`` are the ids of
``prompts[i]``. Each ``Generation`` holds the unpadded prompt ids, the sampled token ids
(through EOS when EOS was sampled, never padding), the log-prob of each sampled token under
``softmax(logits / T)`` — the *untruncated* temperature-scaled distribution that training
recomputes, not the top-k / top-p renormalised one — and ``finish_reason``.

``hf_generator`` (the default) runs Hugging Face ``model.generate``. Any function with the same
signature can replace it (``generator=`` in every function here, in rollouts and in training).
A high-throughput backend fits unchanged: ``rlprim.vllm_engine.vllm_generator`` receives a
``vllm.LLM`` as ``model`` and keeps this contract, and ``create_vllm_generator(engine)`` is the
generator the training loop takes — it receives the policy module as ``model`` and pushes its
weights into the engine (``sync_weights``) before sampling, because the engine holds its own
copy of the weights. ``hf_generator`` samples from the policy module itself and needs no sync.

Hugging Face's ``generate`` mutates nothing global here: seeded sampling runs inside
``torch.random.fork_rng`` so the caller's RNG streams are left exactly as they were.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from rlprim.types import (
    Conversation,
    Generation,
    GenerationConfig,
    Message,
    ModelConfig,
    ToolCall,
)

__all__ = [
    "resolve_model_path",
    "load_model",
    "load_tokenizer",
    "apply_chat_template",
    "hf_generator",
    "generate",
    "generate_with_logprobs",
    "batch_generate",
    "generate_conversation_turn",
]

_ASSETS_DIR = Path(__file__).resolve().parent / "assets"
_BUNDLED_PREFIX = "rlprim/"
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}
# transformers uses a huge integer as "no limit" for tokenizer.model_max_length.
_NO_LENGTH_LIMIT = 10**9


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def resolve_model_path(name: str) -> str:
    """Map a bundled short name ``"rlprim/<name>"`` to its directory in ``rlprim/assets``.

    Returns ``str(rlprim/assets/<name>)`` when that directory exists, else ``name`` unchanged
    (a local path or a hub name), so ``load_model("rlprim/arith-tiny")`` finds the model that
    ships with the package and every other name goes to ``from_pretrained`` as given.
    """
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a str or path, got {type(name).__name__}")
    name = os.fspath(name)
    if name.startswith(_BUNDLED_PREFIX):
        candidate = _ASSETS_DIR / name[len(_BUNDLED_PREFIX) :]
        if candidate.is_dir():
            return str(candidate)
    return name


def _as_model_config(config: ModelConfig | str | os.PathLike[str], argument: str) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return ModelConfig(name_or_path=os.fspath(config))
    raise TypeError(
        f"{argument} must be a ModelConfig or a str (path or hub name), got {type(config).__name__}"
    )


def _check_model_config(config: ModelConfig) -> None:
    if not isinstance(config.name_or_path, str) or not config.name_or_path:
        raise ValueError(
            f"config.name_or_path must be a non-empty str, got {config.name_or_path!r}"
        )
    if config.dtype not in _DTYPES:
        raise ValueError(f"config.dtype must be one of {sorted(_DTYPES)}, got {config.dtype!r}")
    try:
        torch.device(config.device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"config.device must be a torch device string such as 'cpu' or 'cuda:0', "
            f"got {config.device!r}"
        ) from error
    if config.lora is not None and not isinstance(config.lora, Mapping):
        raise TypeError(
            f"config.lora must be None or a mapping of peft.LoraConfig arguments, "
            f"got {type(config.lora).__name__}"
        )


def _from_pretrained_kwargs(config: ModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "dtype": _DTYPES[config.dtype],
        "trust_remote_code": config.trust_remote_code,
    }
    if config.revision is not None:
        kwargs["revision"] = config.revision
    if config.attn_implementation is not None:
        kwargs["attn_implementation"] = config.attn_implementation
    return kwargs


def _apply_lora(model: Any, lora: Mapping[str, Any], task_type: str) -> Any:
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            "ModelConfig.lora needs the `peft` package: pip install rlprim[peft]"
        ) from error
    lora_kwargs = dict(lora)
    lora_kwargs.setdefault("task_type", task_type)
    return peft.get_peft_model(model, peft.LoraConfig(**lora_kwargs))


def load_model(
    config: ModelConfig | str,
    model_loader: Callable[..., Any] | None = None,
) -> Any:
    """Load a causal language model (a local directory, a bundled name or a hub name).

    Args:
      config: a ``ModelConfig`` or just its ``name_or_path``. ``"rlprim/<name>"`` resolves to
        the bundled model (``resolve_model_path``). ``dtype``, ``revision``,
        ``trust_remote_code`` and ``attn_implementation`` go to ``from_pretrained``; the model is
        then moved to ``device``. With ``lora`` (keyword arguments of ``peft.LoraConfig``; needs
        ``pip install rlprim[peft]``) the model is wrapped by ``peft.get_peft_model`` so that only
        the adapters train (``task_type`` defaults to ``"CAUSAL_LM"``).
      model_loader: ``model_loader(name_or_path, **from_pretrained_kwargs) -> nn.Module``;
        ``None`` uses ``transformers.AutoModelForCausalLM.from_pretrained``. Replace it to load
        a custom architecture or a quantised model.

    Returns:
      the model on ``config.device``, in whatever train/eval mode the loader left it
      (``from_pretrained`` gives eval mode).
    """
    config = _as_model_config(config, "config")
    _check_model_config(config)
    if model_loader is None:
        from transformers import AutoModelForCausalLM

        model_loader = AutoModelForCausalLM.from_pretrained
    path = resolve_model_path(config.name_or_path)
    model = model_loader(path, **_from_pretrained_kwargs(config))
    model = model.to(config.device)
    if config.lora is not None:
        model = _apply_lora(model, config.lora, "CAUSAL_LM")
    return model


def load_tokenizer(
    name_or_path: ModelConfig | str,
    padding_side: str = "left",
    tokenizer_loader: Callable[..., Any] | None = None,
) -> Any:
    """Load a tokenizer ready for batched generation.

    Sets ``padding_side`` (left by default: generation appends on the right, so prompts are
    padded on the left) and, when the tokenizer has no pad token, uses its eos token as pad
    (padding positions are always masked out, so the choice of id does not matter).

    Args:
      name_or_path: a path, bundled name, hub name or ``ModelConfig`` (its ``revision`` and
        ``trust_remote_code`` are used).
      padding_side: ``"left"`` or ``"right"``.
      tokenizer_loader: ``tokenizer_loader(name_or_path, **kwargs) -> tokenizer``; ``None`` uses
        ``transformers.AutoTokenizer.from_pretrained``.

    Returns:
      the tokenizer, with ``pad_token_id`` not ``None``.

    Raises:
      ValueError: when the tokenizer has neither a pad nor an eos token (padding would be
        impossible); the message names the tokenizer.
    """
    config = _as_model_config(name_or_path, "name_or_path")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if tokenizer_loader is None:
        from transformers import AutoTokenizer

        tokenizer_loader = AutoTokenizer.from_pretrained
    kwargs: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
    if config.revision is not None:
        kwargs["revision"] = config.revision
    path = resolve_model_path(config.name_or_path)
    tokenizer = tokenizer_loader(path, **kwargs)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"tokenizer loaded from {path!r} ({type(tokenizer).__name__}) has neither a pad "
                "nor an eos token; set tokenizer.pad_token before batched generation"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------


def _message_to_dict(message: Message | Mapping[str, Any], index: int) -> dict[str, Any]:
    if isinstance(message, Mapping):
        if "role" not in message or "content" not in message:
            raise ValueError(
                f"conversation[{index}] must have 'role' and 'content' keys, got {sorted(message)}"
            )
        return dict(message)
    if not isinstance(message, Message):
        raise TypeError(
            f"conversation[{index}] must be a Message or a dict, got {type(message).__name__}"
        )
    record: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        record["tool_calls"] = [
            {"type": "function", "function": {"name": c.name, "arguments": dict(c.arguments)}}
            for c in message.tool_calls
        ]
    if message.name is not None:
        record["name"] = message.name
    return record


def _conversation_messages(
    conversation: Conversation | Sequence[Message | Mapping[str, Any]],
) -> list[Any]:
    if isinstance(conversation, Conversation):
        return list(conversation.messages)
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
        raise TypeError(
            "conversation must be a Conversation or a list of Message / dict, "
            f"got {type(conversation).__name__}"
        )
    return list(conversation)


def apply_chat_template(
    tokenizer: Any,
    conversation: Conversation | Sequence[Message | Mapping[str, Any]],
    add_generation_prompt: bool = True,
    template_fn: Callable[[list[dict[str, Any]], bool], str] | None = None,
) -> str:
    """Render a conversation to the prompt text the model expects.

    Messages become ``{"role", "content"}`` dicts (plus ``tool_calls`` in the
    ``{"type": "function", "function": {"name", "arguments"}}`` layout and ``name`` when set),
    the format of Hugging Face chat templates.

    Args:
      tokenizer: a tokenizer with a ``chat_template`` (unused when ``template_fn`` is given).
      conversation: a ``Conversation``, or a list of ``Message`` or of dicts.
      add_generation_prompt: end with the assistant header so the model writes the next turn.
      template_fn: ``template_fn(messages: list[dict], add_generation_prompt: bool) -> str``,
        replacing the tokenizer's template (e.g. for a base model without one).

    Returns:
      the rendered text (untokenised; ``hf_generator`` does not add a second BOS when the text
      already starts with the tokenizer's BOS token).
    """
    messages = [_message_to_dict(m, i) for i, m in enumerate(_conversation_messages(conversation))]
    if not messages:
        raise ValueError("conversation must hold at least one message, got an empty one")
    if template_fn is not None:
        text = template_fn(messages, add_generation_prompt)
        if not isinstance(text, str):
            raise TypeError(f"template_fn must return a str, returned {type(text).__name__}")
        return text
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer ({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '')!r}) "
            "has no chat_template; pass template_fn= or set tokenizer.chat_template"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_prompts(prompts: Any) -> list[str | list[int]]:
    """Prompts are texts, or token-id lists used verbatim (multi-turn rollouts pass those)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(
            f"prompts must be a list of str or of token-id lists, got {type(prompts).__name__}"
            + (
                " (wrap a single prompt in a list, or use generate)"
                if isinstance(prompts, str)
                else ""
            )
        )
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one prompt, got an empty sequence")
    checked: list[str | list[int]] = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            checked.append(prompt)
            continue
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, Sequence) or not prompt:
            raise TypeError(
                f"prompts[{i}] must be a str or a non-empty list of token ids, "
                f"got {type(prompt).__name__}"
            )
        ids = list(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise TypeError(f"prompts[{i}] must hold non-negative int token ids, got {ids[:8]}")
        checked.append(ids)
    return checked


def _check_generation_config(config: Any) -> None:
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
    if not isinstance(config.max_new_tokens, int) or config.max_new_tokens < 1:
        raise ValueError(
            f"config.max_new_tokens must be an int >= 1, got {config.max_new_tokens!r}"
        )
    if not isinstance(config.num_samples, int) or config.num_samples < 1:
        raise ValueError(f"config.num_samples must be an int >= 1, got {config.num_samples!r}")
    if not isinstance(config.temperature, (int, float)) or not config.temperature > 0:
        hint = (
            "sampling needs a positive temperature"
            if config.do_sample
            else "for greedy decoding keep do_sample=False and a positive temperature "
            "(it scales the returned log-probs)"
        )
        raise ValueError(f"config.temperature must be > 0, got {config.temperature!r}: {hint}")
    if not isinstance(config.top_p, (int, float)) or not 0.0 < config.top_p <= 1.0:
        raise ValueError(f"config.top_p must be in (0, 1], got {config.top_p!r}")
    if not isinstance(config.top_k, int) or config.top_k < 0:
        raise ValueError(f"config.top_k must be an int >= 0 (0 disables), got {config.top_k!r}")
    if config.batch_size is not None and (
        not isinstance(config.batch_size, int) or config.batch_size < 1
    ):
        raise ValueError(
            f"config.batch_size must be None or an int >= 1, got {config.batch_size!r}"
        )
    if config.seed is not None and not isinstance(config.seed, int):
        raise TypeError(f"config.seed must be None or an int, got {type(config.seed).__name__}")
    if isinstance(config.stop, str) or not isinstance(config.stop, Sequence):
        raise TypeError(
            f"config.stop must be a sequence of str (e.g. ['</answer>']), got {config.stop!r}"
        )
    for stop in config.stop:
        if not isinstance(stop, str) or not stop:
            raise ValueError(f"config.stop must hold non-empty strings, got {stop!r}")


def _pad_id(tokenizer: Any) -> int:
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    if pad_id is None:
        raise ValueError(
            f"tokenizer ({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '')!r}) "
            "has neither a pad nor an eos token; load it with load_tokenizer or set "
            "tokenizer.pad_token"
        )
    return int(pad_id)


def _context_length(model: Any, tokenizer: Any) -> int | None:
    limits = []
    model_config = getattr(model, "config", None)
    model_limit = getattr(model_config, "max_position_embeddings", None)
    if isinstance(model_limit, int):
        limits.append(model_limit)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and tokenizer_limit < _NO_LENGTH_LIMIT:
        limits.append(tokenizer_limit)
    return min(limits) if limits else None


def _check_prompt_lengths(
    prompt_ids: Sequence[Sequence[int]], model: Any, tokenizer: Any, config: GenerationConfig
) -> None:
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompts[{i}] encodes to no tokens; generation needs a context")
    context = _context_length(model, tokenizer)
    if context is None:
        return
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    length = len(prompt_ids[longest])
    if length >= context:
        raise ValueError(
            f"prompts[{longest}] is {length} tokens long but the model's context is {context} "
            "tokens (min of model.config.max_position_embeddings and tokenizer.model_max_length); "
            "shorten the prompt"
        )
    if length + config.max_new_tokens > context:
        raise ValueError(
            f"prompts[{longest}] ({length} tokens) plus config.max_new_tokens "
            f"({config.max_new_tokens}) exceeds the model's context of {context} tokens; lower "
            "config.max_new_tokens or shorten the prompt"
        )


def _encode_prompts(tokenizer: Any, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Token ids of each prompt, without a second BOS when the text already starts with it.

    A prompt rendered by a chat template usually begins with the BOS text; tokenizers that add
    BOS (Llama-style) would otherwise double it. Others get the tokenizer's special tokens.
    Prompts already given as token ids are used verbatim.
    """
    bos = getattr(tokenizer, "bos_token", None)
    encoded: list[list[int] | None] = [
        None if isinstance(p, str) else [int(t) for t in p] for p in prompts
    ]
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    has_bos = {i: bool(bos) and prompts[i].startswith(bos) for i in texts}
    for flag in (False, True):
        indices = [i for i in texts if has_bos[i] == flag]
        if not indices:
            continue
        ids = tokenizer([prompts[i] for i in indices], add_special_tokens=not flag)["input_ids"]
        for i, row in zip(indices, ids, strict=True):
            encoded[i] = list(row)
    return encoded  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# hf_generator
# ---------------------------------------------------------------------------------------------


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        for token in [source] if isinstance(source, int) else list(source):
            if int(token) not in ids:
                ids.append(int(token))
    return ids


def _hf_generation_config(config: GenerationConfig, pad_id: int, eos_ids: list[int]) -> Any:
    from transformers import GenerationConfig as HFGenerationConfig

    # Every knob that reshapes the distribution is pinned, so a model's own generation_config
    # (e.g. a shipped repetition_penalty or top_k) cannot change what we sample from. The
    # temperature is applied by our log-prob recorder, so transformers gets temperature 1.
    return HFGenerationConfig(
        max_new_tokens=config.max_new_tokens,
        min_new_tokens=0,
        do_sample=config.do_sample,
        temperature=1.0,
        # Greedy ignores the warpers; leaving them unset avoids transformers' warning.
        top_k=config.top_k if config.do_sample else None,
        top_p=config.top_p if config.do_sample else None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        renormalize_logits=False,
        num_beams=1,
        num_return_sequences=1,
        use_cache=True,
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
        return_dict_in_generate=False,
    )


class _LogprobRecorder(NamedTuple):
    """A logits processor that records ``log softmax(logits / T)[sampled token]`` each step.

    It runs before top-k / top-p (transformers applies user processors before its warpers), so
    it sees the raw logits. It returns ``logits / T`` for the warpers (this *is* the
    temperature step) and keeps that ``[N, V]`` tensor and its logsumexp ``[N]`` in ``state``.
    The next call sees the token sampled from it as ``input_ids[:, -1]`` and stores its
    log-prob; the last token is resolved after ``generate`` returns. Extra memory: one
    ``[N, V]`` step, not the ``[steps, N, V]`` that ``output_logits=True`` would keep.

    A callable NamedTuple rather than a closure: transformers reads each processor's
    ``__call__`` signature at every decoding step, which costs a plain function's
    ``method-wrapper`` several times more than a Python method.
    """

    temperature: float
    state: dict

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state["scaled"] is not None:
            state["logprobs"].append(_token_logprob(state, input_ids[:, -1]))
        scaled = scores / self.temperature if self.temperature != 1.0 else scores
        state["scaled"] = scaled
        state["lse"] = torch.logsumexp(scaled, dim=-1)
        return scaled


def _create_logprob_recorder(temperature: float) -> _LogprobRecorder:
    """The recorder for one ``generate`` call, with an empty ``state`` (see ``_LogprobRecorder``)."""
    return _LogprobRecorder(temperature, {"scaled": None, "lse": None, "logprobs": []})


def _token_logprob(state: Mapping[str, Any], tokens: torch.Tensor) -> torch.Tensor:
    return state["scaled"].gather(-1, tokens[:, None]).squeeze(-1) - state["lse"]


def _create_stop_recorder(
    tokenizer: Any, stop: Sequence[str]
) -> tuple[Callable[..., torch.Tensor], list]:
    """Wrap transformers' ``StopStringCriteria`` to remember, per row, each step's verdict."""
    from transformers import StopStringCriteria

    criteria = StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stop))
    verdicts: list[torch.Tensor] = []

    def check(input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        is_done = criteria(input_ids, scores, **kwargs)
        verdicts.append(is_done)
        return is_done

    return check, verdicts


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True per row of ``[N, S]`` (``S >= 1``), or ``S`` when there is none."""
    steps = mask.shape[1]
    positions = torch.arange(steps, device=mask.device).expand_as(mask)
    return torch.where(mask, positions, steps).amin(dim=1)


def _contains_stop(text: str, stop: Sequence[str]) -> int | None:
    """End offset of the earliest-completed stop string in ``text``, or ``None``."""
    ends = [text.find(s) + len(s) for s in stop if s in text]
    return min(ends) if ends else None


def _cut_at_stop(
    tokenizer: Any, token_ids: list[int], text: str, stop: Sequence[str]
) -> tuple[int, str]:
    """Shortest token prefix whose decoded text holds a stop string, and that text cut there.

    ``decode(ids[:k])`` containing a stop string is monotone in ``k``, so binary search.
    """
    low, high = 1, len(token_ids)
    # Usually the stop string completes at the last token (transformers stopped there).
    if (
        high == 1
        or _contains_stop(tokenizer.decode(token_ids[: high - 1], skip_special_tokens=True), stop)
        is None
    ):
        low = high
    while low < high:
        middle = (low + high) // 2
        prefix = tokenizer.decode(token_ids[:middle], skip_special_tokens=True)
        if _contains_stop(prefix, stop) is not None:
            high = middle
        else:
            low = middle + 1
    prefix_text = tokenizer.decode(token_ids[:low], skip_special_tokens=True)
    end = _contains_stop(prefix_text, stop)
    return low, prefix_text[:end] if end is not None else text


def _generate_one_batch(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    config: GenerationConfig,
    pad_id: int,
    eos_ids: list[int],
) -> list[Generation]:
    device = next(model.parameters()).device
    num_samples = config.num_samples
    width = max(len(ids) for ids in prompt_ids)
    padded = [[pad_id] * (width - len(ids)) + ids for ids in prompt_ids]
    mask = [[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids]
    input_ids = torch.tensor(padded, dtype=torch.long, device=device)
    attention_mask = torch.tensor(mask, dtype=torch.long, device=device)
    if num_samples > 1:  # row i*G + j is sample j of prompt i
        input_ids = input_ids.repeat_interleave(num_samples, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)

    record = _create_logprob_recorder(float(config.temperature))
    logprob_state = record.state
    stopping = []
    stop_verdicts: list[torch.Tensor] = []
    if config.stop:
        stop_check, stop_verdicts = _create_stop_recorder(tokenizer, config.stop)
        stopping.append(stop_check)
    from transformers import LogitsProcessorList, StoppingCriteriaList

    sequences = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=_hf_generation_config(config, pad_id, eos_ids),
        logits_processor=LogitsProcessorList([record]),
        stopping_criteria=StoppingCriteriaList(stopping),
    )
    completions = sequences[:, width:]
    steps = completions.shape[1]
    step_logprobs = logprob_state["logprobs"][:steps]
    if len(step_logprobs) < steps:
        step_logprobs.append(_token_logprob(logprob_state, completions[:, len(step_logprobs)]))
    logprobs = torch.stack(step_logprobs, dim=1)  # steps >= 1 since max_new_tokens >= 1

    # A row ends at its first EOS (kept) or at the step where a stop string completed (kept);
    # transformers pads the rest. Rows that never finished ran to the end of the block.
    finished = torch.isin(completions, torch.tensor(eos_ids, dtype=torch.long, device=device))
    if stop_verdicts:
        finished = finished | torch.stack(stop_verdicts[:steps], dim=1)
    first_end = _first_true(finished)
    lengths = torch.clamp(first_end + 1, max=steps)
    hit_end = first_end < steps

    token_rows = completions.tolist()
    logprob_rows = logprobs.tolist()
    length_list = lengths.tolist()
    hit_list = hit_end.tolist()
    token_ids = [row[:n] for row, n in zip(token_rows, length_list, strict=True)]
    texts = tokenizer.batch_decode(token_ids, skip_special_tokens=True)

    generations = []
    for row in range(len(token_ids)):
        ids, text, n, stopped = token_ids[row], texts[row], length_list[row], hit_list[row]
        if config.stop and _contains_stop(text, config.stop) is not None:
            n, text = _cut_at_stop(tokenizer, ids, text, config.stop)
            ids, stopped = ids[:n], True
        generations.append(
            Generation(
                text=text,
                prompt_ids=tuple(prompt_ids[row // num_samples]),
                token_ids=tuple(ids),
                logprobs=tuple(logprob_rows[row][:n]),
                finish_reason="stop" if stopped else "length",
            )
        )
    return generations


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the block under ``seed``, then restore the caller's RNG state (``None``: no-op)."""
    if seed is None:
        yield
        return
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_devices):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda_devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def hf_generator(
    model: Any, tokenizer: Any, prompts: Sequence[str | Sequence[int]], config: GenerationConfig
) -> list[Generation]:
    """Sample ``config.num_samples`` completions per prompt with Hugging Face ``generate``.

    A prompt is a text (encoded here) or a list of token ids (used verbatim, e.g. the ids so
    far of a multi-turn rollout). One batched ``model.generate`` call per ``config.batch_size``
    prompts (``None``: all), each prompt repeated ``G = num_samples`` times as consecutive rows, left-padded, with the KV
    cache. Sampling draws from ``softmax(z / T)`` restricted by top-k then top-p
    (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"); ``do_sample=False``
    takes the argmax. The model's own ``generation_config`` sampling knobs (temperature, top-k,
    top-p, repetition penalty, n-gram blocking, min length, …) are overridden so the
    distribution is exactly the configured one (rarer processors a model may ship —
    ``suppress_tokens``, ``bad_words_ids``, ``sequence_bias`` — still apply; clear them from
    ``model.generation_config`` if you set them).

    Returned log-probs: for sampled token ``y_t`` with raw logits ``z_t`` (float32),
    ``logprob_t = z_t[y_t] / T - logsumexp(z_t / T)``, i.e. under the full temperature-scaled
    softmax that training recomputes — not the top-k / top-p renormalised distribution. They
    are recorded step by step, holding one ``[N, V]`` tensor (``N = rows``), never
    ``[steps, N, V]``.

    Stopping: a row finishes at EOS (any of the model's and tokenizer's eos ids; kept in
    ``token_ids``) or when a ``config.stop`` string completes (transformers'
    ``StopStringCriteria``). ``token_ids`` then run through the token that completes the stop
    string and no further; ``text`` is ``decode(token_ids, skip_special_tokens=True)`` cut
    right after the stop string, so it ends with it (characters of that last token beyond the
    stop string are dropped from ``text`` only). ``finish_reason`` is ``"stop"`` for EOS or a
    stop string and ``"length"`` for ``max_new_tokens``.

    Seeding: with ``config.seed`` set, sampling runs inside ``torch.random.fork_rng`` seeded
    with it, so equal seeds give equal samples and the global RNG is untouched; results depend
    on ``batch_size`` (rows share one random stream per call). The model is put in eval mode
    for the call and its previous mode restored.

    Args:
      model: a ``transformers`` causal LM (or ``peft`` wrapper); unwrap DDP first.
      tokenizer: its tokenizer; prompts are tokenised without adding a second BOS when the text
        already starts with the BOS token.
      prompts: ``P`` prompt texts.
      config: the ``GenerationConfig``.

    Returns:
      ``P * G`` generations; ``result[i * G + j]`` is sample ``j`` of ``prompts[i]``.
    """
    prompts = _check_prompts(prompts)
    _check_generation_config(config)
    pad_id = _pad_id(tokenizer)
    prompt_ids = _encode_prompts(tokenizer, prompts)
    _check_prompt_lengths(prompt_ids, model, tokenizer, config)
    eos_ids = _eos_ids(model, tokenizer)
    batch_size = config.batch_size or len(prompt_ids)
    device = next(model.parameters()).device

    was_training = model.training
    model.eval()
    try:
        with _seeded(config.seed, device), torch.inference_mode():
            generations: list[Generation] = []
            for start in range(0, len(prompt_ids), batch_size):
                generations.extend(
                    _generate_one_batch(
                        model,
                        tokenizer,
                        prompt_ids[start : start + batch_size],
                        config,
                        pad_id,
                        eos_ids,
                    )
                )
    finally:
        model.train(was_training)
    return generations


# ---------------------------------------------------------------------------------------------
# Public generation functions
# ---------------------------------------------------------------------------------------------


def batch_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    config: GenerationConfig,
    generator: Callable[..., list[Generation]] = hf_generator,
) -> list[Generation]:
    """Sample ``config.num_samples`` completions for each prompt; groups are consecutive.

    Validates the inputs (so any ``generator`` gets checked arguments), then calls
    ``generator(model, tokenizer, prompts, config)`` and checks it returned
    ``len(prompts) * num_samples`` generations.

    Args:
      model: the policy (or an engine, for an engine-backed generator).
      tokenizer: its tokenizer.
      prompts: ``P`` prompt texts (a list, not a single str).
      config: the ``GenerationConfig``.
      generator: ``generator(model, tokenizer, prompts, config) -> list[Generation]``
        (``rlprim.protocols.Generator``); default ``hf_generator``.

    Returns:
      ``P * G`` generations, ``result[i * G + j]`` being sample ``j`` of ``prompts[i]``.

    Raises:
      ValueError / TypeError: empty or non-list ``prompts``; ``num_samples < 1``;
      ``temperature <= 0``; a prompt (plus ``max_new_tokens``) longer than the model's context;
      a tokenizer with neither pad nor eos token.
    """
    prompts = _check_prompts(prompts)
    _check_generation_config(config)
    _pad_id(tokenizer)
    # hf_generator checks prompt lengths on the ids it encodes anyway; others are checked here.
    if generator is not hf_generator and _context_length(model, tokenizer) is not None:
        _check_prompt_lengths(_encode_prompts(tokenizer, prompts), model, tokenizer, config)
    generations = list(generator(model, tokenizer, prompts, config))
    expected = len(prompts) * config.num_samples
    if len(generations) != expected:
        raise ValueError(
            f"generator returned {len(generations)} generations, expected len(prompts) * "
            f"config.num_samples = {expected}"
        )
    return generations


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    config: GenerationConfig,
    generator: Callable[..., list[Generation]] = hf_generator,
) -> Generation:
    """Sample one completion of one prompt.

    Always returns a single ``Generation``: ``config.num_samples`` is ignored (treated as 1);
    use ``batch_generate`` for groups. Same validation and semantics as ``batch_generate``.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
    config = config._replace(num_samples=1, batch_size=None)
    return batch_generate(model, tokenizer, [prompt], config, generator=generator)[0]


def generate_with_logprobs(
    model: Any,
    tokenizer: Any,
    prompt: str,
    config: GenerationConfig,
    generator: Callable[..., list[Generation]] = hf_generator,
    logprob_extractor: Callable[..., torch.Tensor] | None = None,
) -> Generation:
    """``generate``, guaranteeing ``logprobs`` is filled.

    When the generator returns ``logprobs=None``, they are recomputed with one forward pass:
    ``logprob_t = log softmax(z_t / T)[y_t]`` over the completion tokens.

    Args:
      logprob_extractor: ``fn(model, input_ids [1, T], attention_mask [1, T], *,
        temperature: float, completion_length: int) -> [1, Tc]``; ``None`` uses
        ``rlprim.logprobs.get_logprobs``. ``model`` must then be an ``nn.Module``.
    """
    generation = generate(model, tokenizer, prompt, config, generator=generator)
    if generation.logprobs is not None:
        return generation
    if not generation.token_ids:
        return generation._replace(logprobs=())
    if logprob_extractor is None:
        from rlprim.logprobs import get_logprobs

        logprob_extractor = get_logprobs
    device = next(model.parameters()).device
    ids = list(generation.prompt_ids) + list(generation.token_ids)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    with torch.no_grad():
        values = logprob_extractor(
            model,
            input_ids,
            torch.ones_like(input_ids),
            temperature=float(config.temperature),
            completion_length=len(generation.token_ids),
        )
    return generation._replace(logprobs=tuple(values[0].float().tolist()))


def generate_conversation_turn(
    model: Any,
    tokenizer: Any,
    conversation: Conversation | Sequence[Message | Mapping[str, Any]],
    config: GenerationConfig,
    generator: Callable[..., list[Generation]] = hf_generator,
    template_fn: Callable[[list[dict[str, Any]], bool], str] | None = None,
) -> tuple[Conversation, Generation]:
    """Generate the next assistant turn of a conversation.

    Renders the conversation with ``apply_chat_template(..., add_generation_prompt=True)``,
    samples one completion (``num_samples`` ignored, as in ``generate``) and appends
    ``Message("assistant", generation.text)``. Tool calls are not parsed here (see the tools
    module).

    Returns:
      ``(new_conversation, generation)``; the input conversation is not modified.
    """
    messages = _conversation_messages(conversation)
    prompt = apply_chat_template(tokenizer, messages, True, template_fn=template_fn)
    generation = generate(model, tokenizer, prompt, config, generator=generator)
    as_messages = tuple(
        m if isinstance(m, Message) else Message(**_message_fields(m)) for m in messages
    )
    return Conversation(as_messages + (Message("assistant", generation.text),)), generation


def _message_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    calls = []
    for call in record.get("tool_calls") or ():
        function = call.get("function", call)
        calls.append(ToolCall(name=function["name"], arguments=function.get("arguments") or {}))
    return {
        "role": record["role"],
        "content": record["content"],
        "tool_calls": tuple(calls),
        "name": record.get("name"),
    }
