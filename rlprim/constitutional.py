"""Constitutional AI as functions: principles, an AI judge, critique and revision, AI preferences.

Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback", trains a model against a
short list of natural-language principles (a *constitution*) instead of human labels:

* **SL-CAI** — the model critiques its own response against a principle and revises it;
  ``critique_and_revise`` returns ``(original, revised)`` pairs and
  ``create_preference_rollouts`` turns them into groups of two rollouts (revised = reward 1,
  original = reward 0) that the ``dpo`` algorithm trains on (``compute_dpo_pairs`` picks the
  revised one as chosen). The paper fine-tunes on the revisions (SFT); DPO on the pairs is the
  preference form of the same data.
* **RL-CAI** — a feedback model compares two samples of a prompt under a principle, framed as a
  multiple-choice question; the normalised probabilities of the answer options are the
  preference label. ``compute_ai_preferences`` computes them, and
  ``create_ai_preference_reward_fn`` turns them into a reward (each sample's mean win
  probability against the other samples of its group) that any algorithm uses — with ``dpo``,
  ``compute_dpo_pairs`` then pairs each group's most and least preferred samples.
* **AI judge** — ``create_judge_reward_fn`` scores one rollout against each principle with a
  yes/no question.

Every AI-feedback score is read from the judge's log-probabilities of its answer options
(``compute_option_probabilities``), never by parsing generated text: deterministic, batched,
and differentiable in principle. Principles are data (``Principle``), written in code or loaded
from YAML/JSON (``load_constitution``); the prompts given to the judge and to the critiquing
model are format strings (the ``*_TEMPLATE`` constants) or functions.
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from rlprim.inference import _context_length, _encode_prompts, _pad_id, hf_generator
from rlprim.logprobs import get_logits, get_logprobs
from rlprim.rewards import create_batched_reward_fn
from rlprim.types import Generation, GenerationConfig, Rollout

__all__ = [
    "Principle",
    "RevisionPair",
    "JUDGE_TEMPLATE",
    "COMPARISON_TEMPLATE",
    "CRITIQUE_TEMPLATE",
    "REVISION_TEMPLATE",
    "load_constitution",
    "compute_option_probabilities",
    "compute_judge_scores",
    "create_judge_reward_fn",
    "critique_and_revise",
    "create_preference_rollouts",
    "compute_ai_preferences",
    "create_ai_preference_reward_fn",
]


class Principle(NamedTuple):
    """One principle of a constitution, with the texts each use of it needs.

    Fields:
      name: a short unique identifier.
      judge_question: a yes/no question about one response (the AI judge), e.g. "Is the
        assistant's response free of harmful or dangerous content?".
      comparison_question: a multiple-choice question over two responses (RL-CAI), e.g.
        "Which of these assistant responses is less harmful?".
      critique_request: asks the model to critique its response (SL-CAI).
      revision_request: asks the model to rewrite its response after the critique (SL-CAI).
      weight: its weight ``w ≥ 0`` when scores of several principles are averaged.
    A use that needs a field another use does not may leave the other empty.
    """

    name: str
    judge_question: str = ""
    comparison_question: str = ""
    critique_request: str = ""
    revision_request: str = ""
    weight: float = 1.0


class RevisionPair(NamedTuple):
    """A response and its revision after ``len(critiques)`` rounds of critique (SL-CAI).

    Fields: ``prompt``; ``original`` (the response given); ``revised`` (the last revision);
    ``critiques`` (one generated critique per round); ``principles`` (the name of the principle
    used in each round).
    """

    prompt: str
    original: str
    revised: str
    critiques: tuple[str, ...] = ()
    principles: tuple[str, ...] = ()


# The prompts given to the judge and to the critiquing model. Fields in braces are filled in;
# the judge's answer option follows the text directly (options carry their own leading space).
JUDGE_TEMPLATE = (
    "Consider the following conversation between a human and an assistant.\n\n"
    "Human: {prompt}\n\nAssistant: {response}\n\n{question} Answer Yes or No.\nAnswer:"
)
COMPARISON_TEMPLATE = (
    "Consider the following conversation between a human and an assistant.\n\n"
    "Human: {prompt}\n\n{question}\nOptions:\n(A) {response_a}\n(B) {response_b}\n"
    "The answer is:"
)
CRITIQUE_TEMPLATE = (
    "Human: {prompt}\n\nAssistant: {response}\n\nCritique request: {critique_request}\n\n"
    "Critique:"
)
REVISION_TEMPLATE = CRITIQUE_TEMPLATE + (
    "{critique}\n\nRevision request: {revision_request}\n\nRevision:"
)

_PRINCIPLE_TEXT_FIELDS = (
    "judge_question",
    "comparison_question",
    "critique_request",
    "revision_request",
)


# ---------------------------------------------------------------------------------------------
# Principles as data
# ---------------------------------------------------------------------------------------------


def _check_principle(principle: Any, where: str) -> Principle:
    if isinstance(principle, Mapping):
        unknown = sorted(set(principle) - set(Principle._fields))
        if unknown:
            raise ValueError(
                f"{where} has unknown keys {unknown}; a principle has {list(Principle._fields)}"
            )
        if "name" not in principle:
            raise ValueError(f"{where} needs a 'name'")
        principle = Principle(**principle)
    if not isinstance(principle, Principle):
        raise TypeError(
            f"{where} must be a Principle or a mapping of its fields, got "
            f"{type(principle).__name__}"
        )
    if not isinstance(principle.name, str) or not principle.name:
        raise ValueError(f"{where}.name must be a non-empty str, got {principle.name!r}")
    for field in _PRINCIPLE_TEXT_FIELDS:
        if not isinstance(getattr(principle, field), str):
            raise TypeError(
                f"{where}.{field} must be a str, got {type(getattr(principle, field)).__name__}"
            )
    weight = principle.weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"{where}.weight must be a number, got {type(weight).__name__}")
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{where}.weight must be finite and >= 0, got {weight}")
    return principle._replace(weight=float(weight))


def load_constitution(source: Any) -> tuple[Principle, ...]:
    """A constitution: principles from a YAML/JSON file, a list of mappings, or ``Principle``\\ s.

    A file holds a list of principles, or a mapping with the list under ``principles``; each
    principle is a mapping of ``Principle``'s fields (``name`` required, the rest default)::

        principles:
          - name: harmless
            judge_question: Is the response free of harmful content?
            critique_request: Point out anything harmful in the response.
            revision_request: Rewrite the response without the harmful content.

    Args:
      source: a path (``.yaml``, ``.yml`` or ``.json``), or a sequence of ``Principle`` /
        mappings.
    Returns:
      a tuple of ``Principle`` (weights as floats), in the order given.
    Raises:
      ValueError / TypeError: an unreadable file, an unknown key, a missing or repeated name, a
        field of the wrong type, a negative or non-finite weight, no principles.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in (".yaml", ".yml", ".json"):
            raise ValueError(f"source must be a .yaml, .yml or .json file, got {path!r}")
        with open(path, encoding="utf-8") as file:
            text = file.read()
        import json

        import yaml

        try:
            data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as error:
            raise ValueError(f"cannot parse the constitution file {path!r}: {error}") from error
        if isinstance(data, Mapping):
            if set(data) != {"principles"}:
                raise ValueError(
                    f"a constitution file holds a list or {{'principles': [...]}}, got keys "
                    f"{sorted(data)} in {path!r}"
                )
            data = data["principles"]
        where = f"{path}: principles"
    else:
        data, where = source, "source"
    if isinstance(data, (str, bytes, Mapping, Principle)) or not isinstance(data, Sequence):
        raise TypeError(f"{where} must be a list of principles, got {type(data).__name__}")
    principles = tuple(_check_principle(p, f"{where}[{i}]") for i, p in enumerate(data))
    if not principles:
        raise ValueError(f"{where} holds no principles")
    names = [p.name for p in principles]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where}: principle names must be unique, repeated: {repeated}")
    return principles


def _principles_with(principles: Any, fields: Sequence[str]) -> tuple[Principle, ...]:
    principles = load_constitution(principles)
    for principle in principles:
        for field in fields:
            if not getattr(principle, field):
                raise ValueError(
                    f"principle {principle.name!r} has no {field}, which this use needs"
                )
    return principles


# ---------------------------------------------------------------------------------------------
# Reading answers from log-probabilities
# ---------------------------------------------------------------------------------------------


def _check_strings(name: str, values: Any, allow_empty_items: bool = True) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of str, got {type(values).__name__}")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(value).__name__}")
        if not allow_empty_items and not value:
            raise ValueError(f"{name}[{i}] must not be empty")
    return list(values)


def _check_pairs(prompts: Any, responses: Any) -> tuple[list[str], list[str]]:
    """``prompts`` and ``responses`` checked as lists of strings of the same length."""
    prompts = _check_strings("prompts", prompts)
    responses = _check_strings("responses", responses)
    if len(prompts) != len(responses):
        raise ValueError(
            f"prompts and responses must have the same length, got {len(prompts)} and "
            f"{len(responses)}"
        )
    return prompts, responses


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return batch_size


def compute_option_probabilities(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    options: Sequence[str],
    batch_size: int = 8,
) -> torch.Tensor:
    """The model's probability of each answer option after each text, normalised over options.

    With ``ℓ_{n,k} = Σ_t log π(o_{k,t} | x_n, o_{k,<t})``, the log-likelihood of option ``k``'s
    tokens as the continuation of text ``x_n`` (temperature 1)::

        P[n, k] = exp(ℓ_{n,k}) / Σ_j exp(ℓ_{n,j})

    When every option is one token this is the softmax over the options' logits at the text's
    last position, computed from one forward pass per text; otherwise each (text, option) row
    is scored with ``get_logprobs``. This is how Bai et al. 2022 (§4.1) read a feedback model's
    multiple-choice answer: normalised probabilities of the option tokens, no generation.
    Options are tokenised on their own, without special tokens (write ``" Yes"`` with the
    space the template leaves before it), and appended to the text's tokens.

    Args:
      model: a Hugging Face causal LM (the judge).
      tokenizer: its tokenizer; texts get its special tokens (no second BOS).
      texts: ``N`` prompts for the judge, each ending where the answer begins.
      options: ``K ≥ 2`` distinct non-empty answer strings.
      batch_size: rows per forward pass; texts are sorted by length, left-padded, and given
        position ids that follow the mask, so a batched result equals the one-at-a-time one.
    Returns:
      ``[N, K]`` float32 probabilities on the CPU, rows summing to 1. Runs in eval mode without
      gradients and restores the model's mode.
    Raises:
      ValueError / TypeError: fewer than two options, a repeated or empty option, an option or
        text that encodes to no tokens, a text plus option longer than the model's context.
    """
    texts = _check_strings("texts", texts)
    options = _check_strings("options", options, allow_empty_items=False)
    batch_size = _check_batch_size(batch_size)
    if len(options) < 2:
        raise ValueError(f"options must hold at least 2 answers, got {options}")
    if len(set(options)) != len(options):
        raise ValueError(f"options must be distinct, got {options}")
    option_ids = [list(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in options]
    for option, ids in zip(options, option_ids, strict=True):
        if not ids:
            raise ValueError(f"option {option!r} encodes to no tokens")
    if len({tuple(ids) for ids in option_ids}) != len(options):
        raise ValueError(f"options must encode to distinct token ids, got {option_ids}")
    if not texts:
        return torch.zeros(0, len(options), dtype=torch.float32)
    text_ids = _encode_prompts(tokenizer, texts)
    context = _context_length(model, tokenizer)
    longest_option = max(len(ids) for ids in option_ids)
    for i, ids in enumerate(text_ids):
        if not ids:
            raise ValueError(f"texts[{i}] encodes to no tokens")
        if context is not None and len(ids) + longest_option > context:
            raise ValueError(
                f"texts[{i}] is {len(ids)} tokens long; with an option of {longest_option} "
                f"tokens it exceeds the model's context of {context} tokens"
            )
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    single_token = all(len(ids) == 1 for ids in option_ids)
    # Rows: one per text (single-token options) or one per (text, option).
    rows = (
        [(n, None) for n in range(len(texts))]
        if single_token
        else [(n, k) for n in range(len(texts)) for k in range(len(options))]
    )
    rows.sort(key=lambda row: len(text_ids[row[0]]), reverse=True)
    scores = torch.empty(len(texts), len(options), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                tp = max(len(text_ids[n]) for n, _ in chunk)
                # Single-token options: any one option closes the text; its logits are read.
                continuations = [option_ids[0] if k is None else option_ids[k] for _, k in chunk]
                tc = max(len(c) for c in continuations)
                ids, mask, completion_mask = [], [], []
                for (n, _), continuation in zip(chunk, continuations, strict=True):
                    left, right = tp - len(text_ids[n]), tc - len(continuation)
                    ids.append([pad] * left + text_ids[n] + continuation + [pad] * right)
                    mask.append([0] * left + [1] * (tp - left + len(continuation)) + [0] * right)
                    completion_mask.append([1] * len(continuation) + [0] * right)
                input_ids = torch.tensor(ids, dtype=torch.long, device=device)
                attention_mask = torch.tensor(mask, dtype=torch.long, device=device)
                if single_token:
                    logits = get_logits(model, input_ids, attention_mask, completion_length=1)
                    choice = torch.tensor([o[0] for o in option_ids], device=device)
                    values = logits[:, 0].index_select(1, choice).float().cpu()
                    scores[torch.tensor([n for n, _ in chunk])] = values
                else:
                    logprobs = get_logprobs(
                        model,
                        input_ids,
                        attention_mask,
                        completion_mask=torch.tensor(completion_mask, device=device),
                        completion_length=tc,
                    )
                    for (n, k), value in zip(chunk, logprobs.sum(-1).float().cpu(), strict=True):
                        scores[n, k] = value
    finally:
        model.train(was_training)
    return torch.softmax(scores, dim=-1)


def _fields_of(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}


def _check_template(name: str, template: Any, fields: Sequence[str]) -> Callable[..., str]:
    """A format string using only ``fields`` (as keywords), or a function of them, as a
    function of keyword arguments returning a str."""
    if isinstance(template, str):
        unknown = _fields_of(template) - set(fields)
        if unknown:
            raise ValueError(
                f"{name} may use the fields {sorted(fields)}, got unknown {sorted(unknown)}"
            )
        return lambda **values: template.format(**values)
    if not callable(template):
        raise TypeError(f"{name} must be a format str or a function, got {type(template).__name__}")

    def render(**values: str) -> str:
        text = template(**values)
        if not isinstance(text, str):
            raise TypeError(f"{name} must return a str, returned {type(text).__name__}")
        return text

    return render


def _check_option_values(options: Sequence[str], option_values: Any) -> torch.Tensor:
    if isinstance(option_values, str) or not isinstance(option_values, Sequence):
        raise TypeError(
            f"option_values must be a list of numbers, got {type(option_values).__name__}"
        )
    if len(option_values) != len(options):
        raise ValueError(
            f"option_values must hold one value per option ({len(options)}), got "
            f"{len(option_values)}"
        )
    for i, value in enumerate(option_values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value
        ):
            raise ValueError(f"option_values[{i}] must be a finite number, got {value!r}")
    return torch.tensor([float(v) for v in option_values], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# The AI judge: one response, yes/no per principle
# ---------------------------------------------------------------------------------------------


def compute_judge_scores(
    judge: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    principles: Sequence[Principle],
    options: Sequence[str] = (" Yes", " No"),
    option_values: Sequence[float] = (1.0, 0.0),
    template: str | Callable[..., str] = JUDGE_TEMPLATE,
    batch_size: int = 8,
) -> torch.Tensor:
    """Scores of each response against each principle, read from the judge's answer options.

    For response ``b`` and principle ``p`` the judge reads
    ``x_{b,p} = template(prompt=prompts[b], response=responses[b], question=p.judge_question)``
    and::

        score[b, p] = Σ_k P(option_k | x_{b,p}) · option_values[k]

    with ``P`` from ``compute_option_probabilities`` — with the defaults, ``P(" Yes")``, the
    judge's probability that the response satisfies the principle (Bai et al. 2022). All
    ``B·P`` texts go through the judge in batches of ``batch_size``.

    Args:
      judge: a Hugging Face causal LM. tokenizer: its tokenizer.
      prompts, responses: ``B`` texts each.
      principles: a constitution (see ``load_constitution``); each needs a ``judge_question``.
      options: the answer strings the judge may give (``K ≥ 2``).
      option_values: the score of each option.
      template: a format string with ``{prompt}``, ``{response}``, ``{question}``, or
        ``fn(prompt=, response=, question=) -> str`` (e.g. one that applies a chat template).
      batch_size: judge texts per forward pass.
    Returns:
      ``[B, P]`` float32 scores on the CPU.
    """
    prompts, responses = _check_pairs(prompts, responses)
    principles = _principles_with(principles, ["judge_question"])
    values = _check_option_values(options, option_values)
    render = _check_template("template", template, ("prompt", "response", "question"))
    texts = [
        render(prompt=prompt, response=response, question=principle.judge_question)
        for prompt, response in zip(prompts, responses, strict=True)
        for principle in principles
    ]
    probabilities = compute_option_probabilities(judge, tokenizer, texts, options, batch_size)
    return (probabilities @ values).reshape(len(prompts), len(principles))


def _check_prompt_fn(prompt_fn: Any) -> Callable[[Rollout], str]:
    if prompt_fn is None:
        return lambda rollout: rollout.prompt
    if not callable(prompt_fn):
        raise TypeError(f"prompt_fn must be callable or None, got {type(prompt_fn).__name__}")
    return prompt_fn


def _weighted_mean(scores: torch.Tensor, principles: Sequence[Principle]) -> torch.Tensor:
    weights = torch.tensor([p.weight for p in principles], dtype=scores.dtype)
    total = float(weights.sum())
    if total <= 0:
        raise ValueError("the principles' weights sum to 0; give at least one a weight > 0")
    return scores @ weights / total


def create_judge_reward_fn(
    judge: Any,
    tokenizer: Any,
    principles: Sequence[Principle],
    options: Sequence[str] = (" Yes", " No"),
    option_values: Sequence[float] = (1.0, 0.0),
    template: str | Callable[..., str] = JUDGE_TEMPLATE,
    batch_size: int = 8,
    vector: bool = False,
    prompt_fn: Callable[[Rollout], str] | None = None,
) -> Callable[[Rollout], Any]:
    """A ``reward_fn(rollout)`` scoring ``rollout.generation.text`` against a constitution.

    ``r = Σ_p w_p · score_p / Σ_p w_p`` with ``score`` from ``compute_judge_scores`` of
    ``(rollout.prompt, rollout.generation.text)`` and ``w_p`` the principles' weights; with
    ``vector=True`` the reward is the list of the ``P`` per-principle scores instead (combine
    them with ``aggregate_vector_rewards``, e.g. a Pareto rank). It carries
    ``reward_fn.batched(rollouts)``, which ``compute_batch_rewards`` calls once per batch (one
    batched judge pass); scoring one rollout alone gives the same value. ``prompt_fn(rollout)
    -> str`` is the prompt the judge reads (``None``: ``rollout.prompt``; e.g. the human's
    words from ``rollout.metadata`` when the policy's prompt is a rendered template). Other
    arguments as in ``compute_judge_scores``; all are checked here, before any scoring.
    """
    principles = _principles_with(principles, ["judge_question"])
    read_prompt = _check_prompt_fn(prompt_fn)
    _check_option_values(options, option_values)
    _check_template("template", template, ("prompt", "response", "question"))
    _check_batch_size(batch_size)
    if not vector:
        _weighted_mean(torch.zeros(1, len(principles)), principles)  # weights sum > 0

    def score_rollouts(rollouts: Sequence[Rollout]) -> list[Any]:
        for i, rollout in enumerate(rollouts):
            if not isinstance(rollout, Rollout):
                raise TypeError(f"rollouts[{i}] must be a Rollout, got {type(rollout).__name__}")
        scores = compute_judge_scores(
            judge,
            tokenizer,
            [read_prompt(r) for r in rollouts],
            [r.generation.text for r in rollouts],
            principles,
            options,
            option_values,
            template,
            batch_size,
        )
        return scores.tolist() if vector else _weighted_mean(scores, principles).tolist()

    return create_batched_reward_fn(score_rollouts)


# ---------------------------------------------------------------------------------------------
# SL-CAI: critique and revision
# ---------------------------------------------------------------------------------------------


def critique_and_revise(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    principles: Sequence[Principle],
    gen_config: GenerationConfig,
    num_rounds: int = 1,
    critique_template: str | Callable[..., str] = CRITIQUE_TEMPLATE,
    revision_template: str | Callable[..., str] = REVISION_TEMPLATE,
    generator: Callable[..., list[Generation]] = hf_generator,
) -> list[RevisionPair]:
    """Critique each response against a principle, then revise it; repeat ``num_rounds`` times.

    The supervised stage of Constitutional AI (Bai et al. 2022, §3): in round ``r`` response
    ``i`` (the latest revision) is critiqued under principle ``principles[(i + r) % P]`` —
    a deterministic cycle through the constitution — with::

        critique = generate(critique_template(prompt, response, critique_request))
        revised  = generate(revision_template(prompt, response, critique_request, critique,
                                              revision_request))

    Each round makes two batched generator calls over all responses. Texts are kept as
    generated (a leading space included). Train on the result with
    ``create_preference_rollouts`` (revised preferred over original, the ``dpo`` algorithm) or
    fine-tune on the revisions.

    Args:
      model: a Hugging Face causal LM (usually the policy itself). tokenizer: its tokenizer.
      prompts, responses: ``B`` texts each.
      principles: a constitution; each needs ``critique_request`` and ``revision_request``.
      gen_config: how critiques and revisions are sampled; ``num_samples`` must be 1 (set
        ``do_sample=False`` for greedy, ``seed`` for reproducible sampling).
      num_rounds: rounds of critique and revision, ≥ 1.
      critique_template: a format string with ``{prompt}``, ``{response}``,
        ``{critique_request}``, or a function of those keywords.
      revision_template: the same plus ``{critique}`` and ``{revision_request}``.
      generator: ``generator(model, tokenizer, prompts, config) -> list[Generation]``.
    Returns:
      ``B`` ``RevisionPair``\\ s, in the order of the inputs.
    """
    prompts, responses = _check_pairs(prompts, responses)
    principles = _principles_with(principles, ["critique_request", "revision_request"])
    if not isinstance(gen_config, GenerationConfig):
        raise TypeError(f"gen_config must be a GenerationConfig, got {type(gen_config).__name__}")
    if gen_config.num_samples != 1:
        raise ValueError(
            "gen_config.num_samples must be 1 (one critique and one revision per response), "
            f"got {gen_config.num_samples}"
        )
    if isinstance(num_rounds, bool) or not isinstance(num_rounds, int) or num_rounds < 1:
        raise ValueError(f"num_rounds must be an int >= 1, got {num_rounds!r}")
    critique_fields = ("prompt", "response", "critique_request")
    render_critique = _check_template("critique_template", critique_template, critique_fields)
    render_revision = _check_template(
        "revision_template", revision_template, (*critique_fields, "critique", "revision_request")
    )
    if not callable(generator):
        raise TypeError(f"generator must be callable, got {type(generator).__name__}")

    def generate_texts(texts: list[str]) -> list[str]:
        generations = generator(model, tokenizer, texts, gen_config)
        if len(generations) != len(texts):
            raise ValueError(
                f"generator returned {len(generations)} generations for {len(texts)} prompts"
            )
        return [g.text for g in generations]

    current = list(responses)
    critiques: list[list[str]] = [[] for _ in prompts]
    used: list[list[str]] = [[] for _ in prompts]
    for round_index in range(num_rounds):
        chosen = [principles[(i + round_index) % len(principles)] for i in range(len(prompts))]
        requests = [
            {"prompt": p, "response": r, "critique_request": c.critique_request}
            for p, r, c in zip(prompts, current, chosen, strict=True)
        ]
        round_critiques = generate_texts([render_critique(**q) for q in requests])
        current = generate_texts(
            [
                render_revision(**q, critique=critique, revision_request=c.revision_request)
                for q, critique, c in zip(requests, round_critiques, chosen, strict=True)
            ]
        )
        for i, (critique, principle) in enumerate(zip(round_critiques, chosen, strict=True)):
            critiques[i].append(critique)
            used[i].append(principle.name)
    return [
        RevisionPair(prompt, original, revised, tuple(c), tuple(names))
        for prompt, original, revised, c, names in zip(
            prompts, responses, current, critiques, used, strict=True
        )
    ]


def create_preference_rollouts(
    tokenizer: Any,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    add_eos: bool = True,
    group_offset: int = 0,
) -> list[Rollout]:
    """Preference pairs as rollouts the ``dpo`` algorithm trains on: a group of two per pair.

    Pair ``i`` becomes two consecutive rollouts with ``group_id = group_offset + i``: the chosen
    completion with ``rewards = 1.0``, then the rejected one with ``rewards = 0.0``, so
    ``compute_dpo_pairs`` (best vs worst of each group) selects exactly these pairs. Prompts are
    encoded as the generator encodes them; completions are tokenised without special tokens,
    then ``tokenizer.eos_token_id`` is appended when ``add_eos`` (as a sampled completion that
    stopped would end). ``logprobs`` are ``None``: DPO needs only the reference log-probs,
    which the usual reference phase (``get_reference_logprobs``) adds to the batch.

    Args:
      tokenizer: the policy's tokenizer.
      prompts, chosen, rejected: ``N`` texts each (e.g. ``RevisionPair.prompt`` / ``.revised``
        / ``.original``).
      add_eos: end each completion with the EOS token.
      group_offset: the first pair's ``group_id``.
    Returns:
      ``2·N`` ``Rollout``\\ s, ordered chosen, rejected, chosen, rejected, …
    """
    prompts = _check_strings("prompts", prompts, allow_empty_items=False)
    chosen = _check_strings("chosen", chosen)
    rejected = _check_strings("rejected", rejected)
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(
            "prompts, chosen and rejected must have the same length, got "
            f"{len(prompts)}, {len(chosen)} and {len(rejected)}"
        )
    if isinstance(group_offset, bool) or not isinstance(group_offset, int) or group_offset < 0:
        raise ValueError(f"group_offset must be an int >= 0, got {group_offset!r}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is None:
        raise ValueError("add_eos=True needs tokenizer.eos_token_id, which is None")
    prompt_ids = _encode_prompts(tokenizer, prompts)

    def completion(text: str, index: int, name: str) -> list[int]:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids = ids + [int(eos)] if add_eos else ids
        if not ids:
            raise ValueError(f"{name}[{index}] encodes to no tokens (and add_eos is False)")
        return ids

    rollouts = []
    for i, prompt in enumerate(prompts):
        for name, text, reward in (("chosen", chosen[i], 1.0), ("rejected", rejected[i], 0.0)):
            generation = Generation(
                text=text,
                prompt_ids=tuple(prompt_ids[i]),
                token_ids=tuple(completion(text, i, name)),
                logprobs=None,
                finish_reason="stop" if add_eos else "length",
            )
            rollouts.append(
                Rollout(prompt, generation, rewards=reward, group_id=group_offset + i)
            )
    return rollouts


# ---------------------------------------------------------------------------------------------
# RL-CAI: AI preferences between two samples
# ---------------------------------------------------------------------------------------------


def compute_ai_preferences(
    judge: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    principles: Sequence[Principle],
    options: Sequence[str] = (" (A)", " (B)"),
    template: str | Callable[..., str] = COMPARISON_TEMPLATE,
    both_orders: bool = True,
    batch_size: int = 8,
) -> torch.Tensor:
    """The judge's probability that ``responses_a[n]`` is better than ``responses_b[n]``.

    The feedback model of RL-CAI (Bai et al. 2022, §4.1) reads a multiple-choice question
    ``x_p(a, b) = template(prompt, response_a=a, response_b=b, question=p.comparison_question)``
    and its normalised option probabilities are the label. Averaged over principles with their
    weights (the paper ensembles principles)::

        q_p(a, b) = P(option A | x_p(a, b))
        pref(a, b) = Σ_p w_p · ½ (q_p(a, b) + 1 - q_p(b, a)) / Σ_p w_p      (both_orders)
        pref(a, b) = Σ_p w_p · q_p(a, b) / Σ_p w_p                          (otherwise)

    Asking in both orders cancels the judge's bias toward a position: then
    ``pref(a, b) + pref(b, a) = 1`` and ``pref(a, a) = ½``.

    Args:
      judge: a Hugging Face causal LM. tokenizer: its tokenizer.
      prompts, responses_a, responses_b: ``N`` texts each.
      principles: a constitution; each needs a ``comparison_question``.
      options: the two answer strings, for response A then response B.
      template: a format string with ``{prompt}``, ``{question}``, ``{response_a}``,
        ``{response_b}``, or a function of those keywords.
      both_orders: also ask with the responses swapped (twice the judge passes).
      batch_size: judge texts per forward pass.
    Returns:
      ``[N]`` float32 probabilities on the CPU.
    """
    prompts = _check_strings("prompts", prompts)
    responses_a = _check_strings("responses_a", responses_a)
    responses_b = _check_strings("responses_b", responses_b)
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise ValueError(
            "prompts, responses_a and responses_b must have the same length, got "
            f"{len(prompts)}, {len(responses_a)} and {len(responses_b)}"
        )
    principles = _principles_with(principles, ["comparison_question"])
    options = _check_strings("options", options, allow_empty_items=False)
    if len(options) != 2:
        raise ValueError(f"options must hold exactly 2 answers (A, B), got {options}")
    render = _check_template(
        "template", template, ("prompt", "question", "response_a", "response_b")
    )
    orders = ((responses_a, responses_b), (responses_b, responses_a))[: 2 if both_orders else 1]
    texts = [
        render(prompt=prompt, question=p.comparison_question, response_a=a, response_b=b)
        for first, second in orders
        for prompt, a, b in zip(prompts, first, second, strict=True)
        for p in principles
    ]
    first_option = compute_option_probabilities(judge, tokenizer, texts, options, batch_size)
    q = first_option[:, 0].reshape(len(orders), len(prompts), len(principles))
    per_principle = 0.5 * (q[0] + 1.0 - q[1]) if both_orders else q[0]
    return _weighted_mean(per_principle, principles)


def create_ai_preference_reward_fn(
    judge: Any,
    tokenizer: Any,
    principles: Sequence[Principle],
    options: Sequence[str] = (" (A)", " (B)"),
    template: str | Callable[..., str] = COMPARISON_TEMPLATE,
    both_orders: bool = True,
    batch_size: int = 8,
    prompt_fn: Callable[[Rollout], str] | None = None,
) -> Callable[[Rollout], Any]:
    """A batched reward from AI preferences between the samples of each group (RL-CAI).

    For the ``G`` rollouts of a group (same ``group_id``), every pair ``i < j`` is compared
    once with ``compute_ai_preferences`` and sample ``i``'s reward is its mean win probability::

        r_i = Σ_{j ≠ i} pref(i, j) / (G - 1)          (pref(j, i) = 1 - pref(i, j))

    a group of one gets ``½``. For ``G = 2`` the rewards are ``pref(a, b)`` and
    ``1 - pref(a, b)``. Use it as the reward of any algorithm; with ``dpo``,
    ``compute_dpo_pairs`` pairs each group's most and least preferred samples — the AI
    preference labels as DPO pairs. All ``Σ_g G_g (G_g - 1) / 2`` comparisons of a batch go
    through the judge in one batched call.

    Returns:
      ``reward_fn`` whose ``reward_fn.batched(rollouts) -> list[float]`` is what
      ``compute_batch_rewards`` calls. Calling ``reward_fn(rollout)`` on one rollout raises
      TypeError: a preference needs the other samples of the group.
    Args: ``prompt_fn(rollout) -> str``, the prompt the judge reads (``None``:
    ``rollout.prompt``); the others as in ``compute_ai_preferences``. All are checked here,
    before any scoring.
    """
    principles = _principles_with(principles, ["comparison_question"])
    read_prompt = _check_prompt_fn(prompt_fn)
    options = _check_strings("options", options, allow_empty_items=False)
    if len(options) != 2:
        raise ValueError(f"options must hold exactly 2 answers (A, B), got {options}")
    _check_template("template", template, ("prompt", "question", "response_a", "response_b"))
    _check_batch_size(batch_size)

    def score_rollouts(rollouts: Sequence[Rollout]) -> list[float]:
        groups: dict[int, list[int]] = {}
        for i, rollout in enumerate(rollouts):
            if not isinstance(rollout, Rollout):
                raise TypeError(f"rollouts[{i}] must be a Rollout, got {type(rollout).__name__}")
            groups.setdefault(rollout.group_id, []).append(i)
        pairs = [
            (members[x], members[y])
            for members in groups.values()
            for x in range(len(members))
            for y in range(x + 1, len(members))
        ]
        preferences = compute_ai_preferences(
            judge,
            tokenizer,
            [read_prompt(rollouts[i]) for i, _ in pairs],
            [rollouts[i].generation.text for i, _ in pairs],
            [rollouts[j].generation.text for _, j in pairs],
            principles,
            options,
            template,
            both_orders,
            batch_size,
        ).tolist()
        wins = [0.0] * len(rollouts)
        for (i, j), preference in zip(pairs, preferences, strict=True):
            wins[i] += preference
            wins[j] += 1.0 - preference
        rewards = [0.5] * len(rollouts)
        for members in groups.values():
            if len(members) > 1:
                for i in members:
                    rewards[i] = wins[i] / (len(members) - 1)
        return rewards

    def reward_fn(rollout: Rollout) -> float:
        raise TypeError(
            "an AI preference reward compares the samples of a group: call "
            "reward_fn.batched(rollouts) with the whole batch (compute_batch_rewards and the "
            "training loop do), not reward_fn(rollout)"
        )

    reward_fn.batched = score_rollouts  # type: ignore[attr-defined]
    return reward_fn
