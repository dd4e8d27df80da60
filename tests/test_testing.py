"""Tests of rlprim.testing: the locally built tiny tokenizer and models."""

from __future__ import annotations

import json
import string

import pytest
import regex
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from rlprim.testing import (
    TINY_ARCHS,
    TINY_SPECIAL_TOKENS,
    save_tiny_model,
    tiny_corpus,
    tiny_model,
    tiny_model_config,
    tiny_reward_model,
    tiny_tokenizer,
)

ASCII_TEXT = st.text(alphabet=string.printable, max_size=80)


# --- an independent byte-level BPE encoder, in plain Python ------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable-character table.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _reference_bpe_encode(text: str, vocab: dict[str, int], merges: list[list[str]]) -> list[int]:
    """Pre-split with Qwen2's regex, map bytes to characters, apply merges by rank."""
    rank = {tuple(pair): i for i, pair in enumerate(merges)}
    byte_char = _bytes_to_unicode()
    ids: list[int] = []
    for piece in regex.findall(_QWEN2_SPLIT, text):
        symbols = [byte_char[b] for b in piece.encode("utf-8")]
        while len(symbols) > 1:
            pairs = [
                (rank.get((a, b), len(rank)), i)
                for i, (a, b) in enumerate(zip(symbols[:-1], symbols[1:], strict=True))
            ]
            best_rank, where = min(pairs)
            if best_rank == len(rank):
                break
            symbols[where : where + 2] = [symbols[where] + symbols[where + 1]]
        ids.extend(vocab[s] for s in symbols)
    return ids


def _vocab_and_merges(tokenizer: PreTrainedTokenizerFast) -> tuple[dict[str, int], list[list[str]]]:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    return model["vocab"], merges


# --- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_is_a_real_fast_tokenizer_with_the_documented_special_tokens():
    tokenizer = tiny_tokenizer()
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 512
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|pad|>", 0)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|bos|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|eos|>", 2)
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<|unk|>", 3)
    assert tokenizer.convert_tokens_to_ids(list(TINY_SPECIAL_TOKENS)) == list(range(8))
    assert tokenizer.padding_side == "left"
    assert set(TINY_SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)


def test_tokenizer_hand_checked_pieces():
    tokenizer = tiny_tokenizer()
    # Digits are one token each; special tokens inside text stay single tokens.
    assert tokenizer.tokenize("12+34=46") == ["1", "2", "+", "3", "4", "=", "4", "6"]
    assert tokenizer.encode("<|user|><|eos|>") == [5, 2]
    # encode adds no special tokens; single bytes map to their base tokens.
    ids = tokenizer.encode("7")
    assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == ["7"]
    # A frequent corpus word is a single merged token.
    assert tokenizer.tokenize("calculator") == ["calculator"]


def test_tokenizer_matches_independent_bpe_reference():
    tokenizer = tiny_tokenizer()
    vocab, merges = _vocab_and_merges(tokenizer)
    assert len(merges) == 512 - 8 - 256
    texts = list(tiny_corpus()[:200]) + ['Hi  there!\n\n<tool name="calculator">{"x": 1}</tool>']
    for text in texts:
        assert tokenizer.encode(text) == _reference_bpe_encode(text, vocab, merges), text


@given(text=ASCII_TEXT)
def test_tokenizer_round_trips_ascii_text(text):
    tokenizer = tiny_tokenizer()
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


@given(text=ASCII_TEXT)
def test_tokenizer_agrees_with_reference_on_random_text(text):
    tokenizer = tiny_tokenizer()
    vocab, merges = _vocab_and_merges(tokenizer)
    assert tokenizer.encode(text) == _reference_bpe_encode(text, vocab, merges)


def test_tokenizer_is_deterministic_and_each_call_is_a_fresh_object():
    first, second = tiny_tokenizer(), tiny_tokenizer()
    assert first is not second
    text = "What is 123 * 45? The answer is 5535."
    assert first.encode(text) == second.encode(text)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    first.padding_side = "right"
    assert tiny_tokenizer().padding_side == "left"
    assert tiny_tokenizer(padding_side="right").padding_side == "right"


def test_tokenizer_other_vocab_sizes():
    assert len(tiny_tokenizer(vocab_size=300)) == 300
    assert len(tiny_tokenizer(vocab_size=700)) == 700
    with pytest.raises(ValueError, match="vocab_size=5000"):
        tiny_tokenizer(vocab_size=5000)
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_tokenizer(vocab_size=100)
    with pytest.raises(ValueError, match="padding_side"):
        tiny_tokenizer(padding_side="middle")
    with pytest.raises(ValueError, match="num_lines"):
        tiny_tokenizer(num_lines=0)


def test_chat_template_renders_with_and_without_generation_prompt():
    tokenizer = tiny_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nWhat is 2+3?<|eos|>\n<|assistant|>\n"
    )
    full = messages + [{"role": "assistant", "content": "5"}, {"role": "tool", "content": "ok"}]
    rendered = tokenizer.apply_chat_template(full, tokenize=False)
    assert rendered == (
        "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nWhat is 2+3?<|eos|>\n"
        "<|assistant|>\n5<|eos|>\n<|tool|>\nok<|eos|>\n"
    )
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids == tokenizer.encode(prompt)
    assert ids[:2] == [1, 4]


def test_chat_template_assistant_mask_and_unknown_role():
    tokenizer = tiny_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "42"}]
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == "42<|eos|>"
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


# --- models -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_config_forward_and_special_ids(arch):
    model = tiny_model(arch)
    config = model.config
    assert config.model_type == arch
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    generation_config = model.generation_config
    assert (generation_config.pad_token_id, generation_config.eos_token_id) == (0, 2)
    assert config.vocab_size == 512
    head_dim = config.hidden_size // config.num_attention_heads
    assert (config.hidden_size, config.num_hidden_layers, head_dim) == (128, 2, 32)
    input_ids = torch.tensor([[1, 5, 30, 31, 2], [1, 5, 40, 41, 42]])
    logits = model(input_ids=input_ids).logits
    assert logits.shape == (2, 5, 512)
    assert torch.isfinite(logits).all()
    # Weights are tied in gpt2 only (the architectures' usual choice).
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (arch == "gpt2")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_is_deterministic_in_seed_and_leaves_global_rng_alone(arch):
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    first = tiny_model(arch, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    second = tiny_model(arch, seed=7)
    other = tiny_model(arch, seed=8)
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert any(
        not torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters(), strict=True)
    )


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_train_mode_forward_is_deterministic_because_dropout_is_zero(arch):
    model = tiny_model(arch).train()
    input_ids = torch.tensor([[1, 5, 30, 31, 2, 9, 10]])
    assert torch.equal(model(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_generates_with_tokenizer_prompt(arch):
    tokenizer, model = tiny_tokenizer(), tiny_model(arch)
    batch = tokenizer(["2+3=", "What is 7*6?"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and 1 <= out.shape[1] - batch["input_ids"].shape[1] <= 5
    again = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, again)


def test_tiny_model_shape_options_and_bad_arguments():
    model = tiny_model("llama", vocab_size=1000, hidden_size=64, num_layers=1, num_heads=2)
    assert model.get_output_embeddings().weight.shape == (1000, 64)
    assert model.config.num_hidden_layers == 1
    gqa = tiny_model("qwen2", num_kv_heads=2)
    assert gqa.config.num_key_value_heads == 2
    assert tiny_model_config("gpt2", tie_word_embeddings=False).tie_word_embeddings is False
    with pytest.raises(ValueError, match="arch"):
        tiny_model("mamba")
    with pytest.raises(ValueError, match="num_heads"):
        tiny_model("qwen2", hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny_model("qwen2", num_kv_heads=3)
    with pytest.raises(ValueError, match="num_layers"):
        tiny_model("gpt2", num_layers=0)
    with pytest.raises(TypeError, match="seed"):
        tiny_model("gpt2", seed=1.5)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_reward_model_scores_last_non_pad_token(arch):
    model = tiny_reward_model(arch, seed=3)
    assert model.config.num_labels == 1 and model.config.pad_token_id == 0
    rows = [[1, 5, 30, 31], [1, 5, 40, 41, 42, 43]]
    width = max(map(len, rows))
    # Right padding: each row's score must equal its unpadded single-row score.
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attention_mask = (torch.arange(width) < torch.tensor([[len(r)] for r in rows])).long()
    with torch.no_grad():
        scores = model(input_ids=input_ids, attention_mask=attention_mask).logits
        singles = torch.cat([model(input_ids=torch.tensor([r])).logits for r in rows])
    assert scores.shape == (2, 1)
    torch.testing.assert_close(scores, singles, atol=1e-5, rtol=0)
    assert not torch.equal(scores[0], scores[1])


# --- save / load ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_save_and_reload_offline_gives_identical_logits_and_ids(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = save_tiny_model(tmp_path / arch, arch, seed=5)
    loaded_model = AutoModelForCausalLM.from_pretrained(path)
    loaded_tokenizer = AutoTokenizer.from_pretrained(path)
    model, tokenizer = tiny_model(arch, seed=5), tiny_tokenizer()
    assert (tmp_path / arch / "model.safetensors").exists()
    texts = ["(hello) world's 12+3=15", '<tool name="python">{"code": "1"}</tool>\n\n x']
    for text in texts + list(tiny_corpus()[:50]):
        assert loaded_tokenizer.encode(text) == tokenizer.encode(text)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert loaded_tokenizer.pad_token_id == 0 and loaded_tokenizer.eos_token_id == 2
    assert loaded_tokenizer.padding_side == "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(loaded_model(**batch).logits, model(**batch).logits)
    assert loaded_model.generation_config.pad_token_id == 0


def test_save_and_reload_reward_model(tmp_path):
    path = save_tiny_model(tmp_path / "rm", "llama", seed=2, reward_model=True)
    loaded = AutoModelForSequenceClassification.from_pretrained(path)
    input_ids = torch.tensor([[1, 5, 30, 31, 2]])
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=input_ids).logits, tiny_reward_model("llama", 2)(input_ids).logits
        )
