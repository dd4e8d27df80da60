"""Tests for rlprim.rewards: hand cases, independent references (loops / NumPy) and properties."""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from rlprim.rewards import (
    aggregate_vector_rewards,
    apply_reward_shaping,
    compute_batch_rewards,
    compute_overlong_penalty,
    compute_relative_rewards,
    compute_scalar_reward,
    compute_vector_reward,
    create_batched_reward_fn,
    create_pareto_aggregator,
    exact_match_reward,
    from_trl_reward_fn,
    length_reward,
    normalize_rewards,
    pareto_rank,
    regex_format_reward,
    weighted_sum,
)
from rlprim.types import Generation, Rollout


def make_rollout(text="", prompt="p", token_ids=(), metadata=None, **fields):
    return Rollout(
        prompt=prompt,
        generation=Generation(text=text, token_ids=token_ids),
        metadata=metadata,
        **fields,
    )


# --------------------------------------------------------------------------- references


def dominates(a, b):
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(
        x > y for x, y in zip(a, b, strict=True)
    )


def reference_fronts(points):
    """Deb et al. (2002) fast non-dominated sort with domination counts; 1-based fronts."""
    n = len(points)
    dominated_sets = [[] for _ in range(n)]
    counts = [0] * n
    for p in range(n):
        for q in range(n):
            if dominates(points[p], points[q]):
                dominated_sets[p].append(q)
            elif dominates(points[q], points[p]):
                counts[p] += 1
    fronts = [0] * n
    current = [p for p in range(n) if counts[p] == 0]
    level = 1
    while current:
        following = []
        for p in current:
            fronts[p] = level
            for q in dominated_sets[p]:
                counts[q] -= 1
                if counts[q] == 0:
                    following.append(q)
        current = following
        level += 1
    return fronts


def reference_pareto(vectors, group_size):
    vectors = np.asarray(vectors, dtype=np.float64)
    out = []
    for start in range(0, len(vectors), group_size):
        fronts = reference_fronts(vectors[start : start + group_size].tolist())
        num = max(fronts)
        out += [1.0 if num == 1 else (num - f) / (num - 1) for f in fronts]
    return np.array(out)


def reference_relative(rewards, group_size):
    out = []
    for start in range(0, len(rewards), group_size):
        group = list(rewards[start : start + group_size])
        if len(group) == 1:
            out.append(0.5)
            continue
        order = sorted(range(len(group)), key=lambda k: group[k])
        ranks = [0.0] * len(group)
        i = 0
        while i < len(order):  # runs of equal values share the mean of their 1-based ranks
            j = i
            while j + 1 < len(order) and group[order[j + 1]] == group[order[i]]:
                j += 1
            for k in range(i, j + 1):
                ranks[order[k]] = (i + j) / 2 + 1
            i = j + 1
        out += [(r - 1) / (len(group) - 1) for r in ranks]
    return np.array(out)


def reference_normalize(rewards, method, group_size, eps):
    rewards = np.asarray(rewards, dtype=np.float64)
    groups = rewards.reshape(-1, group_size)
    out = np.zeros_like(groups)
    for g, group in enumerate(groups):
        if group.max() == group.min():
            continue
        if method == "zscore":
            out[g] = (group - group.mean()) / (group.std(ddof=1) + eps)
        else:
            out[g] = (group - group.min()) / (group.max() - group.min() + eps)
    return out.reshape(-1)


def reference_overlong(length, max_len, buffer_len, penalty):
    if length <= max_len - buffer_len:
        return 0.0
    if length <= max_len:
        return ((max_len - buffer_len) - length) / buffer_len * penalty
    return -penalty


# --------------------------------------------------------------------------- scalar / vector


def test_compute_scalar_reward_hand_cases():
    rollout = make_rollout("x")
    assert compute_scalar_reward(rollout, lambda r: 0.25) == 0.25
    assert compute_scalar_reward(rollout, lambda r: 3) == 3.0
    assert compute_scalar_reward(rollout, lambda r: True) == 1.0
    assert compute_scalar_reward(rollout, lambda r: False) == 0.0
    assert compute_scalar_reward(rollout, lambda r: np.float32(-1.5)) == -1.5
    assert compute_scalar_reward(rollout, lambda r: torch.tensor(2.5)) == 2.5
    assert compute_scalar_reward(rollout, lambda r: len(r.generation.text)) == 1.0


@pytest.mark.parametrize(
    ("value", "error", "fragment"),
    [
        (float("nan"), ValueError, "nan"),
        (float("inf"), ValueError, "inf"),
        ("1.0", TypeError, "str"),
        (None, TypeError, "NoneType"),
        ([1.0], TypeError, "list"),
        (torch.tensor([1.0, 2.0]), TypeError, "(2,)"),
        (1 + 2j, TypeError, "complex"),
    ],
)
def test_compute_scalar_reward_rejects(value, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        compute_scalar_reward(make_rollout(), lambda r: value)


def test_compute_scalar_reward_checks_its_arguments():
    with pytest.raises(TypeError, match="reward_fn must be callable"):
        compute_scalar_reward(make_rollout(), 1.0)
    with pytest.raises(TypeError, match="rollout must be a Rollout, got str"):
        compute_scalar_reward("text", lambda r: 1.0)


def test_compute_scalar_reward_propagates_reward_fn_errors():
    def broken(rollout):
        raise KeyError("answer")

    with pytest.raises(KeyError):
        compute_scalar_reward(make_rollout(), broken)


def test_compute_vector_reward_hand_cases():
    rollout = make_rollout("abc")
    assert compute_vector_reward(rollout, lambda r: [1, 0.5]) == (1.0, 0.5)
    assert compute_vector_reward(rollout, lambda r: (True, -2.0, 3)) == (1.0, -2.0, 3.0)
    assert compute_vector_reward(rollout, lambda r: torch.tensor([0.5, 1.5])) == (0.5, 1.5)
    assert compute_vector_reward(rollout, lambda r: np.array([7.0])) == (7.0,)


@pytest.mark.parametrize(
    ("value", "error", "fragment"),
    [
        ([], ValueError, "at least one component"),
        ([1.0, float("nan")], ValueError, "[1] must be finite, got nan"),
        ([1.0, "a"], TypeError, "[1] must be a real number"),
        ("ab", TypeError, "str"),
        (1.0, TypeError, "float"),
        (torch.zeros(2, 2), ValueError, "(2, 2)"),
    ],
)
def test_compute_vector_reward_rejects(value, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        compute_vector_reward(make_rollout(), lambda r: value)


# --------------------------------------------------------------------------- weighted sum


def test_weighted_sum_hand_numbers():
    aggregator = weighted_sum([0.5, 2.0])
    vectors = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 0.0]])
    # 0.5·1 + 2·2 = 4.5; 0.5·3 + 2·(-1) = -0.5; 0.
    torch.testing.assert_close(aggregator(vectors), torch.tensor([4.5, -0.5, 0.0]))
    torch.testing.assert_close(
        weighted_sum(torch.tensor([1.0, -1.0]))(vectors), torch.tensor([-1.0, 4.0, 0.0])
    )
    # integer vectors become float32
    assert aggregator(torch.tensor([[2, 1]])).dtype == torch.float32


def test_weighted_sum_matches_numpy_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(20):
        b, k = rng.integers(1, 9), rng.integers(1, 5)
        weights = rng.normal(size=k)
        vectors = rng.normal(size=(b, k))
        got = weighted_sum(weights.tolist())(torch.tensor(vectors))
        np.testing.assert_allclose(got.numpy(), vectors @ weights, rtol=1e-12, atol=1e-12)


@given(st.integers(1, 5), st.integers(0, 4), st.integers(1, 6), st.integers(0, 10**6))
def test_weighted_sum_one_hot_weights_pick_a_column(k, column, b, seed):
    column = column % k
    weights = [0.0] * k
    weights[column] = 1.0
    vectors = torch.tensor(np.random.default_rng(seed).normal(size=(b, k)))
    torch.testing.assert_close(weighted_sum(weights)(vectors), vectors[:, column])


def test_weighted_sum_validation():
    with pytest.raises(ValueError, match=r"K = 2 \(the number of weights\), got shape \(3, 3\)"):
        weighted_sum([1.0, 2.0])(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="weights must have at least one component"):
        weighted_sum([])
    with pytest.raises(ValueError, match=r"weights\[1\] must be finite, got nan"):
        weighted_sum([1.0, float("nan")])
    with pytest.raises(ValueError, match=r"weights must be 1-D, got a Tensor of shape \(1, 2\)"):
        weighted_sum(torch.ones(1, 2))


# --------------------------------------------------------------------------- aggregation


def test_aggregate_vector_rewards_lists_and_tensors_agree():
    rows = [[1.0, 2.0], [3, 4]]
    from_list = aggregate_vector_rewards(rows, weighted_sum([1.0, 10.0]))
    from_tensor = aggregate_vector_rewards(torch.tensor(rows), weighted_sum([1.0, 10.0]))
    torch.testing.assert_close(from_list, torch.tensor([21.0, 43.0]))
    torch.testing.assert_close(from_tensor, from_list)


def test_aggregate_vector_rewards_passes_the_batch_to_a_custom_aggregator():
    seen = []

    def max_component(vectors):
        seen.append(vectors.clone())
        return vectors.max(dim=1).values

    got = aggregate_vector_rewards([[1, 5], [4, 2]], max_component)
    torch.testing.assert_close(got, torch.tensor([5.0, 4.0]))
    torch.testing.assert_close(seen[0], torch.tensor([[1.0, 5.0], [4.0, 2.0]]))


def test_aggregate_vector_rewards_validation():
    total = weighted_sum([1.0, 1.0])
    with pytest.raises(ValueError, match=r"length 1 at vectors\[2\]"):
        aggregate_vector_rewards([[1, 2], [3, 4], [5]], total)
    with pytest.raises(ValueError, match=r"vectors must be finite, got inf at index \(1, 0\)"):
        aggregate_vector_rewards(torch.tensor([[1.0, 2.0], [math.inf, 0.0]]), total)
    with pytest.raises(ValueError, match=r"shape \[B, K\], got shape \(3,\)"):
        aggregate_vector_rewards(torch.zeros(3), total)
    with pytest.raises(ValueError, match=r"aggregator must return shape \[B\] = \(2,\)"):
        aggregate_vector_rewards(torch.zeros(2, 2), lambda v: v)
    with pytest.raises(TypeError, match="aggregator must return a torch.Tensor, got list"):
        aggregate_vector_rewards(torch.zeros(2, 2), lambda v: [0.0, 0.0])
    with pytest.raises(ValueError, match="aggregator's result must be finite, got nan"):
        aggregate_vector_rewards(torch.zeros(2, 2), lambda v: v.sum(1) / 0)
    with pytest.raises(TypeError, match="aggregator must be callable"):
        aggregate_vector_rewards(torch.zeros(2, 2), "sum")


# --------------------------------------------------------------------------- pareto


THREE_FRONTS = [
    [3.0, 1.0],
    [1.0, 3.0],
    [2.0, 2.0],  # front 1: mutually non-dominated
    [2.0, 1.0],
    [1.0, 2.0],  # front 2: each dominated by (2, 2)
    [1.0, 1.0],  # front 3
]


def test_pareto_rank_three_fronts():
    got = pareto_rank(torch.tensor(THREE_FRONTS))
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.0]))


def test_pareto_rank_duplicates_share_a_front():
    got = pareto_rank(torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    # identical rows only: one front, all 1.0
    torch.testing.assert_close(pareto_rank(torch.ones(3, 2)), torch.ones(3))


def test_pareto_rank_within_groups():
    vectors = torch.tensor(
        [
            [0.0, 0.0],
            [1.0, 1.0],
            [2.0, 0.0],  # group 0: fronts 2, 1, 1
            [5.0, 5.0],
            [4.0, 4.0],
            [3.0, 3.0],  # group 1: a chain, fronts 1, 2, 3
            [1.0, 0.0],
            [0.0, 1.0],
            [0.5, 0.5],
        ]  # group 2: one front
    )
    got = pareto_rank(vectors, group_size=3)
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.5, 0.0, 1.0, 1.0, 1.0]))
    # the same rows ranked as one batch: (5, 5) dominates everything else
    whole = pareto_rank(vectors)
    assert whole[3] == 1.0 and bool((whole[[0, 1, 2, 4, 5, 6, 7, 8]] < 1.0).all())


def test_pareto_rank_single_row_groups_and_one_objective():
    torch.testing.assert_close(
        pareto_rank(torch.tensor([[1.0], [5.0]]), group_size=1), torch.ones(2)
    )
    # one objective: fronts are the distinct values, best first
    got = pareto_rank(torch.tensor([[3.0], [1.0], [2.0], [3.0]]))
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0, 0.5, 1.0]))


def test_pareto_rank_matches_brute_force_reference_on_random_inputs():
    rng = np.random.default_rng(1)
    for _ in range(40):
        group_size, num_groups, k = rng.integers(1, 8), rng.integers(1, 4), rng.integers(1, 4)
        vectors = rng.integers(0, 4, size=(group_size * num_groups, k)).astype(np.float64)
        got = pareto_rank(torch.tensor(vectors), group_size=int(group_size))
        np.testing.assert_allclose(got.numpy(), reference_pareto(vectors, group_size))


@given(
    st.lists(st.lists(st.integers(-3, 3), min_size=2, max_size=2), min_size=1, max_size=10),
    st.integers(0, 10**6),
)
def test_pareto_rank_properties(rows, seed):
    vectors = torch.tensor(rows, dtype=torch.float64)
    got = pareto_rank(vectors)
    assert bool(((got >= 0) & (got <= 1)).all())
    assert float(got.max()) == 1.0
    for i in range(len(rows)):
        for j in range(len(rows)):
            if dominates(rows[i], rows[j]):
                assert got[i] > got[j]
    # invariant to strictly increasing transforms of each objective
    transformed = torch.stack([vectors[:, 0] * 3.0 + 1.0, torch.exp(vectors[:, 1])], dim=1)
    torch.testing.assert_close(pareto_rank(transformed), got)
    # permutation-equivariant
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(len(rows)))
    torch.testing.assert_close(pareto_rank(vectors[perm]), got[perm])


def test_create_pareto_aggregator_equals_pareto_rank_and_partial():
    vectors = torch.tensor(THREE_FRONTS)
    expected = pareto_rank(vectors, group_size=3)
    torch.testing.assert_close(create_pareto_aggregator(3)(vectors), expected)
    torch.testing.assert_close(
        aggregate_vector_rewards(vectors, functools.partial(pareto_rank, group_size=3)), expected
    )
    with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
        create_pareto_aggregator(0)


def test_pareto_rank_validation():
    with pytest.raises(ValueError, match="group_size must divide the batch size 6"):
        pareto_rank(torch.tensor(THREE_FRONTS), group_size=4)
    with pytest.raises(ValueError, match=r"vectors must be finite, got nan at index \(0, 1\)"):
        pareto_rank(torch.tensor([[0.0, math.nan]]))
    with pytest.raises(ValueError, match=r"at least one component, got shape \(2, 0\)"):
        pareto_rank(torch.zeros(2, 0))


# --------------------------------------------------------------------------- batch


def test_compute_batch_rewards_scalar():
    rollouts = [make_rollout("a"), make_rollout("bbb"), make_rollout("")]
    got = compute_batch_rewards(rollouts, lambda r: len(r.generation.text) / 2)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, torch.tensor([0.5, 1.5, 0.0]))
    # an aggregator is ignored for scalar rewards
    torch.testing.assert_close(
        compute_batch_rewards(rollouts, lambda r: 1.0, weighted_sum([2.0])), torch.ones(3)
    )
    assert compute_batch_rewards([], lambda r: 1.0).shape == (0,)


def test_compute_batch_rewards_vector_needs_an_aggregator():
    rollouts = [make_rollout("a"), make_rollout("bb")]

    def two_objectives(rollout):
        return [len(rollout.generation.text), 1.0]

    with pytest.raises(ValueError, match=r"vector rewards \(K = 2.*pass an aggregator"):
        compute_batch_rewards(rollouts, two_objectives)
    got = compute_batch_rewards(rollouts, two_objectives, weighted_sum([1.0, 0.5]))
    torch.testing.assert_close(got, torch.tensor([1.5, 2.5]))
    got = compute_batch_rewards(rollouts, two_objectives, create_pareto_aggregator())
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0]))


def test_compute_batch_rewards_names_the_rollout_that_raised():
    rollouts = [make_rollout(str(i), metadata={"answer": i}) for i in range(4)]

    def fails_on_two(rollout):
        if rollout.metadata["answer"] == 2:
            raise RuntimeError("verifier crashed")
        return 1.0

    with pytest.raises(ValueError, match=r"rollout 2 .*RuntimeError: verifier crashed") as info:
        compute_batch_rewards(rollouts, fails_on_two)
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (float("nan"), "rollout 1: nan"),
        (float("-inf"), "rollout 1: -inf"),
        ("oops", "rollout 1: 'oops'"),
        (None, "rollout 1: None"),
        (1e39, "reward 1e+39 for rollout 1 overflows float32"),
    ],
)
def test_compute_batch_rewards_names_index_and_value_of_bad_returns(bad, fragment):
    rollouts = [make_rollout("a"), make_rollout("bad"), make_rollout("c")]
    with pytest.raises(ValueError, match=re.escape(fragment)):
        compute_batch_rewards(rollouts, lambda r: bad if r.generation.text == "bad" else 0.0)


def test_compute_batch_rewards_rejects_mixed_kinds_and_lengths():
    rollouts = [make_rollout("a"), make_rollout("bb")]
    with pytest.raises(ValueError, match=r"\[1.0\] for rollout 1 but a scalar for rollout 0"):
        compute_batch_rewards(rollouts, lambda r: 1.0 if r.generation.text == "a" else [1.0])
    with pytest.raises(ValueError, match="length 1 for rollout 1 .* length 2 for rollout 0"):
        compute_batch_rewards(
            rollouts,
            lambda r: [1.0, 2.0] if r.generation.text == "a" else [1.0],
            weighted_sum([1.0, 1.0]),
        )
    with pytest.raises(ValueError, match=r"invalid reward for rollout 0: \[\]"):
        compute_batch_rewards(rollouts, lambda r: [], weighted_sum([1.0]))


def test_compute_batch_rewards_argument_checks():
    with pytest.raises(TypeError, match="rollouts must be a list or tuple of Rollout, got Rollout"):
        compute_batch_rewards(make_rollout("a"), lambda r: 1.0)
    with pytest.raises(TypeError, match=r"rollouts\[1\] must be a Rollout, got str"):
        compute_batch_rewards([make_rollout(), "x"], lambda r: 1.0)
    with pytest.raises(TypeError, match="reward_fn must be callable"):
        compute_batch_rewards([make_rollout()], None)


# --------------------------------------------------------------------------- batched / TRL


def trl_length_reward(calls):
    """A TRL-style reward function that records every call in ``calls``."""

    def reward(prompts, completions, **kwargs):
        calls.append({"prompts": list(prompts), "completions": list(completions), **kwargs})
        return [
            len(c) + (10.0 if c.strip() == str(a) else 0.0)
            for c, a in zip(completions, kwargs["answer"], strict=True)
        ]

    return reward


def test_from_trl_reward_fn_calls_once_per_batch_and_matches_per_rollout():
    rollouts = [
        make_rollout(" 4", prompt="2+2", token_ids=(7, 8), metadata={"answer": 4}),
        make_rollout("5", prompt="2+3", token_ids=(9,), metadata={"answer": 5, "level": 1}),
        make_rollout("x", prompt="1+1", metadata={"answer": 2}),
    ]
    calls = []
    reward_fn = from_trl_reward_fn(trl_length_reward(calls))
    batch = compute_batch_rewards(rollouts, reward_fn)
    assert len(calls) == 1
    assert calls[0] == {
        "prompts": ["2+2", "2+3", "1+1"],
        "completions": [" 4", "5", "x"],
        "completion_ids": [[7, 8], [9], []],
        "answer": [4, 5, 2],
        "level": [None, 1, None],
    }
    torch.testing.assert_close(batch, torch.tensor([12.0, 11.0, 1.0]))

    per_rollout = [compute_scalar_reward(r, reward_fn) for r in rollouts]
    assert len(calls) == 1 + len(rollouts)
    assert calls[1]["prompts"] == ["2+2"] and calls[1]["answer"] == [4]
    torch.testing.assert_close(batch, torch.tensor(per_rollout, dtype=torch.float32))


def test_from_trl_reward_fn_errors_name_index_and_value():
    rollouts = [make_rollout("a"), make_rollout("b")]
    reward_fn = from_trl_reward_fn(lambda prompts, completions, **kw: [1.0, None])
    with pytest.raises(ValueError, match=r"rollout 1: None"):
        compute_batch_rewards(rollouts, reward_fn)
    reward_fn = from_trl_reward_fn(lambda prompts, completions, **kw: [1.0])
    with pytest.raises(ValueError, match=r"one reward per rollout \(2\), got 1"):
        compute_batch_rewards(rollouts, reward_fn)

    def no_kwargs(prompts, completions):
        return [0.0] * len(prompts)

    with pytest.raises(ValueError, match="reward_fn.batched raised .*completion_ids") as info:
        compute_batch_rewards(rollouts, from_trl_reward_fn(no_kwargs))
    assert isinstance(info.value.__cause__, TypeError)
    clash = [make_rollout("a", metadata={"prompts": 1})]
    with pytest.raises(ValueError, match="'prompts' clashes"):
        compute_batch_rewards(clash, from_trl_reward_fn(lambda p, c, **kw: [0.0]))


def test_create_batched_reward_fn_vector_rewards_and_single_calls():
    calls = []

    def batch_fn(rollouts):
        calls.append(len(rollouts))
        return [(len(r.generation.text), -len(r.prompt)) for r in rollouts]

    reward_fn = create_batched_reward_fn(batch_fn)
    assert reward_fn.batched is batch_fn
    rollouts = [make_rollout("ab", prompt="x"), make_rollout("a", prompt="yyy")]
    got = compute_batch_rewards(rollouts, reward_fn, weighted_sum([1.0, 1.0]))
    torch.testing.assert_close(got, torch.tensor([1.0, -2.0]))
    assert calls == [2]
    assert compute_vector_reward(rollouts[1], reward_fn) == (1.0, -3.0)
    assert calls == [2, 1]
    with pytest.raises(ValueError, match="one reward for a batch of one rollout, got \\[\\]"):
        create_batched_reward_fn(lambda rs: [])(rollouts[0])
    with pytest.raises(TypeError, match="batch_fn must be callable"):
        create_batched_reward_fn(3)


# --------------------------------------------------------------------------- relative


def test_compute_relative_rewards_hand_cases_with_ties():
    # ranks 4, 1, 2.5, 2.5 → (rank - 1) / 3
    got = compute_relative_rewards(torch.tensor([3.0, 1.0, 2.0, 2.0]), 4)
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0, 0.5, 0.5]))
    got = compute_relative_rewards(torch.tensor([1.0, 1.0, 1.0, 0.0, 5.0, 0.0]), 3)
    torch.testing.assert_close(got, torch.tensor([0.5, 0.5, 0.5, 0.25, 1.0, 0.25]))
    torch.testing.assert_close(compute_relative_rewards([7, -1], 1), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(
        compute_relative_rewards([2, 1, 3], None), torch.tensor([0.5, 0.0, 1.0])
    )


def test_compute_relative_rewards_matches_loop_reference():
    rng = np.random.default_rng(2)
    for _ in range(30):
        group_size, num_groups = rng.integers(1, 7), rng.integers(1, 4)
        rewards = rng.integers(0, 4, size=group_size * num_groups).astype(np.float64)
        got = compute_relative_rewards(torch.tensor(rewards), int(group_size))
        np.testing.assert_allclose(got.numpy(), reference_relative(rewards, group_size))


@given(st.lists(st.integers(-5, 5), min_size=1, max_size=12), st.integers(1, 4))
def test_compute_relative_rewards_properties(values, group_size):
    values = values[: len(values) - len(values) % group_size] or values[:1]
    group_size = min(group_size, len(values))
    assume(len(values) % group_size == 0)
    rewards = torch.tensor(values, dtype=torch.float64)
    got = compute_relative_rewards(rewards, group_size)
    assert bool(((got >= 0) & (got <= 1)).all())
    # each group averages exactly 1/2
    torch.testing.assert_close(
        got.reshape(-1, group_size).mean(1),
        torch.full((len(values) // group_size,), 0.5, dtype=torch.float64),
    )
    # only the order matters
    torch.testing.assert_close(compute_relative_rewards(rewards * 2 + 3, group_size), got)


def test_compute_relative_rewards_validation():
    with pytest.raises(ValueError, match=r"rewards must be finite, got nan at index 1"):
        compute_relative_rewards(torch.tensor([0.0, math.nan]), 2)
    with pytest.raises(ValueError, match="group_size must divide the batch size 3"):
        compute_relative_rewards(torch.zeros(3), 2)
    with pytest.raises(ValueError, match=r"rewards must have shape \[B\], got shape \(2, 2\)"):
        compute_relative_rewards(torch.zeros(2, 2), 2)


# --------------------------------------------------------------------------- normalise


def test_normalize_rewards_hand_cases():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # group 0: mean 2, unbiased std 1; group 1 constant → 0
    torch.testing.assert_close(
        normalize_rewards(rewards, "zscore", group_size=3, eps=0.0),
        torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]),
    )
    torch.testing.assert_close(
        normalize_rewards(rewards, "minmax", group_size=3, eps=0.0),
        torch.tensor([0.0, 0.5, 1.0, 0.0, 0.0, 0.0]),
    )
    torch.testing.assert_close(
        normalize_rewards(rewards, "rank", group_size=3),
        torch.tensor([0.0, 0.5, 1.0, 0.5, 0.5, 0.5]),
    )
    torch.testing.assert_close(normalize_rewards(rewards, "none"), rewards)
    # whole batch, with eps: minmax max is 4 / (4 + 1) = 0.8
    got = normalize_rewards(torch.tensor([1.0, 3.0, 5.0]), "minmax", eps=1.0)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.4, 0.8]))
    got = normalize_rewards(torch.tensor([0.0, 4.0]), "zscore", eps=0.0)  # std = 2√2
    torch.testing.assert_close(got, torch.tensor([-1 / math.sqrt(2), 1 / math.sqrt(2)]))


def test_normalize_rewards_constant_float32_groups_are_exactly_zero():
    # the float32 mean of 0.1s is off by an ulp; that must not become a large z-score
    rewards = torch.full((7,), 0.1, dtype=torch.float32)
    assert bool((normalize_rewards(rewards, "zscore") == 0).all())
    assert bool((normalize_rewards(rewards[:1], "zscore", group_size=1) == 0).all())


@pytest.mark.parametrize("method", ["zscore", "minmax"])
def test_normalize_rewards_matches_numpy_reference(method):
    rng = np.random.default_rng(3)
    for _ in range(20):
        group_size, num_groups = rng.integers(1, 6), rng.integers(1, 4)
        rewards = rng.normal(size=group_size * num_groups)
        rewards[:group_size] = rewards[0]  # a constant group
        got = normalize_rewards(torch.tensor(rewards), method, int(group_size), eps=1e-6)
        expected = reference_normalize(rewards, method, group_size, 1e-6)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


@given(
    st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=24),
    st.sampled_from([2, 3, 4]),
)
def test_normalize_rewards_zscore_has_zero_mean_unit_std_per_group(values, group_size):
    values = values[: len(values) - len(values) % group_size]
    assume(values)
    groups = np.array(values).reshape(-1, group_size)
    assume(all(np.ptp(g) > 1e-3 for g in groups))
    got = normalize_rewards(torch.tensor(values, dtype=torch.float64), "zscore", group_size)
    got = got.numpy().reshape(-1, group_size)
    np.testing.assert_allclose(got.mean(axis=1), 0.0, atol=1e-9)
    np.testing.assert_allclose(got.std(axis=1, ddof=1), 1.0, rtol=1e-5)
    minmax = normalize_rewards(torch.tensor(values, dtype=torch.float64), "minmax", group_size)
    minmax = minmax.numpy().reshape(-1, group_size)
    assert (minmax >= 0).all() and (minmax <= 1).all()
    np.testing.assert_allclose(minmax.min(axis=1), 0.0)


def test_normalize_rewards_custom_normalizer_sees_groups():
    seen = []

    def center(grouped):
        seen.append(tuple(grouped.shape))
        return grouped - grouped.mean(dim=1, keepdim=True)

    got = normalize_rewards(torch.tensor([1.0, 3.0, 10.0, 20.0]), group_size=2, normalizer=center)
    torch.testing.assert_close(got, torch.tensor([-1.0, 1.0, -5.0, 5.0]))
    assert seen == [(2, 2)]
    with pytest.raises(ValueError, match=r"normalizer must return a tensor of shape \(2, 2\)"):
        normalize_rewards(torch.zeros(4), group_size=2, normalizer=lambda g: g.reshape(-1))


def test_normalize_rewards_validation():
    with pytest.raises(ValueError, match=r"method must be one of .*'zscore'.* got 'l2'"):
        normalize_rewards(torch.zeros(2), "l2")
    with pytest.raises(
        ValueError, match=r"group_size must divide the batch size 5 .*, got group_size=2"
    ):
        normalize_rewards(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError, match=r"rewards must be finite, got inf at index 0"):
        normalize_rewards(torch.tensor([math.inf, 0.0]))
    with pytest.raises(ValueError, match=r"eps must be >= 0.0, got -1.0"):
        normalize_rewards(torch.zeros(2), eps=-1.0)
    with pytest.raises(TypeError, match="group_size must be an int, got float"):
        normalize_rewards(torch.zeros(2), group_size=2.0)


# --------------------------------------------------------------------------- shaping


def test_overlong_penalty_at_the_boundaries():
    # L_max = 10, L_cache = 4: free up to 6, then -1/4 per token down to -1 at 10, -1 beyond.
    lengths = torch.tensor([0, 5, 6, 7, 8, 9, 10, 11, 50])
    got = compute_overlong_penalty(lengths, max_response_len=10, overlong_buffer_len=4)
    torch.testing.assert_close(
        got, torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0])
    )
    got = compute_overlong_penalty(lengths, 10, 4, penalty=0.5)
    torch.testing.assert_close(
        got, torch.tensor([0.0, 0.0, 0.0, -0.125, -0.25, -0.375, -0.5, -0.5, -0.5])
    )
    # the buffer spans the whole range
    torch.testing.assert_close(
        compute_overlong_penalty([0, 1, 2], 2, 2), torch.tensor([0.0, -0.5, -1.0])
    )


@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=10),
    st.integers(1, 30),
    st.integers(1, 30),
    st.floats(0.0, 3.0),
)
def test_overlong_penalty_matches_reference_and_is_monotone(lengths, max_len, buffer_len, p):
    assume(buffer_len <= max_len)
    got = compute_overlong_penalty(
        torch.tensor(lengths, dtype=torch.float64), max_len, buffer_len, p
    )
    expected = [reference_overlong(n, max_len, buffer_len, p) for n in lengths]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert bool(((got <= 0) & (got >= -p - 1e-12)).all())
    ordered = compute_overlong_penalty(torch.arange(0.0, 45.0), max_len, buffer_len, p)
    assert bool((ordered[1:] <= ordered[:-1] + 1e-12).all())


def test_overlong_penalty_validation():
    with pytest.raises(ValueError, match=r"overlong_buffer_len must be <= max_response_len \(4\)"):
        compute_overlong_penalty([1], 4, 5)
    with pytest.raises(ValueError, match=r"lengths must be >= 0, got -1.0 at index 1"):
        compute_overlong_penalty([1, -1], 4, 2)
    with pytest.raises(ValueError, match="overlong_buffer_len must be >= 1, got 0"):
        compute_overlong_penalty([1], 4, 0)
    with pytest.raises(ValueError, match="penalty must be >= 0.0, got -1.0"):
        compute_overlong_penalty([1], 4, 2, penalty=-1.0)


def test_apply_reward_shaping_hand_cases():
    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0])
    lengths = torch.tensor([2, 6, 8, 12])
    torch.testing.assert_close(apply_reward_shaping(rewards, lengths), rewards)
    # raw length penalty: r - 0.1·|y|
    torch.testing.assert_close(
        apply_reward_shaping(rewards, lengths, length_penalty=0.1),
        torch.tensor([0.8, 0.4, -0.8, 0.8]),
    )
    # distance to target 6: r - 0.5·||y| - 6|
    torch.testing.assert_close(
        apply_reward_shaping(rewards, lengths, length_penalty=0.5, target_length=6),
        torch.tensor([-1.0, 1.0, -1.0, -1.0]),
    )
    # DAPO: L_max 10, L_cache 4 → 0, 0, -0.5, -1
    torch.testing.assert_close(
        apply_reward_shaping(rewards, lengths, overlong_buffer_len=4, max_response_len=10),
        torch.tensor([1.0, 1.0, -0.5, 1.0]),
    )
    # both, with overlong_penalty 2
    torch.testing.assert_close(
        apply_reward_shaping(
            rewards,
            lengths,
            length_penalty=0.1,
            overlong_buffer_len=4,
            max_response_len=10,
            overlong_penalty=2.0,
        ),
        torch.tensor([0.8, 0.4, -1.8, -1.2]),
    )
    assert apply_reward_shaping(rewards.double(), lengths, length_penalty=0.1).dtype == (
        torch.float64
    )


def test_apply_reward_shaping_custom_shaping_fn_replaces_builtins():
    def halve_long(rewards, lengths):
        return torch.where(lengths > 5, rewards / 2, rewards)

    got = apply_reward_shaping(
        torch.tensor([4.0, 4.0]), torch.tensor([3, 9]), shaping_fn=halve_long, length_penalty=100.0
    )
    torch.testing.assert_close(got, torch.tensor([4.0, 2.0]))
    with pytest.raises(ValueError, match=r"shaping_fn must return a tensor of shape \(2,\)"):
        apply_reward_shaping(torch.zeros(2), torch.zeros(2), shaping_fn=lambda r, n: r[:1])


def test_apply_reward_shaping_validation():
    with pytest.raises(ValueError, match="max_response_len is required with overlong_buffer_len=4"):
        apply_reward_shaping(torch.zeros(2), torch.zeros(2), overlong_buffer_len=4)
    with pytest.raises(
        ValueError, match=r"lengths must have the shape of rewards \(2,\), got \(3,\)"
    ):
        apply_reward_shaping(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="length_penalty must be >= 0.0, got -0.1"):
        apply_reward_shaping(torch.zeros(2), torch.zeros(2), length_penalty=-0.1)
    with pytest.raises(ValueError, match=r"rewards must be finite, got nan at index 1"):
        apply_reward_shaping(torch.tensor([0.0, math.nan]), torch.zeros(2))


# --------------------------------------------------------------------------- builders


def test_exact_match_reward_on_rollouts():
    reward_fn = exact_match_reward()
    assert reward_fn(make_rollout("  42\n", metadata={"answer": 42})) == 1.0
    assert reward_fn(make_rollout("41", metadata={"answer": "42"})) == 0.0
    assert reward_fn(make_rollout("b", metadata={"answer": ["a", "b"]})) == 1.0
    with pytest.raises(ValueError, match=r"no key 'answer' .*keys: \['solution'\]"):
        reward_fn(make_rollout("42", metadata={"solution": 42}))

    keyed = exact_match_reward("solution", normalize_fn=str.lower, reward=2.0, penalty=-1.0)
    assert keyed(make_rollout("Paris", metadata={"solution": "PARIS"})) == 2.0
    assert keyed(make_rollout("Paris ", metadata={"solution": "PARIS"})) == -1.0

    def last_number(text):
        found = re.findall(r"-?\d+", text)
        return found[-1] if found else None

    extracted = exact_match_reward(
        lambda r: int(r.prompt.split("+")[0]) * 2, extract_fn=last_number
    )
    assert extracted(make_rollout("so the answer is 6.", prompt="3+3")) == 1.0
    assert extracted(make_rollout("no idea", prompt="3+3")) == 0.0
    with pytest.raises(TypeError, match="answer must be a metadata key"):
        exact_match_reward(3)


def test_exact_match_reward_through_compute_batch_rewards_names_missing_key():
    rollouts = [make_rollout("1", metadata={"answer": 1}), make_rollout("2")]
    with pytest.raises(ValueError, match=r"rollout 1 .*no key 'answer'"):
        compute_batch_rewards(rollouts, exact_match_reward())


def test_regex_format_reward_modes():
    pattern = r"<think>.*</think>\s*<answer>.*</answer>"
    good = make_rollout("<think>a\nb</think>\n<answer>4</answer>")
    prefixed = make_rollout("Sure! <think>a</think><answer>4</answer>")
    assert regex_format_reward(pattern)(good) == 1.0  # DOTALL: '.' spans the newline
    assert regex_format_reward(pattern)(prefixed) == 0.0
    assert regex_format_reward(pattern, mode="search")(prefixed) == 1.0
    assert regex_format_reward(pattern, 0.5, -0.5, mode="match")(prefixed) == -0.5
    assert regex_format_reward(pattern, flags=0)(good) == 0.0
    assert regex_format_reward(re.compile(r"\d+"))(make_rollout("123")) == 1.0
    with pytest.raises(ValueError, match=r"pattern '\(' is not a valid regular expression"):
        regex_format_reward("(")
    with pytest.raises(ValueError, match="mode must be one of"):
        regex_format_reward("a", mode="find")


def test_length_reward_units():
    reward_fn = length_reward(target_length=4, scale=2.0)
    assert reward_fn(make_rollout("abcdefgh", token_ids=(1, 2))) == -1.0  # 2 tokens
    assert reward_fn(make_rollout("abcdefgh")) == -2.0  # no token ids: 8 characters
    assert length_reward(4, unit="chars")(make_rollout("ab", token_ids=(1,) * 9)) == -2.0
    assert length_reward(4, unit="tokens")(make_rollout("abcdef")) == -4.0
    multi_turn = make_rollout(
        "x", token_ids=(1,), completion_ids=(1, 2, 3, 4, 5, 6), action_mask=(1, 1, 0, 0, 1, 1)
    )
    assert length_reward(4)(multi_turn) == 0.0  # 4 model-produced tokens
    assert length_reward(4)(make_rollout("x", completion_ids=(1, 2))) == -2.0
    with pytest.raises(ValueError, match="scale must be > 0.0, got 0.0"):
        length_reward(4, scale=0)
    with pytest.raises(ValueError, match="unit must be one of"):
        length_reward(4, unit="words")


@given(st.text(max_size=30), st.integers(0, 20), st.floats(0.5, 5.0))
def test_length_reward_matches_formula(text, target, scale):
    assert length_reward(target, scale)(make_rollout(text)) == pytest.approx(
        -abs(len(text) - target) / scale
    )
