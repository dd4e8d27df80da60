"""Tests for rlprim.data: prompt loaders, prompt files and datasets, prompt management."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import datasets
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlprim.data import (
    build_few_shot_prompt,
    create_prompt_loader,
    deduplicate_prompts,
    format_prompt,
    load_prompts,
    load_prompts_from_dataset,
    load_prompts_jsonl,
    prompt_metadata,
    prompt_text,
)

LETTERS = ["a", "b", "c", "d", "e"]


def names(n):
    return [f"p{i}" for i in range(n)]


# --------------------------------------------------------------------------- references
# Independent of the module: the stream a loader walks, spelled out item by item.


def ref_stream_batches(stream, batch_size, num_batches):
    """Seamless batching of a flat stream: batch k = stream[k*B:(k+1)*B]."""
    return [stream[k * batch_size : (k + 1) * batch_size] for k in range(num_batches)]


def ref_drop_last_batches(epochs, batch_size, num_batches):
    """Per-epoch batching that drops each epoch's remainder."""
    batches = []
    for epoch in epochs:
        for start in range(0, len(epoch) - batch_size + 1, batch_size):
            batches.append(epoch[start : start + batch_size])
    return batches[:num_batches]


def ref_dedup(texts, normalise):
    seen, kept = [], []
    for text in texts:
        key = normalise(text)
        if key not in seen:
            seen.append(key)
            kept.append(text)
    return kept


# --------------------------------------------------------------------------- loaders: hand cases


def test_loader_without_shuffle_wraps_epochs_in_list_order():
    loader = create_prompt_loader(LETTERS, batch_size=2, shuffle=False)
    got = [loader(k) for k in range(5)]
    assert got == [["a", "b"], ["c", "d"], ["e", "a"], ["b", "c"], ["d", "e"]]


def test_loader_without_shuffle_drop_last_skips_each_epoch_remainder():
    loader = create_prompt_loader(LETTERS, batch_size=2, shuffle=False, drop_last=True)
    got = [loader(k) for k in range(5)]
    assert got == [["a", "b"], ["c", "d"], ["a", "b"], ["c", "d"], ["a", "b"]]


def test_loader_batch_larger_than_items_spans_several_epochs():
    loader = create_prompt_loader(["x", "y"], batch_size=5, shuffle=False)
    assert loader(0) == ["x", "y", "x", "y", "x"]
    assert loader(1) == ["y", "x", "y", "x", "y"]


def test_loader_is_pinned_across_versions():
    # Literal batches for seed 1: a change here breaks resuming runs saved by older versions.
    loader = create_prompt_loader(LETTERS, batch_size=3, seed=1)
    assert [loader(k) for k in range(5)] == [
        ["b", "a", "c"],
        ["e", "d", "d"],
        ["a", "b", "c"],
        ["e", "a", "c"],
        ["d", "b", "e"],
    ]


def test_loader_returns_metadata_items_unchanged():
    items = [{"prompt": "1+1=", "answer": "2"}, "plain", {"prompt": "2+2=", "answer": "4"}]
    loader = create_prompt_loader(items, batch_size=3, shuffle=False)
    assert loader(0) == items


def test_loader_ignores_later_changes_to_the_callers_list():
    items = list(LETTERS)
    loader = create_prompt_loader(items, batch_size=5, shuffle=False)
    items[0] = "changed"
    items.append("f")
    assert loader(0) == LETTERS


def test_loader_seed_and_epoch_change_the_order():
    items = names(20)
    first = create_prompt_loader(items, batch_size=20, seed=0)
    other = create_prompt_loader(items, batch_size=20, seed=1)
    assert first(0) != other(0)
    assert first(0) != first(1)  # a new permutation each epoch
    assert sorted(first(0)) == sorted(first(1)) == sorted(items)
    assert first(0) != items  # actually shuffled


def test_loader_same_arguments_give_same_batches():
    items = names(13)
    a = create_prompt_loader(items, batch_size=4, seed=7)
    b = create_prompt_loader(items, batch_size=4, seed=7)
    assert [a(k) for k in range(12)] == [b(k) for k in range(12)]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"items": []}, ValueError, "non-empty"),
        ({"items": "abc"}, TypeError, "sequence"),
        ({"items": ["a", 3]}, TypeError, r"items\[1\].*int"),
        ({"items": [{"text": "a"}]}, ValueError, r"items\[0\].*'prompt'"),
        ({"items": [{"prompt": 5}]}, TypeError, "must be a str"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1, got 0"),
        ({"batch_size": True}, TypeError, "batch_size must be an int"),
        ({"batch_size": 2.0}, TypeError, "batch_size must be an int"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        ({"shuffle": 1}, TypeError, "shuffle must be a bool"),
        ({"batch_size": 6, "drop_last": True}, ValueError, "batch_size=6"),
    ],
)
def test_loader_rejects_bad_arguments(kwargs, error, match):
    arguments = {"items": LETTERS, "batch_size": 2, **kwargs}
    with pytest.raises(error, match=match):
        create_prompt_loader(**arguments)


def test_loader_rejects_bad_positions():
    loader = create_prompt_loader(LETTERS, batch_size=2)
    with pytest.raises(ValueError, match="position must be >= 0, got -1"):
        loader(-1)
    with pytest.raises(TypeError, match="position must be an int"):
        loader(1.0)


# --------------------------------------------------------------------------- loaders: properties

loader_cases = st.tuples(
    st.integers(1, 12),  # N
    st.integers(1, 15),  # B
    st.integers(0, 2**40),  # seed
    st.booleans(),  # shuffle
)


@given(loader_cases)
def test_loader_matches_seamless_stream_of_epoch_permutations(case):
    num_items, batch_size, seed, shuffle = case
    items = names(num_items)
    single = create_prompt_loader(items, batch_size=1, seed=seed, shuffle=shuffle)
    num_batches = 3 * num_items // batch_size + 2
    stream = [single(i)[0] for i in range(num_batches * batch_size)]
    # Every epoch window of the stream visits each item exactly once.
    for epoch in range(len(stream) // num_items):
        assert sorted(stream[epoch * num_items : (epoch + 1) * num_items]) == sorted(items)
    if not shuffle:
        assert stream[:num_items] == items
    loader = create_prompt_loader(items, batch_size=batch_size, seed=seed, shuffle=shuffle)
    got = [loader(k) for k in range(num_batches)]
    assert got == ref_stream_batches(stream, batch_size, num_batches)


@given(loader_cases, st.randoms(use_true_random=False))
def test_loader_is_pure_and_resumable(case, rng):
    num_items, batch_size, seed, shuffle = case
    items = names(num_items)
    loader = create_prompt_loader(items, batch_size=batch_size, seed=seed, shuffle=shuffle)
    positions = list(range(3 * num_items + 3))
    in_order = {k: loader(k) for k in positions}
    rng.shuffle(positions)
    assert {k: loader(k) for k in positions} == in_order  # call order does not matter
    # A "restarted process": a fresh loader from position k on sees the same batches.
    start = rng.randrange(len(positions))
    fresh = create_prompt_loader(list(items), batch_size=batch_size, seed=seed, shuffle=shuffle)
    assert [fresh(k) for k in range(start, len(positions))] == [
        in_order[k] for k in range(start, len(positions))
    ]


@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 1000), st.booleans())
def test_loader_with_dividing_batch_size_gives_each_item_once_per_epoch(
    batches_per_epoch, batch_size, seed, drop_last
):
    items = names(batches_per_epoch * batch_size)
    loader = create_prompt_loader(items, batch_size=batch_size, seed=seed, drop_last=drop_last)
    for epoch in range(3):
        seen = []
        for k in range(epoch * batches_per_epoch, (epoch + 1) * batches_per_epoch):
            seen.extend(loader(k))
        assert sorted(seen) == sorted(items)


@given(loader_cases)
def test_loader_drop_last_matches_per_epoch_reference(case):
    num_items, batch_size, seed, shuffle = case
    if batch_size > num_items:
        batch_size = num_items
    items = names(num_items)
    # The epoch orders come from the seamless loader (each epoch window is one permutation).
    whole = create_prompt_loader(items, batch_size=num_items, seed=seed, shuffle=shuffle)
    epochs = [whole(e) for e in range(4)]
    loader = create_prompt_loader(
        items, batch_size=batch_size, seed=seed, shuffle=shuffle, drop_last=True
    )
    num_batches = 4 * (num_items // batch_size)
    assert [loader(k) for k in range(num_batches)] == ref_drop_last_batches(
        epochs, batch_size, num_batches
    )


# --------------------------------------------------------------------------- JSONL files


def write_lines(path: Path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_load_prompts_jsonl_reads_strings_objects_and_metadata(tmp_path):
    path = write_lines(
        tmp_path / "p.jsonl",
        [
            json.dumps({"prompt": "1+1=", "answer": "2", "id": 0}),
            "",
            json.dumps("just text"),
            json.dumps({"prompt": "2+3=", "answer": "5", "id": 1}),
        ],
    )
    assert load_prompts_jsonl(path) == [
        {"prompt": "1+1=", "answer": "2", "id": 0},
        "just text",
        {"prompt": "2+3=", "answer": "5", "id": 1},
    ]


def test_load_prompts_jsonl_renames_prompt_key_and_selects_metadata(tmp_path):
    path = write_lines(
        tmp_path / "p.jsonl",
        [
            json.dumps({"question": "1+1=", "answer": "2", "id": 0}),
            json.dumps({"question": "2+3=", "answer": "5", "id": 1}),
        ],
    )
    got = load_prompts_jsonl(str(path), prompt_key="question", metadata_keys=["answer"])
    assert got == [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+3=", "answer": "5"}]
    assert load_prompts_jsonl(path, "question", metadata_keys=[]) == [
        {"prompt": "1+1="},
        {"prompt": "2+3="},
    ]


@pytest.mark.parametrize(
    "lines, kwargs, match",
    [
        (['{"prompt": "a"}', '{"prompt": "b"}', "{not json"], {}, "line 3 is not valid JSON"),
        (['{"prompt": "a"}', '{"text": "b"}'], {}, "line 2 has no prompt key 'prompt'"),
        (['{"prompt": 1}'], {}, r"line 1\['prompt'\] must be a str"),
        (["[1, 2]"], {}, "line 1 must be a str or a mapping"),
        (['"a"'], {"metadata_keys": ["answer"]}, "line 1 is a plain string"),
        (
            ['{"prompt": "a", "answer": 1}', '{"prompt": "b"}'],
            {"metadata_keys": ["answer"]},
            r"line 2 is missing metadata key\(s\) \['answer'\]",
        ),
        (['{"q": "a", "prompt": "x"}'], {"prompt_key": "q"}, "would overwrite the prompt"),
        (["", "  "], {}, "holds no prompts"),
    ],
)
def test_load_prompts_jsonl_errors_name_the_line(tmp_path, lines, kwargs, match):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=match):
        load_prompts_jsonl(path, **kwargs)


def test_load_prompts_jsonl_rejects_bad_arguments(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", ['"a"'])
    with pytest.raises(TypeError, match="prompt_key must be a str"):
        load_prompts_jsonl(path, prompt_key=1)
    with pytest.raises(TypeError, match="metadata_keys must be a sequence"):
        load_prompts_jsonl(path, metadata_keys="answer")
    with pytest.raises(TypeError, match="path must be a str"):
        load_prompts_jsonl(3)
    with pytest.raises(FileNotFoundError):
        load_prompts_jsonl(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- HF datasets


def test_load_prompts_from_dataset_rows_become_items():
    dataset = datasets.Dataset.from_dict(
        {"question": ["1+1=", "2+3="], "answer": ["2", "5"], "level": [1, 2]}
    )
    assert load_prompts_from_dataset(dataset, prompt_key="question") == [
        {"prompt": "1+1=", "answer": "2", "level": 1},
        {"prompt": "2+3=", "answer": "5", "level": 2},
    ]
    assert load_prompts_from_dataset(dataset, "question", metadata_keys=["answer"]) == [
        {"prompt": "1+1=", "answer": "2"},
        {"prompt": "2+3=", "answer": "5"},
    ]


def test_load_prompts_from_dataset_dict_and_iterable():
    train = datasets.Dataset.from_dict({"prompt": ["a", "b"], "answer": ["1", "2"]})
    test = datasets.Dataset.from_dict({"prompt": ["c"], "answer": ["3"]})
    both = datasets.DatasetDict({"train": train, "test": test})
    assert load_prompts_from_dataset(both, split="test") == [{"prompt": "c", "answer": "3"}]
    with pytest.raises(ValueError, match=r"split must name one of .*\['test', 'train'\]"):
        load_prompts_from_dataset(both)
    with pytest.raises(ValueError, match="split must be one of"):
        load_prompts_from_dataset(both, split="validation")
    only = datasets.DatasetDict({"train": train})
    assert load_prompts_from_dataset(only) == load_prompts_from_dataset(train)
    iterable = train.to_iterable_dataset()
    assert load_prompts_from_dataset(iterable) == [
        {"prompt": "a", "answer": "1"},
        {"prompt": "b", "answer": "2"},
    ]


def test_load_prompts_from_dataset_errors():
    dataset = datasets.Dataset.from_dict({"text": ["a"]})
    with pytest.raises(ValueError, match=r"no prompt column 'prompt'.*\['text'\]"):
        load_prompts_from_dataset(dataset)
    with pytest.raises(ValueError, match="split applies to a DatasetDict only"):
        load_prompts_from_dataset(dataset, prompt_key="text", split="train")
    with pytest.raises(TypeError, match="dataset must be a datasets.Dataset"):
        load_prompts_from_dataset([{"prompt": "a"}])
    with pytest.raises(ValueError, match="dataset row 0 is missing metadata"):
        load_prompts_from_dataset(dataset, prompt_key="text", metadata_keys=["answer"])


def test_load_prompts_from_dataset_without_datasets_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"pip install 'rlprim\[datasets\]'"):
        load_prompts_from_dataset(object())


def test_load_prompts_dispatches_on_source_type(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"q": "a", "answer": "1"})])
    expected = [{"prompt": "a", "answer": "1"}]
    assert load_prompts(path, prompt_key="q") == expected
    assert load_prompts(str(path), prompt_key="q") == expected
    dataset = datasets.Dataset.from_dict({"q": ["a"], "answer": ["1"]})
    assert load_prompts(dataset, prompt_key="q") == expected
    assert load_prompts(datasets.DatasetDict({"train": dataset}), "q", split="train") == expected
    assert load_prompts([{"q": "a", "answer": "1"}], prompt_key="q") == expected
    assert load_prompts(("x", {"prompt": "y"})) == ["x", {"prompt": "y"}]
    with pytest.raises(TypeError, match="source must be a list of prompts"):
        load_prompts(42)
    with pytest.raises(TypeError, match="source must be a list of prompts"):
        load_prompts({"prompt": "a"})
    with pytest.raises(ValueError, match="at least one prompt"):
        load_prompts([])
    with pytest.raises(ValueError, match=r"source\[1\] has no prompt key"):
        load_prompts(["a", {"text": "b"}])
    with pytest.raises(ValueError, match="split applies"):
        load_prompts(path, split="train")


def test_loaded_prompts_feed_a_loader(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": f"q{i}"}) for i in range(6)])
    loader = create_prompt_loader(load_prompts(path), batch_size=3, seed=0)
    assert sorted(prompt_text(item) for item in loader(0) + loader(1)) == [
        f"q{i}" for i in range(6)
    ]


# --------------------------------------------------------------------------- item accessors


def test_prompt_text_and_metadata():
    item = {"prompt": "2+3=", "answer": "5", "level": 1}
    assert prompt_text(item) == "2+3="
    assert prompt_metadata(item) == {"answer": "5", "level": 1}
    assert prompt_text("hello") == "hello"
    assert prompt_metadata("hello") == {}
    with pytest.raises(TypeError, match="item must be a str or a Mapping"):
        prompt_text(3)
    with pytest.raises(ValueError, match="item must have a 'prompt' key"):
        prompt_metadata({"answer": "5"})


# --------------------------------------------------------------------------- templates


def test_format_prompt_fills_named_fields():
    assert format_prompt("Solve: {question} =", question="2+3") == "Solve: 2+3 ="
    assert format_prompt("{a}-{b}-{a}", a=1, b="x", unused=0) == "1-x-1"
    assert format_prompt("{{literal}} {x:>3}", x=7) == "{literal}   7"
    item = {"prompt": "2+3", "answer": "5"}
    assert format_prompt("{prompt} -> {answer}", **item) == "2+3 -> 5"


def test_format_prompt_errors():
    with pytest.raises(ValueError, match=r"needs field\(s\) \['answer'\].*given: \['prompt'\]"):
        format_prompt("{prompt} {answer}", prompt="a")
    with pytest.raises(ValueError, match="named fields"):
        format_prompt("{} and {}", x=1)
    with pytest.raises(ValueError, match="not a valid format string"):
        format_prompt("{unclosed", x=1)
    with pytest.raises(ValueError, match="needs field 'width'"):
        format_prompt("{x:{width}}", x=1)
    with pytest.raises(TypeError, match="template must be a str"):
        format_prompt(None)


def test_build_few_shot_prompt_hand_cases():
    examples = [{"prompt": "1+1", "answer": "2"}, {"prompt": "2+2", "answer": "4"}]
    assert build_few_shot_prompt(examples, "2+3") == (
        "Question: 1+1\nAnswer: 2\n\nQuestion: 2+2\nAnswer: 4\n\nQuestion: 2+3\nAnswer:"
    )
    assert (
        build_few_shot_prompt(
            examples,
            {"prompt": "3+3", "answer": "6"},
            template="{prompt}={answer}",
            query_template="{prompt}=",
            separator="; ",
            instruction="Add.",
        )
        == "Add.; 1+1=2; 2+2=4; 3+3="
    )
    assert build_few_shot_prompt([], "q", query_template="{prompt}?") == "q?"


def test_build_few_shot_prompt_errors():
    with pytest.raises(ValueError, match=r"needs field\(s\) \['answer'\]"):
        build_few_shot_prompt([{"prompt": "1+1"}], "2+3")
    with pytest.raises(TypeError, match=r"examples\[0\] must be a Mapping"):
        build_few_shot_prompt(["1+1"], "2+3")
    with pytest.raises(TypeError, match="examples must be a sequence"):
        build_few_shot_prompt("1+1", "2+3")
    with pytest.raises(TypeError, match="query must be a str or a Mapping"):
        build_few_shot_prompt([], 5)


@given(
    st.lists(st.tuples(st.text(max_size=5), st.text(max_size=5)), max_size=4),
    st.text(max_size=5),
    st.sampled_from(["\n\n", " | ", ""]),
)
def test_build_few_shot_prompt_matches_reference(pairs, query, separator):
    examples = [{"prompt": p, "answer": a} for p, a in pairs]
    blocks = [f"Q {p} A {a}" for p, a in pairs] + [f"Q {query} A"]
    expected = separator.join(blocks)
    got = build_few_shot_prompt(
        examples, query, "Q {prompt} A {answer}", "Q {prompt} A", separator=separator
    )
    assert got == expected


# --------------------------------------------------------------------------- dedup


def test_deduplicate_prompts_hand_cases():
    assert deduplicate_prompts(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]
    assert deduplicate_prompts(["a b", "A  b ", "c"]) == ["a b", "A  b ", "c"]
    assert deduplicate_prompts(["a b", "A  b ", "c"], ignore_case=True) == ["a b", "A  b ", "c"]
    assert deduplicate_prompts(["a b", " a\tb", "A b"], ignore_whitespace=True) == ["a b", "A b"]
    assert deduplicate_prompts(["a b", "A  b ", "c"], ignore_case=True, ignore_whitespace=True) == [
        "a b",
        "c",
    ]
    first = {"prompt": "x", "answer": "1"}
    items = [first, "x", {"prompt": "x", "answer": "2"}, {"prompt": "y", "answer": "1"}]
    assert deduplicate_prompts(items) == [first, items[3]]
    by_answer = deduplicate_prompts(items[:1] + items[2:], key=lambda item: item["answer"])
    assert by_answer == [first, items[2]]
    assert deduplicate_prompts([]) == []


def test_deduplicate_prompts_errors():
    with pytest.raises(TypeError, match=r"key\(items\[0\]\) must be hashable, got list"):
        deduplicate_prompts(["a"], key=lambda item: [item])
    with pytest.raises(TypeError, match=r"items\[1\]"):
        deduplicate_prompts(["a", 1])
    with pytest.raises(TypeError, match="key must be a callable"):
        deduplicate_prompts(["a"], key="prompt")
    with pytest.raises(TypeError, match="items must be a sequence"):
        deduplicate_prompts("abc")


@given(
    st.lists(st.text(alphabet="aAbB \t", max_size=4), max_size=12),
    st.booleans(),
    st.booleans(),
)
def test_deduplicate_prompts_matches_reference(texts, ignore_case, ignore_whitespace):
    def normalise(text):
        if ignore_whitespace:
            text = " ".join(text.split())
        return text.casefold() if ignore_case else text

    got = deduplicate_prompts(texts, ignore_case=ignore_case, ignore_whitespace=ignore_whitespace)
    assert got == ref_dedup(texts, normalise)
    assert (
        deduplicate_prompts(got, ignore_case=ignore_case, ignore_whitespace=ignore_whitespace)
        == got
    )  # idempotent
    keys = [normalise(text) for text in got]
    assert len(set(keys)) == len(keys)


def test_deduplicate_keeps_objects_in_order_for_random_metadata_items():
    rng = random.Random(0)
    items = [{"prompt": f"q{rng.randrange(5)}", "row": i} for i in range(30)]
    got = deduplicate_prompts(items)
    first_rows = {}
    for item in items:
        first_rows.setdefault(item["prompt"], item["row"])
    assert [item["row"] for item in got] == sorted(first_rows.values())
