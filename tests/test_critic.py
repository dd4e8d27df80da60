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
