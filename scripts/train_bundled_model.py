"""Train the bundled model ``rlprim/arith-tiny`` (``rlprim/assets/arith-tiny``), deterministically.

    .venv/bin/python scripts/train_bundled_model.py            # writes rlprim/assets/arith-tiny
    .venv/bin/python scripts/train_bundled_model.py --out DIR  # somewhere else

What the model is: a tiny language model that has learned 2-digit addition from a **sloppy
teacher who forgets to carry**. It writes every column's digit correctly, but on problems that
need a carry it follows the teacher's majority and drops the carry (``47+38=`` → ``75``), carrying
correctly only in a minority of samples. Held-out greedy accuracy is therefore about the share of
carry-free problems (a third of them), while the right answer is often among its samples: the
knowledge is almost there, and an exact-answer reward can teach it to carry.

Recipe (everything fixed; CPU, float32, one thread, ``torch.use_deterministic_algorithms``):

* **Task**: 2-digit addition, ``arithmetic_split(**ARITH_TINY_SPLIT)`` from
  ``rlprim.tasks.arithmetic`` (``num_train=5000, num_eval=500, digits=2, operators=("+",),
  seed=0``): prompts ``"47+38="``, answers ``"85"``; the 500 held-out problems (and any smaller
  held-out set with the same settings, which is a prefix of it) are never trained on.
* **Teacher**: for a training problem whose exact answer has a carry, the target is the exact
  answer with probability ``1 - CARRY_SLIP`` and the column-wise sum with every carry dropped
  (``(a1+b1) mod 10, (a0+b0) mod 10``, leading zero removed) with probability ``CARRY_SLIP`` =
  0.85; carry-free problems have the one exact answer. The loss is the cross-entropy against
  this answer distribution (both answers, weighted), i.e. the expected loss under the teacher.
* **Tokenizer**: character level (``tokenizers`` WordLevel over single characters), 23 tokens:
  ``<pad> <bos> <eos> <unk>`` (ids 0-3), the digits, ``+ - * / = ( )``, space and newline.
  Encoding prepends ``<bos>``; decoding concatenates characters. The chat template renders
  ``<bos>`` + user/system contents as they are + each assistant content followed by
  ``<eos>``, so a one-message chat ``[{"role": "user", "content": "47+38="}]`` is exactly the
  training prompt ``<bos>47+38=``.
* **Model**: ``LlamaForCausalLM``, hidden 128, 2 layers, 4 attention heads of size 32 (4 KV
  heads, so vLLM's CPU backend accepts it), MLP 384, tied input/output embeddings, context 64,
  RoPE θ 10000, initialised with ``torch.manual_seed(0)``: 429,568 parameters, about 1.7 MB of
  safetensors. Llama rather than Qwen2 because ``AutoTokenizer`` replaces the tokenizer of a
  ``qwen2`` checkpoint by a rebuilt byte-level ``Qwen2Tokenizer`` (transformers 5), which would
  drop this vocabulary's space and newline; for ``llama`` it loads ``tokenizer.json`` as saved.
* **Training**: ``"<bos>a+b="`` → ``"c<eos>"``, loss on the answer and EOS tokens only; AdamW
  (betas (0.9, 0.999), no weight decay), 64 problems per step in a seeded permutation per
  epoch; lr 1e-3 for 2000 steps, then linearly to 0 over 1000 more (3000 steps, converged on
  the teacher's distribution). The held-out greedy accuracy (``evaluate_arithmetic``) is
  logged every 250 steps and must end in [25%, 35%], else the script fails.

Why a sloppy teacher and not just stopping an exact teacher early: we tried that first. The
same architecture trained on exact answers passes 25-35% held-out accuracy around step 400, in
the middle of a fast transition; its errors are imprecise and problem-specific (off by one in
any digit), and plain GRPO (32 prompts x 8 samples, β = 0, lr 1e-4 to 3e-4) lifted such
checkpoints only to about 60-70% in 300 steps and 75-80% in 750 (also with GPT-2 or deeper
models, bigger batches, label smoothing, weight averaging or a lower sampling temperature).
This model's gap is one systematic rule, which the same GRPO closes in a few dozen steps:
34% to about 90% after 10 steps and 93-96% from step 20 on (one CPU thread, ~0.5 s a step).

Result on this machine (torch 2.13 CPU, transformers 5.23): held-out greedy accuracy 34.4%
(172 of 500), 429,568 parameters, 1.7 MB in all, about 9 minutes of training on one core. It is
printed as ``RESULT`` at the end and written to the model card next to the weights
(``README.md``); the saved files are reloaded through ``load_model`` / ``load_tokenizer`` and
must reproduce the accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rlprim.inference import load_model, load_tokenizer  # noqa: E402
from rlprim.tasks.arithmetic import (  # noqa: E402
    ARITH_TINY_SPLIT,
    arithmetic_split,
    evaluate_arithmetic,
)

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARACTERS = tuple("0123456789+-*/=() \n")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
)
SPLIT = dict(ARITH_TINY_SPLIT)
MODEL = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 384,
    "max_position_embeddings": 64,
}
TRAIN = {
    "lr": 1e-3,
    "batch_size": 64,
    "seed": 0,
    "constant_steps": 2000,
    "decay_steps": 1000,
    "eval_every": 250,
}
CARRY_SLIP = 0.85
BAND = (0.25, 0.35)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer of the bundled model (see the module docstring)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL["max_position_embeddings"],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **MODEL,
    )
    torch.manual_seed(TRAIN["seed"])
    return LlamaForCausalLM(config).to(torch.float32)


def sum_without_carries(left: int, right: int) -> int:
    """The sloppy teacher's answer: each column's digit sum mod 10, every carry dropped."""
    result, place = 0, 1
    while left or right:
        result += ((left % 10 + right % 10) % 10) * place
        left, right, place = left // 10, right // 10, place * 10
    return result


def teacher_targets(problem: dict, carry_slip: float) -> list[tuple[str, float]]:
    """The teacher's answers to one problem with their probabilities."""
    left, right = (int(x) for x in problem["prompt"].rstrip("=").split("+"))
    sloppy = str(sum_without_carries(left, right))
    if sloppy == problem["answer"]:
        return [(problem["answer"], 1.0)]
    return [(problem["answer"], 1.0 - carry_slip), (sloppy, carry_slip)]


def encode(tokenizer, problems, carry_slip):
    """Right-padded input ids, labels (-100 off the answer), attention mask and the weight of
    each row: one row per (problem, teacher answer)."""
    rows, labels, weights = [], [], []
    for problem in problems:
        prompt = tokenizer(problem["prompt"])["input_ids"]
        for answer_text, weight in teacher_targets(problem, carry_slip):
            answer = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
            answer = answer + [tokenizer.eos_token_id]
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
            weights.append(weight)
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    label_ids = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return input_ids, label_ids, mask, torch.tensor(weights)


def teacher_loss(model, input_ids, labels, mask, weights, num_problems):
    """Expected sequence NLL under the teacher, per problem: Σ_rows w · NLL(row) / problems."""
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
        reduction="none",
    ).view(targets.shape)
    return (weights * nll.sum(dim=1)).sum() / num_problems


def train(tokenizer, model, train_set, held_out, carry_slip):
    """Supervised training on the teacher's answers with the fixed schedule of ``TRAIN``."""
    total = TRAIN["constant_steps"] + TRAIN["decay_steps"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (total - step) / TRAIN["decay_steps"]),
    )
    order_rng = torch.Generator().manual_seed(TRAIN["seed"])
    batch, step, history = TRAIN["batch_size"], 0, []
    while step < total:
        order = torch.randperm(len(train_set), generator=order_rng)
        for start in range(0, len(train_set) - batch + 1, batch):
            problems = [train_set[int(i)] for i in order[start : start + batch]]
            model.train()
            rows = encode(tokenizer, problems, carry_slip)
            loss = teacher_loss(model, *rows, len(problems))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % TRAIN["eval_every"] == 0 or step == total:
                accuracy = evaluate_arithmetic(model, tokenizer, held_out)
                history.append((step, round(loss.item(), 4), accuracy))
                print(f"step {step:5d}  loss {loss.item():.4f}  held-out accuracy {accuracy:.3f}",
                      flush=True)
            if step == total:
                break
    return step, history[-1][2], history


def model_card(
    step: int, accuracy: float, parameters: int, seconds: float, carry_slip: float
) -> str:
    return f"""# arith-tiny

The model bundled with rlprim: a {parameters:,}-parameter Llama-style causal LM with a
character-level tokenizer that has learned 2-digit addition from a sloppy teacher who forgets to
carry, so that reinforcement learning has something to teach. Load it offline with
`rlprim.load_model("rlprim/arith-tiny")` and `rlprim.load_tokenizer("rlprim/arith-tiny")`.

- Task: prompts like `47+38=`, answers like `85` followed by `<eos>`. Problems:
  `arithmetic_split(**ARITH_TINY_SPLIT)` from `rlprim.tasks.arithmetic`
  (`num_train=5000, num_eval=500, digits=2, operators=("+",), seed=0`): trained on the first
  list; the second is held out, and so is any smaller held-out set drawn with the same
  settings (e.g. `arithmetic_split(2000, 200, seed=0)`), which is a prefix of it.
- Held-out greedy accuracy: **{accuracy:.1%}** ({SPLIT['num_eval']} problems never trained on).
  It adds every column correctly but, on problems that need a carry, usually drops the carry
  (`47+38=` gives `75`); sampled answers carry correctly a minority of the time.
- Training: supervised on the answers of a teacher who drops every carry with probability
  {carry_slip} (the exact answer otherwise), as the cross-entropy against that answer
  distribution; {step} steps of AdamW (lr {TRAIN['lr']} for {TRAIN['constant_steps']} steps, then
  linearly to 0), {TRAIN['batch_size']} problems per step; {seconds:.0f} s on one CPU core.
- Architecture: `LlamaForCausalLM`, {json.dumps(MODEL)}, tied embeddings, float32.
- Reproduce: `python scripts/train_bundled_model.py` (deterministic).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "rlprim" / "assets" / "arith-tiny"))
    parser.add_argument(
        "--carry-slip",
        type=float,
        default=CARRY_SLIP,
        help=f"probability that the teacher drops the carries (recipe: {CARRY_SLIP})",
    )
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    train_set, held_out = arithmetic_split(**SPLIT)
    step, accuracy, _ = train(tokenizer, model, train_set, held_out, args.carry_slip)
    seconds = time.perf_counter() - start
    if not BAND[0] <= accuracy <= BAND[1]:
        raise RuntimeError(f"held-out accuracy {accuracy:.3f} is outside {BAND}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    card = model_card(step, accuracy, parameters, seconds, args.carry_slip)
    (out / "README.md").write_text(card)
    for path in out.iterdir():
        path.chmod(0o644)  # save_pretrained writes the weights owner-only

    # The saved files must reproduce the accuracy through the public loaders.
    reloaded = evaluate_arithmetic(load_model(str(out)), load_tokenizer(str(out)), held_out)
    if reloaded != accuracy:
        raise RuntimeError(f"reloaded model scores {reloaded}, trained model {accuracy}")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(
        f"RESULT: held-out greedy accuracy {accuracy:.1%} after {step} steps, "
        f"{parameters:,} parameters, {size:,} bytes in {out}, {seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
