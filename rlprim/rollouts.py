"""Rollouts: prompts in, scored and trainable ``Rollout`` s out — single-turn, batched and
multi-turn with tools, tool tracking, and DAPO dynamic sampling.

Single turn::

    rollouts = create_batch_rollouts(model, tokenizer, prompts, gen_config,
                                     ref_model=ref, reward_fn=reward_fn)
    # len(rollouts) == len(prompts) * gen_config.num_samples; rollouts[i*G + j].group_id == i

Multi-turn (the model talks to tools or to an environment until the episode ends)::

    rollouts = create_batch_multiturn_rollouts(model, tokenizer, conversations, gen_config,
                                               tools={"calculator": calculator}, tool_budget=3)

Token ids of a multi-turn rollout are kept *incrementally*, never by re-tokenising the
conversation (re-tokenising text the model produced can give other ids than it sampled, and
then the stored log-probs belong to tokens that are not there). With ``p`` the initial prompt
ids, ``y_k`` the ids sampled at model turn ``k`` and ``e_k`` the ids of what the environment
(tools, a user) answered after it::

    prompt_ids     = p                                   (from the chat template)
    completion_ids = y_1 ⧺ e_1 ⧺ y_2 ⧺ e_2 ⧺ … ⧺ y_K      (ends with e_K if the context ran out)
    action_mask    = 1…1 ⧺ 0…0 ⧺ 1…1 ⧺ 0…0 ⧺ … ⧺ 1…1      (1 on sampled tokens only)
    logprobs       = sampling log-probs on y_k, 0.0 on e_k

and the prompt of turn ``k + 1`` is ``p ⧺ y_1 ⧺ e_1 ⧺ … ⧺ y_k ⧺ e_k`` as ids, so what the model
conditions on at sampling time is exactly what training feeds it. Masking the environment's
tokens out of the loss is the retrieved-token masking of Search-R1 (Jin et al. 2025) and the
interpreter-output masking of ReTool (Feng et al. 2025).

**Environment deltas.** ``e_k`` is the chat template's text between the end of the model's
turn and the start of the next one, tokenised on its own: the conversation is rendered (as
text; cheap) with the last assistant message's content replaced by a sentinel, once without and
once with the new messages plus the generation prompt, and ``e_k`` is the text after the
sentinel. When the model's turn ended with an EOS token that the template also writes there
(e.g. ``<|im_end|>``), that token is not written twice. A template that is not append-only
(rendering new messages changes the text before them) raises ``ValueError``; pass
``template_fn`` (the ``apply_chat_template`` extension point) for models without a suitable
template.

**Generators and token-id prompts.** Multi-turn rollouts call the generator with prompts given
as *lists of token ids* (``generator(model, tokenizer, prompt_ids: list[list[int]], config)``);
a generator used here must accept them and use them verbatim as ``prompt_ids``. The default
``hf_generator`` is served by an equivalent token-id path of this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from rlprim import inference as _inference
from rlprim.inference import apply_chat_template, batch_generate, hf_generator
from rlprim.kl import KL_ESTIMATORS, compute_per_token_kl
from rlprim.logprobs import get_reference_logprobs
from rlprim.rewards import compute_scalar_reward, compute_vector_reward
from rlprim.tools import DEFAULT_TOOLS, execute_tools, extract_tool_calls, parse_xml_tools
from rlprim.types import Conversation, Generation, GenerationConfig, Message, Rollout, ToolCall

__all__ = [
    "create_rollout",
    "create_batch_rollouts",
    "create_multiturn_rollout",
    "create_batch_multiturn_rollouts",
    "tool_call_was_executed",
    "execute_and_track_tools",
    "track_tool_calls",
    "filter_groups",
    "DynamicSamplingStats",
    "sample_until_informative",
    "FINISH_REASONS",
]

FINISH_REASONS = (
    "stop_condition",
    "no_tool_call",
    "env_done",
    "max_turns",
    "budget_exhausted",
    "context_length",
)
"""Why a multi-turn rollout ended (``rollout.metadata["finish_reason"]``); see
``create_batch_multiturn_rollouts``."""

# Stands in for the last assistant message's content when the environment delta is rendered.
_SENTINEL = "\u0000rlprim-end-of-assistant-content\u0000"
_NOT_EXECUTED_MAX_TURNS = "not executed: the conversation reached max_turns"


# =========================================================================== input checks


def _check_callable(name: str, fn: object, optional: bool = False) -> None:
    if fn is None and optional:
        return
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}")


def _check_int(name: str, value: object, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_config(gen_config: object) -> GenerationConfig:
    if not isinstance(gen_config, GenerationConfig):
        raise TypeError(f"gen_config must be a GenerationConfig, got {type(gen_config).__name__}")
    _inference._check_generation_config(gen_config)
    return gen_config


def _check_kl_estimator(kl_estimator: object) -> None:
    if callable(kl_estimator):
        return
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"kl_estimator must be one of {sorted(KL_ESTIMATORS)} or a function "
            f"kl_fn(logprobs, ref_logprobs) -> per-token KL, got {kl_estimator!r}"
        )


def _check_sequence(name: str, value: object) -> list[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list or tuple, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name} must not be empty")
    return list(value)


def _prompt_and_metadata(item: object, index: int) -> tuple[str, dict[str, Any] | None]:
    if isinstance(item, str):
        return item, None
    if isinstance(item, Mapping):
        prompt = item.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(
                f"prompts[{index}] is a mapping and must hold a str under 'prompt', got "
                f"{type(prompt).__name__} (keys: {sorted(map(str, item))})"
            )
        return prompt, {k: v for k, v in item.items() if k != "prompt"}
    raise TypeError(
        f"prompts[{index}] must be a str or a mapping with a 'prompt' key, "
        f"got {type(item).__name__}"
    )


def _as_message(message: object, where: str) -> Message:
    if isinstance(message, Message):
        return message
    if isinstance(message, Mapping):
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise ValueError(f"{where} must have str 'role' and 'content', got {dict(message)!r}")
        return Message(role=message["role"], content=message["content"], name=message.get("name"))
    raise TypeError(f"{where} must be a Message or a dict, got {type(message).__name__}")


def _conversation_and_metadata(
    item: object, index: int
) -> tuple[tuple[Message, ...], dict[str, Any]]:
    """A conversation item: a str (one user message), a Conversation, a list of messages, or a
    mapping with ``messages`` (any of those) plus metadata."""
    metadata: dict[str, Any] = {}
    where = f"conversations[{index}]"
    if isinstance(item, Mapping):
        if "messages" not in item:
            raise ValueError(
                f"{where} is a mapping and must hold the conversation under 'messages', "
                f"got keys {sorted(map(str, item))}"
            )
        metadata = {k: v for k, v in item.items() if k != "messages"}
        item = item["messages"]
    if isinstance(item, str):
        return (Message("user", item),), metadata
    if isinstance(item, Conversation):
        item = item.messages
    if isinstance(item, (bytes, Mapping)) or not isinstance(item, Sequence) or not item:
        raise TypeError(
            f"{where} must be a str, a Conversation, a non-empty list of Message / dict, or a "
            f"mapping with 'messages', got {type(item).__name__}"
        )
    return tuple(_as_message(m, f"{where}[{i}]") for i, m in enumerate(item)), metadata


def _check_tools(name: str, tools: object) -> Mapping[str, Callable[..., Any]]:
    if not isinstance(tools, Mapping):
        raise TypeError(f"{name} must be a mapping of name -> tool function, got "
                        f"{type(tools).__name__}")
    for key, tool in tools.items():
        if not isinstance(key, str) or not callable(tool):
            raise TypeError(f"{name} must map str names to callables, got {key!r}: "
                            f"{type(tool).__name__}")
    return tools


def _tool_sets(tools: object, count: int) -> list[Mapping[str, Callable[..., Any]]]:
    if tools is None:
        return [DEFAULT_TOOLS] * count
    if isinstance(tools, Mapping):
        return [_check_tools("tools", tools)] * count
    if isinstance(tools, Sequence) and not isinstance(tools, (str, bytes)):
        if len(tools) != count:
            raise ValueError(
                f"tools must be one mapping for all conversations or one per conversation "
                f"({count}), got a sequence of {len(tools)}"
            )
        return [_check_tools(f"tools[{i}]", t) for i, t in enumerate(tools)]
    raise TypeError(f"tools must be None, a mapping or a sequence of mappings, got "
                    f"{type(tools).__name__}")


def _check_generations(generations: object, expected: int) -> list[Generation]:
    if isinstance(generations, (str, bytes)) or not isinstance(generations, Sequence):
        raise TypeError(f"generator must return a list of Generation, got "
                        f"{type(generations).__name__}")
    generations = list(generations)
    if len(generations) != expected:
        raise ValueError(f"generator returned {len(generations)} generations, expected {expected}")
    for i, generation in enumerate(generations):
        if not isinstance(generation, Generation):
            raise TypeError(f"generator output [{i}] must be a Generation, got "
                            f"{type(generation).__name__}")
        if generation.logprobs is not None and len(generation.logprobs) != len(
            generation.token_ids
        ):
            raise ValueError(
                f"generator output [{i}] has {len(generation.logprobs)} logprobs for "
                f"{len(generation.token_ids)} token ids; they must align"
            )
    return generations


# =========================================================================== shared pieces


def _score_rollouts(rollouts: Sequence[Rollout], reward_fn: Callable[..., Any]) -> list[Any]:
    """``reward_fn`` on every rollout (once on the batch when it has ``.batched``), checked like
    ``rlprim.rewards.compute_batch_rewards``; scalars stay floats and vectors tuples."""
    batched = getattr(reward_fn, "batched", None)
    if batched is not None:
        try:
            values = batched(list(rollouts))
        except Exception as error:
            raise ValueError(
                f"reward_fn.batched raised on the batch of {len(rollouts)} rollouts: "
                f"{type(error).__name__}: {error}"
            ) from error
        values = list(values)
        if len(values) != len(rollouts):
            raise ValueError(f"reward_fn.batched returned {len(values)} rewards for "
                             f"{len(rollouts)} rollouts")
    else:
        values = []
        for index, rollout in enumerate(rollouts):
            try:
                values.append(reward_fn(rollout))
            except Exception as error:
                raise ValueError(
                    f"reward_fn raised on rollout {index}: {type(error).__name__}: {error}"
                ) from error
    checked = []
    for index, (rollout, value) in enumerate(zip(rollouts, values, strict=True)):
        if hasattr(value, "ndim"):  # tensors and arrays: 0-d is a scalar
            is_vector = value.ndim >= 1
        else:
            is_vector = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
        try:
            if is_vector:
                checked.append(compute_vector_reward(rollout, lambda _, v=value: v))
            else:
                checked.append(compute_scalar_reward(rollout, lambda _, v=value: v))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"reward_fn returned an invalid reward for rollout {index}: {value!r} ({error})"
            ) from error
    return checked


def _sequence_logprobs(
    model: Any,
    rows: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
    temperature: float,
    batch_size: int | None,
) -> list[list[float]]:
    """Log-probs of each row's completion tokens under ``model`` (no gradients, eval mode),
    in padded forwards of ``batch_size`` rows. A row is ``(prompt_ids, completion_ids, mask)``;
    entries where ``mask`` is 0 are 0.0."""
    device = next(model.parameters()).device
    out: list[list[float]] = [[] for _ in rows]
    todo = [i for i, (_, completion, _) in enumerate(rows) if len(completion) > 0]
    step = batch_size or max(len(todo), 1)
    for start in range(0, len(todo), step):
        chunk = todo[start : start + step]
        tp = max(len(rows[i][0]) for i in chunk)
        tc = max(len(rows[i][1]) for i in chunk)
        input_ids = torch.zeros((len(chunk), tp + tc), dtype=torch.long)
        attention = torch.zeros((len(chunk), tp + tc), dtype=torch.long)
        completion_mask = torch.zeros((len(chunk), tc), dtype=torch.float32)
        for r, i in enumerate(chunk):
            prompt, completion, mask = rows[i]
            n, m = len(prompt), len(completion)
            input_ids[r, tp - n : tp] = torch.tensor(list(prompt), dtype=torch.long)
            input_ids[r, tp : tp + m] = torch.tensor(list(completion), dtype=torch.long)
            attention[r, tp - n : tp + m] = 1
            completion_mask[r, :m] = torch.tensor(list(mask), dtype=torch.float32)
        values = get_reference_logprobs(
            model,
            input_ids.to(device),
            attention.to(device),
            completion_mask=completion_mask.to(device),
            temperature=float(temperature),
            completion_length=tc,
        ).cpu()
        for r, i in enumerate(chunk):
            out[i] = values[r, : len(rows[i][1])].tolist()
    return out


def _sequence_kl(
    logprobs: Sequence[float], ref_logprobs: Sequence[float], mask: Sequence[int],
    kl_estimator: str | Callable[..., torch.Tensor],
) -> float:
    """``Σ_t mask_t · k(logp_t, ref_logp_t)`` with ``k`` the per-token estimator."""
    if len(logprobs) == 0:
        return 0.0
    policy = torch.tensor([list(logprobs)], dtype=torch.float32)
    reference = torch.tensor([list(ref_logprobs)], dtype=torch.float32)
    if callable(kl_estimator):
        per_token = compute_per_token_kl(policy, reference, kl_fn=kl_estimator)
    else:
        per_token = compute_per_token_kl(policy, reference, estimator=kl_estimator)
    weights = torch.tensor([list(mask)], dtype=torch.float32)
    return float((per_token * weights).sum())


def _add_reference(
    rollouts: list[Rollout],
    model: Any,
    ref_model: Any,
    gen_config: GenerationConfig,
    kl_estimator: str | Callable[..., torch.Tensor],
) -> list[Rollout]:
    """Fills ``ref_logprobs`` and ``kl_divergence`` (and policy log-probs a generator left out)."""
    rows = []
    for index, rollout in enumerate(rollouts):
        if len(rollout.generation.prompt_ids) == 0:
            raise ValueError(f"rollout {index}: the generator returned no prompt_ids, which the "
                             "reference log-probs need as context")
        completion = (rollout.completion_ids if rollout.completion_ids is not None
                      else rollout.generation.token_ids)
        mask = rollout.action_mask if rollout.action_mask is not None else [1] * len(completion)
        rows.append((rollout.generation.prompt_ids, completion, mask))
    ref = _sequence_logprobs(ref_model, rows, gen_config.temperature, gen_config.batch_size)
    policy = [
        rollout.logprobs if rollout.logprobs is not None else rollout.generation.logprobs
        for rollout in rollouts
    ]
    missing = [i for i, values in enumerate(policy) if values is None]
    if missing:  # the generator gave no log-probs: recompute them from the policy
        recomputed = _sequence_logprobs(
            model, [rows[i] for i in missing], gen_config.temperature, gen_config.batch_size
        )
        for i, values in zip(missing, recomputed, strict=True):
            policy[i] = values
    out = []
    for i, rollout in enumerate(rollouts):
        kl = _sequence_kl(policy[i], ref[i], rows[i][2], kl_estimator)
        update: dict[str, Any] = {"ref_logprobs": tuple(ref[i]), "kl_divergence": kl}
        if i in missing:
            update["logprobs"] = tuple(policy[i])
        out.append(rollout._replace(**update))
    return out


def _add_rewards(rollouts: list[Rollout], reward_fn: Callable[..., Any] | None) -> list[Rollout]:
    if reward_fn is None:
        return rollouts
    rewards = _score_rollouts(rollouts, reward_fn)
    return [r._replace(rewards=v) for r, v in zip(rollouts, rewards, strict=True)]


def _rollouts_from_generations(
    items: Sequence[tuple[str, Mapping[str, Any] | None]],
    generations: Sequence[Generation],
    num_samples: int,
    tool_parser: Callable[[str], Sequence[ToolCall]] | None,
    group_offset: int,
) -> list[Rollout]:
    """Row ``i·G + j`` (sample ``j`` of prompt ``i``) as a rollout of group ``group_offset + i``,
    with its prompt's metadata and, given ``tool_parser``, the tool calls parsed from its text."""
    rollouts = []
    for row, generation in enumerate(generations):
        index = row // num_samples
        calls = () if tool_parser is None else tuple(
            extract_tool_calls(generation.text, parser=tool_parser))
        prompt, metadata = items[index]
        rollouts.append(Rollout(
            prompt=prompt,
            generation=generation,
            tool_calls=calls,
            group_id=group_offset + index,
            metadata=None if metadata is None else dict(metadata),
        ))
    return rollouts


# =========================================================================== single turn


def create_batch_rollouts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Mapping[str, Any]],
    gen_config: GenerationConfig,
    ref_model: Any = None,
    reward_fn: Callable[[Rollout], Any] | None = None,
    tool_parser: Callable[[str], Sequence[ToolCall]] | None = None,
    generator: Callable[..., list[Generation]] = hf_generator,
    group_offset: int = 0,
    kl_estimator: str | Callable[..., torch.Tensor] = "k3",
) -> list[Rollout]:
    """Samples ``G = gen_config.num_samples`` completions per prompt and turns them into rollouts.

    One ``generator`` call for all prompts (it batches by ``gen_config.batch_size``). Row
    ``i·G + j`` is sample ``j`` of ``prompts[i]`` with ``group_id = group_offset + i``, so the
    ``G`` samples of a prompt form a consecutive group (GRPO, Shao et al. 2024).

    With ``ref_model``, the reference log-probs of the *sampled* tokens are computed at the
    sampling temperature ``T`` in padded forwards of ``gen_config.batch_size`` rows (all rows
    when ``None``) and the sequence KL is the sum of the per-token estimate (Schulman 2020):

        ref_logprobs_t = log softmax(z^ref_t / T)[y_t],   d_t = logp_t - ref_logp_t
        kl_divergence  = Σ_t k(d_t)      (k3: exp(-d) + d - 1; "k1", "k2", "low_var" or a KLFn)

    (If the generator returns no log-probs, the policy's are recomputed the same way and stored
    in ``rollout.logprobs``.) With ``tool_parser``, ``tool_calls`` holds the calls parsed from
    the text — parsed, not executed (use the multi-turn functions to execute them). With
    ``reward_fn`` (``fn(rollout) -> float | Sequence[float]``, optionally with ``.batched``),
    ``rewards`` is filled after everything else, validated like ``compute_batch_rewards``.

    Args:
      model: the policy (or an engine, for an engine-backed generator).
      tokenizer: its tokenizer.
      prompts: ``P`` prompt texts, or mappings ``{"prompt": str, **metadata}`` whose other keys
        become ``rollout.metadata`` (e.g. the reference answer a reward function reads).
      gen_config: sampling settings.
      ref_model: a frozen reference ``nn.Module`` or ``None``.
      reward_fn: the reward function or ``None`` (``rewards`` stays ``None``).
      tool_parser: ``parser(text) -> Sequence[ToolCall]`` or ``None``.
      generator: ``generator(model, tokenizer, prompts, config) -> list[Generation]``.
      group_offset: added to every group id (to keep ids unique across calls).
      kl_estimator: ``"k1"``, ``"k2"``, ``"k3"``, ``"low_var"`` or ``kl_fn(logprobs,
        ref_logprobs) -> per-token KL``.

    Returns:
      ``P · G`` rollouts; ``completion_ids``, ``action_mask`` and ``logprobs`` stay ``None``
      (meaning ``generation.token_ids``, all ones and ``generation.logprobs``).

    Raises:
      TypeError / ValueError: bad prompts, config, estimator or callables (before generating);
      a reward function that raises or returns a non-finite or non-numeric value (the rollout
      index is named).
    """
    items = [_prompt_and_metadata(p, i) for i, p in enumerate(_check_sequence("prompts", prompts))]
    gen_config = _check_config(gen_config)
    _check_callable("reward_fn", reward_fn, optional=True)
    _check_callable("tool_parser", tool_parser, optional=True)
    _check_callable("generator", generator)
    _check_int("group_offset", group_offset, 0)
    _check_kl_estimator(kl_estimator)

    texts = [text for text, _ in items]
    generations = batch_generate(model, tokenizer, texts, gen_config, generator=generator)
    generations = _check_generations(generations, len(texts) * gen_config.num_samples)
    rollouts = _rollouts_from_generations(
        items, generations, gen_config.num_samples, tool_parser, group_offset
    )
    if ref_model is not None:
        rollouts = _add_reference(rollouts, model, ref_model, gen_config, kl_estimator)
    return _add_rewards(rollouts, reward_fn)


def create_rollout(
    model: Any,
    tokenizer: Any,
    prompt: str | Mapping[str, Any],
    gen_config: GenerationConfig,
    ref_model: Any = None,
    reward_fn: Callable[[Rollout], Any] | None = None,
    tool_parser: Callable[[str], Sequence[ToolCall]] | None = None,
    generator: Callable[..., list[Generation]] = hf_generator,
    kl_estimator: str | Callable[..., torch.Tensor] = "k3",
) -> Rollout:
    """One rollout of one prompt: ``create_batch_rollouts`` with ``[prompt]`` and one sample.

    ``gen_config.num_samples`` is ignored (treated as 1) and ``group_id`` is 0. See
    ``create_batch_rollouts`` for the reference log-probs, the KL
    ``Σ_t k(logp_t - ref_logp_t)``, tool-call parsing and rewards.

    Returns:
      a ``Rollout`` (``prompt`` is the text, ``metadata`` the mapping's other keys or ``None``).
    """
    if not isinstance(prompt, (str, Mapping)):
        raise TypeError(f"prompt must be a str or a mapping with a 'prompt' key, got "
                        f"{type(prompt).__name__}")
    gen_config = _check_config(gen_config)
    return create_batch_rollouts(
        model, tokenizer, [prompt], gen_config._replace(num_samples=1), ref_model=ref_model,
        reward_fn=reward_fn, tool_parser=tool_parser, generator=generator,
        kl_estimator=kl_estimator,
    )[0]


# =========================================================================== tools


def tool_call_was_executed(call: ToolCall) -> bool:
    """Whether a tool actually ran for ``call`` (and so used one unit of tool budget).

    True when the call has a ``result``, or when its error is a failure *of the tool itself*
    (``"tool 'NAME' failed: ..."``, the format of ``rlprim.tools.execute_tools``). Parse errors,
    unknown tools, rejected arguments and budget refusals did not run anything and are False.
    """
    if not isinstance(call, ToolCall):
        raise TypeError(f"call must be a ToolCall, got {type(call).__name__}")
    if call.result is not None:
        return True
    return call.error is not None and call.error.startswith(f"tool {call.name!r} failed:")


def _execute(
    calls: Sequence[ToolCall],
    tools: Mapping[str, Callable[..., Any]],
    budget: int | None,
    tool_executor: Callable[..., Sequence[ToolCall]],
) -> tuple[list[ToolCall], int | None]:
    executed = tool_executor(list(calls), tools, budget)
    if isinstance(executed, (str, bytes)) or not isinstance(executed, Sequence):
        raise TypeError(f"tool_executor must return a list of ToolCall, got "
                        f"{type(executed).__name__}")
    executed = list(executed)
    if len(executed) != len(calls):
        raise ValueError(f"tool_executor returned {len(executed)} calls for {len(calls)}")
    for i, call in enumerate(executed):
        if not isinstance(call, ToolCall):
            raise TypeError(f"tool_executor output [{i}] must be a ToolCall, got "
                            f"{type(call).__name__}")
    used = sum(tool_call_was_executed(call) for call in executed)
    if budget is None:
        return executed, None
    if used > budget:
        raise ValueError(f"tool_executor ran {used} tools with a budget of {budget}; it must "
                         "refuse calls beyond the budget (as execute_tools does)")
    return executed, budget - used


def execute_and_track_tools(
    text: str,
    tools: Mapping[str, Callable[..., Any]],
    tool_parser: Callable[[str], Sequence[ToolCall]] = parse_xml_tools,
    budget: int | None = None,
    tool_executor: Callable[..., Sequence[ToolCall]] = execute_tools,
) -> tuple[list[ToolCall], int | None]:
    """Parses the tool calls in ``text``, executes them within ``budget`` and returns the calls
    with the budget left.

        calls     = tool_executor(tool_parser(text), tools, budget)
        remaining = budget - #{c in calls : tool_call_was_executed(c)}      (None if no budget)

    Malformed calls come back with ``error`` set and cost nothing; calls beyond the budget are
    refused by the executor (``"tool budget exhausted"``) and cost nothing.

    Args:
      text: the model's output.
      tools: name -> tool function.
      tool_parser: ``parser(text) -> Sequence[ToolCall]``.
      budget: tool executions still allowed, ``None`` for no limit.
      tool_executor: ``fn(calls, tools, budget) -> list[ToolCall]`` (``execute_tools``'s
        signature); it must run at most ``budget`` tools.

    Returns:
      ``(calls, remaining_budget)``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    _check_tools("tools", tools)
    _check_callable("tool_parser", tool_parser)
    _check_callable("tool_executor", tool_executor)
    _check_int("budget", budget, 0, optional=True)
    calls = extract_tool_calls(text, parser=tool_parser)
    return _execute(calls, tools, budget, tool_executor)


def track_tool_calls(rollouts: Sequence[Rollout]) -> dict[str, Any]:
    """A summary of the tool use in a batch of rollouts (a pure function of ``tool_calls``).

    Returns a dict with
      * ``num_rollouts``, ``total_calls``, ``executed_calls`` (``tool_call_was_executed``),
        ``error_calls`` (calls with ``error`` set);
      * ``calls_per_rollout`` / ``executed_per_rollout``: lists, one entry per rollout;
      * ``mean_calls_per_rollout`` (0.0 for no rollouts), ``error_rate`` = errors / calls (0.0
        without calls);
      * ``calls_per_tool`` / ``errors_per_tool``: ``{name: count}`` (a nameless malformed call
        counts under ``""``).
    """
    if isinstance(rollouts, Rollout) or not isinstance(rollouts, Sequence):
        raise TypeError(f"rollouts must be a sequence of Rollout, got {type(rollouts).__name__}")
    calls_per_rollout, executed_per_rollout = [], []
    calls_per_tool: dict[str, int] = {}
    errors_per_tool: dict[str, int] = {}
    errors = 0
    for index, rollout in enumerate(rollouts):
        if not isinstance(rollout, Rollout):
            raise TypeError(f"rollouts[{index}] must be a Rollout, got {type(rollout).__name__}")
        calls = list(rollout.tool_calls)
        calls_per_rollout.append(len(calls))
        executed_per_rollout.append(sum(tool_call_was_executed(c) for c in calls))
        for call in calls:
            calls_per_tool[call.name] = calls_per_tool.get(call.name, 0) + 1
            if call.error is not None:
                errors += 1
                errors_per_tool[call.name] = errors_per_tool.get(call.name, 0) + 1
    total = sum(calls_per_rollout)
    return {
        "num_rollouts": len(calls_per_rollout),
        "total_calls": total,
        "executed_calls": sum(executed_per_rollout),
        "error_calls": errors,
        "calls_per_rollout": calls_per_rollout,
        "executed_per_rollout": executed_per_rollout,
        "mean_calls_per_rollout": total / len(calls_per_rollout) if calls_per_rollout else 0.0,
        "error_rate": errors / total if total else 0.0,
        "calls_per_tool": calls_per_tool,
        "errors_per_tool": errors_per_tool,
    }


# =========================================================================== multi-turn


def _turn_seed(seed: int | None, turn: int) -> int | None:
    """Turn 0 samples with ``seed`` itself; later turns with distinct derived seeds (the same
    seed every turn would replay the same random numbers at every turn)."""
    if seed is None or turn == 0:
        return seed
    return (seed + turn * 0x9E3779B97F4A7C15) % 2**63


class _Trajectory(NamedTuple):
    """The state of one multi-turn episode between turns (immutable; ``_replace`` updates)."""

    messages: tuple[Message, ...]
    prompt_text: str
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...] = ()
    action_mask: tuple[int, ...] = ()
    logprobs: tuple[float, ...] | None = ()
    tool_calls: tuple[ToolCall, ...] = ()
    turns: int = 0
    budget: int | None = None
    generation: Generation | None = None
    finish_reason: str | None = None
    group_id: int = 0
    metadata: Mapping[str, Any] = {}
    tools: Mapping[str, Callable[..., Any]] = {}


class _TurnSettings(NamedTuple):
    tokenizer: Any
    template_fn: Callable[..., str] | None
    tool_parser: Callable[[str], Sequence[ToolCall]] | None
    tool_executor: Callable[..., Sequence[ToolCall]]
    stop_condition: Callable[[Conversation], bool] | None
    env_fn: Callable[[Conversation], Sequence[Message] | None] | None
    max_turns: int
    eos_ids: tuple[int, ...]


def _render_delta(
    settings: _TurnSettings,
    messages: Sequence[Message],
    new_messages: Sequence[Message],
    sampled_ids: Sequence[int],
) -> str:
    """The template's text from the end of the last assistant content to the next generation
    prompt (see the module docstring)."""
    base = list(messages[:-1]) + [Message("assistant", _SENTINEL)]
    head = apply_chat_template(settings.tokenizer, base, False, settings.template_fn)
    full = apply_chat_template(
        settings.tokenizer, base + list(new_messages), True, settings.template_fn)
    cut = head.rfind(_SENTINEL)
    if cut < 0:
        raise ValueError("the chat template does not render the assistant message's content "
                         "verbatim; pass template_fn= to render conversations")
    cut += len(_SENTINEL)
    if full[:cut] != head[:cut]:
        raise ValueError("the chat template is not append-only (rendering new messages changed "
                         "the text before them), so environment tokens cannot be appended; "
                         "pass template_fn=")
    delta = full[cut:]
    if sampled_ids and int(sampled_ids[-1]) in settings.eos_ids:
        eos_text = settings.tokenizer.decode([int(sampled_ids[-1])], skip_special_tokens=False)
        if eos_text and delta.startswith(eos_text):  # the model already wrote it
            delta = delta[len(eos_text):]
    return delta


def _tool_message(call: ToolCall) -> Message:
    content = call.result if call.error is None and call.result is not None else (
        f"error: {call.error}")
    return Message("tool", content, name=call.name or None)


def _append_model_turn(
    trajectory: _Trajectory, generation: Generation, settings: _TurnSettings
) -> _Trajectory:
    """Appends one model turn; ends the episode when ``stop_condition`` says so."""
    sampled = tuple(int(t) for t in generation.token_ids)
    logprobs = None
    if trajectory.logprobs is not None and generation.logprobs is not None:
        logprobs = trajectory.logprobs + tuple(float(v) for v in generation.logprobs)
    messages = trajectory.messages + (Message("assistant", generation.text),)
    trajectory = trajectory._replace(
        messages=messages,
        completion_ids=trajectory.completion_ids + sampled,
        action_mask=trajectory.action_mask + (1,) * len(sampled),
        logprobs=logprobs,
        turns=trajectory.turns + 1,
        generation=generation,
    )
    if settings.stop_condition is not None and bool(
        settings.stop_condition(Conversation(messages))
    ):
        return trajectory._replace(finish_reason="stop_condition")
    return trajectory


_ASK_ENV = object()  # _answer_turn: call settings.env_fn itself (no batched answer given)


def _answer_turn(
    trajectory: _Trajectory, turn: int, settings: _TurnSettings, env_answer: Any = _ASK_ENV
) -> _Trajectory:
    """After a model turn: the environment's (or the tools') answer, or the episode's end.

    ``env_answer`` is ``env_fn``'s answer when it was already asked in a batch."""
    generation = trajectory.generation
    assert generation is not None
    sampled = tuple(int(t) for t in generation.token_ids)
    messages, logprobs = trajectory.messages, trajectory.logprobs
    calls: list[ToolCall] = []
    if settings.env_fn is not None:
        new_messages = (
            settings.env_fn(Conversation(messages)) if env_answer is _ASK_ENV else env_answer
        )
        if new_messages is not None and (
            isinstance(new_messages, (str, bytes, Mapping))
            or not isinstance(new_messages, Sequence)
        ):
            raise TypeError(f"env_fn must return a list of Message or None, got "
                            f"{type(new_messages).__name__}")
        if not new_messages:
            return trajectory._replace(finish_reason="env_done")
        new_messages = [_as_message(m, "env_fn output") for m in new_messages]
    else:
        if settings.tool_parser is not None:
            calls = extract_tool_calls(generation.text, parser=settings.tool_parser)
        if not calls:
            return trajectory._replace(finish_reason="no_tool_call")
    last_turn = turn + 1 >= settings.max_turns
    if calls and (last_turn or trajectory.budget == 0):
        if last_turn:  # the model would never see the results: do not run (or charge) them
            calls = [c if c.error is not None else c._replace(error=_NOT_EXECUTED_MAX_TURNS)
                     for c in calls]
        else:  # called a tool with no budget left: every call is refused, the episode ends
            calls, _ = _execute(calls, trajectory.tools, 0, settings.tool_executor)
        return trajectory._replace(
            messages=messages[:-1] + (messages[-1]._replace(tool_calls=tuple(calls)),),
            tool_calls=trajectory.tool_calls + tuple(calls),
            finish_reason="max_turns" if last_turn else "budget_exhausted",
        )
    if last_turn:
        return trajectory._replace(finish_reason="max_turns")
    budget = trajectory.budget
    if calls:
        calls, budget = _execute(calls, trajectory.tools, budget, settings.tool_executor)
        messages = messages[:-1] + (messages[-1]._replace(tool_calls=tuple(calls)),)
        new_messages = [_tool_message(call) for call in calls]
    delta = _render_delta(settings, messages, new_messages, sampled)
    delta_ids = tuple(settings.tokenizer(delta, add_special_tokens=False)["input_ids"])
    return trajectory._replace(
        messages=messages + tuple(new_messages),
        completion_ids=trajectory.completion_ids + delta_ids,
        action_mask=trajectory.action_mask + (0,) * len(delta_ids),
        logprobs=None if logprobs is None else logprobs + (0.0,) * len(delta_ids),
        tool_calls=trajectory.tool_calls + tuple(calls),
        budget=budget,
    )


def _batched_env_answers(
    env_fn: Any, trajectories: Sequence[_Trajectory]
) -> list[Any] | None:
    """``env_fn.batched`` over the conversations awaiting an answer this turn (one call, e.g.
    one request to an environment server), or ``None`` when ``env_fn`` has no ``.batched``."""
    batched = getattr(env_fn, "batched", None)
    if env_fn is None or batched is None or not trajectories:
        return None
    _check_callable("env_fn.batched", batched)
    answers = batched([Conversation(t.messages) for t in trajectories])
    if isinstance(answers, (str, bytes, Mapping)) or not isinstance(answers, Sequence):
        raise TypeError(
            f"env_fn.batched must return a list (one answer per conversation), got "
            f"{type(answers).__name__}"
        )
    if len(answers) != len(trajectories):
        raise ValueError(
            f"env_fn.batched returned {len(answers)} answers for {len(trajectories)} "
            "conversations"
        )
    return list(answers)


def _to_rollout(trajectory: _Trajectory, tool_budget: int | None) -> Rollout:
    assert trajectory.generation is not None  # every episode has at least one model turn
    metadata = dict(trajectory.metadata)
    metadata.update(
        turns=trajectory.turns,
        finish_reason=trajectory.finish_reason,
        tool_calls_executed=sum(tool_call_was_executed(c) for c in trajectory.tool_calls),
    )
    if tool_budget is not None:
        metadata["tool_budget_remaining"] = trajectory.budget
    return Rollout(
        prompt=trajectory.prompt_text,
        generation=trajectory.generation._replace(prompt_ids=trajectory.prompt_ids),
        tool_calls=trajectory.tool_calls,
        group_id=trajectory.group_id,
        metadata=metadata,
        completion_ids=trajectory.completion_ids,
        action_mask=trajectory.action_mask,
        logprobs=trajectory.logprobs,
        conversation=Conversation(trajectory.messages),
    )


def _start_episodes(
    tokenizer: Any,
    items: Sequence[tuple[tuple[Message, ...], Any]],
    gen_config: GenerationConfig,
    template_fn: Callable[..., str] | None,
    context: int | None,
    tool_budget: int | None,
    group_offset: int,
    tool_sets: Sequence[Mapping[str, Callable[..., Any]]],
) -> list[_Trajectory]:
    """``G`` fresh episodes per conversation (consecutive), each with its rendered prompt ids.

    A prompt that renders to no tokens, or leaves no room for ``max_new_tokens`` in the model's
    ``context``, is a ``ValueError`` naming the conversation.
    """
    trajectories: list[_Trajectory] = []
    for index, (messages, metadata) in enumerate(items):
        prompt_text = apply_chat_template(tokenizer, messages, True, template_fn)
        prompt_ids = tuple(_inference._encode_prompts(tokenizer, [prompt_text])[0])
        if not prompt_ids:
            raise ValueError(f"conversations[{index}] renders to no tokens")
        if context is not None and len(prompt_ids) + gen_config.max_new_tokens > context:
            raise ValueError(
                f"conversations[{index}] is {len(prompt_ids)} tokens, which with "
                f"gen_config.max_new_tokens={gen_config.max_new_tokens} exceeds the model's "
                f"context of {context} tokens"
            )
        trajectories.extend(
            _Trajectory(messages=messages, prompt_text=prompt_text, prompt_ids=prompt_ids,
                        budget=tool_budget, group_id=group_offset + index,
                        metadata=metadata, tools=tool_sets[index])
            for _ in range(gen_config.num_samples)
        )
    return trajectories


def _end_episodes_out_of_context(
    trajectories: Sequence[_Trajectory], context: int | None, max_new_tokens: int
) -> list[_Trajectory]:
    """Ends (``"context_length"``) each live episode with no room left for another turn."""
    ended = []
    for trajectory in trajectories:
        length = len(trajectory.prompt_ids) + len(trajectory.completion_ids)
        if (trajectory.finish_reason is None and context is not None
                and length + max_new_tokens > context):
            trajectory = trajectory._replace(finish_reason="context_length")
        ended.append(trajectory)
    return ended


def _play_turn(
    model: Any,
    tokenizer: Any,
    trajectories: Sequence[_Trajectory],
    live: Sequence[int],
    turn: int,
    gen_config: GenerationConfig,
    generator: Callable[..., list[Generation]],
    settings: _TurnSettings,
) -> list[_Trajectory]:
    """Turn ``turn`` of the ``live`` episodes: one generator call for all of them, then the
    environment's (or the tools') answers to those still running, batched when it can be."""
    trajectories = list(trajectories)
    turn_config = gen_config._replace(num_samples=1, seed=_turn_seed(gen_config.seed, turn))
    prompts = [list(trajectories[i].prompt_ids) + list(trajectories[i].completion_ids)
               for i in live]
    generations = _check_generations(
        generator(model, tokenizer, prompts, turn_config), len(live))
    for i, generation in zip(live, generations, strict=True):
        trajectories[i] = _append_model_turn(trajectories[i], generation, settings)
    waiting = [i for i in live if trajectories[i].finish_reason is None]
    answers = _batched_env_answers(settings.env_fn, [trajectories[i] for i in waiting])
    for position, i in enumerate(waiting):
        answer = _ASK_ENV if answers is None else answers[position]
        trajectories[i] = _answer_turn(trajectories[i], turn, settings, answer)
    return trajectories


def create_batch_multiturn_rollouts(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Any],
    gen_config: GenerationConfig,
    tool_parser: Callable[[str], Sequence[ToolCall]] | None = parse_xml_tools,
    tool_executor: Callable[..., Sequence[ToolCall]] = execute_tools,
    stop_condition: Callable[[Conversation], bool] | None = None,
    max_turns: int = 4,
    reward_fn: Callable[[Rollout], Any] | None = None,
    tool_budget: int | None = None,
    generator: Callable[..., list[Generation]] = hf_generator,
    tools: Mapping[str, Callable[..., Any]] | Sequence[Mapping[str, Callable[..., Any]]]
    | None = None,
    env_fn: Callable[[Conversation], Sequence[Message] | None] | None = None,
    ref_model: Any = None,
    kl_estimator: str | Callable[..., torch.Tensor] = "k3",
    template_fn: Callable[[list[dict[str, Any]], bool], str] | None = None,
    group_offset: int = 0,
) -> list[Rollout]:
    """Runs many multi-turn episodes together: one generator call per turn for every live one.

    Each conversation is repeated ``G = gen_config.num_samples`` times (a group, ``group_id =
    group_offset + conversation index``, consecutive). Every turn, the live episodes' token
    sequences go to *one* ``generator`` call (with ``num_samples=1``; it batches by
    ``gen_config.batch_size``); an episode that ends leaves, so later calls are smaller and no
    slot idles on a finished episode. Token ids are kept incrementally (see the module
    docstring): sampled ids with ``action_mask`` 1 and their log-probs, environment ids with 0.
    With ``gen_config.seed`` set, turn 0 samples with that seed and turn ``k`` with the derived
    seed ``(seed + k · 0x9E3779B97F4A7C15) mod 2^63``, so turns do not replay one random stream.

    After model turn ``k`` (1-based) an episode ends, first rule that applies:
      1. ``stop_condition(conversation)`` is true (the conversation includes the new turn) →
         ``"stop_condition"``;
      2. with ``env_fn``: it returns ``None`` or no messages → ``"env_done"``; without: the turn
         has no tool call (or ``tool_parser`` is ``None``) → ``"no_tool_call"``;
      3. ``k == max_turns`` → ``"max_turns"`` (the turn's calls are recorded with the error
         ``"not executed: ..."``, not run and not charged: the model would never see them);
      4. the turn calls tools while no budget is left → ``"budget_exhausted"`` (its calls are
         recorded with the executor's budget error). So the call that uses the last unit of
         budget still gets its result, and the model one more turn to answer.
      Otherwise the environment answers: with ``env_fn`` its messages; else the calls run,
      ``calls = tool_executor(calls, tools, remaining_budget)``, one ``Message("tool", result
      or "error: ...", name=tool)`` per call (malformed calls answer with their parse error,
      the episode goes on), and the remaining budget drops by the calls that ran
      (``tool_call_was_executed``). Its tokens are appended with ``action_mask`` 0.
      5. Before a turn, an episode whose sequence plus ``max_new_tokens`` no longer fits the
         model's context ends → ``"context_length"`` (its last tokens are environment tokens).

    Rollout fields: ``prompt`` the initial prompt text; ``generation`` the last model turn with
    ``prompt_ids`` set to the *initial* prompt ids (so ``[prompt_ids | completion_ids]`` is the
    whole sequence, as ``rollouts_to_batch`` expects); ``completion_ids`` / ``action_mask`` /
    ``logprobs`` as above (``logprobs`` is ``None`` if the generator gave none); ``tool_calls``
    in order; ``conversation`` the final ``Conversation`` (assistant messages carry their
    executed ``tool_calls``); ``metadata`` the conversation's metadata plus ``turns``,
    ``finish_reason`` (one of ``FINISH_REASONS``), ``tool_calls_executed`` and, with a budget,
    ``tool_budget_remaining``. With ``ref_model``: ``ref_logprobs`` of the whole completion at
    the sampling temperature (0.0 on environment tokens) and ``kl_divergence = Σ_t a_t k(d_t)``
    over action tokens (``a`` the action mask). ``rewards`` from ``reward_fn`` last.

    Args:
      model: the policy (or an engine); tokenizer: its tokenizer.
      conversations: each a str (one user message), a ``Conversation``, a list of ``Message`` /
        dicts, or a mapping ``{"messages": ..., **metadata}``.
      gen_config: sampling settings per turn (``max_new_tokens`` is per turn).
      tool_parser: ``parser(text) -> Sequence[ToolCall]`` (``None``: no tools).
      tool_executor: ``fn(calls, tools, budget) -> list[ToolCall]`` (default ``execute_tools``);
        it must run at most ``budget`` tools.
      stop_condition: ``fn(conversation) -> bool`` or ``None``.
      max_turns: the most model turns per episode (>= 1).
      reward_fn: ``fn(rollout) -> float | Sequence[float]`` or ``None``.
      tool_budget: tool executions allowed per episode (``None``: unlimited).
      generator: called as ``generator(model, tokenizer, prompt_ids: list[list[int]], config)``;
        it must accept token-id prompts (``hf_generator`` is served by a token-id path here).
      tools: the tool set (default ``rlprim.tools.DEFAULT_TOOLS``), or one per conversation.
      env_fn: ``fn(conversation) -> Sequence[Message] | None``, the environment's answer after a
        model turn, replacing the tool step (e.g. a simulated user). When it carries
        ``env_fn.batched(conversations) -> list[answer]`` (``remote_env_fn`` does), each turn
        asks it once for all the conversations awaiting an answer, in order.
      ref_model: a frozen reference model or ``None``.
      kl_estimator: ``"k1"``, ``"k2"``, ``"k3"``, ``"low_var"`` or a ``KLFn``.
      template_fn: ``fn(messages: list[dict], add_generation_prompt) -> str`` replacing the
        tokenizer's chat template (initial prompt and environment deltas).
      group_offset: added to every group id.

    Returns:
      ``len(conversations) · G`` rollouts in input order (samples of a conversation consecutive).
    """
    items = [_conversation_and_metadata(c, i)
             for i, c in enumerate(_check_sequence("conversations", conversations))]
    gen_config = _check_config(gen_config)
    _check_callable("tool_parser", tool_parser, optional=True)
    _check_callable("tool_executor", tool_executor)
    _check_callable("stop_condition", stop_condition, optional=True)
    _check_callable("reward_fn", reward_fn, optional=True)
    _check_callable("generator", generator)
    _check_callable("env_fn", env_fn, optional=True)
    _check_callable("template_fn", template_fn, optional=True)
    _check_int("max_turns", max_turns, 1)
    _check_int("tool_budget", tool_budget, 0, optional=True)
    _check_int("group_offset", group_offset, 0)
    _check_kl_estimator(kl_estimator)
    tool_sets = _tool_sets(tools, len(items))
    context = _inference._context_length(model, tokenizer)
    trajectories = _start_episodes(
        tokenizer, items, gen_config, template_fn, context, tool_budget, group_offset, tool_sets
    )
    settings = _TurnSettings(
        tokenizer=tokenizer, template_fn=template_fn, tool_parser=tool_parser,
        tool_executor=tool_executor, stop_condition=stop_condition, env_fn=env_fn,
        max_turns=max_turns, eos_ids=tuple(_inference._eos_ids(model, tokenizer)),
    )
    for turn in range(max_turns):
        trajectories = _end_episodes_out_of_context(
            trajectories, context, gen_config.max_new_tokens
        )
        live = [i for i, t in enumerate(trajectories) if t.finish_reason is None]
        if not live:
            break
        trajectories = _play_turn(
            model, tokenizer, trajectories, live, turn, gen_config, generator, settings
        )

    rollouts = [_to_rollout(t, tool_budget) for t in trajectories]
    if ref_model is not None:
        rollouts = _add_reference(rollouts, model, ref_model, gen_config, kl_estimator)
    return _add_rewards(rollouts, reward_fn)


def create_multiturn_rollout(
    model: Any,
    tokenizer: Any,
    conversation: Any,
    gen_config: GenerationConfig,
    tool_parser: Callable[[str], Sequence[ToolCall]] | None = parse_xml_tools,
    tool_executor: Callable[..., Sequence[ToolCall]] = execute_tools,
    stop_condition: Callable[[Conversation], bool] | None = None,
    max_turns: int = 4,
    reward_fn: Callable[[Rollout], Any] | None = None,
    tool_budget: int | None = None,
    generator: Callable[..., list[Generation]] = hf_generator,
    tools: Mapping[str, Callable[..., Any]] | None = None,
    env_fn: Callable[[Conversation], Sequence[Message] | None] | None = None,
    ref_model: Any = None,
    kl_estimator: str | Callable[..., torch.Tensor] = "k3",
    template_fn: Callable[[list[dict[str, Any]], bool], str] | None = None,
) -> Rollout:
    """One multi-turn episode: ``create_batch_multiturn_rollouts`` with one conversation.

    ``gen_config.num_samples`` is ignored (treated as 1); ``group_id`` is 0. The turn loop, the
    end rules (``stop_condition``, no tool call / ``env_fn`` done, ``max_turns``, exhausted
    ``tool_budget``, context length), the incremental token ids with ``action_mask`` (1 on
    sampled tokens, 0 on tool/environment tokens) and every field are as documented there.
    """
    gen_config = _check_config(gen_config)
    return create_batch_multiturn_rollouts(
        model, tokenizer, [conversation], gen_config._replace(num_samples=1),
        tool_parser=tool_parser, tool_executor=tool_executor, stop_condition=stop_condition,
        max_turns=max_turns, reward_fn=reward_fn, tool_budget=tool_budget, generator=generator,
        tools=tools, env_fn=env_fn, ref_model=ref_model, kl_estimator=kl_estimator,
        template_fn=template_fn,
    )[0]


# =========================================================================== dynamic sampling


def _group_runs(rollouts: Sequence[Rollout], name: str) -> list[list[int]]:
    """Indices of each group, in order; groups must be consecutive runs of one ``group_id``."""
    if isinstance(rollouts, Rollout) or not isinstance(rollouts, Sequence):
        raise TypeError(f"{name} must be a sequence of Rollout, got {type(rollouts).__name__}")
    runs: list[list[int]] = []
    seen: set[int] = set()
    for index, rollout in enumerate(rollouts):
        if not isinstance(rollout, Rollout):
            raise TypeError(f"{name}[{index}] must be a Rollout, got {type(rollout).__name__}")
        if runs and rollouts[runs[-1][0]].group_id == rollout.group_id:
            runs[-1].append(index)
            continue
        if rollout.group_id in seen:
            raise ValueError(
                f"{name}[{index}] has group_id {rollout.group_id}, which appeared earlier in "
                "another run; the rollouts of a group must be consecutive"
            )
        seen.add(rollout.group_id)
        runs.append([index])
    return runs


def _metric_values(
    rollouts: Sequence[Rollout], metric: str | Callable[[Rollout], float], name: str
) -> list[float]:
    if metric != "reward" and not callable(metric):
        raise ValueError(f"metric must be 'reward' or a function fn(rollout) -> float, "
                         f"got {metric!r}")
    values = []
    for index, rollout in enumerate(rollouts):
        value = rollout.rewards if metric == "reward" else metric(rollout)
        if value is None:
            raise ValueError(f"{name}[{index}] has no reward (rewards=None); score the rollouts "
                             "first or pass metric=")
        if isinstance(value, torch.Tensor) and value.ndim == 0:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"the metric of {name}[{index}] must be a real number, got "
                f"{type(value).__name__} {value!r} (aggregate vector rewards, or pass metric=)"
            )
        if not math.isfinite(value):
            raise ValueError(f"the metric of {name}[{index}] must be finite, got {value}")
        values.append(float(value))
    return values


def _informative_runs(
    rollouts: Sequence[Rollout], metric: str | Callable[[Rollout], float], tolerance: float,
    name: str,
) -> tuple[list[list[int]], list[bool]]:
    runs = _group_runs(rollouts, name)
    values = _metric_values(rollouts, metric, name)
    keep = [max(values[i] for i in run) - min(values[i] for i in run) > tolerance for run in runs]
    return runs, keep


def _check_tolerance(tolerance: object) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise TypeError(f"tolerance must be a number, got {type(tolerance).__name__}")
    if not tolerance >= 0 or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be finite and >= 0, got {tolerance}")
    return float(tolerance)


def filter_groups(
    rollouts: Sequence[Rollout],
    metric: str | Callable[[Rollout], float] = "reward",
    tolerance: float = 0.0,
) -> list[Rollout]:
    """DAPO dynamic sampling: drops the groups whose metric is the same for every sample.

    A group (a run of consecutive rollouts with one ``group_id``) is kept iff
    ``max_i m_i - min_i m_i > tolerance`` over its samples, i.e. its group-relative advantages
    ``(m_i - mean) / (std + ε)`` are not all zero (DAPO, Yu et al. 2025, §3.2: groups with
    accuracy 0 or 1 give no gradient). A group of one sample is always dropped. Kept groups stay
    in order with their rollouts unchanged.

    Args:
      rollouts: the batch; the samples of a group must be consecutive.
      metric: ``"reward"`` (``rollout.rewards``, a scalar) or ``fn(rollout) -> float``.
      tolerance: spreads ``<= tolerance`` count as equal (0.0: exact equality).

    Returns:
      the rollouts of the informative groups.

    Raises:
      ValueError / TypeError: a group split into several runs, an unscored rollout or a vector
        reward with ``metric="reward"``, a non-finite metric (the index is named).
    """
    tolerance = _check_tolerance(tolerance)
    runs, keep = _informative_runs(rollouts, metric, tolerance, "rollouts")
    return [rollouts[i] for run, k in zip(runs, keep, strict=True) if k for i in run]


class DynamicSamplingStats(NamedTuple):
    """What ``sample_until_informative`` did.

    Fields:
      rounds: calls of ``sample_fn`` made.
      groups_sampled: groups produced by those calls.
      groups_informative: of those, groups with a spread in the metric.
      groups_returned: groups returned (``min(groups_informative, target_groups)``).
      target_reached: whether ``target_groups`` informative groups were found.
    """

    rounds: int
    groups_sampled: int
    groups_informative: int
    groups_returned: int
    target_reached: bool


def sample_until_informative(
    sample_fn: Callable[[int], Sequence[Rollout]],
    target_groups: int,
    max_rounds: int,
    metric: str | Callable[[Rollout], float] = "reward",
    tolerance: float = 0.0,
) -> tuple[list[Rollout], DynamicSamplingStats]:
    """Keeps sampling until ``target_groups`` informative groups are found (DAPO's refill).

    Round ``r = 0, 1, …`` calls ``sample_fn(r)`` (a pure function of the round index, e.g.
    ``lambda r: create_batch_rollouts(..., prompts=loader(r), gen_config=cfg._replace(seed=r))``),
    keeps its informative groups (``filter_groups``) and stops as soon as at least
    ``target_groups`` are collected or after ``max_rounds`` rounds. Collected groups are
    renumbered ``0, 1, 2, …`` in the order they were found (group ids of different rounds may
    collide; the renumbering keeps them unique and consecutive). When the target is reached the
    result is cut to exactly the first ``target_groups`` groups (DAPO, Yu et al. 2025: "keep
    sampling until the batch is fully filled with samples whose accuracy is neither 0 nor 1").

    Args:
      sample_fn: ``fn(round_index) -> Sequence[Rollout]`` (scored, groups consecutive).
      target_groups: informative groups wanted (>= 1).
      max_rounds: the most calls of ``sample_fn`` (>= 1).
      metric, tolerance: as in ``filter_groups``.

    Returns:
      ``(rollouts, stats)``: at most ``target_groups`` groups (fewer when the cap was hit) and
      a ``DynamicSamplingStats``.
    """
    _check_callable("sample_fn", sample_fn)
    _check_int("target_groups", target_groups, 1)
    _check_int("max_rounds", max_rounds, 1)
    tolerance = _check_tolerance(tolerance)
    if metric != "reward" and not callable(metric):
        raise ValueError(f"metric must be 'reward' or a function fn(rollout) -> float, "
                         f"got {metric!r}")
    kept: list[list[Rollout]] = []
    sampled = informative = rounds = 0
    while rounds < max_rounds and len(kept) < target_groups:
        batch = sample_fn(rounds)
        name = f"sample_fn({rounds})"
        runs, keep = _informative_runs(batch, metric, tolerance, name)
        rounds += 1
        sampled += len(runs)
        informative += sum(keep)
        kept.extend([batch[i] for i in run] for run, k in zip(runs, keep, strict=True) if k)
    kept = kept[:target_groups]
    rollouts = [r._replace(group_id=g) for g, group in enumerate(kept) for r in group]
    stats = DynamicSamplingStats(
        rounds=rounds,
        groups_sampled=sampled,
        groups_informative=informative,
        groups_returned=len(kept),
        target_reached=len(kept) >= target_groups,
    )
    return rollouts, stats
