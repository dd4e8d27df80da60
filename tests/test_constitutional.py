"""Tests of rlprim.constitutional and rlprim.tasks.constitutional on real tiny models.

Every AI-feedback number is checked against a forward of the judge written out here: the
softmax over the option tokens' logits at the text's last position (single-token options), or
over the options' summed token log-probs (multi-token options).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import rlprim as rp
from rlprim.constitutional import (
    COMPARISON_TEMPLATE,
    CRITIQUE_TEMPLATE,
    JUDGE_TEMPLATE,
    REVISION_TEMPLATE,
    Principle,
    RevisionPair,
    compute_ai_preferences,
    compute_judge_scores,
    compute_option_probabilities,
    create_ai_preference_reward_fn,
    create_judge_reward_fn,
    create_preference_rollouts,
    critique_and_revise,
    load_constitution,
)
from rlprim.tasks.constitutional import (
    CONSTITUTIONAL_PROMPTS,
    HARMLESSNESS_PRINCIPLES,
    create_constitutional_task,
)
from rlprim.testing import tiny_model, tiny_tokenizer
from rlprim.types import Generation, GenerationConfig, Rollout

PRINCIPLES = (
    Principle(
        "harmless",
        judge_question="Is it harmless?",
        comparison_question="Which is less harmful?",
        critique_request="Say what is harmful.",
        revision_request="Remove the harm.",
    ),
    Principle(
        "honest",
        judge_question="Is it true?",
        comparison_question="Which is more honest?",
        critique_request="Say what is false.",
        revision_request="Make it true.",
        weight=3.0,
    ),
)
# Short templates keep the judge's texts (and the tests) small; the defaults are tested once each.
SHORT_JUDGE = "{prompt}{response}\n{question}\nAnswer:"
SHORT_COMPARISON = "{prompt}\n{question}\n(A){response_a}\n(B){response_b}\nAnswer:"
PROMPTS = ["How do I pick a lock?", "Hi", "Tell me a joke about cats, a long one please."]
RESPONSES = [" Ask a locksmith.", " Hello!", " Cats land on their feet; jokes do not."]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def judge():
    return tiny_model("qwen2", seed=1)


def last_position_probabilities(judge, tokenizer, text, option_ids):
    """softmax over the options' logits at the last position of ``text``, one forward."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        logits = judge(input_ids=ids).logits[0, -1]
    return torch.softmax(logits[option_ids], dim=-1)


def summed_option_probabilities(judge, tokenizer, text, options):
    """softmax over k of Σ_t log p(option_k token t | text, earlier option tokens)."""
    text_ids = tokenizer(text)["input_ids"]
    totals = []
    for option in options:
        option_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([text_ids + option_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(judge(input_ids=ids).logits[0].double(), dim=-1)
        totals.append(
            sum(logprobs[len(text_ids) - 1 + t, token] for t, token in enumerate(option_ids))
        )
    return torch.softmax(torch.stack(totals), dim=-1).float()


# --------------------------------------------------------------------------- option probabilities


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_single_token_options_are_the_softmax_of_their_logits(judge, tokenizer, batch_size):
    texts = [p + r + "\nAnswer:" for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    options = ["A", "B", "C"]  # one token each: ids 40, 41, 42
    probabilities = compute_option_probabilities(judge, tokenizer, texts, options, batch_size)
    expected = torch.stack(
        [last_position_probabilities(judge, tokenizer, t, [40, 41, 42]) for t in texts]
    )
    assert probabilities.shape == (3, 3)
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(3))


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_multi_token_options_sum_their_token_logprobs(judge, tokenizer, batch_size):
    texts = [p + r + "\nAnswer:" for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    options = [" Yes", " No", " not sure"]  # 3, 3 and more tokens
    probabilities = compute_option_probabilities(judge, tokenizer, texts, options, batch_size)
    expected = torch.stack([summed_option_probabilities(judge, tokenizer, t, options) for t in texts])
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=1e-5)


def test_option_probabilities_by_hand_with_a_judge_whose_logits_are_zero(tokenizer):
    # A zero final-norm weight makes every hidden state, hence every logit, 0: each token has
    # probability 1/V (V = 512), so an option of n tokens has likelihood V^-n.
    flat = tiny_model("qwen2", seed=3)
    with torch.no_grad():
        flat.model.norm.weight.zero_()
    single = compute_option_probabilities(flat, tokenizer, ["x", "a longer text"], ["A", "B"])
    assert single.tolist() == [[0.5, 0.5], [0.5, 0.5]]
    # "A" is one token, " A" two (228, 40): P = [V, 1] / (V + 1).
    mixed = compute_option_probabilities(flat, tokenizer, ["x"], ["A", " A"])
    torch.testing.assert_close(mixed, torch.tensor([[512 / 513, 1 / 513]]), atol=1e-6, rtol=0)
    values = compute_judge_scores(flat, tokenizer, ["q"], ["r"], PRINCIPLES, options=["1", "2"],
                                  option_values=[1.0, 2.0], template=SHORT_JUDGE)
    assert values.tolist() == [[1.5, 1.5]]  # the expected rating under a uniform answer


def test_option_probabilities_keep_the_mode_and_check_inputs(judge, tokenizer):
    judge.train()
    try:
        compute_option_probabilities(judge, tokenizer, ["x"], ["A", "B"])
        assert judge.training
    finally:
        judge.eval()
    assert compute_option_probabilities(judge, tokenizer, [], ["A", "B"]).shape == (0, 2)
    with pytest.raises(ValueError, match="at least 2"):
        compute_option_probabilities(judge, tokenizer, ["x"], ["A"])
    with pytest.raises(ValueError, match="distinct"):
        compute_option_probabilities(judge, tokenizer, ["x"], ["A", "A"])
    with pytest.raises(ValueError, match=r"options\[1\] must not be empty"):
        compute_option_probabilities(judge, tokenizer, ["x"], ["A", ""])
    with pytest.raises(TypeError, match="texts"):
        compute_option_probabilities(judge, tokenizer, "x", ["A", "B"])
    with pytest.raises(ValueError, match=r"texts\[1\].*context"):
        compute_option_probabilities(judge, tokenizer, ["x", "1 " * 600], ["A", "B"])
    with pytest.raises(ValueError, match="batch_size"):
        compute_option_probabilities(judge, tokenizer, ["x"], ["A", "B"], batch_size=0)


# --------------------------------------------------------------------------- the AI judge


def test_judge_score_equals_a_manual_forward_of_the_judge(judge, tokenizer):
    scores = compute_judge_scores(judge, tokenizer, PROMPTS, RESPONSES, PRINCIPLES)
    assert scores.shape == (3, 2)
    for b, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        for p, principle in enumerate(PRINCIPLES):
            text = JUDGE_TEMPLATE.format(
                prompt=prompt, response=response, question=principle.judge_question
            )
            yes = summed_option_probabilities(judge, tokenizer, text, [" Yes", " No"])[0]
            assert abs(scores[b, p].item() - yes.item()) < 1e-5


def test_judge_with_single_token_options_and_graded_values(judge, tokenizer):
    # A 1..3 rating: the score is the expected rating Σ_k P(k) · k.
    template = "{prompt}{response}\n{question} Rate 1 to 3:"
    scores = compute_judge_scores(
        judge, tokenizer, PROMPTS, RESPONSES, PRINCIPLES[:1], options=["1", "2", "3"],
        option_values=[1.0, 2.0, 3.0], template=template, batch_size=2,
    )
    for b in range(3):
        text = template.format(
            prompt=PROMPTS[b], response=RESPONSES[b], question=PRINCIPLES[0].judge_question
        )
        p = last_position_probabilities(judge, tokenizer, text, [24, 25, 26])
        expected = float(p @ torch.tensor([1.0, 2.0, 3.0]))
        assert abs(scores[b, 0].item() - expected) < 1e-5
        assert 1.0 <= scores[b, 0].item() <= 3.0


def test_judge_batching_gives_the_scores_of_one_at_a_time(judge, tokenizer):
    together = compute_judge_scores(
        judge, tokenizer, PROMPTS, RESPONSES, PRINCIPLES, template=SHORT_JUDGE, batch_size=4
    )
    alone = torch.cat([
        compute_judge_scores(judge, tokenizer, [p], [r], PRINCIPLES, template=SHORT_JUDGE,
                             batch_size=1)
        for p, r in zip(PROMPTS, RESPONSES, strict=True)
    ])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_judge_reward_fn_is_the_weighted_mean_and_batched(judge, tokenizer):
    rollouts = [
        Rollout(p, Generation(r, (), (), None, "stop"), group_id=i)
        for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True))
    ]
    short = {"template": SHORT_JUDGE}
    scores = compute_judge_scores(judge, tokenizer, PROMPTS, RESPONSES, PRINCIPLES, **short)
    expected = (scores[:, 0] * 1.0 + scores[:, 1] * 3.0) / 4.0  # weights 1 and 3
    reward_fn = create_judge_reward_fn(judge, tokenizer, PRINCIPLES, batch_size=3, **short)
    torch.testing.assert_close(torch.tensor(reward_fn.batched(rollouts)), expected)
    torch.testing.assert_close(
        rp.compute_batch_rewards(rollouts, reward_fn), expected, atol=1e-6, rtol=1e-6
    )
    assert abs(reward_fn(rollouts[1]) - expected[1].item()) < 1e-5
    vector_fn = create_judge_reward_fn(judge, tokenizer, PRINCIPLES, vector=True, **short)
    torch.testing.assert_close(torch.tensor(vector_fn.batched(rollouts)), scores)
    # prompt_fn chooses the judge's prompt text.
    other = create_judge_reward_fn(judge, tokenizer, PRINCIPLES, prompt_fn=lambda r: "Hi",
                                   **short)
    by_hand = compute_judge_scores(judge, tokenizer, ["Hi"] * 3, RESPONSES, PRINCIPLES, **short)
    torch.testing.assert_close(
        torch.tensor(other.batched(rollouts)), (by_hand[:, 0] + 3 * by_hand[:, 1]) / 4
    )


def test_judge_checks_its_arguments_before_scoring(judge, tokenizer):
    with pytest.raises(ValueError, match="'bare' has no judge_question"):
        create_judge_reward_fn(judge, tokenizer, [Principle("bare")])
    with pytest.raises(ValueError, match="unknown"):
        create_judge_reward_fn(judge, tokenizer, PRINCIPLES, template="{prompt} {answer}")
    with pytest.raises(ValueError, match="one value per option"):
        create_judge_reward_fn(judge, tokenizer, PRINCIPLES, option_values=[1.0])
    with pytest.raises(ValueError, match="sum to 0"):
        create_judge_reward_fn(judge, tokenizer, [PRINCIPLES[0]._replace(weight=0.0)])
    with pytest.raises(ValueError, match="same length"):
        compute_judge_scores(judge, tokenizer, PROMPTS, RESPONSES[:2], PRINCIPLES)


# --------------------------------------------------------------------------- RL-CAI preferences


def test_ai_preference_is_the_judges_option_probability(judge, tokenizer):
    one_order = compute_ai_preferences(
        judge, tokenizer, PROMPTS, RESPONSES, RESPONSES[::-1], PRINCIPLES[:1], both_orders=False
    )
    for n in range(3):
        text = COMPARISON_TEMPLATE.format(
            prompt=PROMPTS[n], question=PRINCIPLES[0].comparison_question,
            response_a=RESPONSES[n], response_b=RESPONSES[::-1][n],
        )
        expected = summed_option_probabilities(judge, tokenizer, text, [" (A)", " (B)"])[0]
        assert abs(one_order[n].item() - expected.item()) < 1e-5


def test_ai_preferences_in_both_orders_are_antisymmetric(judge, tokenizer):
    others = [" No.", " Go away.", " I will not."]
    short = {"template": SHORT_COMPARISON}
    ab = compute_ai_preferences(judge, tokenizer, PROMPTS, RESPONSES, others, PRINCIPLES, **short)
    ba = compute_ai_preferences(judge, tokenizer, PROMPTS, others, RESPONSES, PRINCIPLES, **short)
    torch.testing.assert_close(ab + ba, torch.ones(3), atol=1e-6, rtol=0)
    same = compute_ai_preferences(
        judge, tokenizer, PROMPTS, RESPONSES, RESPONSES, PRINCIPLES, **short
    )
    torch.testing.assert_close(same, torch.full((3,), 0.5), atol=1e-6, rtol=0)
    # The weighted mean over principles (weights 1 and 3) of the per-principle preferences.
    per = [
        compute_ai_preferences(judge, tokenizer, PROMPTS, RESPONSES, others, [p], **short)
        for p in PRINCIPLES
    ]
    torch.testing.assert_close(ab, (per[0] + 3 * per[1]) / 4, atol=1e-6, rtol=0)


def test_preference_reward_is_the_mean_win_probability_in_the_group(judge, tokenizer):
    texts = [" Ask a locksmith.", " Break the window.", " I cannot help.", " Hello!"]
    rollouts = [
        Rollout(PROMPTS[0], Generation(t, (), (), None, "stop"), group_id=0) for t in texts[:3]
    ] + [Rollout(PROMPTS[1], Generation(texts[3], (), (), None, "stop"), group_id=1)]
    reward_fn = create_ai_preference_reward_fn(
        judge, tokenizer, PRINCIPLES, template=SHORT_COMPARISON, batch_size=5
    )
    rewards = reward_fn.batched(rollouts)

    def pref(i, j):
        return compute_ai_preferences(
            judge, tokenizer, [PROMPTS[0]], [texts[i]], [texts[j]], PRINCIPLES,
            template=SHORT_COMPARISON,
        ).item()

    for i in range(3):
        expected = sum(pref(i, j) for j in range(3) if j != i) / 2
        assert abs(rewards[i] - expected) < 1e-5
    assert abs(sum(rewards[:3]) - 1.5) < 1e-5  # G / 2: every comparison hands out 1
    assert rewards[3] == 0.5  # a group of one has nobody to compare with
    with pytest.raises(TypeError, match="batched"):
        reward_fn(rollouts[0])
    torch.testing.assert_close(
        rp.compute_batch_rewards(rollouts, reward_fn), torch.tensor(rewards)
    )


def test_preference_reward_feeds_dpo_pairs(judge, tokenizer):
    texts = [" Ask a locksmith.", " Break the window.", " Hello!", " Go away."]
    rollouts = [
        Rollout(PROMPTS[g], Generation(t, (), (), None, "stop"), group_id=g)
        for g, t in zip([0, 0, 1, 1], texts, strict=True)
    ]
    reward_fn = create_ai_preference_reward_fn(
        judge, tokenizer, PRINCIPLES, template=SHORT_COMPARISON
    )
    rewards = torch.tensor(reward_fn.batched(rollouts))
    chosen, rejected = rp.compute_dpo_pairs(rewards, 2)
    for g in range(2):  # in each group of two the judge's preferred sample is chosen
        p = compute_ai_preferences(
            judge, tokenizer, [PROMPTS[g]], [texts[2 * g]], [texts[2 * g + 1]], PRINCIPLES,
            template=SHORT_COMPARISON,
        ).item()
        assert (chosen[g].item(), rejected[g].item()) == (
            (2 * g, 2 * g + 1) if p > 0.5 else (2 * g + 1, 2 * g)
        )


# --------------------------------------------------------------------------- SL-CAI


def scripted_generator(model, tokenizer, prompts, config):
    """A real generator function (the Generator protocol) whose text is read off its prompt."""
    out = []
    for prompt in prompts:
        if prompt.endswith("Critique:"):
            request = prompt.split("Critique request: ")[-1].split("\n")[0]
            text = f" [critique for: {request}]"
        else:
            request = prompt.split("Revision request: ")[-1].split("\n")[0]
            response = prompt.split("Assistant: ")[1].split("\n\nCritique request")[0]
            text = f" {response.strip()} +{request}"
        out.append(Generation(text, (1,), (2,), None, "stop"))
    return out


def test_critique_and_revise_renders_the_requests_and_cycles_principles(tokenizer):
    config = GenerationConfig(max_new_tokens=8, do_sample=False)
    pairs = critique_and_revise(
        None, tokenizer, PROMPTS[:2], RESPONSES[:2], PRINCIPLES, config, num_rounds=2,
        generator=scripted_generator,
    )
    assert pairs[0] == RevisionPair(
        PROMPTS[0],
        RESPONSES[0],
        " Ask a locksmith. +Remove the harm. +Make it true.",
        (" [critique for: Say what is harmful.]", " [critique for: Say what is false.]"),
        ("harmless", "honest"),
    )
    # Response 1 starts one principle later in the cycle.
    assert pairs[1].principles == ("honest", "harmless")
    assert pairs[1].revised == " Hello! +Make it true. +Remove the harm."


def test_critique_and_revise_prompts_are_the_templates_filled_in(tokenizer):
    seen = []

    def recording_generator(model, tokenizer, prompts, config):
        seen.append(list(prompts))
        return scripted_generator(model, tokenizer, prompts, config)

    config = GenerationConfig(max_new_tokens=8, do_sample=False)
    [pair] = critique_and_revise(None, tokenizer, PROMPTS[:1], RESPONSES[:1], PRINCIPLES, config,
                                 generator=recording_generator)
    fields = {"prompt": PROMPTS[0], "response": RESPONSES[0],
              "critique_request": "Say what is harmful."}
    assert seen == [
        [CRITIQUE_TEMPLATE.format(**fields)],
        [REVISION_TEMPLATE.format(**fields, critique=pair.critiques[0],
                                  revision_request="Remove the harm.")],
    ]
    assert seen[1][0].startswith(seen[0][0])  # the revision prompt continues the critique's


@pytest.mark.slow
def test_critique_and_revise_with_the_tiny_model_is_deterministic(tokenizer):
    model = tiny_model("llama", seed=2)
    config = GenerationConfig(max_new_tokens=6, do_sample=False)
    first = critique_and_revise(model, tokenizer, PROMPTS, RESPONSES, PRINCIPLES, config)
    again = critique_and_revise(model, tokenizer, PROMPTS, RESPONSES, PRINCIPLES, config)
    assert first == again and [p.original for p in first] == RESPONSES
    assert all(len(p.critiques) == 1 and isinstance(p.revised, str) for p in first)
    with pytest.raises(ValueError, match="num_samples must be 1"):
        critique_and_revise(model, tokenizer, PROMPTS, RESPONSES, PRINCIPLES,
                            config._replace(num_samples=2))
    with pytest.raises(ValueError, match="'x' has no critique_request"):
        critique_and_revise(model, tokenizer, PROMPTS, RESPONSES, [Principle("x")], config)
    with pytest.raises(ValueError, match="num_rounds"):
        critique_and_revise(model, tokenizer, PROMPTS, RESPONSES, PRINCIPLES, config, 0)


@pytest.mark.slow
def test_preference_rollouts_are_groups_of_two_that_dpo_trains_on(tokenizer):
    pairs = [RevisionPair(p, r, r + " Stay safe.") for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    rollouts = create_preference_rollouts(
        tokenizer, [p.prompt for p in pairs], [p.revised for p in pairs],
        [p.original for p in pairs],
    )
    assert [r.group_id for r in rollouts] == [0, 0, 1, 1, 2, 2]
    assert [r.rewards for r in rollouts] == [1.0, 0.0] * 3
    assert list(rollouts[1].generation.token_ids) == (
        tokenizer(RESPONSES[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    )
    assert list(rollouts[0].generation.prompt_ids) == tokenizer(PROMPTS[0])["input_ids"]
    batch = rp.rollouts_to_batch(rollouts, tokenizer)
    chosen, rejected = rp.compute_dpo_pairs(batch.rewards, 2)
    assert chosen.tolist() == [0, 2, 4] and rejected.tolist() == [1, 3, 5]

    # One DPO step on the pairs raises the policy's margin for the revised responses.
    policy = tiny_model("qwen2", seed=0)
    config = rp.create_algorithm_config("dpo", beta=0.5)
    state = rp.create_training_state(policy, tokenizer, config, learning_rate=1e-3)
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    tc = batch.completion_ids.shape[1]
    batch = batch._replace(ref_logprobs=rp.get_reference_logprobs(
        state.ref_model, input_ids, batch.attention_mask, batch.completion_mask,
        completion_length=tc,
    ))

    def margin(model):
        with torch.no_grad():
            seq = rp.get_logprobs(model, input_ids, batch.attention_mask, batch.completion_mask,
                                  completion_length=tc).sum(-1)
        return (seq[0::2] - seq[1::2]).sum().item()

    before = margin(policy)
    state, stats = rp.training_step(state, batch, config)
    assert stats.skipped_updates == 0 and stats.loss > 0
    assert margin(policy) > before


def test_preference_rollouts_check_inputs(tokenizer):
    with pytest.raises(ValueError, match="same length"):
        create_preference_rollouts(tokenizer, ["a", "b"], ["x"], ["y"])
    with pytest.raises(ValueError, match=r"chosen\[0\] encodes to no tokens"):
        create_preference_rollouts(tokenizer, ["a"], [""], ["y"], add_eos=False)
    offset = create_preference_rollouts(tokenizer, ["a"], ["x"], ["y"], group_offset=7)
    assert [r.group_id for r in offset] == [7, 7]


# --------------------------------------------------------------------------- principles as data


def test_load_constitution_from_yaml_json_and_records(tmp_path):
    records = [p._asdict() for p in PRINCIPLES]
    path = tmp_path / "constitution.yaml"
    path.write_text(yaml.safe_dump({"principles": records}))
    assert load_constitution(path) == PRINCIPLES
    listed = tmp_path / "constitution.yml"
    listed.write_text("- name: brief\n  judge_question: Is it short?\n  weight: 2\n")
    assert load_constitution(str(listed)) == (
        Principle("brief", judge_question="Is it short?", weight=2.0),
    )
    as_json = tmp_path / "c.json"
    as_json.write_text(json.dumps(records))
    assert load_constitution(as_json) == PRINCIPLES
    assert load_constitution(records) == load_constitution(PRINCIPLES) == PRINCIPLES
    assert isinstance(load_constitution([{"name": "x", "weight": 1}])[0].weight, float)


@pytest.mark.parametrize(
    "source, error, match",
    [
        ([{"name": "x", "colour": "red"}], ValueError, r"unknown keys \['colour'\]"),
        ([{"judge_question": "?"}], ValueError, "needs a 'name'"),
        ([{"name": "x"}, {"name": "x"}], ValueError, r"unique, repeated: \['x'\]"),
        ([{"name": "x", "weight": -1.0}], ValueError, "weight must be finite and >= 0"),
        ([{"name": "x", "weight": float("nan")}], ValueError, "weight must be finite"),
        ([{"name": "x", "judge_question": 3}], TypeError, "judge_question must be a str"),
        ([], ValueError, "no principles"),
        ("harmless", ValueError, r"\.yaml, \.yml or \.json"),
        ({"name": "x"}, TypeError, "list of principles"),
        ([3], TypeError, r"source\[0\] must be a Principle"),
    ],
)
def test_load_constitution_rejects_bad_input(source, error, match):
    with pytest.raises(error, match=match):
        load_constitution(source)


def test_load_constitution_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rules:\n  - name: x\n")
    with pytest.raises(ValueError, match=r"\['rules'\] in .*bad.yaml"):
        load_constitution(path)
    path.write_text("- name: x\n  weight: [1\n")
    with pytest.raises(ValueError, match="cannot parse"):
        load_constitution(path)


# --------------------------------------------------------------------------- the task


def test_constitutional_task(judge, tokenizer):
    task = create_constitutional_task(judge, tokenizer, template=SHORT_COMPARISON)
    assert task.principles == HARMLESSNESS_PRINCIPLES and len(task.principles) == 4
    assert [item["human"] for item in task.prompts] == list(CONSTITUTIONAL_PROMPTS)
    assert task.prompts[0]["prompt"] == f"Human: {CONSTITUTIONAL_PROMPTS[0]}\n\nAssistant:"
    human = CONSTITUTIONAL_PROMPTS[1]
    rollouts = [
        Rollout(f"Human: {human}\n\nAssistant:", Generation(t, (), (), None, "stop"),
                group_id=0, metadata={"human": human})
        for t in (" Talk to them kindly.", " Poison the dog.")
    ]
    # The judge reads the human's words, not the rendered prompt.
    rewards = task.reward_fn.batched(rollouts)
    expected = compute_ai_preferences(
        judge, tokenizer, [human], [rollouts[0].generation.text],
        [rollouts[1].generation.text], HARMLESSNESS_PRINCIPLES, template=SHORT_COMPARISON,
    ).item()
    assert abs(rewards[0] - expected) < 1e-6 and abs(rewards[1] - (1 - expected)) < 1e-6
    judged = create_constitutional_task(
        judge, tokenizer, feedback="judge", prompts=["Hi"], template=SHORT_JUDGE
    )
    scores = compute_judge_scores(
        judge, tokenizer, [human] * 2, [r.generation.text for r in rollouts],
        HARMLESSNESS_PRINCIPLES, template=SHORT_JUDGE,
    )
    weights = torch.tensor([p.weight for p in HARMLESSNESS_PRINCIPLES])
    torch.testing.assert_close(
        torch.tensor(judged.reward_fn.batched(rollouts)), scores @ weights / weights.sum()
    )
    with pytest.raises(ValueError, match="metadata\\['human'\\]"):
        judged.reward_fn(rollouts[0]._replace(metadata=None))
    with pytest.raises(ValueError, match="feedback"):
        create_constitutional_task(judge, tokenizer, feedback="vibes")
