"""Prompts: loaders (from a list, a JSONL file or a Hugging Face ``datasets`` Dataset) and prompt
management (templates, few-shot prompts, deduplication).

A **prompt item** is either a ``str`` (the prompt text) or a ``Mapping`` with a ``"prompt"`` key
holding the text plus any metadata the reward function needs, e.g.
``{"prompt": "2+3=", "answer": "5"}``. Rollouts carry an item's metadata in
``Rollout.metadata`` (``prompt_metadata(item)``), so ``reward_fn(rollout)`` can compare the
completion with ``rollout.metadata["answer"]``.

A **prompt loader** is a pure function of the batch position::

    prompt_loader(position: int) -> list[PromptItem]

It has no hidden state: the same position always gives the same batch, whatever was asked
before. The training loop's resumable position is therefore one integer, stored in
``TrainingState.loader_state = {"position": k}`` and saved in checkpoints; resuming at ``k``
gives exactly the batches an uninterrupted run would have seen. Any function with that
signature can replace ``create_prompt_loader`` (e.g. a curriculum that picks by position).
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rlprim.protocols import PromptLoader

__all__ = [
    "PromptItem",
    "create_prompt_loader",
    "load_prompts",
    "load_prompts_jsonl",
    "load_prompts_from_dataset",
    "prompt_text",
    "prompt_metadata",
    "format_prompt",
    "build_few_shot_prompt",
    "deduplicate_prompts",
]

PromptItem = str | Mapping[str, Any]
"""A prompt: its text, or a mapping with a ``"prompt"`` text and metadata (e.g. ``"answer"``)."""

"""``prompt_loader(position: int) -> list[PromptItem]``: the batch at ``position`` (pure)."""

PROMPT_KEY = "prompt"
_DATASETS_HINT = "install it with: pip install 'rlprim[datasets]'"


# --------------------------------------------------------------------------- items


def _check_item(item: object, where: str) -> None:
    if isinstance(item, str):
        return
    if isinstance(item, Mapping):
        if PROMPT_KEY not in item:
            raise ValueError(
                f"{where} must have a {PROMPT_KEY!r} key, got a mapping with keys "
                f"{sorted(map(str, item))}"
            )
        if not isinstance(item[PROMPT_KEY], str):
            raise TypeError(
                f"{where}[{PROMPT_KEY!r}] must be a str, got {type(item[PROMPT_KEY]).__name__}"
            )
        return
    raise TypeError(
        f"{where} must be a str or a Mapping with a {PROMPT_KEY!r} key, got {type(item).__name__}"
    )


def prompt_text(item: PromptItem) -> str:
    """The text of a prompt item: the item itself if it is a ``str``, else ``item["prompt"]``.

    Example: ``prompt_text({"prompt": "2+3=", "answer": "5"}) == "2+3="``.
    """
    _check_item(item, "item")
    return item if isinstance(item, str) else item[PROMPT_KEY]


def prompt_metadata(item: PromptItem) -> dict[str, Any]:
    """The metadata of a prompt item: every key but ``"prompt"`` (``{}`` for a ``str`` item).

    This is what rollouts store in ``Rollout.metadata`` for reward functions.
    Example: ``prompt_metadata({"prompt": "2+3=", "answer": "5"}) == {"answer": "5"}``.
    """
    _check_item(item, "item")
    if isinstance(item, str):
        return {}
    return {key: value for key, value in item.items() if key != PROMPT_KEY}


def _normalise_record(
    record: object,
    prompt_key: str,
    metadata_keys: Sequence[str] | None,
    where: str,
) -> PromptItem:
    """One raw record (str or mapping) -> a prompt item whose text is under ``"prompt"``."""
    if isinstance(record, str):
        if metadata_keys:
            raise ValueError(
                f"{where} is a plain string, so it has none of metadata_keys {list(metadata_keys)}"
            )
        return record
    if not isinstance(record, Mapping):
        raise TypeError(
            f"{where} must be a str or a mapping with a {prompt_key!r} key, "
            f"got {type(record).__name__}"
        )
    if prompt_key not in record:
        raise ValueError(
            f"{where} has no prompt key {prompt_key!r}; its keys are {sorted(map(str, record))}"
        )
    text = record[prompt_key]
    if not isinstance(text, str):
        raise TypeError(f"{where}[{prompt_key!r}] must be a str, got {type(text).__name__}")
    if metadata_keys is None:
        names = [key for key in record if key != prompt_key]
    else:
        missing = [key for key in metadata_keys if key not in record]
        if missing:
            raise ValueError(
                f"{where} is missing metadata key(s) {missing}; its keys are "
                f"{sorted(map(str, record))}"
            )
        names = [key for key in metadata_keys if key != prompt_key]
    if PROMPT_KEY in names:
        raise ValueError(
            f"{where} has both a prompt key {prompt_key!r} and a {PROMPT_KEY!r} field, which "
            f"would overwrite the prompt; pass metadata_keys to choose the metadata"
        )
    return {PROMPT_KEY: text, **{key: record[key] for key in names}}


def _check_keys(prompt_key: object, metadata_keys: object) -> tuple[str, ...] | None:
    if not isinstance(prompt_key, str):
        raise TypeError(f"prompt_key must be a str, got {type(prompt_key).__name__}")
    if metadata_keys is None:
        return None
    if isinstance(metadata_keys, str) or not isinstance(metadata_keys, Iterable):
        raise TypeError(f"metadata_keys must be a sequence of str or None, got {metadata_keys!r}")
    keys = tuple(metadata_keys)
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"metadata_keys must contain str, got {key!r}")
    return keys


# --------------------------------------------------------------------------- loaders


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _epoch_order(num_items: int, epoch: int, shuffle: bool, seed: int) -> torch.Tensor:
    """The item order of one epoch: ``randperm(N)`` from a generator seeded by (seed, epoch)."""
    if not shuffle:
        return torch.arange(num_items)
    # SeedSequence mixes (seed, epoch) into a well-spread 63-bit seed, so nearby seeds and
    # epochs give unrelated permutations.
    mixed = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed((int(mixed[0]) << 31) ^ int(mixed[1]))
    return torch.randperm(num_items, generator=generator)


def create_prompt_loader(
    items: Sequence[PromptItem],
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> PromptLoader:
    """Returns ``prompt_loader(position) -> list[PromptItem]``, a pure function of the position.

    The items are read as an endless stream of epochs; epoch ``e`` visits every item once, in
    the order ``randperm(N)`` drawn from a ``torch.Generator`` seeded by ``(seed, e)`` (or in
    list order when ``shuffle=False``). With ``N = len(items)`` and ``B = batch_size``:

    - ``drop_last=False`` (default): batch ``k`` is the stream's items ``[k·B, (k+1)·B)``; item
      ``i`` of the stream belongs to epoch ``e = i // N`` at index ``i mod N`` of that epoch's
      order. Batches wrap across epoch boundaries seamlessly, so every item is seen equally often.
    - ``drop_last=True``: every epoch gives ``⌊N / B⌋`` full batches and no batch mixes two
      epochs: batch ``k`` is in epoch ``e = k // ⌊N / B⌋`` at batch ``k mod ⌊N / B⌋``; the last
      ``N mod B`` items of each epoch's order are skipped (requires ``B ≤ N``).

    There is no hidden state: store ``position`` (e.g. in ``TrainingState.loader_state``) to
    resume; ``loader(k)`` is the same batch in a fresh process. The items are copied into a
    tuple at creation, so later changes to the caller's list do not change the batches.

    Args:
      items: a non-empty sequence of prompt items (``str`` or mappings with ``"prompt"``).
      batch_size: prompts per batch ``B ≥ 1``.
      shuffle: reshuffle every epoch (seeded); ``False`` keeps list order.
      seed: a non-negative int; the same seed gives the same batches on every machine.
      drop_last: see above.

    Returns:
      ``prompt_loader(position: int) -> list[PromptItem]`` of length ``batch_size``, for any
      ``position ≥ 0``.
    """
    if isinstance(items, (str, Mapping)) or not isinstance(items, Sequence):
        raise TypeError(f"items must be a sequence of prompt items, got {type(items).__name__}")
    frozen = tuple(items)
    if not frozen:
        raise ValueError("items must be non-empty, got 0 items")
    for index, item in enumerate(frozen):
        _check_item(item, f"items[{index}]")
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, 0)
    if not isinstance(shuffle, bool):
        raise TypeError(f"shuffle must be a bool, got {type(shuffle).__name__}")
    if not isinstance(drop_last, bool):
        raise TypeError(f"drop_last must be a bool, got {type(drop_last).__name__}")
    num_items = len(frozen)
    if drop_last and batch_size > num_items:
        raise ValueError(
            f"batch_size must be <= len(items) when drop_last=True, got batch_size={batch_size} "
            f"and {num_items} items"
        )

    def prompt_loader(position: int) -> list[PromptItem]:
        position = _check_int("position", position, 0)
        if drop_last:
            batches_per_epoch = num_items // batch_size
            epoch, batch_in_epoch = divmod(position, batches_per_epoch)
            order = _epoch_order(num_items, epoch, shuffle, seed)
            start = batch_in_epoch * batch_size
            return [frozen[int(i)] for i in order[start : start + batch_size]]
        start = position * batch_size
        stop = start + batch_size
        batch: list[PromptItem] = []
        for epoch in range(start // num_items, (stop - 1) // num_items + 1):
            order = _epoch_order(num_items, epoch, shuffle, seed)
            lo = max(start - epoch * num_items, 0)
            hi = min(stop - epoch * num_items, num_items)
            batch.extend(frozen[int(i)] for i in order[lo:hi])
        return batch

    return prompt_loader


def load_prompts_jsonl(
    path: str | os.PathLike,
    prompt_key: str = "prompt",
    metadata_keys: Sequence[str] | None = None,
) -> list[PromptItem]:
    """Reads prompt items from a JSON Lines file (one JSON value per line, blank lines skipped).

    A line holding a JSON string is a plain prompt. A line holding a JSON object must have
    ``prompt_key``; it becomes ``{"prompt": obj[prompt_key], **metadata}`` where the metadata
    is every other key (``metadata_keys=None``) or exactly ``metadata_keys`` (each required).

    Example line: ``{"question": "2+3=", "answer": "5", "id": 7}`` with
    ``prompt_key="question", metadata_keys=["answer"]`` -> ``{"prompt": "2+3=", "answer": "5"}``.

    Raises ``ValueError`` naming the file and 1-based line number on invalid JSON, a missing key
    or a value that is not a prompt.
    """
    metadata_keys = _check_keys(prompt_key, metadata_keys)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    items: list[PromptItem] = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{os.fspath(path)} line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON: {error.msg}") from error
            try:
                items.append(_normalise_record(record, prompt_key, metadata_keys, where))
            except TypeError as error:
                raise ValueError(str(error)) from error
    if not items:
        raise ValueError(f"{os.fspath(path)} holds no prompts (it is empty or blank)")
    return items


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"loading prompts from a Hugging Face dataset needs the 'datasets' package; "
            f"{_DATASETS_HINT}"
        ) from error
    return datasets


def load_prompts_from_dataset(
    dataset: Any,
    prompt_key: str = "prompt",
    metadata_keys: Sequence[str] | None = None,
    split: str | None = None,
) -> list[PromptItem]:
    """Reads prompt items from a Hugging Face ``datasets`` dataset, row by row.

    ``dataset`` is a ``datasets.Dataset`` or ``IterableDataset``, or a ``DatasetDict`` /
    ``IterableDatasetDict`` with ``split`` naming the split (optional when it has one split).
    Each row becomes ``{"prompt": row[prompt_key], **metadata}`` with the metadata columns
    chosen as in ``load_prompts_jsonl``. Build the dataset however you like, e.g.
    ``datasets.load_dataset("gsm8k", "main", split="train")`` or locally with
    ``datasets.Dataset.from_dict({"prompt": [...], "answer": [...]})``.

    Needs the optional ``datasets`` package (``pip install 'rlprim[datasets]'``).
    """
    metadata_keys = _check_keys(prompt_key, metadata_keys)
    datasets = _import_datasets()
    dict_types = (datasets.DatasetDict, datasets.IterableDatasetDict)
    row_types = (datasets.Dataset, datasets.IterableDataset)
    if isinstance(dataset, dict_types):
        if split is None:
            if len(dataset) != 1:
                raise ValueError(
                    f"split must name one of the dataset's splits {sorted(dataset)}, got None"
                )
            split = next(iter(dataset))
        if split not in dataset:
            raise ValueError(f"split must be one of {sorted(dataset)}, got {split!r}")
        dataset = dataset[split]
    elif not isinstance(dataset, row_types):
        raise TypeError(
            f"dataset must be a datasets.Dataset, IterableDataset or DatasetDict, "
            f"got {type(dataset).__name__}"
        )
    elif split is not None:
        raise ValueError(f"split applies to a DatasetDict only, got split={split!r}")
    columns = dataset.column_names
    if columns is not None and prompt_key not in columns:
        raise ValueError(
            f"dataset has no prompt column {prompt_key!r}; its columns are {list(columns)}"
        )
    items = [
        _normalise_record(row, prompt_key, metadata_keys, f"dataset row {index}")
        for index, row in enumerate(dataset)
    ]
    if not items:
        raise ValueError("dataset holds no rows")
    return items


def _is_hf_dataset(source: object) -> bool:
    return type(source).__module__.split(".")[0] == "datasets"


def load_prompts(
    source: Any,
    prompt_key: str = "prompt",
    metadata_keys: Sequence[str] | None = None,
    split: str | None = None,
) -> list[PromptItem]:
    """Reads prompt items from a list, a JSONL path or a Hugging Face dataset.

    Dispatches on the type of ``source``:

    - a ``str`` or ``os.PathLike``: a JSON Lines file (``load_prompts_jsonl``);
    - a ``datasets`` object: ``load_prompts_from_dataset`` (with ``split``);
    - any other sequence: its elements, each a ``str`` or a mapping with ``prompt_key``,
      normalised like file records (mapping items become ``{"prompt": ..., **metadata}``).

    Returns a new list of prompt items ready for ``create_prompt_loader``.
    """
    if isinstance(source, (str, os.PathLike)):
        if split is not None:
            raise ValueError(f"split applies to a datasets DatasetDict only, got split={split!r}")
        return load_prompts_jsonl(source, prompt_key, metadata_keys)
    if _is_hf_dataset(source):
        return load_prompts_from_dataset(source, prompt_key, metadata_keys, split)
    if isinstance(source, Mapping) or not isinstance(source, Sequence):
        raise TypeError(
            f"source must be a list of prompts, a JSONL path or a datasets Dataset, "
            f"got {type(source).__name__}"
        )
    if split is not None:
        raise ValueError(f"split applies to a datasets DatasetDict only, got split={split!r}")
    metadata_keys = _check_keys(prompt_key, metadata_keys)
    items = [
        _normalise_record(record, prompt_key, metadata_keys, f"source[{index}]")
        for index, record in enumerate(source)
    ]
    if not items:
        raise ValueError("source must hold at least one prompt, got an empty sequence")
    return items


# --------------------------------------------------------------------------- prompt management


def format_prompt(template: str, **fields: Any) -> str:
    """Fills ``template`` with ``fields`` using ``str.format`` (extra fields are ignored).

    Example: ``format_prompt("Solve: {question}", question="2+3")`` -> ``"Solve: 2+3"``.
    Pass an item's metadata as fields with ``format_prompt(t, **item)``. Literal braces are
    written ``{{`` and ``}}``. A field the template needs but that is not given raises a
    ``ValueError`` naming it and the fields given.
    """
    if not isinstance(template, str):
        raise TypeError(f"template must be a str, got {type(template).__name__}")
    try:
        needed = {
            name.split(".")[0].split("[")[0]
            for _, name, _, _ in string.Formatter().parse(template)
            if name is not None
        }
    except ValueError as error:
        raise ValueError(
            f"template is not a valid format string ({error}): {template!r}"
        ) from error
    if "" in needed or any(name.isdigit() for name in needed):
        raise ValueError(
            f"template must use named fields like {{question}}, not positional ones: {template!r}"
        )
    missing = sorted(needed - fields.keys())
    if missing:
        raise ValueError(
            f"template needs field(s) {missing} that were not given; fields given: "
            f"{sorted(fields)}; template: {template!r}"
        )
    try:
        return template.format(**fields)
    except (KeyError, IndexError) as error:  # a field nested in a format spec, e.g. {x:{w}}
        raise ValueError(
            f"template needs field {error} that was not given; fields given: {sorted(fields)}"
        ) from error


DEFAULT_FEW_SHOT_TEMPLATE = "Question: {prompt}\nAnswer: {answer}"
DEFAULT_FEW_SHOT_QUERY_TEMPLATE = "Question: {prompt}\nAnswer:"


def _as_fields(value: object, name: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {PROMPT_KEY: value}
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(
        f"{name} must be a str or a Mapping of template fields, got {type(value).__name__}"
    )


def build_few_shot_prompt(
    examples: Sequence[Mapping[str, Any]],
    query: PromptItem,
    template: str = DEFAULT_FEW_SHOT_TEMPLATE,
    query_template: str = DEFAULT_FEW_SHOT_QUERY_TEMPLATE,
    separator: str = "\n\n",
    instruction: str | None = None,
) -> str:
    """Builds a few-shot prompt: solved examples, then the query left for the model to answer.

    ``result = separator.join([instruction] + [template.format(**ex) for ex in examples]
    + [query_template.format(**query)])`` (the instruction only when given). A ``str`` query
    is the field ``prompt``. Few-shot prompting as in Brown et al. 2020, "Language Models are
    Few-Shot Learners".

    Example: ``build_few_shot_prompt([{"prompt": "1+1", "answer": "2"}], "2+3")`` ->
    ``"Question: 1+1\\nAnswer: 2\\n\\nQuestion: 2+3\\nAnswer:"``.

    To keep a query item's metadata: ``{**item, "prompt": build_few_shot_prompt(examples, item)}``.
    """
    if isinstance(examples, (str, Mapping)) or not isinstance(examples, Sequence):
        raise TypeError(f"examples must be a sequence of mappings, got {type(examples).__name__}")
    if not isinstance(separator, str):
        raise TypeError(f"separator must be a str, got {type(separator).__name__}")
    if instruction is not None and not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str or None, got {type(instruction).__name__}")
    blocks = [] if instruction is None else [instruction]
    for index, example in enumerate(examples):
        if not isinstance(example, Mapping):
            raise TypeError(f"examples[{index}] must be a Mapping, got {type(example).__name__}")
        blocks.append(format_prompt(template, **example))
    blocks.append(format_prompt(query_template, **_as_fields(query, "query")))
    return separator.join(blocks)


def deduplicate_prompts(
    items: Sequence[PromptItem],
    key: Callable[[PromptItem], Hashable] | None = None,
    ignore_case: bool = False,
    ignore_whitespace: bool = False,
) -> list[PromptItem]:
    """Removes duplicate prompts, keeping each first occurrence in the original order.

    Two items are duplicates when their keys are equal. The key is ``key(item)`` (default: the
    prompt text). When the key is a ``str``, ``ignore_whitespace`` first collapses every run of
    whitespace to one space and strips both ends, and ``ignore_case`` then applies
    ``str.casefold``. Metadata does not take part unless ``key`` uses it.

    Example: ``deduplicate_prompts(["a b", "A  b ", "c"], ignore_case=True,
    ignore_whitespace=True)`` -> ``["a b", "c"]``.
    """
    if isinstance(items, (str, Mapping)) or not isinstance(items, Sequence):
        raise TypeError(f"items must be a sequence of prompt items, got {type(items).__name__}")
    if key is not None and not callable(key):
        raise TypeError(f"key must be a callable or None, got {type(key).__name__}")
    for index, item in enumerate(items):
        _check_item(item, f"items[{index}]")
    seen: set[Hashable] = set()
    kept: list[PromptItem] = []
    for index, item in enumerate(items):
        value = prompt_text(item) if key is None else key(item)
        if isinstance(value, str):
            if ignore_whitespace:
                value = " ".join(value.split())
            if ignore_case:
                value = value.casefold()
        try:
            is_new = value not in seen
        except TypeError as error:
            raise TypeError(
                f"key(items[{index}]) must be hashable, got {type(value).__name__}"
            ) from error
        if is_new:
            seen.add(value)
            kept.append(item)
    return kept
