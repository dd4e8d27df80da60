"""Serialization: NamedTuples to plain dicts / JSON and back, rollouts to JSONL, config files,
and replaying a saved batch's loss.

**Dicts and JSON.** ``to_dict(value)`` turns any rlprim record (``ModelConfig``,
``GenerationConfig``, ``Message``, ``Conversation``, ``ToolCall``, ``Generation``, ``Rollout``,
``Batch``, ``AlgorithmConfig``, ``TrainingStats``), nested records included, into a value made
only of ``dict``, ``list``, ``str``, ``int``, finite ``float``, ``bool`` and ``None``, so
``json.dumps(..., allow_nan=False)`` (strict JSON) accepts it. ``from_dict`` rebuilds it exactly:
``from_dict(to_dict(x))`` equals ``x`` field for field, container type for container type and bit
for bit. The encoding::

    record        {"__type__": "Rollout", "prompt": ..., "generation": {"__type__": ...}, ...}
    tensor        {"__type__": "torch.Tensor", "dtype": "float32", "shape": [2, 3],
                   "byteorder": "little", "data": "<base64 of the raw element bytes>"}
    nan / ±inf    {"__type__": "float", "value": "nan" | "inf" | "-inf"}
    tuple         a JSON array where the field's type is ``Sequence[...]`` or ``tuple[...]``
                  (``stop``, ``token_ids``, ``tool_calls``… — rlprim's records hold tuples
                  there), else {"__type__": "tuple", "items": [...]} (e.g. in ``metadata``)
    list          a JSON array, except in such a field: {"__type__": "list", "items": [...]}
    dict          a JSON object when every key is a ``str`` other than "__type__", else
                  {"__type__": "dict", "items": [[key, value], ...]}

Tensors keep their dtype, shape and every bit (NaN payloads included) and come back on the CPU,
contiguous, without ``requires_grad`` (use ``batch_to_device`` to move a ``Batch``). NumPy
scalars are written as the Python number they hold. ``TrainingState`` (models, optimizer) is not
data: save it with ``save_checkpoint``. ``Algorithm`` and ``Schedule`` hold functions and are
rejected too. Your own NamedTuples serialise the same way; pass
``registry={**SERIALIZABLE_TYPES, "MyRecord": MyRecord}`` to ``from_dict`` to read them back.
``SERIALIZABLE_TYPES`` (read-only) maps each tag to the record ``from_dict`` builds for it;
``CONFIG_TYPES`` (read-only) holds the three records that config files store.

``from_dict`` also reads hand-written dicts: a record without a ``"__type__"`` tag is built
from the type given as ``type_`` (or the field's declared type when nested), JSON arrays in
``Sequence`` fields become tuples, and every value is checked against the field's declared type
(``ValueError`` naming the field path, e.g. ``data.generation.token_ids[2]``).

**JSONL.** ``save_rollouts_jsonl`` writes one ``to_json(rollout)`` per line, atomically (a temp
file in the same directory, fsync'ed, then ``os.replace``); ``load_rollouts_jsonl`` reads it
back and names the line of any error.

**Config files.** ``save_config`` / ``load_config`` write and read ``ModelConfig``,
``GenerationConfig`` and ``AlgorithmConfig`` as YAML (``.yaml`` / ``.yml``) or JSON (``.json``)
with the record type in a top-level ``type`` key::

    type: AlgorithmConfig
    name: grpo
    clip_eps_low: 0.2
    ...

Unknown keys are rejected (the error lists the unknown and the valid keys), missing keys take the
record's defaults, values are type-checked and then validated (``validate_algorithm_config`` for
an ``AlgorithmConfig``, the generator's checks for a ``GenerationConfig``, the loader's for a
``ModelConfig``). ``Sequence`` fields load as tuples.

**Replay.** A batch's loss is a deterministic function of its data and the policy's weights, so
a saved batch reproduces its loss bit for bit on a CPU (same machine and library versions)::

    save_rollouts_jsonl(rollouts, "rollouts.jsonl")          # after scoring
    rollouts = load_rollouts_jsonl("rollouts.jsonl")
    loss, metrics = replay_loss(rollouts, policy, config, tokenizer=tokenizer)

``replay_loss`` is the recipe written once: ``rollouts_to_batch`` → (advantages by the
algorithm when the batch has none) → ``get_logprobs`` → ``compute_loss_by_algorithm``.
"""

from __future__ import annotations

import base64
import collections.abc
import json
import math
import os
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml

from rlprim.algorithms import (
    ALGORITHMS,
    compute_advantages_by_algorithm,
    compute_loss_by_algorithm,
    get_algorithm,
    group_size_from_ids,
    validate_algorithm_config,
)
from rlprim.batching import rollouts_to_batch
from rlprim.critic import get_values
from rlprim.inference import _check_generation_config, _check_model_config
from rlprim.kl import compute_per_token_kl
from rlprim.logprobs import get_logprobs
from rlprim.rollouts import DynamicSamplingStats
from rlprim.types import (
    Algorithm,
    AlgorithmConfig,
    Batch,
    Conversation,
    Generation,
    GenerationConfig,
    Message,
    ModelConfig,
    Rollout,
    Schedule,
    ToolCall,
    TrainingState,
    TrainingStats,
)

__all__ = [
    "SERIALIZABLE_TYPES",
    "CONFIG_TYPES",
    "to_dict",
    "from_dict",
    "to_json",
    "from_json",
    "save_rollouts_jsonl",
    "load_rollouts_jsonl",
    "save_config",
    "load_config",
    "replay_loss",
]

TAG = "__type__"
_TENSOR_TAG = "torch.Tensor"
_RESERVED_TAGS = (_TENSOR_TAG, "float", "tuple", "list", "dict")

SERIALIZABLE_TYPES: Mapping[str, type] = types.MappingProxyType(
    {
        cls.__name__: cls
        for cls in (
            ModelConfig,
            GenerationConfig,
            Message,
            Conversation,
            ToolCall,
            Generation,
            Rollout,
            Batch,
            AlgorithmConfig,
            TrainingStats,
            DynamicSamplingStats,
        )
    }
)
"""The records ``from_dict`` rebuilds from their ``"__type__"`` tag, by class name."""

CONFIG_TYPES: Mapping[str, type] = types.MappingProxyType(
    {cls.__name__: cls for cls in (ModelConfig, GenerationConfig, AlgorithmConfig)}
)
"""The records ``save_config`` / ``load_config`` handle, by class name."""

_CONFIG_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}

_NOT_DATA = {
    TrainingState: (
        "TrainingState holds models, a tokenizer and an optimizer, which are not plain data: "
        "save it with rlprim.save_checkpoint(state, path) and restore it with "
        "rlprim.load_checkpoint(path, state)"
    ),
    Algorithm: (
        "Algorithm holds functions, which are not data: serialise its AlgorithmConfig and "
        "register the algorithm by name in code (register_algorithm)"
    ),
    Schedule: "Schedule holds a function, which is not data: serialise the configs it returns",
}


# --------------------------------------------------------------------------------------------
# Type hints: what a NamedTuple field is declared to hold.
# --------------------------------------------------------------------------------------------


def _is_record_class(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")


def _is_record(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def _field_hints(cls: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # hints that do not resolve (a user's record): accept anything
        hints = {}
    return {name: hints.get(name, Any) for name in cls._fields}


def _union_members(hint: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(hint)
    return (hint,)


_SEQUENCE_ORIGINS = (collections.abc.Sequence, list, tuple, collections.abc.MutableSequence)
_MAPPING_ORIGINS = (collections.abc.Mapping, dict, collections.abc.MutableMapping)
_SCALARS = {type(None): "none", bool: "bool", int: "int", float: "float", str: "str"}


class _Rule(NamedTuple):
    """What a field declared ``hint`` may hold, worked out once per field (not per value).

    ``open``: anything (``Any`` or a class this module does not know); ``kinds``: the allowed
    scalar kinds and ``"tensor"``; ``element`` / ``value``: the rule of a sequence's elements /
    a mapping's values when the field admits one, else ``None``; ``records``: record classes;
    ``container``: what a JSON array in this field decodes to (``tuple`` for ``Sequence[...]``
    and ``tuple[...]``, ``list`` for ``list[...]``).
    """

    hint: Any
    open: bool
    kinds: frozenset
    element: Any
    value: Any
    records: tuple
    container: type = list


def _rule(hint: Any) -> _Rule:
    members = _union_members(hint)
    kinds, element, value, records, is_open, container = set(), None, None, [], False, list
    for member in members:
        origin = typing.get_origin(member) or member
        args = typing.get_args(member)
        if member is Any:
            is_open = True
        elif origin in _SCALARS:
            kinds.add(_SCALARS[origin])
            if origin is float:
                kinds.add("int")  # an int fits a float field
        elif origin is torch.Tensor:
            kinds.add("tensor")
        elif origin in _SEQUENCE_ORIGINS:
            fixed_tuple = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
            element = _rule(args[0] if args and not fixed_tuple else Any)
            container = list if origin in (list, collections.abc.MutableSequence) else tuple
        elif origin in _MAPPING_ORIGINS:
            value = _rule(args[1] if len(args) == 2 else Any)
        elif _is_record_class(origin):
            records.append(origin)
        else:
            is_open = True
    return _Rule(hint, is_open, frozenset(kinds), element, value, tuple(records), container)


_ANY = _rule(Any)


def _compute_field_rules(cls: type) -> Mapping[str, _Rule]:
    return types.MappingProxyType({name: _rule(hint) for name, hint in _field_hints(cls).items()})


def _field_rules(cls: type) -> Mapping[str, _Rule]:
    # rlprim's records have their rules worked out once, at import (an immutable table).
    known = _KNOWN_RULES.get(cls)
    return known if known is not None else _compute_field_rules(cls)


_KNOWN_RULES: Mapping[type, Mapping[str, _Rule]] = types.MappingProxyType(
    {cls: _compute_field_rules(cls) for cls in SERIALIZABLE_TYPES.values()}
)


def _describe(rule: _Rule) -> str:
    text = str(rule.hint).replace("typing.", "").replace("collections.abc.", "")
    return text.replace("<class '", "").replace("'>", "").replace("NoneType", "None")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _allows(rule: _Rule, kind: Any) -> bool:
    """Whether a field with ``rule`` may hold a value of ``kind``.

    ``kind`` is ``"none"``, ``"bool"``, ``"int"``, ``"float"``, ``"str"``, ``"tensor"``,
    ``"sequence"``, ``"mapping"`` or a record class.
    """
    if rule.open:
        return True
    if isinstance(kind, type):
        return kind in rule.records
    if kind == "sequence":
        return rule.element is not None
    if kind == "mapping":
        return rule.value is not None
    return kind in rule.kinds


def _scalar_kind(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    return "float" if isinstance(value, float) else "str"


# --------------------------------------------------------------------------------------------
# Encoding.
# --------------------------------------------------------------------------------------------


def _encode_float(value: float, plain: bool) -> Any:
    if math.isfinite(value) or plain:
        return value
    return {TAG: "float", "value": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}


def _encode_tensor(value: torch.Tensor, path: str) -> dict[str, Any]:
    if value.layout != torch.strided:
        raise TypeError(f"{path}: only dense (strided) tensors serialise, got {value.layout}")
    flat = value.detach().resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {
        TAG: _TENSOR_TAG,
        "dtype": str(value.dtype).removeprefix("torch."),
        "shape": list(value.shape),
        "byteorder": sys.byteorder,
        "data": base64.b64encode(raw).decode("ascii"),
    }


def _encode_record(value: Any, path: str, plain: bool) -> dict[str, Any]:
    for cls, message in _NOT_DATA.items():
        if isinstance(value, cls):
            raise TypeError(f"{path}: {message}")
    cls = type(value)
    if cls.__name__ in _RESERVED_TAGS:
        raise TypeError(f"{path}: a NamedTuple may not be called {cls.__name__!r} (reserved tag)")
    rules = _field_rules(cls)
    out: dict[str, Any] = {TAG: cls.__name__}
    for name in cls._fields:
        out[name] = _encode(getattr(value, name), rules[name], f"{path}.{name}", plain)
    return out


def _encode(value: Any, rule: _Rule, path: str, plain: bool = False) -> Any:
    """Encodes ``value`` found at ``path`` in a field whose declared type gave ``rule``.

    ``plain`` (config files): tuples and lists both become arrays and non-finite floats stay
    floats (YAML writes ``.nan``), since the field's type says how to read them back.
    """
    if isinstance(value, np.generic) and isinstance(value.item(), (bool, int, float, str)):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        kind = _scalar_kind(value)
        if not _allows(rule, kind):
            raise TypeError(f"{path} must be {_describe(rule)}, got {_short(value)}")
        if kind == "float":
            return _encode_float(float(value), plain)
        if kind == "int":
            return int(value)  # an int subclass (IntEnum…) is written as its value
        return str(value) if kind == "str" else value
    if isinstance(value, torch.Tensor):
        if plain or not _allows(rule, "tensor"):
            raise TypeError(f"{path} must be {_describe(rule)}, got a tensor")
        return _encode_tensor(value, path)
    if _is_record(value):
        if not _allows(rule, type(value)):
            raise TypeError(f"{path} must be {_describe(rule)}, got a {type(value).__name__}")
        return _encode_record(value, path, plain)
    if isinstance(value, (tuple, list)):
        if not _allows(rule, "sequence"):
            raise TypeError(f"{path} must be {_describe(rule)}, got {_short(value)}")
        element = rule.element
        items = [
            _encode(item, _ANY if element is None else element, f"{path}[{i}]", plain)
            for i, item in enumerate(value)
        ]
        if plain:
            return items
        if isinstance(value, rule.container):  # the field's own container: a plain array
            return items
        return {TAG: "tuple" if isinstance(value, tuple) else "list", "items": items}
    if isinstance(value, Mapping):
        if not _allows(rule, "mapping"):
            raise TypeError(f"{path} must be {_describe(rule)}, got {_short(value)}")
        inner = _ANY if rule.value is None else rule.value
        if all(isinstance(k, str) for k in value) and TAG not in value:
            return {str(k): _encode(v, inner, f"{path}[{k!r}]", plain) for k, v in value.items()}
        if plain:
            raise TypeError(f"{path}: config mappings need str keys, got {list(value)!r}")
        pairs = [
            [_encode(k, _ANY, f"{path}.keys()", plain), _encode(v, inner, f"{path}[{k!r}]", plain)]
            for k, v in value.items()
        ]
        return {TAG: "dict", "items": pairs}
    if callable(value):
        raise TypeError(
            f"{path}: {type(value).__name__} is code, not data, and cannot be serialised"
        )
    raise TypeError(
        f"{path}: cannot serialise a {type(value).__name__}; supported are None, bool, int, "
        "float, str, tuple, list, dict, torch.Tensor and NamedTuples of these"
    )


def to_dict(value: Any) -> Any:
    """Encodes ``value`` as plain JSON data; ``from_dict`` rebuilds it exactly.

    ``value`` is usually an rlprim record (``Rollout``, ``Batch``, ``AlgorithmConfig``…), which
    becomes ``{"__type__": "<class name>", field: encoded value, ...}``; a tensor becomes
    ``{"__type__": "torch.Tensor", "dtype", "shape", "byteorder", "data": base64}``; any mix of
    records, tensors, ``None``/``bool``/``int``/``float``/``str`` and tuples, lists and dicts of
    them is accepted (the module docstring lists the encoding). The result holds only ``dict``,
    ``list``, ``str``, ``int``, finite ``float``, ``bool`` and ``None``.

    Args:
      value: the value to encode.
    Returns:
      The encoded value (a ``dict`` for a record or a tensor).
    Raises:
      TypeError: a ``TrainingState`` (use ``save_checkpoint``), an ``Algorithm`` or
        ``Schedule`` (they hold functions), or any other unsupported object, named by its path
        (e.g. ``value.metadata['fn']``).
    """
    return _encode(value, _ANY, "value")


def to_json(value: Any, indent: int | None = None) -> str:
    """``json.dumps(to_dict(value))`` as strict, ASCII-only JSON (no ``NaN`` tokens).

    Args:
      value: what ``to_dict`` accepts.
      indent: JSON indentation; ``None`` writes one line.
    """
    return json.dumps(to_dict(value), allow_nan=False, ensure_ascii=True, indent=indent)


# --------------------------------------------------------------------------------------------
# Decoding.
# --------------------------------------------------------------------------------------------


def _decode_tensor(data: Mapping[str, Any], path: str) -> torch.Tensor:
    expected = {TAG, "dtype", "shape", "byteorder", "data"}
    if set(data) != expected:
        raise ValueError(
            f"{path}: a tensor needs exactly the keys {sorted(expected)}, got {sorted(data)}"
        )
    dtype = getattr(torch, str(data["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{path}.dtype: {data['dtype']!r} is not a torch dtype")
    shape = data["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ValueError(f"{path}.shape must be a list of ints >= 0, got {shape!r}")
    if data["byteorder"] != sys.byteorder:
        raise ValueError(
            f"{path}.byteorder: the tensor was written on a {data['byteorder']!r}-endian machine "
            f"and this one is {sys.byteorder!r}-endian"
        )
    if not isinstance(data["data"], str):
        raise ValueError(f"{path}.data must be a base64 str, got {type(data['data']).__name__}")
    try:
        raw = base64.b64decode(data["data"].encode("ascii"), validate=True)
    except ValueError as error:
        raise ValueError(f"{path}.data is not valid base64: {error}") from error
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != numel * itemsize:
        raise ValueError(
            f"{path}.data holds {len(raw)} bytes; shape {shape} of {data['dtype']} needs "
            f"{numel * itemsize}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def _decode_float(data: Mapping[str, Any], path: str) -> float:
    names = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
    if set(data) != {TAG, "value"} or data["value"] not in names:
        raise ValueError(
            f"{path}: a tagged float is {{'__type__': 'float', 'value': 'nan' | 'inf' | '-inf'}}, "
            f"got {dict(data)!r}"
        )
    return names[data["value"]]


def _items(data: Mapping[str, Any], path: str) -> list[Any]:
    if set(data) != {TAG, "items"} or not isinstance(data["items"], list):
        raise ValueError(
            f"{path}: a tagged {data[TAG]} is {{'__type__': {data[TAG]!r}, 'items': [...]}}, "
            f"got keys {sorted(data)}"
        )
    return data["items"]


def _check_kind(rule: _Rule, kind: Any, path: str, what: str) -> None:
    if not _allows(rule, kind):
        if isinstance(kind, type) and rule.records:
            names = " or ".join(c.__name__ for c in rule.records)
            raise ValueError(
                f"{path}: type tag mismatch: the data holds a {kind.__name__}, expected {names}"
            )
        raise ValueError(f"{path} must be {_describe(rule)}, got {what}")


def _decode_tagged(data: Mapping[str, Any], rule: _Rule, path: str, registry: Mapping) -> Any:
    tag = data[TAG]
    if tag == _TENSOR_TAG:
        _check_kind(rule, "tensor", path, "a tensor")
        return _decode_tensor(data, path)
    if tag == "float":
        value = _decode_float(data, path)
        _check_kind(rule, "float", path, repr(value))
        return value
    if tag in ("tuple", "list"):
        _check_kind(rule, "sequence", path, f"a {tag}")
        element = _ANY if rule.element is None else rule.element
        items = [
            _decode(item, element, f"{path}[{i}]", registry)
            for i, item in enumerate(_items(data, path))
        ]
        return tuple(items) if tag == "tuple" else items
    if tag == "dict":
        _check_kind(rule, "mapping", path, "a mapping")
        inner = _ANY if rule.value is None else rule.value
        out = {}
        for i, pair in enumerate(_items(data, path)):
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError(f"{path}.items[{i}] must be a [key, value] pair, got {pair!r}")
            key = _decode(pair[0], _ANY, f"{path}.items[{i}][0]", registry)
            if isinstance(key, (list, dict)):
                raise ValueError(f"{path}.items[{i}][0]: a dict key must be hashable, got {key!r}")
            out[key] = _decode(pair[1], inner, f"{path}[{key!r}]", registry)
        return out
    if not isinstance(tag, str) or tag not in registry:
        raise ValueError(
            f"{path}: unknown __type__ {tag!r}; known: {sorted(registry)} and "
            f"{list(_RESERVED_TAGS)} (pass registry= to read your own NamedTuples)"
        )
    cls = registry[tag]
    _check_kind(rule, cls, path, f"a {cls.__name__}")
    return _build(cls, data, path, registry)


def _build(cls: type, data: Mapping[str, Any], path: str, registry: Mapping) -> Any:
    for bad, message in _NOT_DATA.items():
        if cls is bad:
            raise TypeError(message)
    fields = cls._fields
    keys = [k for k in data if k != TAG]
    unknown = [k for k in keys if k not in fields]
    where = f"{path}: " if path else ""
    if unknown:
        raise ValueError(
            f"{where}unknown keys {unknown} for {cls.__name__}; valid keys: {list(fields)}"
        )
    missing = [f for f in fields if f not in data and f not in cls._field_defaults]
    if missing:
        raise ValueError(f"{where}{cls.__name__} needs the keys {missing}, which are missing")
    rules = _field_rules(cls)
    values = {
        k: _decode(data[k], rules[k], f"{path}.{k}" if path else k, registry) for k in keys
    }
    return cls(**values)


def _decode(data: Any, rule: _Rule, path: str, registry: Mapping) -> Any:
    if isinstance(data, dict):
        if TAG in data:
            return _decode_tagged(data, rule, path, registry)
        if rule.records and not rule.open:
            return _build(rule.records[0], data, path, registry)
        _check_kind(rule, "mapping", path, f"a mapping {_short(data)}")
        inner = _ANY if rule.value is None else rule.value
        return {k: _decode(v, inner, f"{path}[{k!r}]", registry) for k, v in data.items()}
    if isinstance(data, list):
        _check_kind(rule, "sequence", path, f"a list {_short(data)}")
        element = _ANY if rule.element is None else rule.element
        return rule.container(
            _decode(x, element, f"{path}[{i}]", registry) for i, x in enumerate(data)
        )
    if data is None or isinstance(data, (bool, int, float, str)):
        _check_kind(rule, _scalar_kind(data), path, _short(data))
        return data
    raise ValueError(f"{path}: {type(data).__name__} is not JSON data")


def _check_type_argument(type_: Any) -> None:
    if type_ is None or type_ is torch.Tensor:
        return
    if not _is_record_class(type_):
        raise TypeError(f"type_ must be a NamedTuple class, torch.Tensor or None, got {type_!r}")
    if type_ in _NOT_DATA:
        raise TypeError(_NOT_DATA[type_])


def from_dict(
    data: Any, type_: type | None = None, *, registry: Mapping[str, type] = SERIALIZABLE_TYPES
) -> Any:
    """Rebuilds what ``to_dict`` encoded: ``from_dict(to_dict(x))`` equals ``x`` exactly.

    The record type comes from the ``"__type__"`` tag (looked up in ``registry``) or from
    ``type_``. An untagged dict with ``type_`` is read as that record's fields (missing fields
    take their defaults), so hand-written dicts work: ``from_dict({"max_new_tokens": 16},
    GenerationConfig)``. Values are checked against each field's declared type; JSON arrays in
    ``Sequence`` fields become tuples.

    Args:
      data: the encoded value (what ``to_dict`` or ``json.loads(to_json(x))`` returned).
      type_: the expected record class (or ``torch.Tensor``); ``None`` trusts the tag.
      registry: class name → NamedTuple class for the tags (extend it for your own records).
    Returns:
      The rebuilt value.
    Raises:
      ValueError: a tag that disagrees with ``type_``, an unknown tag, unknown or missing
        fields (the valid keys are listed), a value of the wrong type, malformed tensor data —
        each naming the path in ``data`` (``data.generation.token_ids[2]``).
      TypeError: ``type_`` is not a NamedTuple class, or is ``TrainingState``.
    """
    _check_type_argument(type_)
    if type_ is None:
        return _decode(data, _ANY, "data", registry)
    if isinstance(data, dict) and TAG in data:
        tag = data[TAG]
        expected = _TENSOR_TAG if type_ is torch.Tensor else type_.__name__
        if tag != expected:
            raise ValueError(
                f"data: type tag mismatch: the data holds {tag!r}, expected {expected!r}"
            )
        if type_ is torch.Tensor:
            return _decode_tensor(data, "data")
        return _build(type_, data, "data", {**registry, type_.__name__: type_})
    if type_ is torch.Tensor or not isinstance(data, dict):
        raise ValueError(
            f"data: expected an encoded {getattr(type_, '__name__', type_)} (a dict), "
            f"got {type(data).__name__}"
        )
    return _build(type_, data, "data", {**registry, type_.__name__: type_})


def from_json(
    text: str | bytes,
    type_: type | None = None,
    *,
    registry: Mapping[str, type] = SERIALIZABLE_TYPES,
) -> Any:
    """``from_dict(json.loads(text), type_)``: the inverse of ``to_json``.

    Raises:
      ValueError: invalid JSON, or anything ``from_dict`` rejects.
    """
    if not isinstance(text, (str, bytes, bytearray)):
        raise TypeError(f"text must be a str or bytes, got {type(text).__name__}")
    return from_dict(json.loads(text), type_, registry=registry)


# --------------------------------------------------------------------------------------------
# Files: atomic writes, JSONL rollouts, configs.
# --------------------------------------------------------------------------------------------


def _check_path(path: Any, argument: str = "path") -> Path:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"{argument} must be a non-empty str or os.PathLike, got {path!r}")
    return Path(os.fspath(path))


def _atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to a temp file beside ``path``, fsyncs it, then renames it over ``path``.

    A reader sees the old file or the new one, never a partial one.
    """
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    try:  # make the rename itself durable
        directory = os.open(parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def save_rollouts_jsonl(rollouts: Sequence[Rollout], path: str | os.PathLike[str]) -> Path:
    """Writes ``rollouts`` to ``path``, one ``to_json(rollout)`` per line, atomically.

    Every rollout is encoded before anything is written; then the lines go to a temp file in
    the same directory that replaces ``path`` with ``os.replace`` (parent directories are
    created), so ``path`` holds either its old content or all the new lines.

    Args:
      rollouts: a sequence of ``Rollout`` (may be empty).
      path: the ``.jsonl`` file to write.
    Returns:
      ``path`` as a ``pathlib.Path``.
    Raises:
      TypeError: ``rollouts`` is not a sequence of ``Rollout`` (the index is named) or holds
        unserialisable values (e.g. a function in ``metadata``); nothing is written.
    """
    path = _check_path(path)
    if isinstance(rollouts, (Rollout, str)) or not isinstance(rollouts, Sequence):
        raise TypeError(f"rollouts must be a sequence of Rollout, got {type(rollouts).__name__}")
    lines = []
    for index, rollout in enumerate(rollouts):
        if not isinstance(rollout, Rollout):
            raise TypeError(f"rollouts[{index}] must be a Rollout, got {type(rollout).__name__}")
        encoded = _encode(rollout, _ANY, f"rollouts[{index}]")
        lines.append(json.dumps(encoded, allow_nan=False, ensure_ascii=True) + "\n")
    _atomic_write_text(path, "".join(lines))
    return path


def load_rollouts_jsonl(
    path: str | os.PathLike[str], *, registry: Mapping[str, type] = SERIALIZABLE_TYPES
) -> list[Rollout]:
    """Reads the rollouts ``save_rollouts_jsonl`` wrote (blank lines are skipped).

    Args:
      path: the ``.jsonl`` file.
      registry: as in ``from_dict``.
    Returns:
      The rollouts, in file order, equal to those saved.
    Raises:
      ValueError: a line that is not JSON, not an encoded ``Rollout``, or holds invalid
        values — the message starts with ``"<path>:<line number>:"``.
    """
    path = _check_path(path)
    rollouts: list[Rollout] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}:{number}: invalid JSON: {error}") from error
            try:
                rollout = from_dict(data, Rollout, registry=registry)
            except (ValueError, TypeError) as error:
                raise ValueError(f"{path}:{number}: {error}") from error
            rollouts.append(rollout)
    return rollouts


def _validate_config(config: Any, registry: Mapping[str, Algorithm] | None) -> Any:
    if isinstance(config, AlgorithmConfig):
        validate_algorithm_config(config)
        if registry is not None:
            get_algorithm(config.name, registry)
    elif isinstance(config, GenerationConfig):
        _check_generation_config(config)
    elif isinstance(config, ModelConfig):
        _check_model_config(config)
    return config


def _config_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _CONFIG_SUFFIXES:
        raise ValueError(
            f"path must end in one of {sorted(_CONFIG_SUFFIXES)} (the file format), "
            f"got {str(path)!r}"
        )
    return _CONFIG_SUFFIXES[suffix]


def save_config(
    config: ModelConfig | GenerationConfig | AlgorithmConfig,
    path: str | os.PathLike[str],
    *,
    registry: Mapping[str, Algorithm] | None = ALGORITHMS,
) -> Path:
    """Writes ``config`` to a YAML (``.yaml``/``.yml``) or JSON (``.json``) file, atomically.

    The file holds ``type: <class name>`` then every field in declaration order, as plain
    values (tuples as lists); ``load_config`` reads it back equal. The config is validated
    first (as ``load_config`` would), so an invalid config is never written.

    Args:
      config: a ``ModelConfig``, ``GenerationConfig`` or ``AlgorithmConfig``.
      path: the file; its extension picks the format.
      registry: where an ``AlgorithmConfig``'s ``name`` must be registered (``None`` skips
        that check).
    Returns:
      ``path`` as a ``pathlib.Path``.
    Raises:
      TypeError: another type of ``config``. ValueError: an unknown extension or an invalid
        config.
    """
    if not isinstance(config, tuple(CONFIG_TYPES.values())):
        raise TypeError(
            f"config must be one of {list(CONFIG_TYPES)}, got {type(config).__name__}"
            + (
                f" ({_NOT_DATA[TrainingState]})" if isinstance(config, TrainingState) else ""
            )
        )
    path = _check_path(path)
    file_format = _config_format(path)
    _validate_config(config, registry)
    rules = _field_rules(type(config))
    data: dict[str, Any] = {"type": type(config).__name__}
    for name in type(config)._fields:
        data[name] = _encode(getattr(config, name), rules[name], f"config.{name}", plain=True)
    if file_format == "yaml":
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
    else:
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    _atomic_write_text(path, text)
    return path


def _parse_yaml_floats(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    # YAML 1.1 reads ``1e-4`` (no dot) as a string; accept it where a float is expected.
    rules = _field_rules(cls)
    out = dict(data)
    for name, value in data.items():
        kinds = rules[name].kinds if name in rules else frozenset()
        if isinstance(value, str) and "float" in kinds and "str" not in kinds:
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def load_config(
    path: str | os.PathLike[str],
    type_: type | None = None,
    *,
    registry: Mapping[str, Algorithm] | None = ALGORITHMS,
) -> ModelConfig | GenerationConfig | AlgorithmConfig:
    """Reads a config file written by ``save_config`` (or by hand), checked and validated.

    The record type is the file's top-level ``type`` key (``__type__`` from ``to_json`` is
    read too) or ``type_``; when both are present they must agree. Missing keys take the
    record's defaults; ``Sequence`` fields (``stop``) load as tuples; in YAML a float written
    without a dot (``1e-4``, which YAML 1.1 reads as a string) is accepted for float fields.

    Args:
      path: a ``.yaml``, ``.yml`` or ``.json`` file.
      type_: ``ModelConfig``, ``GenerationConfig`` or ``AlgorithmConfig``; ``None`` reads the
        type from the file.
      registry: where an ``AlgorithmConfig``'s ``name`` must be registered (``None`` skips
        that check).
    Returns:
      The config, validated (``validate_algorithm_config`` for an ``AlgorithmConfig``).
    Raises:
      ValueError: unreadable YAML/JSON, no type, a type that disagrees with ``type_``, unknown
        keys (listed with the valid ones), values of the wrong type or failing validation —
        each message starts with the file path.
    """
    path = _check_path(path)
    file_format = _config_format(path)
    if type_ is not None and type_ not in CONFIG_TYPES.values():
        raise TypeError(f"type_ must be one of {list(CONFIG_TYPES)} or None, got {type_!r}")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) if file_format == "yaml" else json.loads(text)
    except (yaml.YAMLError, ValueError) as error:
        raise ValueError(f"{path}: not valid {file_format.upper()}: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    data = dict(data)
    recorded = [data.pop(key) for key in ("type", TAG) if key in data]
    if len(set(map(str, recorded))) > 1:
        raise ValueError(f"{path}: 'type' and '__type__' disagree: {recorded}")
    name = recorded[0] if recorded else None
    if name is not None and name not in CONFIG_TYPES:
        raise ValueError(
            f"{path}: type {name!r} is not a config type; expected one of {list(CONFIG_TYPES)}"
        )
    if name is not None and type_ is not None and name != type_.__name__:
        raise ValueError(
            f"{path}: type tag mismatch: the file holds a {name}, expected {type_.__name__}"
        )
    cls = type_ or (CONFIG_TYPES[name] if name is not None else None)
    if cls is None:
        raise ValueError(
            f"{path}: the file records no 'type' (one of {list(CONFIG_TYPES)}); add it or pass "
            "type_="
        )
    if file_format == "yaml":
        data = _parse_yaml_floats(cls, data)
    try:
        config = _build(cls, data, "", {cls.__name__: cls})
        return _validate_config(config, registry)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: {error}") from error


# --------------------------------------------------------------------------------------------
# Replay.
# --------------------------------------------------------------------------------------------


def _replay_advantages(
    batch: Batch,
    config: AlgorithmConfig,
    algorithm: Algorithm,
    beta: float,
    value_model: Any,
    input_ids: torch.Tensor,
    registry: Mapping[str, Algorithm],
    advantage_fn: Callable[..., Any] | None,
) -> Batch:
    """``batch`` with the advantages (returns, values) ``training_iteration`` would give it."""
    attention_mask = batch.attention_mask
    tc = batch.completion_ids.shape[1]
    if batch.rewards is None:
        raise ValueError("the batch has neither advantages nor rewards: score the rollouts")
    mask = batch.completion_mask
    kl = None
    if beta > 0 and batch.old_logprobs is not None and batch.ref_logprobs is not None:
        kl = compute_per_token_kl(batch.old_logprobs, batch.ref_logprobs, config.kl_estimator)
        kl = kl * mask
    values = batch.values
    if algorithm.needs_value and values is None:
        with torch.no_grad():
            values = get_values(value_model, input_ids, attention_mask, tc, mask)
    if batch.group_ids is None:
        raise ValueError("the batch has no group_ids: advantages need the groups")
    group_size = group_size_from_ids(batch.group_ids)
    advantages = compute_advantages_by_algorithm(
        config,
        batch.rewards,
        registry=registry,
        advantage_fn=advantage_fn,
        group_size=group_size,
        mask=mask,
        values=values,
        kl=kl,
        kl_coef=beta,
    )
    returns = batch.returns
    if isinstance(advantages, tuple):
        advantages, returns = advantages
    return batch._replace(advantages=advantages, returns=returns, values=values)


def replay_loss(
    data: Batch | Sequence[Rollout],
    policy: torch.nn.Module,
    algorithm_config: AlgorithmConfig,
    *,
    tokenizer: Any = None,
    pad_token_id: int | None = None,
    temperature: float = 1.0,
    kl_coef: float | None = None,
    value_model: Any = None,
    registry: Mapping[str, Algorithm] = ALGORITHMS,
    advantage_fn: Callable[..., Any] | None = None,
    loss_fn: Callable[..., Any] | None = None,
    logprob_extractor: Callable[..., Any] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss ``policy`` gets on a saved batch — the same numbers as the training step.

    With rollouts, the batch is ``rollouts_to_batch(rollouts, tokenizer)``. When it has no
    advantages they are computed as ``training_iteration`` does::

        G       = group_size_from_ids(group_ids)
        kl      = k(old_logprobs, ref_logprobs) · mask      (only when β > 0 and both exist)
        values  = value_model(...)                            (critic algorithms only)
        A       = advantage_fn(rewards, config, group_size=G, mask=mask, values=values,
                               kl=kl, kl_coef=β)

    Then ``new_logprobs, entropy = get_logprobs(policy, [prompt | completion], attention_mask,
    temperature, completion_length=Tc, return_entropy=True)`` and the result is
    ``compute_loss_by_algorithm(config, batch, new_logprobs, kl_coef=β, entropy=entropy)``
    (plus ``new_values`` for critic algorithms), exactly what ``training_step`` computes for a
    single micro-batch. Every step is deterministic on a CPU, so the same data and weights give
    a bit-identical loss. A ``Batch`` with advantages (e.g. saved with ``to_json`` just before
    ``training_step``) is used as it is.

    Gradients follow the caller's mode: wrap the call in ``torch.no_grad()`` to get only the
    value, or call ``loss.backward()`` to replay the gradient too.

    Args:
      data: a ``Batch`` or a sequence of scored ``Rollout``.
      policy: the causal LM whose loss to compute.
      algorithm_config: the algorithm configuration.
      tokenizer / pad_token_id: the pad id for ``rollouts_to_batch`` (rollouts only).
      temperature: the sampling temperature (log-probs use ``logits / temperature``).
      kl_coef: β (``None``: ``algorithm_config.kl_coef``).
      value_model: the critic for critic algorithms (PPO).
      registry: where to look the algorithm up.
      advantage_fn / loss_fn / logprob_extractor: replacements, as in ``training_iteration``.
    Returns:
      ``(loss, metrics)`` from the loss function.
    Raises:
      ValueError: rollouts without rewards when advantages are needed, a critic algorithm
        without ``value_model``; anything ``rollouts_to_batch`` or the loss rejects.
    """
    config = validate_algorithm_config(algorithm_config)
    algorithm = get_algorithm(config.name, registry)
    if isinstance(data, Batch):
        batch = data
    else:
        batch = rollouts_to_batch(data, tokenizer, pad_token_id=pad_token_id)
    beta = float(config.kl_coef if kl_coef is None else kl_coef)
    extract = logprob_extractor or get_logprobs
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    attention_mask = batch.attention_mask
    tc = batch.completion_ids.shape[1]
    if algorithm.needs_value and value_model is None:
        raise ValueError(f"algorithm {config.name!r} needs value_model, got None")

    if batch.advantages is None:
        batch = _replay_advantages(
            batch, config, algorithm, beta, value_model, input_ids, registry, advantage_fn
        )

    new_logprobs, entropy = extract(
        policy,
        input_ids,
        attention_mask,
        temperature=temperature,
        completion_length=tc,
        return_entropy=True,
    )
    extras: dict[str, Any] = {"kl_coef": beta, "entropy": entropy}
    if algorithm.needs_value:
        extras["new_values"] = get_values(value_model, input_ids, attention_mask, tc)
    return compute_loss_by_algorithm(
        config, batch, new_logprobs, registry=registry, loss_fn=loss_fn, **extras
    )
