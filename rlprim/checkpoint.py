"""Checkpoints: save a ``TrainingState`` atomically and load it back exactly, verified.

A checkpoint is a directory (format version 1)::

    path/
      manifest.json          {"format": "rlprim-checkpoint", "format_version": 1,
                              "files": {relative path: {"size": bytes, "sha256": hex}}}
      state.json             step, iteration, kl_coef, config, loader_state, extra, and what
                             each component is (class, train/eval mode, frozen or not)
      rng.json               RNG states: python ``random``, numpy's global RNG, torch CPU (+ CUDA)
      policy/                model.safetensors (the state_dict), config.json,
                             generation_config.json, tokenizer files: a Hugging Face model
                             directory, so ``AutoModelForCausalLM.from_pretrained(path/"policy")``
                             and ``AutoTokenizer.from_pretrained(path/"policy")`` load it
      ref_model/             the reference model, same layout (absent when there is none or when
                             the reference *is* the policy object)
      value_model/           the critic, same layout (config.json only for transformers models)
      optimizer.pt           ``torch.save(optimizer.state_dict())``, read with weights_only=True
      scheduler.pt           ``torch.save(scheduler.state_dict())``, read with weights_only=True

Weights: ``model.state_dict()`` (parameters and persistent buffers) in safetensors. Tensors that
alias one another (tied embeddings: ``lm_head.weight is embed_tokens.weight``) are stored once,
under the first name in ``state_dict`` order — the name transformers keeps too — and tensors
that only partly share storage are stored as copies. Loading rebuilds the aliases from the
target model, so tied weights stay tied.

Writing (``save_checkpoint``) never leaves a partial checkpoint at ``path``:
  1. everything is validated (types, JSON-encodability, RNG states) before a byte is written;
  2. files are written to the sibling ``.<name>.tmp`` (a leftover one from a crashed save is
     removed first), each file and directory is fsync'ed, and ``manifest.json`` (sizes and
     SHA-256 of every other file) is written and fsync'ed last;
  3. the directory is moved into place: if ``path`` does not exist, ``rename(.<name>.tmp,
     path)``; if it holds an older checkpoint, the two directories are swapped in one atomic
     ``renameat2(RENAME_EXCHANGE)`` (Linux) and the old one, now at ``.<name>.tmp``, is deleted.
     Where the exchange is unavailable the fallback is ``rename(path, .<name>.old)`` then
     ``rename(.<name>.tmp, path)``: a crash between those two renames leaves ``path`` absent but
     both complete checkpoints on disk (old at ``.<name>.old``, new at ``.<name>.tmp``); the
     next save to ``path`` clears them;
  4. the parent directory is fsync'ed.
So at every moment a complete checkpoint (old or new) exists, and ``path`` holds either the old
or the new one (on Linux). One writer per ``path`` at a time.

Reading (``load_checkpoint``) first verifies the manifest (format version, every listed file
present with its size and SHA-256, no unlisted file) and raises ``ValueError`` naming the file
and what mismatched; then loads every tensor into memory and checks it against the target
modules (exact key sets, shapes, dtypes) and the optimizer / scheduler against theirs; only when
all checks pass does it copy anything. A truncated or corrupted checkpoint is an error, never a
silent partial load.

Exact resume: with the same code, seeds and device (CPU), saving at iteration ``k``, loading into
freshly built objects and continuing to ``n`` gives bit-identical weights to an uninterrupted run
to ``n``: weights, optimizer moments and step counts, scheduler, and the global RNG streams
(torch, numpy, python — dropout and data sampling) are all restored.

Data parallel (``torchrun``, ``rlprim.distributed``): ``save_checkpoint`` is called on every
rank; DDP wrappers are unwrapped (weights keyed as in the bare model), every rank's RNG states
are gathered, rank 0 writes (rank ``r >= 1``'s RNG states go to ``rng_rank_<r>.json``) and all
ranks wait until it has. ``load_checkpoint`` is called on every rank with the same path (a
filesystem all ranks see); each restores its own RNG states (rank 0's when the checkpoint has
none for it, e.g. written by fewer ranks). An FSDP2-sharded policy (``strategy="fsdp"``) is
saved as full tensors — its weights and optimizer moments gathered on every rank, written by
rank 0 — in exactly the single-process format (the model's own class, not FSDP's subclass), and
loaded back into shards: a checkpoint moves freely between one process, DDP and FSDP2.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import numbers
import os
import random
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import safetensors.torch
import torch
from torch import nn

from rlprim.distributed import (
    all_gather_objects,
    all_reduce_scalars,
    copy_into,
    full_state_dict,
    get_distributed_info,
    is_distributed,
    is_fsdp_module,
    model_class,
    unwrap_model,
)
from rlprim.types import TrainingState

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "verify_checkpoint",
    "read_checkpoint_metadata",
    "load_checkpoint",
    "latest_checkpoint",
    "create_checkpoint_fn",
]

CHECKPOINT_FORMAT = "rlprim-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

_MANIFEST = "manifest.json"
_STATE = "state.json"
_RNG = "rng.json"
_RANK_RNG = "rng_rank_{rank}.json"  # data parallel: ranks 1… (rank 0's is rng.json)
_OPTIMIZER = "optimizer.pt"
_SCHEDULER = "scheduler.pt"
_WEIGHTS = "model.safetensors"
_MODEL_COMPONENTS = ("policy", "ref_model", "value_model")
_RNG_KEYS = ("python", "numpy", "torch", "torch_cuda")
_STEP_DIR = re.compile(r"step_(\d+)")
_HASH_CHUNK = 1 << 20
# Linux renameat2(2) constants: relative paths resolve against the cwd; swap both entries.
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# Optimizer state entries that have their parameter's shape (torch.optim's Adam(W), SGD, ...).
_PER_PARAMETER_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg")
# How many offending keys an error message lists before "...".
_SHOW_KEYS = 6


# --------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states that training code draws from, for exact resume.

    Returns:
      ``{"python": random.getstate(), "numpy": np.random.get_state(),
      "torch": torch.get_rng_state()}`` plus ``"torch_cuda": torch.cuda.get_rng_state_all()``
      when CUDA is available. Nothing is advanced: capturing then drawing gives the same
      numbers as drawing without capturing. ``restore_rng_state`` sets them back.
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def _normalize_rng_state(rng_state: Any, argument: str) -> dict[str, Any]:
    """Validates an RNG-state mapping by loading each part into a fresh generator (no global
    RNG is touched) and returns it in canonical form (the fresh generators' ``get_state``)."""
    if not isinstance(rng_state, Mapping):
        raise TypeError(
            f"{argument} must be a mapping like capture_rng_state() returns, "
            f"got {type(rng_state).__name__}"
        )
    unknown = sorted(str(key) for key in rng_state if key not in _RNG_KEYS)
    if unknown:
        raise ValueError(f"{argument} has unknown keys {unknown}; expected a subset of {_RNG_KEYS}")
    normalized: dict[str, Any] = {}
    if "python" in rng_state:
        generator = random.Random()
        try:
            generator.setstate(rng_state["python"])
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{argument}['python'] is not a random.getstate() value: {error}"
            ) from error
        normalized["python"] = generator.getstate()
    if "numpy" in rng_state:
        legacy = np.random.RandomState()
        try:
            legacy.set_state(rng_state["numpy"])
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(
                f"{argument}['numpy'] is not a np.random.get_state() value: {error}"
            ) from error
        normalized["numpy"] = legacy.get_state()
    if "torch" in rng_state:
        normalized["torch"] = _check_torch_rng(rng_state["torch"], f"{argument}['torch']")
    if "torch_cuda" in rng_state:
        states = rng_state["torch_cuda"]
        if not isinstance(states, Sequence) or isinstance(states, (str, bytes)):
            raise TypeError(
                f"{argument}['torch_cuda'] must be a list of uint8 tensors, "
                f"got {type(states).__name__}"
            )
        normalized["torch_cuda"] = [
            _check_byte_tensor(state, f"{argument}['torch_cuda'][{index}]")
            for index, state in enumerate(states)
        ]
    return normalized


def _check_byte_tensor(value: Any, argument: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        description = (
            f"{value.dtype} tensor of shape {tuple(value.shape)}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise ValueError(f"{argument} must be a 1-D torch.uint8 tensor, got {description}")
    return value.detach().to("cpu").clone()


def _check_torch_rng(value: Any, argument: str) -> torch.Tensor:
    state = _check_byte_tensor(value, argument)
    try:
        torch.Generator().set_state(state)
    except RuntimeError as error:
        raise ValueError(f"{argument} is not a torch.get_rng_state() value: {error}") from error
    return state


def restore_rng_state(rng_state: Mapping[str, Any]) -> None:
    """Sets the global RNGs to a state from ``capture_rng_state`` (or ``load_checkpoint``).

    Every part present is restored: ``random.setstate``, ``np.random.set_state``,
    ``torch.set_rng_state`` and, when CUDA is available, ``torch.cuda.set_rng_state`` for each
    saved device that exists here (CUDA states are skipped on a machine without CUDA). The whole
    mapping is validated first, so a bad value raises ``ValueError``/``TypeError`` and changes
    nothing.
    """
    normalized = _normalize_rng_state(rng_state, "rng_state")
    if "python" in normalized:
        random.setstate(normalized["python"])
    if "numpy" in normalized:
        np.random.set_state(normalized["numpy"])
    if "torch" in normalized:
        torch.set_rng_state(normalized["torch"])
    if "torch_cuda" in normalized and torch.cuda.is_available():
        for device, state in enumerate(normalized["torch_cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


def _rng_to_json(normalized: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "python" in normalized:
        version, internal, gauss_next = normalized["python"]
        out["python"] = {"version": version, "state": list(internal), "gauss_next": gauss_next}
    if "numpy" in normalized:
        name, key, pos, has_gauss, cached_gaussian = normalized["numpy"]
        out["numpy"] = {
            "bit_generator": name,
            "key": [int(k) for k in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        }
    if "torch" in normalized:
        out["torch"] = bytes(normalized["torch"].tolist()).hex()
    if "torch_cuda" in normalized:
        out["torch_cuda"] = [bytes(state.tolist()).hex() for state in normalized["torch_cuda"]]
    return out


def _hex_to_bytes_tensor(text: str) -> torch.Tensor:
    return torch.tensor(list(bytes.fromhex(text)), dtype=torch.uint8)


def _rng_from_json(data: Any, where: str) -> dict[str, Any]:
    try:
        state: dict[str, Any] = {}
        if "python" in data:
            python = data["python"]
            state["python"] = (python["version"], tuple(python["state"]), python["gauss_next"])
        if "numpy" in data:
            legacy = data["numpy"]
            state["numpy"] = (
                legacy["bit_generator"],
                np.asarray(legacy["key"], dtype=np.uint32),
                legacy["pos"],
                legacy["has_gauss"],
                legacy["cached_gaussian"],
            )
        if "torch" in data:
            state["torch"] = _hex_to_bytes_tensor(data["torch"])
        if "torch_cuda" in data:
            state["torch_cuda"] = [_hex_to_bytes_tensor(text) for text in data["torch_cuda"]]
    except (TypeError, ValueError, KeyError, OverflowError) as error:
        raise ValueError(f"{where}: malformed RNG state ({error!r})") from error
    return _normalize_rng_state(state, where)


# --------------------------------------------------------------------------- JSON values

_TUPLE_TAG = "__tuple__"
_NAMEDTUPLE_TAG = "__namedtuple__"


def _to_json(value: Any, where: str) -> Any:
    """Encodes configs and loader states: JSON scalars, lists, str-keyed mappings, tuples
    (tagged) and NamedTuples (tagged with ``module:qualname``), recursively."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.generic) and isinstance(value.item(), (bool, int, float, str)):
        return value.item()
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):
        cls = type(value)
        return {
            _NAMEDTUPLE_TAG: f"{cls.__module__}:{cls.__qualname__}",
            "fields": {
                name: _to_json(item, f"{where}.{name}")
                for name, item in zip(cls._fields, value, strict=True)
            },
        }
    if isinstance(value, tuple):
        return {_TUPLE_TAG: [_to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{where} must have str keys to be saved as JSON, got key {key!r} "
                    f"of type {type(key).__name__}"
                )
            if key in (_TUPLE_TAG, _NAMEDTUPLE_TAG):
                raise ValueError(f"{where} uses the reserved key {key!r}")
            out[key] = _to_json(item, f"{where}[{key!r}]")
        return out
    raise TypeError(
        f"{where} of type {type(value).__module__}.{type(value).__qualname__} cannot be saved: "
        "a checkpoint stores configs, loader states and extras as JSON (None, bool, int, float, "
        "str, list, tuple, str-keyed mapping, NamedTuple of those)"
    )


def _resolve_namedtuple(spec: str) -> type | None:
    # Only classes whose module is already imported: a checkpoint never triggers an import.
    module_name, _, qualname = spec.partition(":")
    target: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    if isinstance(target, type) and issubclass(target, tuple) and hasattr(target, "_fields"):
        return target
    return None


def _from_json(value: Any, where: str) -> Any:
    if isinstance(value, list):
        return [_from_json(item, where) for item in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {_TUPLE_TAG}:
        return tuple(_from_json(item, where) for item in value[_TUPLE_TAG])
    if _NAMEDTUPLE_TAG in value:
        fields = {name: _from_json(item, where) for name, item in value["fields"].items()}
        cls = _resolve_namedtuple(value[_NAMEDTUPLE_TAG])
        if cls is None:
            # The class is not importable here: the fields are still all there.
            return fields
        unknown = sorted(set(fields) - set(cls._fields))
        if unknown:
            raise ValueError(
                f"{where}: the saved {value[_NAMEDTUPLE_TAG]} has fields {unknown} that the "
                f"class here does not have (fields {list(cls._fields)})"
            )
        try:
            return cls(**fields)
        except TypeError as error:
            raise ValueError(
                f"{where}: cannot rebuild {value[_NAMEDTUPLE_TAG]}: {error}"
            ) from error
    return {key: _from_json(item, where) for key, item in value.items()}


# --------------------------------------------------------------------------- weights


def _dedupe_state_dict(
    state_dict: Mapping[str, torch.Tensor], where: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Splits a state_dict into the tensors to store and the aliases of stored ones.

    Two entries alias when they are the same view of the same storage (tied weights); the first
    name in ``state_dict`` order is kept. Returns ``(kept, aliases)`` with ``aliases[name] =
    kept name``. Kept tensors are detached, not copied.
    """
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[tuple[Any, ...], str] = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"{where}.state_dict()[{name!r}] is a {type(tensor).__name__}, expected a tensor"
            )
        tensor = tensor.detach()
        if tensor.numel() and tensor.device.type != "meta":
            view = (
                tensor.device,
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tuple(tensor.shape),
                tensor.stride(),
                tensor.dtype,
            )
            if view in first_name:
                aliases[name] = first_name[view]
                continue
            first_name[view] = name
        kept[name] = tensor
    return kept, aliases


def _tensors_to_store(kept: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage or are not contiguous: copy those.
    storage_users: dict[tuple[Any, int], int] = {}
    for tensor in kept.values():
        if tensor.numel():
            key = (tensor.device, tensor.untyped_storage().data_ptr())
            storage_users[key] = storage_users.get(key, 0) + 1
    out = {}
    for name, tensor in kept.items():
        shared = tensor.numel() and (
            storage_users[(tensor.device, tensor.untyped_storage().data_ptr())] > 1
            or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
        )
        if shared or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        out[name] = tensor.to("cpu")
    return out


def _describe_keys(keys: set[str]) -> str:
    ordered = sorted(keys)
    shown = ", ".join(repr(key) for key in ordered[:_SHOW_KEYS])
    return f"[{shown}{', ...' if len(ordered) > _SHOW_KEYS else ''}] ({len(ordered)})"


def _kept_state(module: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` without the aliases of tied weights (first name kept). FSDP2's
    ``DTensor`` shards have no plain storage: tied names are found by parameter identity."""
    if not is_fsdp_module(module):
        return _dedupe_state_dict(module.state_dict(), where)[0]
    parameters = dict(module.named_parameters(remove_duplicate=False))
    seen: set[int] = set()
    kept = {}
    for name, tensor in module.state_dict().items():
        key = id(parameters.get(name, tensor))
        if key not in seen:
            seen.add(key)
            kept[name] = tensor
    return kept


def _optimizer_parameters(optimizer: Any) -> list[Any]:
    """The parameters in ``state_dict`` id order (ids count through the groups)."""
    return [p for group in getattr(optimizer, "param_groups", ()) for p in group["params"]]


def _full_optimizer_state(optimizer: Any) -> Any:
    """FSDP2: ``optimizer.state_dict()`` with every ``DTensor`` moment gathered in full (a
    collective: every rank calls it) — the file a single process would write. ``None`` when
    no parameter is sharded."""
    from torch.distributed.tensor import DTensor

    if optimizer is None or not any(
        isinstance(p, DTensor) for p in _optimizer_parameters(optimizer)
    ):
        return None
    saved = optimizer.state_dict()
    states = {
        pid: {
            key: value.full_tensor() if isinstance(value, DTensor) else value
            for key, value in sorted(saved["state"][pid].items())
        }
        for pid in sorted(saved["state"])
    }
    return {**saved, "state": states}


def _sharded_optimizer_state(optimizer: Any, saved: Any) -> Any:
    """The inverse of ``_full_optimizer_state`` for loading: each full moment of a sharded
    parameter becomes this rank's ``DTensor`` shard (no communication); else ``saved``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    parameters = _optimizer_parameters(optimizer)
    if not any(isinstance(p, DTensor) for p in parameters):
        return saved
    states = {}
    for pid, state in saved["state"].items():
        param = parameters[pid]
        states[pid] = {
            key: distribute_tensor(
                value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
            )
            if isinstance(param, DTensor)
            and isinstance(value, torch.Tensor)
            and tuple(value.shape) == tuple(param.shape)
            else value
            for key, value in state.items()
        }
    return {**saved, "state": states}


def _match_weights(
    module: nn.Module, loaded: Mapping[str, torch.Tensor], component: str, file: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Checks ``loaded`` against ``module.state_dict()`` (exact keys after aliasing, shapes,
    dtypes) and returns the ``(target, source)`` pairs to copy. Modifies nothing."""
    kept = _kept_state(module, component)
    missing = set(kept) - set(loaded)
    unexpected = set(loaded) - set(kept)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {_describe_keys(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_describe_keys(unexpected)}")
        raise ValueError(
            f"{file} does not match state.{component} ({type(module).__name__}): "
            + "; ".join(parts)
        )
    mismatched = []
    for name, target in kept.items():
        source = loaded[name]
        if target.shape != source.shape or target.dtype != source.dtype:
            mismatched.append(
                f"{name!r}: checkpoint {source.dtype} {tuple(source.shape)}, "
                f"model {target.dtype} {tuple(target.shape)}"
            )
    if mismatched:
        shown = "; ".join(mismatched[:_SHOW_KEYS])
        more = f"; ... ({len(mismatched)} in all)" if len(mismatched) > _SHOW_KEYS else ""
        raise ValueError(
            f"{file} does not match state.{component} ({type(module).__name__}): {shown}{more}"
        )
    return [(kept[name], loaded[name]) for name in kept]


# --------------------------------------------------------------------------- files


def _fsync(path: str) -> None:
    if os.name == "nt" and os.path.isdir(path):
        return  # Windows cannot open directories; NTFS journals renames itself.
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _file_digest(path: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _list_files(root: str) -> list[str]:
    """Relative POSIX paths of every file under ``root``, sorted."""
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            relative = os.path.relpath(os.path.join(directory, name), root)
            found.append(relative.replace(os.sep, "/"))
    return sorted(found)


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=1, sort_keys=True, allow_nan=True)


def _remove_tree(path: str) -> None:
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _exchange(first: str, second: str) -> bool:
    """Atomically swaps two directory entries (Linux renameat2 RENAME_EXCHANGE); False when the
    platform or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: use the two-rename fallback
        return False
    raise OSError(error, f"renameat2({first!r}, {second!r}, RENAME_EXCHANGE) failed")


def _move_into_place(temporary: str, path: str) -> None:
    parent, name = os.path.split(path)
    if not os.path.lexists(path):
        os.rename(temporary, path)
    elif _exchange(temporary, path):
        shutil.rmtree(temporary)  # it now holds the old checkpoint
    else:
        old = os.path.join(parent, f".{name}.old")
        _remove_tree(old)
        os.rename(path, old)
        _fsync(parent)
        os.rename(temporary, path)
        _fsync(parent)
        shutil.rmtree(old)
    _fsync(parent)


def _is_checkpoint_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, _MANIFEST))


# --------------------------------------------------------------------------- saving


def _component_info(module: nn.Module) -> dict[str, Any]:
    config = getattr(module, "config", None)
    is_transformers = config is not None and callable(getattr(config, "save_pretrained", None))
    return {
        "kind": "transformers" if is_transformers else "module",
        "class": model_class(module).__name__,  # FSDP2's generated subclass is not saved
        "module": model_class(module).__module__,
        "training": bool(module.training),
        "requires_grad": any(parameter.requires_grad for parameter in module.parameters()),
    }


def _save_model_dir(
    module: nn.Module,
    directory: str,
    info: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    os.makedirs(directory)
    kept, _ = _dedupe_state_dict(
        module.state_dict() if state_dict is None else state_dict, directory
    )
    safetensors.torch.save_file(
        _tensors_to_store(kept), os.path.join(directory, _WEIGHTS), metadata={"format": "pt"}
    )
    if info["kind"] == "transformers":
        config = copy.deepcopy(module.config)
        config.architectures = [model_class(module).__name__]
        config.save_pretrained(directory)
        generation_config = getattr(module, "generation_config", None)
        if generation_config is not None and callable(
            getattr(generation_config, "save_pretrained", None)
        ):
            generation_config.save_pretrained(directory)


def _check_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{argument} must be a non-negative int, got {value!r}")
    return int(value)


def _check_module(value: Any, argument: str, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, nn.Module):
        raise TypeError(f"{argument} must be a torch.nn.Module, got {type(value).__name__}")


def _check_has_state_dict(value: Any, argument: str) -> None:
    if value is not None and not (
        callable(getattr(value, "state_dict", None))
        and callable(getattr(value, "load_state_dict", None))
    ):
        raise TypeError(
            f"{argument} must have state_dict() and load_state_dict(), got {type(value).__name__}"
        )


def save_checkpoint(state: TrainingState, path: str | os.PathLike[str], extra: Any = None) -> str:
    """Writes ``state`` to the directory ``path``, atomically (see the module docstring).

    Saved: the policy's weights (safetensors), config, generation config and tokenizer (a
    Hugging Face model directory under ``path/policy``); ``ref_model`` and ``value_model`` when
    present (a reference that is the policy object itself is recorded as such, not stored
    twice); ``optimizer.state_dict()`` and ``scheduler.state_dict()``; ``step``, ``iteration``,
    ``kl_coef``, ``config``, ``loader_state`` and ``extra`` (JSON); the RNG states
    ``state.rng_state`` — or, when it is ``None``, the global RNG states captured now
    (``capture_rng_state``). Train/eval mode and frozen-ness of each model are recorded.

    ``state.rng_state`` is saved as is: it must be the RNG states *at this point* of the run.
    A stale one (e.g. the one ``load_checkpoint`` returned, iterations ago) would make a resume
    replay old random numbers; pass ``rng_state=None`` (capture now) unless you hold fresh ones.

    ``config``, ``loader_state`` and ``extra`` must be JSON-like: None, bool, int, float, str,
    lists, tuples, str-keyed mappings and NamedTuples (an ``AlgorithmConfig``) of those, nested.
    Anything else raises ``TypeError`` before anything is written.

    Nothing in ``state`` and no global RNG is modified.

    Data parallel: every rank calls it; rank 0 writes, the others send their RNG states and wait
    until the write has succeeded (an error on rank 0 is raised on every rank).

    Args:
      state: the ``TrainingState`` to save (``policy`` must be an ``nn.Module``; a DDP wrapper
        is saved as its inner model).
      path: the checkpoint directory. Its parent is created if needed. An existing checkpoint at
        ``path`` is replaced atomically; an existing directory that is not a checkpoint (no
        ``manifest.json``) or a file is refused with ``ValueError``.
      extra: any further JSON-like value to keep (read back with ``read_checkpoint_metadata``).

    Returns:
      ``str(path)``.
    """
    step, iteration, kl_coef = _check_save_arguments(state)
    rng_state = capture_rng_state() if state.rng_state is None else state.rng_state
    rng_json = _rng_to_json(_normalize_rng_state(rng_state, "state.rng_state"))
    path = _check_save_path(path)
    modules = {name: unwrap_model(getattr(state, name)) for name in _MODEL_COMPONENTS}
    components = _saved_components(state, modules)
    metadata = {
        "step": step,
        "iteration": iteration,
        "kl_coef": kl_coef,
        "config": _to_json(state.config, "state.config"),
        "loader_state": _to_json(state.loader_state, "state.loader_state"),
        "extra": _to_json(extra, "extra"),
        "components": components,
        "torch_version": torch.__version__,
    }
    if is_distributed():
        _save_from_rank_zero(state, modules, path, components, metadata, rng_json)
    else:
        _write_checkpoint(state, modules, path, components, metadata, [rng_json])
    return path


# The steps of save_checkpoint. Nothing is written before every check has passed.


def _check_save_arguments(state: Any) -> tuple[int, int, float]:
    """``(step, iteration, kl_coef)`` after checking every field ``save_checkpoint`` reads."""
    if not isinstance(state, TrainingState):
        raise TypeError(f"state must be a TrainingState, got {type(state).__name__}")
    _check_module(state.policy, "state.policy", required=True)
    _check_module(state.ref_model, "state.ref_model", required=False)
    _check_module(state.value_model, "state.value_model", required=False)
    _check_has_state_dict(state.optimizer, "state.optimizer")
    _check_has_state_dict(state.scheduler, "state.scheduler")
    if state.tokenizer is not None and not callable(
        getattr(state.tokenizer, "save_pretrained", None)
    ):
        raise TypeError(
            "state.tokenizer must have save_pretrained() (a transformers tokenizer) or be None, "
            f"got {type(state.tokenizer).__name__}"
        )
    step = _check_int(state.step, "state.step")
    iteration = _check_int(state.iteration, "state.iteration")
    try:
        kl_coef = float(state.kl_coef)
    except (TypeError, ValueError) as error:
        raise TypeError(f"state.kl_coef must be a real number, got {state.kl_coef!r}") from error
    return step, iteration, kl_coef


def _check_save_path(path: Any) -> str:
    """The absolute checkpoint path; an existing non-checkpoint there is refused."""
    path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise ValueError(f"path must be a non-empty path, got {path!r}")
    path = os.path.abspath(path)
    if os.path.lexists(path) and not _is_checkpoint_dir(path):
        raise ValueError(
            f"path {path!r} exists and is not an rlprim checkpoint (no {_MANIFEST}); "
            "refusing to replace it"
        )
    return path


def _saved_components(
    state: TrainingState, modules: Mapping[str, nn.Module | None]
) -> dict[str, Any]:
    """What ``state.json`` records of each component: its class, or that it aliases the policy."""
    components: dict[str, Any] = {
        "tokenizer": None if state.tokenizer is None else {"class": type(state.tokenizer).__name__},
        "optimizer": None if state.optimizer is None else {"class": type(state.optimizer).__name__},
        "scheduler": None if state.scheduler is None else {"class": type(state.scheduler).__name__},
    }
    for name in _MODEL_COMPONENTS:
        module = modules[name]
        if module is None:
            components[name] = None
        elif name != "policy" and module is modules["policy"]:
            components[name] = {"alias": "policy"}
        else:
            components[name] = _component_info(module)
    return components


def _save_from_rank_zero(
    state: TrainingState,
    modules: Mapping[str, nn.Module | None],
    path: str,
    components: Mapping[str, Any],
    metadata: Mapping[str, Any],
    rng_json: Any,
) -> None:
    """Data parallel: rank 0 writes every rank's RNG states; the others wait for it.

    Collective: every rank calls it. An error on rank 0 is raised on every rank.
    """
    rank_rngs = all_gather_objects(rng_json)
    # FSDP2: every rank takes part in gathering the sharded weights and optimizer moments.
    full_weights = {
        name: full_state_dict(module)
        for name, module in modules.items()
        if is_fsdp_module(module) and "alias" not in components[name]
    }
    optimizer_state = _full_optimizer_state(state.optimizer)
    failure: BaseException | None = None
    if get_distributed_info().rank == 0:
        try:
            _write_checkpoint(
                state, modules, path, components, metadata, rank_rngs, full_weights,
                optimizer_state,
            )
        except BaseException as error:  # re-raised below, after telling the other ranks
            failure = error
    if all_reduce_scalars([0.0 if failure is None else 1.0])[0]:
        if failure is not None:
            raise failure
        raise RuntimeError(f"save_checkpoint: rank 0 failed to write {path!r} (see its error)")


def _write_checkpoint(
    state: TrainingState,
    modules: Mapping[str, nn.Module | None],
    path: str,
    components: Mapping[str, Any],
    metadata: Mapping[str, Any],
    rank_rngs: Sequence[Any],
    full_weights: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    optimizer_state: Any = None,
) -> None:
    """Writes the validated checkpoint atomically (``rank_rngs[0]`` is ``rng.json``;
    ``full_weights`` / ``optimizer_state`` replace the state dicts of FSDP2-sharded parts)."""
    full_weights = full_weights or {}
    rng_json = rank_rngs[0]
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(parent, f".{name}.tmp")
    _remove_tree(temporary)  # a leftover of a crashed save
    os.mkdir(temporary)
    try:
        for component in _MODEL_COMPONENTS:
            info = components[component]
            if info is not None and "alias" not in info:
                _save_model_dir(
                    modules[component], os.path.join(temporary, component), info,
                    full_weights.get(component),
                )
        if state.tokenizer is not None:
            state.tokenizer.save_pretrained(os.path.join(temporary, "policy"))
        if state.optimizer is not None:
            saved = state.optimizer.state_dict() if optimizer_state is None else optimizer_state
            torch.save(saved, os.path.join(temporary, _OPTIMIZER))
        if state.scheduler is not None:
            torch.save(state.scheduler.state_dict(), os.path.join(temporary, _SCHEDULER))
        _write_json(os.path.join(temporary, _RNG), rng_json)
        for rank, rank_rng in enumerate(rank_rngs[1:], start=1):
            _write_json(os.path.join(temporary, _RANK_RNG.format(rank=rank)), rank_rng)
        _write_json(os.path.join(temporary, _STATE), metadata)

        files = {}
        for relative in _list_files(temporary):
            full = os.path.join(temporary, relative)
            _fsync(full)
            size, sha256 = _file_digest(full)
            files[relative] = {"size": size, "sha256": sha256}
        manifest = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "files": files,
        }
        _write_json(os.path.join(temporary, _MANIFEST), manifest)
        _fsync(os.path.join(temporary, _MANIFEST))
        for directory, _, _ in sorted(os.walk(temporary), key=lambda entry: -len(entry[0])):
            _fsync(directory)
        _move_into_place(temporary, path)
    except BaseException:
        _remove_tree(temporary)
        raise


# --------------------------------------------------------------------------- verification


def _read_manifest(path: str) -> dict[str, Any]:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path!r}")
    manifest_path = os.path.join(path, _MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ValueError(f"{path!r} is not a complete checkpoint: {_MANIFEST} is missing")
    try:
        with open(manifest_path, encoding="utf-8") as file:
            manifest = json.load(file)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{manifest_path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{manifest_path} is not an {CHECKPOINT_FORMAT!r} manifest")
    version = manifest.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{manifest_path} has format_version {version!r}; this rlprim reads version "
            f"{CHECKPOINT_FORMAT_VERSION}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
        for entry in files.values()
    ):
        raise ValueError(f"{manifest_path} has a malformed 'files' table")
    return manifest


def _verify_file(path: str, relative: str, entry: Mapping[str, Any]) -> None:
    full = os.path.join(path, relative)
    if not os.path.isfile(full):
        raise ValueError(f"checkpoint {path!r}: file {relative!r} listed in {_MANIFEST} is missing")
    size = os.path.getsize(full)
    if size != entry["size"]:
        raise ValueError(
            f"checkpoint {path!r}: file {relative!r} has {size} bytes, the manifest says "
            f"{entry['size']} (truncated or modified)"
        )
    _, sha256 = _file_digest(full)
    if sha256 != entry["sha256"]:
        raise ValueError(
            f"checkpoint {path!r}: file {relative!r} has sha256 {sha256}, the manifest says "
            f"{entry['sha256']} (corrupted or modified)"
        )


def verify_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Checks a checkpoint directory against its manifest without loading anything.

    Checks: ``manifest.json`` parses, has ``format == CHECKPOINT_FORMAT`` and
    ``format_version == CHECKPOINT_FORMAT_VERSION``; every listed file exists with the listed
    size and SHA-256; no file is present that the manifest does not list.

    Returns:
      the manifest (a dict). Raises ``FileNotFoundError`` when ``path`` is not a directory and
      ``ValueError`` naming the file and what mismatched otherwise.
    """
    path = os.path.abspath(os.fspath(path))
    manifest = _read_manifest(path)
    listed = manifest["files"]
    unlisted = sorted(set(_list_files(path)) - set(listed) - {_MANIFEST})
    if unlisted:
        raise ValueError(
            f"checkpoint {path!r}: files {unlisted} are not listed in {_MANIFEST} "
            "(the manifest was modified or files were added)"
        )
    for relative in sorted(listed):
        _verify_file(path, relative, listed[relative])
    return manifest


def _read_state_json(path: str) -> dict[str, Any]:
    with open(os.path.join(path, _STATE), encoding="utf-8") as file:
        raw = json.load(file)
    for key in ("step", "iteration", "kl_coef", "components"):
        if key not in raw:
            raise ValueError(f"checkpoint {path!r}: {_STATE} has no {key!r}")
    return raw


def read_checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The small metadata of a checkpoint, without loading weights.

    Only ``manifest.json`` and ``state.json`` (its size and SHA-256) are verified.

    Returns:
      ``{"step", "iteration", "kl_coef", "config", "loader_state", "extra", "components",
      "format_version"}``; ``config`` is rebuilt as its NamedTuple type (e.g.
      ``AlgorithmConfig``) when that class is importable, else a dict of its fields.
    """
    path = os.path.abspath(os.fspath(path))
    manifest = _read_manifest(path)
    if _STATE not in manifest["files"]:
        raise ValueError(f"checkpoint {path!r}: {_MANIFEST} does not list {_STATE}")
    _verify_file(path, _STATE, manifest["files"][_STATE])
    raw = _read_state_json(path)
    return {
        "step": raw["step"],
        "iteration": raw["iteration"],
        "kl_coef": raw["kl_coef"],
        "config": _from_json(raw.get("config"), f"{_STATE} config"),
        "loader_state": _from_json(raw.get("loader_state"), f"{_STATE} loader_state"),
        "extra": _from_json(raw.get("extra"), f"{_STATE} extra"),
        "components": raw["components"],
        "format_version": manifest["format_version"],
    }


# --------------------------------------------------------------------------- loading


def _rebuild_model(
    path: str,
    component: str,
    info: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor],
    device: Any,
) -> nn.Module:
    module_name, class_name = str(info.get("module", "")), str(info.get("class", ""))
    if info.get("kind") != "transformers" or not module_name.startswith("transformers"):
        raise ValueError(
            f"checkpoint {path!r}: state.{component} is a {module_name}.{class_name}, not a "
            "transformers model, so load_checkpoint cannot rebuild it; build it yourself and "
            f"pass it in: load_checkpoint(path, TrainingState(policy=None, tokenizer=None, "
            f"optimizer=None, {component}=<module>))"
        )
    import transformers

    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        raise ValueError(
            f"checkpoint {path!r}: state.{component} class {class_name!r} is not in this "
            f"transformers {transformers.__version__}"
        )
    # The saved tensors' dtype, not config.dtype (which a later ``model.to(dtype)`` leaves stale).
    floating = [t.dtype for t in weights.values() if t.is_floating_point()]
    dtype = max(set(floating), key=floating.count) if floating else "auto"
    # Loading must not consume the caller's RNG (transformers may initialise before loading).
    with torch.random.fork_rng(devices=[]):
        model = model_class.from_pretrained(os.path.join(path, component), dtype=dtype)
    model.to(device)
    model.train(bool(info.get("training", False)))
    if not info.get("requires_grad", True):
        model.requires_grad_(False)
    return model


def _load_torch_file(path: str, relative: str, device: Any) -> Any:
    try:
        return torch.load(os.path.join(path, relative), map_location=device, weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise ValueError(f"checkpoint {path!r}: cannot read {relative!r}: {error}") from error


def _check_optimizer(optimizer: Any, saved: Any, info: Mapping[str, Any], path: str) -> None:
    if type(optimizer).__name__ != info.get("class"):
        raise ValueError(
            f"checkpoint {path!r}: {_OPTIMIZER} holds a {info.get('class')} state, but "
            f"state.optimizer is a {type(optimizer).__name__}"
        )
    if not isinstance(saved, dict) or "param_groups" not in saved or "state" not in saved:
        raise ValueError(f"checkpoint {path!r}: {_OPTIMIZER} is not an optimizer state_dict")
    groups, saved_groups = optimizer.state_dict()["param_groups"], saved["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError(
            f"checkpoint {path!r}: {_OPTIMIZER} has {len(saved_groups)} parameter groups, "
            f"state.optimizer has {len(groups)}"
        )
    for index, (group, saved_group) in enumerate(zip(groups, saved_groups, strict=True)):
        if len(group["params"]) != len(saved_group["params"]):
            raise ValueError(
                f"checkpoint {path!r}: {_OPTIMIZER} parameter group {index} has "
                f"{len(saved_group['params'])} parameters, state.optimizer's has "
                f"{len(group['params'])}"
            )
    saved_ids = [pid for group in saved_groups for pid in group["params"]]
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    shape_of = dict(zip(saved_ids, (tuple(p.shape) for p in parameters), strict=True))
    for pid, entry in saved["state"].items():
        if pid not in shape_of:
            raise ValueError(
                f"checkpoint {path!r}: {_OPTIMIZER} has state for unknown parameter id {pid}"
            )
        for key in _PER_PARAMETER_STATE:
            value = entry.get(key)
            if isinstance(value, torch.Tensor) and tuple(value.shape) != shape_of[pid]:
                raise ValueError(
                    f"checkpoint {path!r}: {_OPTIMIZER} state {key!r} of parameter {pid} has "
                    f"shape {tuple(value.shape)}, the parameter has shape {shape_of[pid]}"
                )


def _check_scheduler(scheduler: Any, saved: Any, info: Mapping[str, Any], path: str) -> None:
    if type(scheduler).__name__ != info.get("class"):
        raise ValueError(
            f"checkpoint {path!r}: {_SCHEDULER} holds a {info.get('class')} state, but "
            f"state.scheduler is a {type(scheduler).__name__}"
        )
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint {path!r}: {_SCHEDULER} is not a scheduler state_dict")


def load_checkpoint(
    path: str | os.PathLike[str],
    state: TrainingState | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> TrainingState:
    """Loads a checkpoint written by ``save_checkpoint``, verified, into ``state`` or new objects.

    Procedure (nothing is modified until every check has passed):
      1. verify the manifest (``verify_checkpoint``): format version, every file's size and
         SHA-256, no unlisted file — else ``ValueError`` naming the file;
      2. read the metadata, RNG states, all weights (into memory on ``map_location``) and the
         optimizer / scheduler state_dicts (``torch.load(weights_only=True)``);
      3. match each saved component to its target: for every model given in ``state`` (a DDP
         wrapper counts as its inner model) the checkpoint's keys must equal the model's
         ``state_dict`` keys exactly (tied aliases resolved), with equal shapes and dtypes;
         the optimizer must be the same class with the same parameter groups and sizes; the
         scheduler the same class. A component given in
         ``state`` but absent from the checkpoint is an error too (never a silent partial
         load);
      4. rebuild what ``state`` leaves ``None`` (see below);
      5. copy the weights into the models in place (``Tensor.copy_``, so parameters keep their
         identity and the optimizer still refers to them), ``optimizer.load_state_dict``,
         ``scheduler.load_state_dict``, and, if ``restore_rng``, ``restore_rng_state``.

    Rebuilding (``state=None``, or a field of ``state`` set to ``None``): the policy and the
    reference / value models saved from transformers models are rebuilt with their class's
    ``from_pretrained`` on the checkpoint's directory (then overwritten with the verified
    tensors, so missing keys cannot be silently initialised) in their saved train/eval mode and
    frozen-ness; the tokenizer with ``AutoTokenizer.from_pretrained``. A plain ``nn.Module``
    (e.g. a custom value head) cannot be rebuilt from weights alone: pass it built, e.g.
    ``load_checkpoint(path, TrainingState(policy=None, tokenizer=None, optimizer=None,
    value_model=head))``. An optimizer or scheduler is never rebuilt (it needs the parameters
    and hyper-parameters): it is ``None`` unless given in ``state``. A reference saved as the
    policy object itself comes back as the returned policy.

    Args:
      path: a checkpoint directory.
      state: the ``TrainingState`` to load into, or ``None`` to rebuild.
      restore_rng: set the global RNGs to the saved states (needed for exact resume).
      map_location: device for loaded tensors and rebuilt models.

    Returns:
      the ``TrainingState`` with the loaded/rebuilt components and ``step``, ``iteration``,
      ``kl_coef``, ``loader_state``, ``rng_state`` (the saved states, as
      ``capture_rng_state`` returns them) and ``config`` (an ``AlgorithmConfig`` when one was
      saved) from the checkpoint.
    """
    state = _check_load_arguments(state, restore_rng)
    device = torch.device(map_location)
    path = os.path.abspath(os.fspath(path))
    verify_checkpoint(path)  # 1
    saved = _read_checkpoint(path, device)  # 2
    targets, to_rebuild, copies = _match_models(path, state, saved)  # 3
    optimizer_state, scheduler_state = _match_optimizer_and_scheduler(path, state, saved, device)
    rebuilt, rebuilt_copies = _rebuild_models(path, to_rebuild, saved, device)  # 4
    tokenizer = state.tokenizer
    if tokenizer is None and saved.components.get("tokenizer") is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "policy"))
    _apply_loaded(  # 5
        state, copies + rebuilt_copies, optimizer_state, scheduler_state,
        saved.rng_state if restore_rng else None,
    )
    models = _loaded_models(state, saved.components, targets, rebuilt)
    return state._replace(
        policy=models["policy"],
        tokenizer=tokenizer,
        ref_model=models["ref_model"],
        value_model=models["value_model"],
        optimizer=state.optimizer if optimizer_state is not None else None,
        scheduler=state.scheduler if scheduler_state is not None else None,
        step=int(saved.raw["step"]),
        iteration=int(saved.raw["iteration"]),
        kl_coef=float(saved.raw["kl_coef"]),
        rng_state=saved.rng_state,
        config=saved.config,
        loader_state=saved.loader_state,
    )


# The steps of load_checkpoint, in order. Nothing of the caller's changes before _apply_loaded.


class _SavedCheckpoint(NamedTuple):
    """A verified checkpoint read into memory (step 2 of ``load_checkpoint``)."""

    raw: dict[str, Any]  # state.json
    components: dict[str, Any]  # what was saved, and how (an "alias" shares the policy's weights)
    rng_state: dict[str, Any]  # this rank's RNG states
    config: Any
    loader_state: Any
    weights: dict[str, dict[str, torch.Tensor]]  # component -> safetensors tensors


def _check_load_arguments(state: Any, restore_rng: Any) -> TrainingState:
    """``state`` (a new empty one for ``None``) after checking the arguments' types."""
    if state is not None and not isinstance(state, TrainingState):
        raise TypeError(f"state must be a TrainingState or None, got {type(state).__name__}")
    if not isinstance(restore_rng, bool):
        raise TypeError(f"restore_rng must be a bool, got {type(restore_rng).__name__}")
    if state is None:
        state = TrainingState(policy=None, tokenizer=None, optimizer=None)
    for name in _MODEL_COMPONENTS:
        _check_module(getattr(state, name), f"state.{name}", required=False)
    return state


def _read_checkpoint(path: str, device: torch.device) -> _SavedCheckpoint:
    """Metadata, this rank's RNG states and every saved model's weights, from a verified dir."""
    raw = _read_state_json(path)
    rng_file = _RNG
    rank = get_distributed_info().rank if is_distributed() else 0
    if rank and os.path.isfile(os.path.join(path, _RANK_RNG.format(rank=rank))):
        rng_file = _RANK_RNG.format(rank=rank)  # data parallel: this rank's own RNG streams
    with open(os.path.join(path, rng_file), encoding="utf-8") as file:
        rng_state = _rng_from_json(json.load(file), f"checkpoint {path!r}: {rng_file}")
    config = _from_json(raw.get("config"), f"{_STATE} config")
    loader_state = _from_json(raw.get("loader_state"), f"{_STATE} loader_state")
    components = raw["components"]
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for name in _MODEL_COMPONENTS:
        info = components.get(name)
        if info is not None and "alias" not in info:
            relative = f"{name}/{_WEIGHTS}"
            try:
                weights[name] = safetensors.torch.load_file(
                    os.path.join(path, relative), device=str(device)
                )
            except Exception as error:  # safetensors raises its own error types
                raise ValueError(
                    f"checkpoint {path!r}: cannot read {relative!r}: {error}"
                ) from error
    return _SavedCheckpoint(raw, components, rng_state, config, loader_state, weights)


def _match_models(
    path: str, state: TrainingState, saved: _SavedCheckpoint
) -> tuple[dict[str, nn.Module | None], list[str], list[tuple[torch.Tensor, torch.Tensor]]]:
    """``(targets, to_rebuild, copies)``: each given model matched to its saved weights.

    ``targets[name]`` is the given model (unwrapped) or ``None``; ``to_rebuild`` lists saved
    models that ``state`` leaves ``None``; ``copies`` the ``(target, source)`` tensor pairs.
    """
    components = saved.components
    targets: dict[str, nn.Module | None] = {}
    to_rebuild: list[str] = []
    for name in _MODEL_COMPONENTS:
        info = components.get(name)
        given = getattr(state, name)
        if info is None:
            if given is not None:
                raise ValueError(
                    f"checkpoint {path!r} has no {name}, but state.{name} is given; pass "
                    f"state._replace({name}=None) to load without it"
                )
            targets[name] = None
        elif given is None:
            if "alias" not in info:
                to_rebuild.append(name)
            targets[name] = None
        else:
            targets[name] = unwrap_model(given)  # a DDP wrapper's keys carry "module."
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name in _MODEL_COMPONENTS:
        info = components.get(name)
        target = targets[name]
        if target is None or info is None:
            continue
        source = "policy" if "alias" in info else name
        copies += _match_weights(
            target, saved.weights[source], name, f"checkpoint {path!r}: {source}/{_WEIGHTS}"
        )
    return targets, to_rebuild, copies


def _match_optimizer_and_scheduler(
    path: str, state: TrainingState, saved: _SavedCheckpoint, device: torch.device
) -> tuple[Any, Any]:
    """The saved optimizer and scheduler state_dicts (``None`` where not given), checked."""
    optimizer_state = scheduler_state = None
    for key, relative, given in (
        ("optimizer", _OPTIMIZER, state.optimizer),
        ("scheduler", _SCHEDULER, state.scheduler),
    ):
        info = saved.components.get(key)
        if info is None and given is not None:
            raise ValueError(
                f"checkpoint {path!r} has no {key} state, but state.{key} is given; pass "
                f"state._replace({key}=None) to load without it"
            )
        if info is not None and given is not None:
            loaded = _load_torch_file(path, relative, device)
            if key == "optimizer":
                _check_optimizer(given, loaded, info, path)
                optimizer_state = loaded
            else:
                _check_scheduler(given, loaded, info, path)
                scheduler_state = loaded
    return optimizer_state, scheduler_state


def _rebuild_models(
    path: str, names: list[str], saved: _SavedCheckpoint, device: torch.device
) -> tuple[dict[str, nn.Module], list[tuple[torch.Tensor, torch.Tensor]]]:
    """New models for ``names`` (not given in ``state``) and the copies that fill them."""
    rebuilt: dict[str, nn.Module] = {}
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name in names:
        model = _rebuild_model(path, name, saved.components[name], saved.weights[name], device)
        copies += _match_weights(
            model, saved.weights[name], name, f"checkpoint {path!r}: {name}/{_WEIGHTS}"
        )
        rebuilt[name] = model
    return rebuilt, copies


def _apply_loaded(
    state: TrainingState,
    copies: list[tuple[torch.Tensor, torch.Tensor]],
    optimizer_state: Any,
    scheduler_state: Any,
    rng_state: Mapping[str, Any] | None,
) -> None:
    """Copies the weights in place, loads optimizer / scheduler state, restores the RNGs."""
    with torch.no_grad():
        for target_tensor, source_tensor in copies:
            copy_into(target_tensor, source_tensor)  # a DTensor shard keeps its own slice
    if optimizer_state is not None:
        state.optimizer.load_state_dict(_sharded_optimizer_state(state.optimizer, optimizer_state))
    if scheduler_state is not None:
        state.scheduler.load_state_dict(scheduler_state)
    if rng_state is not None:
        restore_rng_state(rng_state)


def _loaded_models(
    state: TrainingState,
    components: Mapping[str, Any],
    targets: Mapping[str, nn.Module | None],
    rebuilt: Mapping[str, nn.Module],
) -> dict[str, Any]:
    """The returned policy / ref_model / value_model: given wrappers come back as given."""
    models = {}
    for name in _MODEL_COMPONENTS:
        given = getattr(state, name)
        models[name] = given if given is not None else targets[name] or rebuilt.get(name)
    for name in ("ref_model", "value_model"):
        info = components.get(name)
        if info is not None and "alias" in info and models[name] is None:
            models[name] = models["policy"]
    return models


# --------------------------------------------------------------------------- directories


def _list_checkpoints(directory: str) -> list[tuple[int, str]]:
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _STEP_DIR.fullmatch(name)
        full = os.path.join(directory, name)
        if match and _is_checkpoint_dir(full):
            found.append((int(match.group(1)), full))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike[str], verify: bool = False) -> str | None:
    """The checkpoint with the largest step number in ``directory``, or ``None``.

    Candidates are the sub-directories named ``step_<N>`` (as ``create_checkpoint_fn`` writes
    them) that hold a ``manifest.json``; in-progress or crashed saves (hidden ``.step_<N>.tmp``
    directories) never qualify. With ``verify=True`` each candidate, newest first, is checked
    with ``verify_checkpoint`` and corrupted ones are skipped (this reads every file).

    Returns:
      the path as a str, or ``None`` when there is none (or ``directory`` does not exist).
    """
    directory = os.path.abspath(os.fspath(directory))
    for _, path in reversed(_list_checkpoints(directory)):
        if not verify:
            return path
        try:
            verify_checkpoint(path)
        except (ValueError, OSError):
            continue
        return path
    return None


def _delete_checkpoint(path: str) -> None:
    # Rename first, so an interrupted deletion never leaves a half-deleted ``step_<N>``.
    parent, name = os.path.split(path)
    trash = os.path.join(parent, f".{name}.trash")
    _remove_tree(trash)
    os.rename(path, trash)
    shutil.rmtree(trash)


def create_checkpoint_fn(
    directory: str | os.PathLike[str], every: int = 1, keep_last: int | None = None
) -> Callable[[TrainingState], str | None]:
    """Builds the ``checkpoint_fn(state) -> path | None`` that ``train`` calls each iteration.

    The function saves ``state`` to ``directory/step_{state.iteration:08d}`` (via
    ``save_checkpoint``) when ``state.iteration % every == 0`` and returns that path, else
    returns ``None`` and does nothing. With ``keep_last = K`` it then deletes the checkpoints
    ``step_<N>`` with ``N < state.iteration`` beyond the ``K`` most recent ones with
    ``N <= state.iteration``; newer ones (``N > state.iteration``, left by a run resumed from an
    earlier checkpoint) are left alone. Its decisions depend only on ``state.iteration`` and the
    directory listing: no hidden counter. Under ``torchrun`` every rank calls it; rank 0 writes
    and deletes.

    Args:
      directory: where checkpoints go (created on first save).
      every: save every ``every`` iterations (a positive int).
      keep_last: how many recent checkpoints to keep (a positive int), ``None`` keeps all.
    """
    directory = os.path.abspath(os.fspath(directory))
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    if keep_last is not None and (
        isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
    ):
        raise ValueError(f"keep_last must be a positive int or None, got {keep_last!r}")

    def checkpoint_fn(state: TrainingState) -> str | None:
        if not isinstance(state, TrainingState):
            raise TypeError(f"state must be a TrainingState, got {type(state).__name__}")
        iteration = _check_int(state.iteration, "state.iteration")
        if iteration % every:
            return None
        path = save_checkpoint(state, os.path.join(directory, f"step_{iteration:08d}"))
        # Data parallel: only rank 0 deletes (save_checkpoint returned once it had written).
        if keep_last is not None and get_distributed_info().rank == 0:
            older = [p for n, p in _list_checkpoints(directory) if n <= iteration]
            for stale in older[:-keep_last]:
                _delete_checkpoint(stale)
        return path

    return checkpoint_fn
