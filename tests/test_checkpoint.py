"""Tests for rlprim.checkpoint: exact round trips, exact resume, verification, atomic writes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlprim.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_VERSION,
    capture_rng_state,
    create_checkpoint_fn,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_metadata,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)
from rlprim.kl import create_ema_updater, create_reference_model
from rlprim.testing import tiny_model, tiny_reward_model, tiny_tokenizer
from rlprim.types import AlgorithmConfig, TrainingState

VOCAB = 512


# --------------------------------------------------------------------------- helpers


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _draws() -> tuple:
    """One draw from each global RNG."""
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _gpt2_with_dropout(seed: int) -> nn.Module:
    # tiny_model fixes dropout at 0; switch every Dropout on so training consumes torch RNG.
    model = tiny_model("gpt2", seed, hidden_size=32, num_heads=2)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.1
    return model.train()


def _optimizer_and_scheduler(model: nn.Module):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)
    return optimizer, scheduler


def _train(model, optimizer, scheduler, num_steps: int) -> None:
    """A plain loop whose data comes from all three global RNGs and whose dropout uses torch's."""
    for _ in range(num_steps):
        batch_size = random.choice([2, 3])
        length = int(np.random.randint(4, 9))
        ids = torch.randint(0, VOCAB, (batch_size, length))
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _state_dict_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _assert_same_tensors(first: dict, second: dict) -> None:
    assert list(first) == list(second)
    for name in first:
        assert first[name].dtype == second[name].dtype, name
        assert torch.equal(first[name], second[name]), name


def _assert_nested_equal(first, second) -> None:
    """Recursive equality with bit-exact tensors (optimizer / scheduler state_dicts)."""
    if isinstance(first, torch.Tensor):
        assert isinstance(second, torch.Tensor) and first.dtype == second.dtype
        assert torch.equal(first, second)
    elif isinstance(first, dict):
        assert isinstance(second, dict) and set(first) == set(second)
        for key in first:
            _assert_nested_equal(first[key], second[key])
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second)
        for a, b in zip(first, second, strict=True):
            _assert_nested_equal(a, b)
    else:
        assert first == second


def _linear_state(seed: int = 0, **fields) -> TrainingState:
    # A plain nn.Module policy: the fastest checkpoint to write.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = nn.Linear(4, 3)
    return TrainingState(policy=policy, tokenizer=None, optimizer=None, **fields)


def _trained_qwen2_state() -> TrainingState:
    """Qwen2 policy after 3 AdamW steps, an EMA reference that differs from it, an HF critic."""
    _seed_all(0)
    policy = tiny_model("qwen2", 1, hidden_size=32, num_heads=2)
    ref_model = create_reference_model(policy)
    value_model = tiny_reward_model("qwen2", 2, hidden_size=32, num_heads=2)
    parameters = list(policy.parameters()) + list(value_model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    policy.train()
    ema = create_ema_updater(0.5)
    for step in range(1, 4):
        ids = torch.randint(0, VOCAB, (2, 6))
        loss = policy(ids, labels=ids).loss + value_model(ids).logits.square().mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        ref_model = ema(ref_model, policy, step)
    return TrainingState(
        policy=policy,
        tokenizer=tiny_tokenizer(),
        optimizer=optimizer,
        ref_model=ref_model,
        value_model=value_model,
        step=3,
        kl_coef=0.0375,
        config=AlgorithmConfig(name="ppo", kl_coef=0.05, value_clip=None, minibatch_size=4),
        scheduler=scheduler,
        iteration=3,
        loader_state={"position": 17, "epoch": 1, "order": (3, 1, 2), "seed": 7},
    )


def _fresh_qwen2_target() -> TrainingState:
    """Freshly built objects of the same shapes (different weights, empty optimizer)."""
    policy = tiny_model("qwen2", 11, hidden_size=32, num_heads=2)
    ref_model = tiny_model("qwen2", 12, hidden_size=32, num_heads=2)
    value_model = tiny_reward_model("qwen2", 13, hidden_size=32, num_heads=2)
    optimizer = torch.optim.AdamW(
        list(policy.parameters()) + list(value_model.parameters()), lr=1e-2
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return TrainingState(
        policy=policy,
        tokenizer=tiny_tokenizer(),
        optimizer=optimizer,
        ref_model=ref_model,
        value_model=value_model,
        scheduler=scheduler,
    )


@pytest.fixture(scope="module")
def qwen2_checkpoint(tmp_path_factory):
    """A saved checkpoint of ``_trained_qwen2_state`` and the state itself."""
    state = _trained_qwen2_state()
    path = save_checkpoint(state, tmp_path_factory.mktemp("ckpt") / "qwen2", extra={"note": "x"})
    return path, state


def _flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


# --------------------------------------------------------------------------- RNG helpers


def test_capture_rng_state_format_and_no_side_effect():
    _seed_all(3)
    expected = _draws()
    _seed_all(3)
    rng_state = capture_rng_state()
    assert _draws() == expected  # capturing advances nothing
    assert set(rng_state) == {"python", "numpy", "torch"}  # CPU-only machine
    assert rng_state["python"] == random.Random(3).getstate()
    legacy = np.random.RandomState(3).get_state()
    assert rng_state["numpy"][0] == "MT19937" and np.array_equal(rng_state["numpy"][1], legacy[1])
    assert torch.equal(rng_state["torch"], torch.Generator().manual_seed(3).get_state())


def test_restore_rng_state_replays_draws():
    _seed_all(5)
    _draws()
    rng_state = capture_rng_state()
    expected = [_draws() for _ in range(3)]
    _seed_all(99)
    restore_rng_state(rng_state)
    assert [_draws() for _ in range(3)] == expected


def test_restore_rng_state_rejects_bad_input_and_changes_nothing():
    _seed_all(8)
    valid = capture_rng_state()
    _seed_all(1)
    expected = _draws()
    _seed_all(1)
    bad_torch = {"python": valid["python"], "torch": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"rng_state\['torch'\] must be a 1-D torch.uint8"):
        restore_rng_state(bad_torch)
    with pytest.raises(ValueError, match=r"rng_state\['python'\]"):
        restore_rng_state({"python": (3, (1, 2), None), "torch": valid["torch"]})
    with pytest.raises(ValueError, match="unknown keys"):
        restore_rng_state({"jax": 0})
    with pytest.raises(TypeError, match="must be a mapping"):
        restore_rng_state([1, 2])
    assert _draws() == expected  # the python part of bad_torch was not applied


@settings(max_examples=8)
@given(st.integers(0, 2**32 - 1), st.integers(1, 5))
def test_rng_states_survive_a_checkpoint(tmp_path_factory, seed, num_draws):
    path = tmp_path_factory.mktemp("rng") / "ckpt"
    _seed_all(seed)
    for _ in range(num_draws):
        _draws()
    save_checkpoint(_linear_state(), path)  # rng_state None: captured now
    expected = [_draws() for _ in range(2)]
    _seed_all(seed + 1)
    loaded = load_checkpoint(path, _linear_state(seed=1))
    assert [_draws() for _ in range(2)] == expected
    restore_rng_state(loaded.rng_state)  # the returned state replays too
    assert [_draws() for _ in range(2)] == expected


# --------------------------------------------------------------------------- round trips


def test_checkpoint_layout_and_manifest(qwen2_checkpoint):
    path, state = qwen2_checkpoint
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert manifest["format"] == CHECKPOINT_FORMAT == "rlprim-checkpoint"
    assert manifest["format_version"] == CHECKPOINT_FORMAT_VERSION == 1
    files = set(manifest["files"])
    assert {
        "state.json",
        "rng.json",
        "optimizer.pt",
        "scheduler.pt",
        "policy/model.safetensors",
        "policy/config.json",
        "policy/generation_config.json",
        "policy/tokenizer.json",
        "ref_model/model.safetensors",
        "ref_model/config.json",
        "value_model/model.safetensors",
        "value_model/config.json",
    } <= files
    # Every file on disk is listed, with its real size and sha256 (computed independently).
    on_disk = set()
    for directory, _, names in os.walk(path):
        for name in names:
            on_disk.add(os.path.relpath(os.path.join(directory, name), path))
    assert on_disk == files | {"manifest.json"}
    for relative, entry in manifest["files"].items():
        data = open(os.path.join(path, relative), "rb").read()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_checkpoint(path) == manifest
    metadata = read_checkpoint_metadata(path)
    assert metadata["extra"] == {"note": "x"}
    assert (metadata["step"], metadata["iteration"], metadata["kl_coef"]) == (3, 3, 0.0375)
    assert metadata["components"]["optimizer"] == {"class": "AdamW"}
    # No temp or backup sibling is left behind.
    assert os.listdir(os.path.dirname(path)) == ["qwen2"]


def test_tied_weights_stored_once_and_stay_tied(tmp_path):
    model = tiny_model("gpt2", 0, hidden_size=32, num_heads=2)
    assert model.lm_head.weight is model.transformer.wte.weight
    path = save_checkpoint(TrainingState(model, None, None), tmp_path / "gpt2")
    stored = safetensors.torch.load_file(os.path.join(path, "policy", "model.safetensors"))
    assert set(stored) == set(model.state_dict()) - {"lm_head.weight"}
    target = tiny_model("gpt2", 1, hidden_size=32, num_heads=2)
    load_checkpoint(path, TrainingState(target, None, None))
    assert target.lm_head.weight is target.transformer.wte.weight
    _assert_same_tensors(target.state_dict(), model.state_dict())


def test_round_trip_into_fresh_objects_is_bit_identical(qwen2_checkpoint):
    path, saved = qwen2_checkpoint
    target = _fresh_qwen2_target()
    policy_parameters = list(target.policy.parameters())
    loaded = load_checkpoint(path, target)
    # The very same objects, updated in place (the optimizer still refers to these parameters).
    assert loaded.policy is target.policy and loaded.optimizer is target.optimizer
    assert all(a is b for a, b in zip(loaded.policy.parameters(), policy_parameters, strict=True))
    for name in ("policy", "ref_model", "value_model"):
        _assert_same_tensors(getattr(loaded, name).state_dict(), getattr(saved, name).state_dict())
    _assert_nested_equal(loaded.optimizer.state_dict(), saved.optimizer.state_dict())
    _assert_nested_equal(loaded.scheduler.state_dict(), saved.scheduler.state_dict())
    assert loaded.optimizer.param_groups[0]["lr"] == 1e-2 * 0.5  # StepLR after 3 steps
    assert (loaded.step, loaded.iteration, loaded.kl_coef) == (3, 3, 0.0375)
    assert type(loaded.config) is AlgorithmConfig and loaded.config == saved.config
    assert loaded.loader_state == {"position": 17, "epoch": 1, "order": (3, 1, 2), "seed": 7}
    assert set(loaded.rng_state) == {"python", "numpy", "torch"}


def test_state_none_rebuilds_models_with_same_outputs(qwen2_checkpoint):
    path, saved = qwen2_checkpoint
    loaded = load_checkpoint(path)
    assert loaded.optimizer is None and loaded.scheduler is None
    ids = torch.randint(0, VOCAB, (2, 7))
    saved.policy.eval()
    with torch.no_grad():
        assert torch.equal(loaded.policy(ids).logits, saved.policy(ids).logits)
        assert torch.equal(loaded.ref_model(ids).logits, saved.ref_model(ids).logits)
        assert torch.equal(loaded.value_model(ids).logits, saved.value_model(ids).logits)
        # The policy directory is a plain Hugging Face model directory.
        hf_policy = AutoModelForCausalLM.from_pretrained(os.path.join(path, "policy"))
        assert torch.equal(hf_policy(ids).logits, saved.policy(ids).logits)
    saved.policy.train()
    # Modes and frozen-ness as saved: the policy was training, the reference frozen in eval.
    assert loaded.policy.training and not loaded.ref_model.training
    assert all(p.requires_grad for p in loaded.policy.parameters())
    assert not any(p.requires_grad for p in loaded.ref_model.parameters())
    text = "12+7=19 <|user|> hello"
    assert loaded.tokenizer.encode(text) == saved.tokenizer.encode(text)
    hf_tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "policy"))
    assert hf_tokenizer.encode(text) == saved.tokenizer.encode(text)
    assert loaded.config == saved.config and loaded.step == 3


def test_plain_module_value_model_must_be_passed_in(tmp_path):
    policy = tiny_model("qwen2", 0, hidden_size=32, num_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        head = nn.Linear(32, 1)
    path = save_checkpoint(TrainingState(policy, None, None, value_model=head), tmp_path / "c")
    with pytest.raises(ValueError, match=r"state.value_model is a torch.nn.modules.linear.Linear"):
        load_checkpoint(path)
    fresh_head = nn.Linear(32, 1)
    loaded = load_checkpoint(
        path, TrainingState(policy=None, tokenizer=None, optimizer=None, value_model=fresh_head)
    )
    assert loaded.value_model is fresh_head
    _assert_same_tensors(fresh_head.state_dict(), head.state_dict())
    _assert_same_tensors(loaded.policy.state_dict(), policy.state_dict())
    assert loaded.tokenizer is None  # none was saved


def test_reference_that_is_the_policy_comes_back_as_the_policy(tmp_path):
    state = _linear_state(ref_model=None)
    state = state._replace(ref_model=state.policy)
    path = save_checkpoint(state, tmp_path / "c")
    assert not os.path.exists(os.path.join(path, "ref_model"))
    target = _linear_state(seed=1)
    loaded = load_checkpoint(path, target)
    assert loaded.ref_model is loaded.policy is target.policy
    _assert_same_tensors(loaded.policy.state_dict(), state.policy.state_dict())


@settings(max_examples=25)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False)
        | st.text(max_size=5),
        lambda children: (
            st.lists(children, max_size=3)
            | st.lists(children, max_size=3).map(tuple)
            | st.dictionaries(
                st.text(max_size=4).filter(lambda k: not k.startswith("__")), children, max_size=3
            )
        ),
        max_leaves=10,
    )
)
def test_json_values_round_trip_exactly(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("json") / "ckpt"
    save_checkpoint(_linear_state(loader_state={"v": value}), path, extra=value)
    metadata = read_checkpoint_metadata(path)
    assert metadata["extra"] == value and type(metadata["extra"]) is type(value)
    assert metadata["loader_state"] == {"v": value}


def test_non_finite_kl_coef_and_nested_namedtuples_round_trip(tmp_path):
    config = {"algo": AlgorithmConfig(name="dapo"), "betas": (0.9, 0.999), "inf": math.inf}
    path = save_checkpoint(_linear_state(kl_coef=float("inf"), config=config), tmp_path / "c")
    loaded = load_checkpoint(path, _linear_state(seed=1))
    assert loaded.kl_coef == math.inf
    assert loaded.config == config and type(loaded.config["algo"]) is AlgorithmConfig


# --------------------------------------------------------------------------- exact resume


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    k, n = 3, 7
    # Uninterrupted run, with a save at k (saving must not disturb the run).
    _seed_all(2024)
    model = _gpt2_with_dropout(0)
    optimizer, scheduler = _optimizer_and_scheduler(model)
    _train(model, optimizer, scheduler, k)
    state = TrainingState(model, None, optimizer, step=k, scheduler=scheduler, iteration=k)
    path = save_checkpoint(state, tmp_path / "step_k")
    _train(model, optimizer, scheduler, n - k)
    uninterrupted = _state_dict_copy(model)

    def resume(restore_rng: bool) -> dict[str, torch.Tensor]:
        _seed_all(777)  # a different process would have different RNG states
        fresh = _gpt2_with_dropout(5)
        fresh_optimizer, fresh_scheduler = _optimizer_and_scheduler(fresh)
        target = TrainingState(fresh, None, fresh_optimizer, scheduler=fresh_scheduler)
        loaded = load_checkpoint(path, target, restore_rng=restore_rng)
        assert loaded.step == k
        _train(loaded.policy, loaded.optimizer, loaded.scheduler, n - loaded.step)
        return _state_dict_copy(loaded.policy)

    _assert_same_tensors(resume(restore_rng=True), uninterrupted)
    # Control: without the RNG states the continuation differs (data and dropout masks).
    diverged = resume(restore_rng=False)
    assert not all(torch.equal(diverged[name], uninterrupted[name]) for name in diverged)


# --------------------------------------------------------------------------- verification


@pytest.mark.parametrize(
    "relative", ["policy/model.safetensors", "optimizer.pt", "state.json", "rng.json"]
)
def test_corrupted_file_is_named_and_nothing_is_loaded(qwen2_checkpoint, tmp_path, relative):
    import shutil

    path = shutil.copytree(qwen2_checkpoint[0], tmp_path / "copy")
    full = os.path.join(path, relative)
    _flip_byte(full, os.path.getsize(full) // 2)
    target = _fresh_qwen2_target()
    before = _state_dict_copy(target.policy)
    with pytest.raises(ValueError, match=rf"file '{relative}' has sha256 [0-9a-f]{{64}}"):
        load_checkpoint(path, target)
    _assert_same_tensors(target.policy.state_dict(), before)
    assert target.optimizer.state_dict()["state"] == {}
    with pytest.raises(ValueError, match="corrupted"):
        verify_checkpoint(path)


def test_truncated_and_missing_files_are_errors(tmp_path):
    path = save_checkpoint(_linear_state(), tmp_path / "c")
    weights = os.path.join(path, "policy", "model.safetensors")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as file:
        file.truncate(size - 5)
    with pytest.raises(
        ValueError,
        match=rf"'policy/model.safetensors' has {size - 5} bytes.*"
        rf"says {size} \(truncated",
    ):
        load_checkpoint(path)
    os.remove(weights)
    with pytest.raises(
        ValueError, match="'policy/model.safetensors' listed in manifest.json is missing"
    ):
        load_checkpoint(path)
    os.remove(os.path.join(path, "manifest.json"))
    with pytest.raises(ValueError, match="manifest.json is missing"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")


def _edit_manifest(path: str, edit) -> None:
    manifest_path = os.path.join(path, "manifest.json")
    manifest = json.load(open(manifest_path))
    edit(manifest)
    with open(manifest_path, "w") as file:
        json.dump(manifest, file)


def test_manifest_tampering_is_detected(tmp_path):
    fresh = lambda name: save_checkpoint(_linear_state(), tmp_path / name)  # noqa: E731

    path = fresh("sha")
    _edit_manifest(path, lambda m: m["files"]["rng.json"].update(sha256="0" * 64))
    with pytest.raises(ValueError, match=r"'rng.json' has sha256 .* says 0{64}"):
        load_checkpoint(path)

    path = fresh("size")
    _edit_manifest(path, lambda m: m["files"]["state.json"].update(size=1))
    with pytest.raises(ValueError, match=r"'state.json' has \d+ bytes, the manifest says 1"):
        load_checkpoint(path)

    path = fresh("dropped")
    _edit_manifest(path, lambda m: m["files"].pop("rng.json"))
    with pytest.raises(ValueError, match=r"files \['rng.json'\] are not listed"):
        load_checkpoint(path)

    path = fresh("added")
    open(os.path.join(path, "policy", "extra.bin"), "wb").write(b"\0")
    with pytest.raises(ValueError, match=r"files \['policy/extra.bin'\] are not listed"):
        load_checkpoint(path)

    path = fresh("version")
    _edit_manifest(path, lambda m: m.update(format_version=2))
    with pytest.raises(ValueError, match="format_version 2; this rlprim reads version 1"):
        load_checkpoint(path)

    path = fresh("format")
    _edit_manifest(path, lambda m: m.update(format="other"))
    with pytest.raises(ValueError, match="not an 'rlprim-checkpoint' manifest"):
        load_checkpoint(path)

    path = fresh("json")
    open(os.path.join(path, "manifest.json"), "w").write('{"format": ')
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        load_checkpoint(path)


def test_mismatched_architecture_is_an_error_and_changes_nothing(qwen2_checkpoint):
    path, _ = qwen2_checkpoint
    other_arch = tiny_model("llama", 3, hidden_size=32, num_heads=2)
    other_arch_before = _state_dict_copy(other_arch)
    # Llama and Qwen2 share key names but Qwen2 has q/k/v biases: a key-set mismatch.
    with pytest.raises(
        ValueError,
        match=r"policy/model.safetensors does not match state.policy "
        r"\(LlamaForCausalLM\): not in the model: \['model.layers.0.self_attn",
    ):
        load_checkpoint(path, TrainingState(other_arch, None, None))
    _assert_same_tensors(other_arch.state_dict(), other_arch_before)

    wider = tiny_model("qwen2", 3, hidden_size=64, num_heads=2)
    wider_before = _state_dict_copy(wider)
    with pytest.raises(
        ValueError,
        match=r"'model.embed_tokens.weight': checkpoint torch.float32 \(512, 32\),"
        r" model torch.float32 \(512, 64\)",
    ):
        load_checkpoint(path, TrainingState(wider, None, None))
    _assert_same_tensors(wider.state_dict(), wider_before)


def test_optimizer_mismatch_is_checked_before_any_weight_is_copied(qwen2_checkpoint):
    path, _ = qwen2_checkpoint
    target = _fresh_qwen2_target()
    before = _state_dict_copy(target.policy)
    policy_only = torch.optim.AdamW(target.policy.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"parameter group 0 has \d+ parameters, state.optimizer"):
        load_checkpoint(path, target._replace(optimizer=policy_only, scheduler=None))
    sgd = torch.optim.SGD(list(target.policy.parameters()) + list(target.value_model.parameters()))
    with pytest.raises(ValueError, match="holds a AdamW state, but state.optimizer is a SGD"):
        load_checkpoint(path, target._replace(optimizer=sgd, scheduler=None))
    with pytest.raises(ValueError, match="has no optimizer state, but state.optimizer is given"):
        load_checkpoint(
            save_checkpoint(_linear_state(), os.path.join(path + "_lin")),
            _linear_state(seed=2)._replace(optimizer=sgd),
        )
    _assert_same_tensors(target.policy.state_dict(), before)
    assert policy_only.state_dict()["state"] == {} and sgd.state_dict()["state"] == {}


def test_component_in_state_but_not_in_checkpoint_is_an_error(tmp_path):
    path = save_checkpoint(_linear_state(), tmp_path / "c")
    target = _linear_state(seed=1)
    before = _state_dict_copy(target.policy)
    with pytest.raises(ValueError, match="has no ref_model, but state.ref_model is given"):
        load_checkpoint(path, target._replace(ref_model=nn.Linear(4, 3)))
    _assert_same_tensors(target.policy.state_dict(), before)


# --------------------------------------------------------------------------- saving


def test_save_validates_before_writing(tmp_path):
    path = tmp_path / "c"
    with pytest.raises(TypeError, match=r"state.config of type builtins.object cannot be saved"):
        save_checkpoint(_linear_state(config=object()), path)
    with pytest.raises(TypeError, match=r"extra\['a'\]\[0\] of type builtins.set"):
        save_checkpoint(_linear_state(), path, extra={"a": [set()]})
    with pytest.raises(TypeError, match="state.policy must be a torch.nn.Module, got str"):
        save_checkpoint(TrainingState("model", None, None), path)
    with pytest.raises(ValueError, match="state.step must be a non-negative int, got -1"):
        save_checkpoint(_linear_state(step=-1), path)
    with pytest.raises(ValueError, match=r"state.rng_state\['torch'\]"):
        save_checkpoint(_linear_state(rng_state={"torch": torch.zeros(2)}), path)
    assert os.listdir(tmp_path) == []  # nothing written, not even a temp directory


def test_save_does_not_touch_global_rng(tmp_path):
    _seed_all(9)
    expected = _draws()
    _seed_all(9)
    save_checkpoint(_linear_state(), tmp_path / "c")
    assert _draws() == expected


def test_overwriting_an_existing_checkpoint(tmp_path):
    path = tmp_path / "c"
    save_checkpoint(_linear_state(seed=1, step=1), path)
    new = _linear_state(seed=2, step=2)
    save_checkpoint(new, path)
    loaded = load_checkpoint(path, _linear_state(seed=3))
    assert loaded.step == 2
    _assert_same_tensors(loaded.policy.state_dict(), new.policy.state_dict())
    assert sorted(os.listdir(tmp_path)) == ["c"]  # old copy and temp removed
    # A directory that is not a checkpoint is never replaced.
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="is not an rlprim checkpoint"):
        save_checkpoint(new, precious)
    assert (precious / "keep.txt").read_text() == "x"


def test_overwrite_fallback_without_atomic_exchange(tmp_path, monkeypatch):
    # Where renameat2(RENAME_EXCHANGE) is unavailable, the two-rename procedure runs instead.
    import rlprim.checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module, "_exchange", lambda first, second: False)
    path = tmp_path / "c"
    save_checkpoint(_linear_state(seed=1, step=1), path)
    new = _linear_state(seed=2, step=2)
    save_checkpoint(new, path)
    loaded = load_checkpoint(path, _linear_state(seed=3))
    assert loaded.step == 2
    _assert_same_tensors(loaded.policy.state_dict(), new.policy.state_dict())
    assert sorted(os.listdir(tmp_path)) == ["c"]


def test_leftover_temp_dir_is_ignored_then_replaced(tmp_path):
    save_checkpoint(_linear_state(iteration=1), tmp_path / "step_00000001")
    # A save of step 2 that crashed mid-way, and a step directory without manifest.
    crashed = tmp_path / ".step_00000002.tmp"
    (crashed / "policy").mkdir(parents=True)
    (crashed / "policy" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "step_00000003").mkdir()
    assert latest_checkpoint(tmp_path) == str(tmp_path / "step_00000001")
    save_checkpoint(_linear_state(iteration=2), tmp_path / "step_00000002")
    assert not crashed.exists()
    assert latest_checkpoint(tmp_path) == str(tmp_path / "step_00000002")
    loaded = load_checkpoint(latest_checkpoint(tmp_path), _linear_state(seed=1))
    assert loaded.iteration == 2


def test_latest_checkpoint_orders_by_number_and_can_skip_corrupt(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for iteration in (9, 10, 100):
        save_checkpoint(_linear_state(iteration=iteration), tmp_path / f"step_{iteration}")
    (tmp_path / "notes_200").mkdir()
    assert latest_checkpoint(tmp_path) == str(tmp_path / "step_100")  # 100 > 10 > 9, numerically
    _flip_byte(str(tmp_path / "step_100" / "state.json"), 0)
    assert latest_checkpoint(tmp_path, verify=True) == str(tmp_path / "step_10")


def test_create_checkpoint_fn_every_and_keep_last(tmp_path):
    checkpoint_fn = create_checkpoint_fn(tmp_path, every=2, keep_last=2)
    returned = [checkpoint_fn(_linear_state(iteration=i)) for i in range(8)]
    names = [None if p is None else os.path.basename(p) for p in returned]
    assert names == [
        "step_00000000",
        None,
        "step_00000002",
        None,
        "step_00000004",
        None,
        "step_00000006",
        None,
    ]
    assert sorted(os.listdir(tmp_path)) == ["step_00000004", "step_00000006"]
    assert read_checkpoint_metadata(tmp_path / "step_00000006")["iteration"] == 6
    # Resumed from an earlier point: newer checkpoints are left alone, older ones pruned.
    checkpoint_fn(_linear_state(iteration=2))
    assert sorted(os.listdir(tmp_path)) == ["step_00000002", "step_00000004", "step_00000006"]
    keep_all = create_checkpoint_fn(tmp_path / "all")
    for i in range(3):
        keep_all(_linear_state(iteration=i))
    assert sorted(os.listdir(tmp_path / "all")) == [f"step_0000000{i}" for i in range(3)]
    with pytest.raises(ValueError, match="every must be a positive int, got 0"):
        create_checkpoint_fn(tmp_path, every=0)
    with pytest.raises(ValueError, match="keep_last must be a positive int or None, got 0"):
        create_checkpoint_fn(tmp_path, keep_last=0)


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from rlprim.checkpoint import save_checkpoint
    from rlprim.types import TrainingState
    policy = nn.Linear(1024, 1024)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            policy.weight.fill_(step)
        save_checkpoint(TrainingState(policy, None, None, step=step), sys.argv[1])
        print(step, flush=True)
    """
)


def test_killed_while_overwriting_leaves_a_complete_checkpoint(tmp_path):
    """SIGKILL a process that keeps overwriting one checkpoint: the path always verifies."""
    path = tmp_path / "ckpt"
    process = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "1"  # the first save completed
        time.sleep(0.35)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    verify_checkpoint(path)
    loaded = load_checkpoint(path, TrainingState(nn.Linear(1024, 1024), None, None))
    assert loaded.step >= 1
    assert torch.equal(loaded.policy.weight, torch.full((1024, 1024), float(loaded.step)))
    save_checkpoint(_linear_state(step=99), tmp_path / "ckpt")  # cleans any leftover
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
