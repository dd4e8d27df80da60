"""Tests for rlprim.critic: the value model and the alignment of per-token values."""

import pytest
import torch

from rlprim.critic import create_value_model, get_values
from rlprim.testing import tiny_model


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
def test_value_model_starts_at_zero_with_the_policy_trunk(arch):
    policy = tiny_model(arch, seed=0)
    critic = create_value_model(policy)
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    values = get_values(critic, ids, mask, completion_length=3)
    assert values.shape == (2, 3) and torch.all(values == 0)
    # the trunk is a copy of the policy's: same hidden states, separate storage
    h_policy = policy.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    h_critic = critic.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(h_policy, h_critic)
    p0 = next(policy.base_model.parameters())
    c0 = next(critic.base_model.parameters())
    assert p0.data_ptr() != c0.data_ptr()


def test_values_are_the_outputs_before_each_completion_token():
    policy = tiny_model("qwen2", seed=1)
    critic = create_value_model(policy)
    with torch.no_grad():
        critic.score.weight.normal_(generator=torch.Generator().manual_seed(2))
    ids = torch.randint(3, 60, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    tc = 4
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    full = critic(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[..., 0]
    expected = full[:, 9 - tc - 1 : 9 - 1]
    torch.testing.assert_close(get_values(critic, ids, mask, tc), expected)
    cmask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(get_values(critic, ids, mask, tc, cmask), expected * cmask)


def test_values_flow_gradients_and_accept_a_plain_function():
    policy = tiny_model("gpt2", seed=0)
    critic = create_value_model(policy, init_from_policy=False)
    ids = torch.randint(3, 60, (2, 6))
    mask = torch.ones_like(ids)
    get_values(critic, ids, mask, 2).sum().backward()
    head = critic.classifier  # GPT-2's token-classification head
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    fn = lambda i, m: (i * m).float()  # noqa: E731
    assert get_values(fn, ids, mask, 2).tolist() == ids[:, 3:5].float().tolist()


def test_bad_inputs():
    policy = tiny_model("qwen2")
    critic = create_value_model(policy)
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="completion_length"):
        get_values(critic, ids, torch.ones_like(ids), 5)
    with pytest.raises(ValueError, match="input_ids and attention_mask"):
        get_values(critic, ids, torch.ones(2, 4), 2)
    with pytest.raises(TypeError, match="config"):
        create_value_model(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------- seed 004's critic
# A value model of seed 004's shape: forward(input_ids, attention_mask) -> [B], the value of the
# last position read from a value head on a causal LM's last hidden state.


class SeedValueModel(torch.nn.Module):
    def __init__(self, base_model, hidden_size=128):
        super().__init__()
        self.base_model = base_model
        self.value_head = torch.nn.Sequential(
            torch.nn.Linear(hidden_size, 256),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(256, 1),
        )

    def forward(self, input_ids, attention_mask):
        outputs = self.base_model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )
        hidden = outputs.hidden_states[-1][:, -1, :]
        return self.value_head(hidden).squeeze(-1)


class LastTokenValue(torch.nn.Module):
    """V(sequence) = table[last token id]: values anyone can check by hand."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.arange(100, dtype=torch.float32))

    def forward(self, input_ids, attention_mask):
        return self.table[input_ids[:, -1]]


def test_per_sequence_critic_gives_the_value_of_each_prefix():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 11, 12, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])
    # Tc = 3: V_t is the value at position Tp + t - 1 = 3, 4, 5, i.e. ids[:, 3:6].
    values = get_values(LastTokenValue(), ids, mask, 3)
    assert values.tolist() == [[6.0, 7.0, 8.0], [4.0, 11.0, 12.0]]
    cmask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert get_values(LastTokenValue(), ids, mask, 3, cmask).tolist() == [
        [6.0, 7.0, 8.0], [4.0, 11.0, 0.0]
    ]
    column = get_values(lambda i, m: LastTokenValue()(i, m).unsqueeze(-1), ids, mask, 3)
    assert column.tolist() == values.tolist()  # [B, 1] is one value per sequence too


def test_seed_value_model_matches_its_forward_on_each_prefix_and_trains():
    critic = SeedValueModel(tiny_model("llama", seed=4)).eval()
    ids = torch.randint(3, 60, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    values = get_values(critic, ids, mask, 3)
    with torch.no_grad():  # the reference: one unpadded forward per row and prefix
        expected = [
            [critic(ids[b : b + 1, :end], mask[b : b + 1, :end]).item() for end in (5, 6, 7)]
            for b in range(2)
        ]
    torch.testing.assert_close(values, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    values.sum().backward()
    assert critic.value_head[3].weight.grad.abs().sum() > 0


def test_seed_value_model_is_the_critic_of_ppo():
    from rlprim.algorithms import create_algorithm_config
    from rlprim.data import create_prompt_loader
    from rlprim.testing import tiny_tokenizer
    from rlprim.training import create_training_state, train
    from rlprim.types import GenerationConfig

    tokenizer = tiny_tokenizer()
    policy = tiny_model("qwen2", seed=0)
    critic = SeedValueModel(tiny_model("qwen2", seed=1))
    config = create_algorithm_config("ppo", minibatch_size=4)
    state = create_training_state(policy, tokenizer, config, learning_rate=1e-2, value_model=critic)
    assert state.value_model is critic
    head_before = critic.value_head[3].weight.detach().clone()
    log = []
    prompts = [{"prompt": "1+1="}, {"prompt": "2+2="}]
    state = train(
        state, create_prompt_loader(prompts, batch_size=2, seed=0), 1,
        GenerationConfig(max_new_tokens=3, num_samples=2, seed=0), config,
        lambda rollout: float(len(rollout.generation.text)), logger=log.append, progress=False,
    )
    assert len(log) == 1 and torch.isfinite(torch.tensor(log[0].value_loss))
    assert not torch.equal(critic.value_head[3].weight, head_before)


def test_critic_of_another_shape_gets_an_error_naming_the_shapes():
    from rlprim.testing import tiny_reward_model

    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    with pytest.raises(ValueError, match=r"\[B, T, 1\].*\(2, 1\)"):
        get_values(tiny_reward_model("qwen2"), ids, mask, 2)  # one value per sequence, HF
    with pytest.raises(ValueError, match=r"\[B, T\] or \[B, T, 1\].*\(2, 5, 2\)"):
        get_values(lambda i, m: torch.zeros(2, 5, 2), ids, mask, 2)
    with pytest.raises(ValueError, match=r"\[B\] / \[B, 1\].*\(3,\)"):
        get_values(lambda i, m: torch.zeros(3), ids, mask, 2)
    with pytest.raises(ValueError, match=r"every prefix.*\(2, 3\)"):
        get_values(lambda i, m: torch.zeros(2) if i.shape[1] == 5 else i.float(), ids, mask, 2)
