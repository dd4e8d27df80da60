"""Tests for rlprim.serialization: dict/JSON round trips of every record, JSONL rollouts, config
files, and the exact replay of a saved batch's loss."""

from __future__ import annotations

import base64
import collections
import collections.abc
import json
import math
import os
import tempfile
import types
import typing
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import rlprim.types as rlprim_types
from rlprim.algorithms import (
    ALGORITHMS,
    compute_advantages_by_algorithm,
    compute_loss_by_algorithm,
    create_algorithm_config,
    register_algorithm,
)
from rlprim.batching import rollouts_to_batch
from rlprim.critic import create_value_model, get_values
from rlprim.kl import compute_per_token_kl
from rlprim.logprobs import get_logprobs
from rlprim.rollouts import create_batch_rollouts
from rlprim.serialization import (
    CONFIG_TYPES,
    SERIALIZABLE_TYPES,
    from_dict,
    from_json,
    load_config,
    load_rollouts_jsonl,
    replay_loss,
    save_config,
    save_rollouts_jsonl,
    to_dict,
    to_json,
)
from rlprim.testing import tiny_model, tiny_tokenizer
from rlprim.training import create_training_state, training_step
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

NOT_DATA = (TrainingState, Algorithm, Schedule)
RECORD_TYPES = [
    getattr(rlprim_types, name)
    for name in rlprim_types.__all__
    if isinstance(getattr(rlprim_types, name), type)
    and issubclass(getattr(rlprim_types, name), tuple)
    and getattr(rlprim_types, name) not in NOT_DATA
]


# --------------------------------------------------------------------------------------------
# Exact comparison: same types, same containers, same bits.
# --------------------------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def assert_identical(a: Any, b: Any, path: str = "x") -> None:
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert tensor_bytes(a) == tensor_bytes(b), f"{path}: tensor bits differ"
    elif isinstance(a, float):
        if math.isnan(a):
            assert math.isnan(b), f"{path}: nan != {b}"
        else:
            assert a == b and math.copysign(1, a) == math.copysign(1, b), f"{path}: {a} != {b}"
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{path}[{key!r}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_plain_json(value: Any, path: str = "x") -> None:
    """Only dict (str keys), list, str, int, finite float, bool and None."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{path}: key {key!r}"
            assert_plain_json(item, f"{path}[{key!r}]")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            assert_plain_json(item, f"{path}[{i}]")
    elif isinstance(value, float):
        assert math.isfinite(value), f"{path}: {value}"
    else:
        assert value is None or type(value) in (str, int, bool), f"{path}: {type(value)}"


def strict_loads(text: str) -> Any:
    def reject(token: str) -> Any:
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)


# --------------------------------------------------------------------------------------------
# Strategies, generated from each record's declared field types.
# --------------------------------------------------------------------------------------------

TENSOR_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
]


@st.composite
def tensors(draw, dtypes=TENSOR_DTYPES) -> torch.Tensor:
    """Any bit pattern (NaN payloads, ±inf, subnormals, -0.0), 0-d to 3-d, some non-contiguous."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(shape)
    if dtype == torch.bool:
        values = draw(st.lists(st.booleans(), min_size=numel, max_size=numel))
        tensor = torch.tensor(values, dtype=torch.bool).reshape(shape)
    else:
        raw = draw(st.binary(min_size=numel * itemsize, max_size=numel * itemsize))
        tensor = (
            torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
            if numel
            else torch.empty(shape, dtype=dtype)
        )
    if tensor.dim() >= 2 and draw(st.booleans()):
        tensor = tensor.transpose(0, 1)  # non-contiguous
    return tensor


any_float = st.floats(allow_nan=True, allow_infinity=True)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), any_float, st.text(max_size=8)
)
free_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from(["a", "b", "__type__", "items"]) | st.text(max_size=4),
                        children, max_size=3),
        st.dictionaries(st.integers(-5, 5), children, max_size=3),
    ),
    max_leaves=8,
)


def strategy_for(hint: Any) -> st.SearchStrategy:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return st.one_of(*[strategy_for(member) for member in typing.get_args(hint)])
    if hint is Any:
        return free_values
    if hint is type(None):
        return st.none()
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(-(2**40), 2**40)
    if hint is float:
        return st.one_of(any_float, st.integers(-5, 5))  # an int may sit in a float field
    if hint is str:
        return st.text(max_size=10)
    if hint is torch.Tensor:
        return tensors()
    if origin is collections.abc.Sequence:
        items = st.lists(strategy_for(typing.get_args(hint)[0]), max_size=4)
        return st.one_of(items.map(tuple), items)  # lists survive too (tagged)
    if origin is collections.abc.Mapping:
        key, value = typing.get_args(hint)
        return st.dictionaries(strategy_for(key), strategy_for(value), max_size=3)
    if isinstance(hint, type) and issubclass(hint, tuple) and hasattr(hint, "_fields"):
        return record_strategy(hint)
    raise AssertionError(f"no strategy for {hint!r}")


def record_strategy(cls: type) -> st.SearchStrategy:
    hints = typing.get_type_hints(cls)
    return st.builds(cls, **{name: strategy_for(hints[name]) for name in cls._fields})


# --------------------------------------------------------------------------------------------
# to_dict / from_dict / JSON.
# --------------------------------------------------------------------------------------------


def test_serializable_types_cover_every_data_record_of_rlprim_types():
    assert set(RECORD_TYPES) <= set(SERIALIZABLE_TYPES.values())
    assert {cls.__name__ for cls in RECORD_TYPES} == {
        "ModelConfig", "GenerationConfig", "Message", "Conversation", "ToolCall", "Generation",
        "Rollout", "Batch", "AlgorithmConfig", "TrainingStats",
    }


def test_to_dict_hand_computed_generation_config():
    config = GenerationConfig(max_new_tokens=8, temperature=0.5, stop=("\n",), seed=3)
    assert to_dict(config) == {
        "__type__": "GenerationConfig",
        "max_new_tokens": 8,
        "temperature": 0.5,
        "top_p": 1.0,
        "top_k": 0,
        "num_samples": 1,
        "stop": ["\n"],
        "seed": 3,
        "do_sample": True,
        "batch_size": None,
    }
    assert to_json(config) == (
        '{"__type__": "GenerationConfig", "max_new_tokens": 8, "temperature": 0.5, '
        '"top_p": 1.0, "top_k": 0, "num_samples": 1, "stop": ["\\n"], "seed": 3, '
        '"do_sample": true, "batch_size": null}'
    )


def test_tensor_encoding_hand_computed():
    # 1.0 = 0x3F800000 and -2.0 = 0xC0000000, little-endian: 00 00 80 3F 00 00 00 C0.
    encoded = to_dict(torch.tensor([1.0, -2.0], dtype=torch.float32))
    assert encoded == {
        "__type__": "torch.Tensor",
        "dtype": "float32",
        "shape": [2],
        "byteorder": "little",
        "data": "AACAPwAAAMA=",
    }
    assert base64.b64decode("AACAPwAAAMA=") == bytes([0, 0, 0x80, 0x3F, 0, 0, 0, 0xC0])
    decoded = from_dict(encoded)
    assert decoded.dtype == torch.float32 and decoded.tolist() == [1.0, -2.0]


@given(tensors(dtypes=[torch.float32, torch.float64, torch.float16, torch.int64, torch.int8,
                       torch.uint8, torch.bool]))
def test_tensor_bytes_match_an_independent_numpy_decoding(tensor):
    encoded = to_dict(tensor)
    numpy_dtype = {
        torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
        torch.int64: np.int64, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
    }[tensor.dtype]
    reference = np.frombuffer(base64.b64decode(encoded["data"]), dtype=numpy_dtype)
    reference = reference.reshape(encoded["shape"])
    expected = tensor.contiguous().numpy()
    assert reference.shape == expected.shape
    assert reference.tobytes() == expected.tobytes()


def test_special_floats_are_tagged_and_json_is_strict():
    stats = TrainingStats(step=2, loss=float("inf"), kl=-float("inf"), entropy=-0.0)
    encoded = to_dict(stats)
    assert encoded["loss"] == {"__type__": "float", "value": "inf"}
    assert encoded["kl"] == {"__type__": "float", "value": "-inf"}
    assert encoded["policy_loss"] == {"__type__": "float", "value": "nan"}
    assert encoded["entropy"] == 0.0 and math.copysign(1, encoded["entropy"]) == -1
    back = from_json(to_json(stats))
    assert strict_loads(to_json(stats))["step"] == 2
    assert_identical(back, stats)


@pytest.mark.parametrize("cls", RECORD_TYPES, ids=lambda cls: cls.__name__)
def test_round_trip_every_record(cls):
    @given(record_strategy(cls))
    def check(value):
        encoded = to_dict(value)
        assert_plain_json(encoded)
        assert encoded["__type__"] == cls.__name__
        assert_identical(from_dict(encoded), value)
        assert_identical(from_dict(encoded, cls), value)
        text = to_json(value)
        assert text.isascii()
        assert_identical(from_json(text), value)
        assert_identical(from_dict(strict_loads(text)), value)

    check()


@given(tensors())
def test_tensor_round_trip_is_bit_exact(tensor):
    back = from_json(to_json(tensor))
    assert back.is_contiguous() and not back.requires_grad
    assert_identical(back, tensor.contiguous())


def test_tensor_round_trip_drops_grad_and_keeps_special_values():
    special = [float("nan"), float("inf"), -float("inf"), -0.0, 1e-45]
    tensor = torch.tensor(special, requires_grad=True)
    back = from_json(to_json(tensor))
    assert not back.requires_grad
    assert tensor_bytes(back) == tensor_bytes(tensor.detach())
    bf16 = torch.tensor([1.5, float("nan"), -3.0], dtype=torch.bfloat16)
    assert_identical(from_json(to_json(bf16)), bf16)


@given(free_values)
def test_free_form_values_round_trip(value):
    rollout = Rollout("p", Generation("t"), metadata={"value": value})
    encoded = to_dict(rollout)
    assert_plain_json(encoded)
    assert_identical(from_json(to_json(rollout)), rollout)
    assert_identical(from_dict(to_dict(value)), value)


def test_containers_tuple_list_and_dict_encodings():
    # Sequence fields: a tuple is a plain array, a list is tagged (and comes back a list).
    assert to_dict(GenerationConfig(stop=("a",)))["stop"] == ["a"]
    assert to_dict(GenerationConfig(stop=["a"]))["stop"] == {"__type__": "list", "items": ["a"]}
    assert from_dict(to_dict(GenerationConfig(stop=["a"]))).stop == ["a"]
    # Free-form values: a list is a plain array, a tuple is tagged.
    metadata = {"l": [1, 2], "t": (1, 2)}
    encoded = to_dict(Rollout("p", Generation("t"), metadata=metadata))["metadata"]
    assert encoded == {"l": [1, 2], "t": {"__type__": "tuple", "items": [1, 2]}}
    # Dicts with non-str keys or a "__type__" key are tagged.
    assert to_dict({1: "a"}) == {"__type__": "dict", "items": [[1, "a"]]}
    assert to_dict({"__type__": 1}) == {"__type__": "dict", "items": [["__type__", 1]]}
    assert from_dict(to_dict({"__type__": 1})) == {"__type__": 1}
    # A hand-written list in a Sequence field reads as a tuple.
    assert from_dict({"max_new_tokens": 4, "stop": ["x"]}, GenerationConfig).stop == ("x",)


def test_from_dict_reads_hand_written_nested_records():
    data = {
        "prompt": "2+2=",
        "generation": {"text": "4", "prompt_ids": [5, 6], "token_ids": [7], "logprobs": [-0.5]},
        "rewards": 1,
        "tool_calls": [{"name": "calc", "arguments": {"expression": "2+2"}}],
        "conversation": {"messages": [{"role": "user", "content": "2+2="}]},
    }
    rollout = from_dict(data, Rollout)
    assert_identical(
        rollout,
        Rollout(
            "2+2=",
            Generation("4", (5, 6), (7,), (-0.5,)),
            rewards=1,
            tool_calls=(ToolCall("calc", {"expression": "2+2"}),),
            conversation=Conversation((Message("user", "2+2="),)),
        ),
    )


def test_numpy_scalars_are_written_as_python_numbers():
    rollout = Rollout("p", Generation("t"), rewards=np.float32(0.5), group_id=np.int64(3),
                      metadata={"ok": np.bool_(True)})
    back = from_json(to_json(rollout))
    assert_identical(back, Rollout("p", Generation("t"), rewards=0.5, group_id=3,
                                   metadata={"ok": True}))


def test_user_records_round_trip_with_a_registry():
    class Point(NamedTuple):
        x: float
        label: str = "origin"

    class Path(NamedTuple):
        points: tuple
        batch: Any = None
        tags: list[str] = []
        pair: tuple[int, str] = (0, "")

    value = Path((Point(1.0), Point(float("nan"), "far")), batch=torch.arange(3), tags=["a"],
                 pair=(2, "b"))
    registry = {**SERIALIZABLE_TYPES, "Point": Point, "Path": Path}
    encoded = to_dict(value)
    assert encoded["tags"] == ["a"] and encoded["pair"] == [2, "b"]  # each field's own container
    assert_identical(from_json(to_json(value), registry=registry), value)
    swapped = value._replace(tags=("a",), pair=[2, "b"])
    assert_identical(from_json(to_json(swapped), registry=registry), swapped)
    assert_identical(from_dict({"points": [], "tags": ["x"]}, Path), Path((), tags=["x"]))
    with pytest.raises(ValueError, match=r"unknown __type__ 'Path'.*registry="):
        from_json(to_json(value))


@pytest.mark.parametrize(
    "value, match",
    [
        (TrainingState(None, None, None), r"save_checkpoint"),
        (Algorithm(None, None), r"Algorithm holds functions"),
        (Schedule(lambda it: it), r"Schedule holds a function"),
        (Rollout("p", Generation("t"), metadata={"fn": len}), r"value\.metadata\['fn'\].*code"),
        (Rollout("p", Generation("t"), metadata={"obj": object()}), r"cannot serialise a object"),
        (GenerationConfig(stop="abc"), r"value\.stop must be Sequence\[str\], got 'abc'"),
        (Generation("t", token_ids=(1, 2.5)), r"value\.token_ids\[1\] must be int, got 2\.5"),
        (Rollout("p", Generation("t"), rewards=torch.tensor(1.0)), r"value\.rewards must be"),
    ],
)
def test_to_dict_rejects_what_is_not_data(value, match):
    with pytest.raises(TypeError, match=match):
        to_dict(value)


def test_from_dict_type_argument_errors():
    with pytest.raises(TypeError, match="save_checkpoint"):
        from_dict({}, TrainingState)
    with pytest.raises(TypeError, match="type_ must be a NamedTuple class"):
        from_dict({}, dict)


@pytest.mark.parametrize(
    "data, type_, match",
    [
        (to_dict(Generation("t")), Rollout,
         r"type tag mismatch: the data holds 'Generation', expected 'Rollout'"),
        ({"__type__": "Rollout", "prompt": "p", "generation": to_dict(ToolCall("x"))}, None,
         r"data\.generation: type tag mismatch: the data holds a ToolCall, expected Generation"),
        ({"__type__": "Nope"}, None, r"unknown __type__ 'Nope'; known: \['AlgorithmConfig'"),
        ({"max_new_tokens": 4, "temprature": 1.0}, GenerationConfig,
         r"unknown keys \['temprature'\] for GenerationConfig; valid keys: \['max_new_tokens', "
         r"'temperature'"),
        ({"dtype": "float32"}, ModelConfig, r"ModelConfig needs the keys \['name_or_path'\]"),
        ({"max_new_tokens": "8"}, GenerationConfig, r"data\.max_new_tokens must be int, got '8'"),
        ({"max_new_tokens": True}, GenerationConfig, r"data\.max_new_tokens must be int, got True"),
        ({"text": "t", "token_ids": [1, "2"]}, Generation, r"data\.token_ids\[1\] must be int"),
        ({"text": "t", "token_ids": 5}, Generation, r"data\.token_ids must be Sequence\[int\]"),
        ({"step": 1, "extra": {"a": "x"}}, TrainingStats, r"data\.extra\['a'\] must be float"),
        (dict.fromkeys(["prompt_ids", "completion_ids", "attention_mask", "completion_mask"], [1]),
         Batch, r"data\.prompt_ids must be torch\.Tensor, got a list \[1\]"),
        ({"__type__": "torch.Tensor", "dtype": "float32", "shape": [2], "byteorder": "little",
          "data": "AACAPw=="}, None, r"holds 4 bytes; shape \[2\] of float32 needs 8"),
        ({"__type__": "torch.Tensor", "dtype": "float33", "shape": [], "byteorder": "little",
          "data": ""}, None, r"'float33' is not a torch dtype"),
        ({"__type__": "float", "value": "NaN"}, None, r"a tagged float is"),
        ({"__type__": "tuple", "elements": []}, None, r"a tagged tuple is"),
    ],
)
def test_from_dict_rejects_malformed_data(data, type_, match):
    with pytest.raises(ValueError, match=match):
        from_dict(data, type_)


# --------------------------------------------------------------------------------------------
# JSONL rollouts.
# --------------------------------------------------------------------------------------------


@settings(max_examples=30)  # each example writes and fsyncs a file
@given(st.lists(record_strategy(Rollout), max_size=4))
def test_rollouts_jsonl_round_trip(rollouts):
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "sub", "rollouts.jsonl")
        assert str(save_rollouts_jsonl(rollouts, path)) == path
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        assert len(lines) == len(rollouts)
        for line, rollout in zip(lines, rollouts, strict=True):
            assert_identical(from_dict(strict_loads(line)), rollout)
        assert_identical(load_rollouts_jsonl(path), list(rollouts))
        assert os.listdir(os.path.dirname(path)) == ["rollouts.jsonl"]  # no temp file left


def test_rollouts_jsonl_failed_save_leaves_the_old_file(tmp_path):
    path = tmp_path / "r.jsonl"
    good = [Rollout("a", Generation("x", (1,), (2,), (-0.25,)), rewards=1.0)]
    save_rollouts_jsonl(good, path)
    before = path.read_bytes()
    bad = good + [Rollout("b", Generation("y"), metadata={"fn": print})]
    with pytest.raises(TypeError, match=r"rollouts\[1\]\.metadata\['fn'\]"):
        save_rollouts_jsonl(bad, path)
    with pytest.raises(TypeError, match=r"rollouts\[1\] must be a Rollout, got Generation"):
        save_rollouts_jsonl([good[0], Generation("y")], path)
    with pytest.raises(TypeError, match="rollouts must be a sequence of Rollout"):
        save_rollouts_jsonl(good[0], path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]
    assert load_rollouts_jsonl(path) == good


def test_rollouts_jsonl_errors_name_the_line(tmp_path):
    good = to_json(Rollout("a", Generation("x")))
    cases = [
        ([good, good, "{not json"], r":3: invalid JSON"),
        ([good, to_json(Generation("x"))], r":2: data: type tag mismatch"),
        ([good, "", json.dumps({"prompt": "p", "generation": {"text": 1}})],
         r":3: data\.generation\.text must be str, got 1"),
    ]
    for lines, match in cases:
        path = tmp_path / "r.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=match):
            load_rollouts_jsonl(path)
    path.write_text(good + "\n\n" + good + "\n")  # blank lines are skipped
    assert len(load_rollouts_jsonl(path)) == 2


# --------------------------------------------------------------------------------------------
# Config files.
# --------------------------------------------------------------------------------------------

positive = st.floats(0.01, 10.0)
generation_configs = st.builds(
    GenerationConfig,
    max_new_tokens=st.integers(1, 512),
    temperature=st.floats(0.05, 4.0),
    top_p=st.floats(0.05, 1.0),
    top_k=st.integers(0, 100),
    num_samples=st.integers(1, 16),
    stop=st.lists(st.text(min_size=1, max_size=6), max_size=3).map(tuple),
    seed=st.none() | st.integers(0, 2**31),
    do_sample=st.booleans(),
    batch_size=st.none() | st.integers(1, 64),
)
model_configs = st.builds(
    ModelConfig,
    name_or_path=st.text(min_size=1, max_size=12),
    dtype=st.sampled_from(["float32", "bfloat16", "float16", "auto"]),
    device=st.sampled_from(["cpu", "cuda", "cuda:1"]),
    revision=st.none() | st.text(max_size=8),
    trust_remote_code=st.booleans(),
    lora=st.none()
    | st.fixed_dictionaries(
        {"r": st.integers(1, 64), "lora_alpha": positive,
         "target_modules": st.lists(st.sampled_from(["q_proj", "v_proj"]), max_size=2)}
    ),
    attn_implementation=st.none() | st.sampled_from(["eager", "sdpa"]),
)
algorithm_configs = st.builds(
    create_algorithm_config,
    st.sampled_from(sorted(ALGORITHMS)),
    st.fixed_dictionaries(
        {},
        optional={
            "kl_coef": st.floats(0.0, 1.0),
            "clip_eps_low": st.floats(0.0, 0.5),
            "clip_eps_high": st.floats(0.0, 0.5),
            "dual_clip_c": st.none() | st.floats(1.01, 10.0),
            "entropy_coef": st.floats(0.0, 0.1),
            "loss_agg_mode": st.sampled_from(
                ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                 "seq-mean-token-sum-norm"]
            ),
            "minibatch_size": st.none() | st.integers(1, 64),
            "max_grad_norm": st.none() | positive,
            "scale_rewards": st.sampled_from(["group", "batch", "none"]),
            "adv_eps": st.floats(0.0, 1e-3),
            "overlong_buffer_len": st.none() | st.integers(1, 100),
        },
    ),
)
configs = st.one_of(generation_configs, model_configs, algorithm_configs)


@given(configs, st.sampled_from([".yaml", ".yml", ".json"]))
def test_config_files_round_trip(config, suffix):
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "config" + suffix)
        save_config(config, path)
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle) if suffix != ".json" else json.load(handle)
        assert raw["type"] == type(config).__name__
        assert list(raw)[1:] == list(type(config)._fields)
        assert_identical(load_config(path), config)
        assert_identical(load_config(path, type(config)), config)


def test_config_file_contents_hand_written(tmp_path):
    path = save_config(GenerationConfig(max_new_tokens=16, stop=("</a>",), seed=1),
                       tmp_path / "gen.yaml")
    assert path.read_text() == (
        "type: GenerationConfig\nmax_new_tokens: 16\ntemperature: 1.0\ntop_p: 1.0\ntop_k: 0\n"
        "num_samples: 1\nstop:\n- </a>\nseed: 1\ndo_sample: true\nbatch_size: null\n"
    )
    json_path = save_config(ModelConfig("m", lora={"r": 8}), tmp_path / "model.json")
    assert json.loads(json_path.read_text()) == {
        "type": "ModelConfig", "name_or_path": "m", "dtype": "float32", "device": "cpu",
        "revision": None, "trust_remote_code": False, "lora": {"r": 8},
        "attn_implementation": None,
    }


def test_load_config_hand_written_yaml_with_defaults(tmp_path):
    path = tmp_path / "algo.yml"
    path.write_text("type: AlgorithmConfig\nname: dapo\nclip_eps_high: 0.28\nadv_eps: 1e-4\n"
                    "kl_coef: 0\n")
    config = load_config(path)
    assert config == AlgorithmConfig(name="dapo", clip_eps_high=0.28, adv_eps=1e-4, kl_coef=0)
    assert config.adv_eps == 0.0001  # YAML 1.1 reads "1e-4" as a string; accepted as a float
    gen = tmp_path / "gen.yaml"
    gen.write_text("max_new_tokens: 4\nstop: [\"\\n\"]\n")
    assert load_config(gen, GenerationConfig) == GenerationConfig(max_new_tokens=4, stop=("\n",))
    # A file written by to_json is a config file too.
    tagged = tmp_path / "tagged.json"
    tagged.write_text(to_json(GenerationConfig(max_new_tokens=3)))
    assert load_config(tagged) == GenerationConfig(max_new_tokens=3)


@pytest.mark.parametrize(
    "text, type_, match",
    [
        ("type: AlgorithmConfig\nklcoef: 0.1\nfoo: 1\n", None,
         r"unknown keys \['klcoef', 'foo'\] for AlgorithmConfig; valid keys: \['name', "
         r"'clip_eps_low'"),
        ("type: AlgorithmConfig\nkl_coef: -0.1\n", None, r"kl_coef must be ≥ 0, got -0\.1"),
        ("type: AlgorithmConfig\nloss_agg_mode: mean\n", None, r"loss_agg_mode must be one of"),
        ("type: AlgorithmConfig\nname: grop\n", None, r"unknown algorithm name='grop'"),
        ("type: AlgorithmConfig\nkl_coef: lots\n", None, r"kl_coef must be float, got 'lots'"),
        ("type: AlgorithmConfig\nnum_epochs: 1.5\n", None, r"num_epochs must be int, got 1\.5"),
        ("type: GenerationConfig\nmax_new_tokens: 0\n", None,
         r"max_new_tokens must be an int >= 1"),
        ("type: GenerationConfig\nstop: '</a>'\n", None, r"stop must be Sequence\[str\]"),
        ("type: GenerationConfig\ntop_p: 1.5\n", None, r"top_p must be in \(0, 1\]"),
        ("type: ModelConfig\nname_or_path: m\ndtype: float33\n", None, r"dtype must be one of"),
        ("type: ModelConfig\ndtype: float32\n", None, r"needs the keys \['name_or_path'\]"),
        ("type: ModelConfig\nname_or_path: m\n", AlgorithmConfig,
         r"type tag mismatch: the file holds a ModelConfig, expected AlgorithmConfig"),
        ("type: Rollout\nprompt: p\n", None, r"type 'Rollout' is not a config type"),
        ("name: grpo\n", None, r"records no 'type'.*pass type_="),
        ("- 1\n- 2\n", None, r"expected a mapping of config keys, got list"),
        ("type: [unclosed\n", None, r"not valid YAML"),
    ],
)
def test_load_config_rejects_bad_files(tmp_path, text, type_, match):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as error:
        load_config(path, type_)
    assert str(error.value).startswith(str(path))


def test_config_files_other_errors(tmp_path):
    with pytest.raises(ValueError, match=r"must end in one of \['.json', '.yaml', '.yml'\]"):
        save_config(GenerationConfig(), tmp_path / "gen.toml")
    with pytest.raises(TypeError, match=r"config must be one of .*save_checkpoint"):
        save_config(TrainingState(None, None, None), tmp_path / "state.yaml")
    with pytest.raises(TypeError, match=r"config must be one of"):
        save_config(TrainingStats(), tmp_path / "stats.yaml")
    with pytest.raises(ValueError, match=r"kl_coef must be ≥ 0"):
        save_config(AlgorithmConfig(kl_coef=-1.0), tmp_path / "bad.yaml")
    assert not (tmp_path / "bad.yaml").exists()  # an invalid config is never written
    with pytest.raises(TypeError, match="type_ must be one of"):
        load_config(tmp_path / "x.yaml", Rollout)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(bad_json)
    assert set(CONFIG_TYPES) == {"ModelConfig", "GenerationConfig", "AlgorithmConfig"}


def test_config_with_a_registered_algorithm(tmp_path):
    mine = register_algorithm("my_pg", ALGORITHMS["reinforce"])
    config = create_algorithm_config("my_pg", registry=mine)
    with pytest.raises(ValueError, match="unknown algorithm name='my_pg'"):
        save_config(config, tmp_path / "mine.yaml")
    path = save_config(config, tmp_path / "mine.yaml", registry=mine)
    assert load_config(path, registry=mine) == config
    assert load_config(path, registry=None) == config
    with pytest.raises(ValueError, match="unknown algorithm name='my_pg'"):
        load_config(path)


# --------------------------------------------------------------------------------------------
# Replay: a saved batch reproduces its loss exactly.
# --------------------------------------------------------------------------------------------

TEMPERATURE = 0.7
GROUP = 4


@pytest.fixture(scope="module")
def run():
    policy = tiny_model(seed=0)
    ref = tiny_model(seed=1)
    tokenizer = tiny_tokenizer()
    prompts = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]
    gen = GenerationConfig(max_new_tokens=6, temperature=TEMPERATURE, num_samples=GROUP, seed=0)

    def reward_fn(rollout: Rollout) -> float:
        return float(sum(rollout.generation.token_ids) % 5) / 4.0

    rollouts = create_batch_rollouts(policy, tokenizer, prompts, gen, ref_model=ref,
                                     reward_fn=reward_fn)
    # Sampled rewards can tie across a whole group (then every advantage, and the loss, is
    # exactly 0), so each sample's reward is fixed by its position in its group instead.
    position = collections.Counter()
    fixed = []
    for r in rollouts:
        fixed.append(r._replace(rewards=[0.0, 0.25, 1.0, 0.5][position[r.group_id] % 4]))
        position[r.group_id] += 1
    # The loss is taken under a learner a small step away from the sampler, so ratios are not 1
    # and no term cancels exactly (equal lengths and ratio 1 make a policy-gradient loss 0).
    learner = tiny_model(seed=0)
    with torch.no_grad():
        noise = torch.Generator().manual_seed(7)
        for p in learner.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=noise))
    value_model = create_value_model(learner)
    return learner, tokenizer, fixed, value_model


def reference_loss(rollouts, policy, tokenizer, config, value_model):
    """The recipe written out with the primitives (independent of ``replay_loss``)."""
    batch = rollouts_to_batch(rollouts, tokenizer)
    mask = batch.completion_mask
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    tc = batch.completion_ids.shape[1]
    kl = None
    if config.kl_coef > 0:
        kl = compute_per_token_kl(batch.old_logprobs, batch.ref_logprobs, config.kl_estimator)
        kl = kl * mask
    values = None
    if config.name == "ppo":
        values = get_values(value_model, ids, batch.attention_mask, tc, mask)
    advantages = compute_advantages_by_algorithm(
        config, batch.rewards, group_size=GROUP, mask=mask, values=values, kl=kl,
        kl_coef=config.kl_coef,
    )
    returns = None
    if isinstance(advantages, tuple):
        advantages, returns = advantages
    batch = batch._replace(advantages=advantages, returns=returns, values=values)
    new_logprobs, entropy = get_logprobs(policy, ids, batch.attention_mask,
                                         temperature=TEMPERATURE, completion_length=tc,
                                         return_entropy=True)
    extras = {"kl_coef": config.kl_coef, "entropy": entropy}
    if config.name == "ppo":
        extras["new_values"] = get_values(value_model, ids, batch.attention_mask, tc)
    loss, _ = compute_loss_by_algorithm(config, batch, new_logprobs, **extras)
    return loss, batch


REPLAY_CONFIGS = [
    ("grpo", {"kl_coef": 0.1}),
    ("dr_grpo", {}),
    ("dapo", {"entropy_coef": 0.01}),
    ("gspo", {}),
    ("cispo", {}),
    ("rloo", {"kl_coef": 0.05, "kl_in_reward": True}),
    ("reinforce", {"whiten_advantages": True}),
    ("ppo", {"kl_coef": 0.02}),
]


@pytest.mark.parametrize("name, overrides", REPLAY_CONFIGS, ids=[n for n, _ in REPLAY_CONFIGS])
def test_saved_and_replayed_rollouts_reproduce_the_loss_exactly(run, tmp_path, name, overrides):
    policy, tokenizer, rollouts, value_model = run
    config = create_algorithm_config(name, overrides)
    with torch.no_grad():
        original, _ = reference_loss(rollouts, policy, tokenizer, config, value_model)
        path = save_rollouts_jsonl(rollouts, tmp_path / "rollouts.jsonl")
        loaded = load_rollouts_jsonl(path)
        assert_identical(loaded, rollouts)
        recomputed, _ = reference_loss(loaded, policy, tokenizer, config, value_model)
        replayed, metrics = replay_loss(loaded, policy, config, tokenizer=tokenizer,
                                        temperature=TEMPERATURE, value_model=value_model)
    assert torch.isfinite(original) and original.item() != 0.0
    assert torch.equal(recomputed, original)
    assert torch.equal(replayed, original)
    assert metrics and all(isinstance(v, float) for v in metrics.values())


def test_replay_detects_a_lossy_save(run):
    # The exactness check can fail: old log-probs rounded to float16 (a lossy format) change it.
    policy, tokenizer, rollouts, value_model = run
    config = create_algorithm_config("grpo", {"kl_coef": 0.1})
    lossy = [
        r._replace(generation=r.generation._replace(
            logprobs=tuple(float(np.float16(x)) for x in r.generation.logprobs)))
        for r in rollouts
    ]
    with torch.no_grad():
        original, _ = replay_loss(rollouts, policy, config, tokenizer=tokenizer,
                                  temperature=TEMPERATURE)
        perturbed, _ = replay_loss(lossy, policy, config, tokenizer=tokenizer,
                                   temperature=TEMPERATURE)
    assert not torch.equal(original, perturbed)


def test_replayed_batch_matches_the_training_step_loss(run):
    # Save the exact Batch a training step receives; replaying it gives the loss that step
    # reported.
    policy, tokenizer, rollouts, value_model = run
    config = create_algorithm_config("dapo", {"kl_coef": 0.05})
    _, batch = reference_loss(rollouts, policy, tokenizer, config, value_model)
    loaded = from_json(to_json(batch))
    assert_identical(loaded, batch)
    student = tiny_model(seed=0)
    replayed, _ = replay_loss(loaded, student, config, temperature=TEMPERATURE)
    assert replayed.requires_grad  # the caller's grad mode: it can be backpropagated
    state = create_training_state(tiny_model(seed=0), tokenizer, config, learning_rate=1e-3)
    state, stats = training_step(state, batch, config, temperature=TEMPERATURE)
    assert stats.loss == replayed.item()
    assert stats.skipped_updates == 0


def test_replay_loss_errors(run):
    policy, tokenizer, rollouts, _ = run
    unscored = [r._replace(rewards=None) for r in rollouts]
    with pytest.raises(ValueError, match="neither advantages nor rewards"):
        replay_loss(unscored, policy, create_algorithm_config("grpo"), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="needs value_model"):
        replay_loss(rollouts, policy, create_algorithm_config("ppo"), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="kl_coef"):
        replay_loss(rollouts, policy, AlgorithmConfig(kl_coef=-1.0), tokenizer=tokenizer)
