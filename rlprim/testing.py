"""Tiny models and tokenizers built locally, for rlprim's tests and for users' own tests.

Nothing here reaches a model hub: the tokenizer is trained on the spot with the ``tokenizers``
library on a small generated corpus, and the models are built from a small ``transformers``
config with randomly initialised (seeded) weights. Everything is deterministic: the same
arguments give the same token ids and the same weights, and the global torch RNG is left as it was.

* ``tiny_tokenizer()`` — a byte-level BPE ``PreTrainedTokenizerFast`` (any text round-trips,
  digits are split one per token) with pad / bos / eos / unk tokens, role-marker tokens and a
  chat template.
* ``tiny_model(arch)`` — a ``qwen2``, ``llama`` or ``gpt2`` causal LM (2 layers, hidden 128, 4
  heads of size 32 by default) in float32, eval mode, dropout 0.
* ``tiny_reward_model(arch)`` — the same backbone with a one-output sequence-classification head.
* ``save_tiny_model(path, arch)`` — writes model + tokenizer with ``save_pretrained`` so that
  ``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)`` load
  them (with ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import functools
import os
import random
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

__all__ = [
    "TINY_ARCHS",
    "TINY_SPECIAL_TOKENS",
    "TINY_CHAT_TEMPLATE",
    "tiny_corpus",
    "tiny_tokenizer",
    "tiny_model_config",
    "tiny_model",
    "tiny_reward_model",
    "save_tiny_model",
]

TINY_ARCHS = ("qwen2", "llama", "gpt2")

# Ids 0..7 in this order: pad, bos, eos, unk, then the four chat role markers.
TINY_SPECIAL_TOKENS = (
    "<|pad|>",
    "<|bos|>",
    "<|eos|>",
    "<|unk|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|tool|>",
)

# Renders ``<|bos|>`` then, per message, ``<|role|>\n{content}<|eos|>\n``; with
# ``add_generation_prompt`` it ends with ``<|assistant|>\n``. The end-of-turn marker is the eos
# token so that generation stops at the end of an assistant turn. Assistant content is wrapped in
# ``{% generation %}`` so ``return_assistant_tokens_mask=True`` works. Written on one line because
# transformers renders templates with ``trim_blocks``, which would eat literal newlines.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ message['content'] + eos_token + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_WORDS = (
    "the a an and or but if then else when what which who how why is are was were be been "
    "to of in on at by for with from into over under about answer question result number sum "
    "product difference total add plus minus times divided equals think step first next last "
    "so therefore because let us compute check correct wrong yes no true false hello world "
    "please thank you tool call calculator python code run output error value final solve "
    "problem math count down target use each only once reward model policy sample good bad "
    "cat dog sun tree water book red blue green small large fast slow one two three four five "
    "six seven eight nine ten hundred thousand"
).split()

# Qwen2's pre-tokenisation split: words, single digits, punctuation runs, whitespace runs.
_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_PUNCTUATION = ".,;:!?'\"()[]{}<>-_=+*/%&|#@$^~`\\"


def _arithmetic_line(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    op = rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return rng.choice(
        (
            f"{a}{op}{b}={value}",
            f"{a} {op} {b} = {value}",
            f"What is {a} {op} {b}? The answer is {value}.",
            f"Compute {a}{op}{b}. Answer: {value}",
            f"<answer>{value}</answer>",
            f"#### {value}",
        )
    )


def _tool_line(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-*/")
    return rng.choice(
        (
            f'<tool name="calculator">{{"expression": "{a}{op}{b}"}}</tool>',
            f'<tool name="python">{{"code": "print({a}{op}{b})"}}</tool>',
            f"<result>{a}</result>",
            f"<think>I should use the calculator for {a} {op} {b}.</think>",
        )
    )


def _words_line(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice(".!?;,:")


@functools.cache
def tiny_corpus(num_lines: int = 3000, seed: int = 0) -> tuple[str, ...]:
    """The generated training corpus of ``tiny_tokenizer``: arithmetic, words, punctuation, tools.

    Deterministic in ``(num_lines, seed)``; uses a local ``random.Random(seed)``.

    Returns:
      a tuple of ``num_lines + 1`` text lines (the last one holds every printable ASCII char).
    """
    rng = random.Random(seed)
    makers = (_arithmetic_line, _tool_line, _words_line)
    lines = [rng.choice(makers)(rng) for _ in range(num_lines)]
    lines.append(" ".join(_PUNCTUATION) + " 0 1 2 3 4 5 6 7 8 9")
    return tuple(lines)


@functools.cache
def _tiny_tokenizer_json(vocab_size: int, num_lines: int, seed: int) -> str:
    # Pure builder: the serialised tokenizer is an immutable string, so caching it is safe and
    # every call of ``tiny_tokenizer`` still gets its own fresh tokenizer object.
    # The exact pipeline transformers' ``Qwen2Tokenizer`` rebuilds on load, so a saved qwen2 tiny
    # model reloads with ``AutoTokenizer`` to identical ids (other archs load it as is).
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_corpus(num_lines, seed), trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer(
    vocab_size: int = 512,
    *,
    num_lines: int = 3000,
    seed: int = 0,
    padding_side: str = "left",
) -> PreTrainedTokenizerFast:
    """A real byte-level BPE ``PreTrainedTokenizerFast`` trained locally and deterministically.

    Byte-level BPE with Qwen2's pipeline (NFC normalisation, Qwen2's pre-tokenisation regex):
    text is split into bytes, each byte maps to one of 256 base tokens and learned merges join
    frequent pairs, so every string encodes and ``tokenizer.decode(tokenizer.encode(text)) ==
    text`` for any NFC-normalised text (all ASCII text included). Digits are always split one per
    token, which keeps arithmetic learnable. ``encode`` adds no
    special tokens (like Qwen / GPT-2); the chat template adds ``<|bos|>`` itself.

    Special tokens (ids 0..7): ``<|pad|>`` (pad), ``<|bos|>`` (bos), ``<|eos|>`` (eos, also the
    end-of-turn marker of the chat template), ``<|unk|>`` (unk; byte-level BPE never needs it),
    ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|tool|>``. The chat template is
    ``TINY_CHAT_TEMPLATE``.

    Args:
      vocab_size: total vocabulary size ``V`` including the 8 special and 256 byte tokens;
        ``len(tokenizer) == vocab_size`` always. The default corpus supports up to 761; a larger
        value raises ``ValueError`` (pass more ``num_lines``).
      num_lines: corpus size; seed: corpus seed (see ``tiny_corpus``).
      padding_side: ``"left"`` (for generation, the default) or ``"right"``.

    Returns:
      a fresh tokenizer object each call (mutating it does not affect later calls); the trained
      tokenizer is cached, so calls after the first take a few milliseconds.
    """
    if not isinstance(vocab_size, int) or vocab_size < len(TINY_SPECIAL_TOKENS) + 256:
        raise ValueError(
            f"vocab_size must be an int >= {len(TINY_SPECIAL_TOKENS) + 256} (special + byte "
            f"tokens), got {vocab_size!r}"
        )
    if not isinstance(num_lines, int) or num_lines < 1:
        raise ValueError(f"num_lines must be a positive int, got {num_lines!r}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    backend = Tokenizer.from_str(_tiny_tokenizer_json(vocab_size, num_lines, seed))
    if backend.get_vocab_size() != vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is more than the corpus of {num_lines} lines supports "
            f"({backend.get_vocab_size()} tokens); use a smaller vocab_size or more num_lines"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=TINY_SPECIAL_TOKENS[0],
        bos_token=TINY_SPECIAL_TOKENS[1],
        eos_token=TINY_SPECIAL_TOKENS[2],
        unk_token=TINY_SPECIAL_TOKENS[3],
        additional_special_tokens=list(TINY_SPECIAL_TOKENS[4:]),
        chat_template=TINY_CHAT_TEMPLATE,
        padding_side=padding_side,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def _check_arch(arch: str) -> None:
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")


def tiny_model_config(
    arch: str = "qwen2",
    *,
    vocab_size: int | None = None,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool | None = None,
    attn_implementation: str | None = None,
    **overrides: Any,
) -> PretrainedConfig:
    """The ``transformers`` config of a tiny model; see ``tiny_model`` for the arguments.

    Dropout is 0 everywhere, and pad / bos / eos ids are those of ``tiny_tokenizer()``.
    """
    _check_arch(arch)
    if vocab_size is None:
        vocab_size = len(tiny_tokenizer())
    for name, value in (
        ("vocab_size", vocab_size),
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("max_position_embeddings", max_position_embeddings),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if vocab_size < len(TINY_SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be >= {len(TINY_SPECIAL_TOKENS)} to hold the special tokens, "
            f"got {vocab_size}"
        )
    if hidden_size % num_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})"
        )
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads must divide num_heads ({num_heads}), got {num_kv_heads}")
    intermediate_size = 2 * hidden_size if intermediate_size is None else intermediate_size
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if arch == "gpt2":
        config: PretrainedConfig = GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_position_embeddings,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            tie_word_embeddings=True if tie_word_embeddings is None else tie_word_embeddings,
            **special,
            **overrides,
        )
    else:
        config_class = Qwen2Config if arch == "qwen2" else LlamaConfig
        config = config_class(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_position_embeddings,
            attention_dropout=0.0,
            tie_word_embeddings=False if tie_word_embeddings is None else tie_word_embeddings,
            **special,
            **overrides,
        )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config


def _build(model_class: Any, config: PretrainedConfig, seed: int) -> PreTrainedModel:
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    # fork_rng restores the global CPU RNG afterwards, so building a model consumes no global
    # randomness; manual_seed inside makes the initial weights a function of ``seed`` only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class.from_config(config, dtype=torch.float32)
    model.eval()
    return model


def tiny_model(
    arch: str = "qwen2",
    seed: int = 0,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool | None = None,
    attn_implementation: str | None = None,
    **overrides: Any,
) -> PreTrainedModel:
    """A real, randomly initialised ``transformers`` causal LM, small enough for CPU tests.

    Args:
      arch: ``"qwen2"`` (``Qwen2ForCausalLM``), ``"llama"`` (``LlamaForCausalLM``) or ``"gpt2"``
        (``GPT2LMHeadModel``, learned absolute positions, tied embeddings).
      seed: the weights are a deterministic function of ``seed`` (and the shape arguments); the
        global torch RNG is unchanged by the call.
      vocab_size: ``V``; ``None`` uses ``len(tiny_tokenizer())`` (512). A larger ``V`` (e.g.
        151,936 for a Qwen-sized head) gives ids the tiny tokenizer cannot decode.
      hidden_size, num_layers, num_heads: the defaults (128, 2, 4) give heads of size 32, which
        vLLM's CPU backend accepts.
      num_kv_heads: key/value heads (grouped-query attention) for qwen2/llama; ``None`` = heads.
      intermediate_size: MLP width; ``None`` = ``2 * hidden_size``.
      max_position_embeddings: the context length.
      tie_word_embeddings: ``None`` keeps the architecture's usual choice (gpt2 tied, others not).
      attn_implementation: ``"eager"``, ``"sdpa"`` or ``None`` (transformers' default).
      **overrides: extra config fields.

    Returns:
      the model in float32 and eval mode, dropout 0 everywhere (so ``model.train()`` is
      deterministic too), ``config`` and ``generation_config`` carrying the tokenizer's
      pad (0), bos (1) and eos (2) ids.
    """
    config = tiny_model_config(
        arch,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        attn_implementation=attn_implementation,
        **overrides,
    )
    model = _build(AutoModelForCausalLM, config, seed)
    generation_config = model.generation_config
    generation_config.pad_token_id = config.pad_token_id
    generation_config.bos_token_id = config.bos_token_id
    generation_config.eos_token_id = config.eos_token_id
    return model


def tiny_reward_model(
    arch: str = "qwen2",
    seed: int = 0,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 512,
    attn_implementation: str | None = None,
    **overrides: Any,
) -> PreTrainedModel:
    """A tiny ``AutoModelForSequenceClassification`` with one output: a scalar reward model.

    Same backbone and arguments as ``tiny_model``; ``num_labels=1`` and ``pad_token_id`` is set,
    so transformers scores each row at its last non-pad token. Float32, eval mode, weights a
    function of ``seed`` only, global RNG unchanged.

    Returns:
      a model whose ``model(input_ids, attention_mask).logits`` has shape ``[B, 1]``.
    """
    config = tiny_model_config(
        arch,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        attn_implementation=attn_implementation,
        num_labels=1,
        **overrides,
    )
    return _build(AutoModelForSequenceClassification, config, seed)


def save_tiny_model(
    path: str | os.PathLike[str],
    arch: str = "qwen2",
    seed: int = 0,
    *,
    reward_model: bool = False,
    **model_kwargs: Any,
) -> str:
    """Write a tiny model and ``tiny_tokenizer()`` to ``path`` with ``save_pretrained``.

    ``AutoModelForCausalLM.from_pretrained(path)`` (or ``AutoModelForSequenceClassification``
    when ``reward_model=True``) and ``AutoTokenizer.from_pretrained(path)`` then load them
    offline, giving the same logits and token ids. Weights are written as safetensors.

    Returns:
      ``str(path)``.
    """
    builder = tiny_reward_model if reward_model else tiny_model
    model = builder(arch, seed, **model_kwargs)
    tokenizer = tiny_tokenizer()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
