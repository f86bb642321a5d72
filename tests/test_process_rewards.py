"""Process-reward step splitting and potential-based shaping."""

import math

import pytest
import torch

from dqo_ray.algo.process_rewards import shaped_step_rewards, soft_step_values, step_ends


def test_step_ends_at_delimiter_tokens_and_the_last_token():
    tokens = ["Tom", " has", " 3", ".\n", "He", " eats", " 1", ".\n", "answer", ":", " 2", "</s>"]
    assert step_ends(tokens) == [3, 7, 11]
    assert step_ends(["a", "b\n"]) == [1]  # ends on a delimiter: no empty extra step
    assert step_ends(["one step"]) == [0]
    assert step_ends([]) == []
    assert step_ends(["a", ";", "b"], delimiter=";") == [1, 2]


def test_shaped_rewards_telescope_to_outcome_minus_prompt_value():
    values = [0.25, 0.5, 0.5, 1.0]  # p_0 (prompt), p_1, p_2, p_3 = outcome
    rewards = shaped_step_rewards(values, alpha=2.0)
    assert rewards == [0.5, 0.0, 1.0]
    assert sum(rewards) == pytest.approx(2.0 * (values[-1] - values[0]))
    assert shaped_step_rewards([0.3], alpha=1.0) == []


def test_soft_step_values_are_the_soft_value_of_a_bernoulli_outcome():
    p = torch.tensor([0.0, 0.25, 0.5, 1.0])
    values = soft_step_values(p, beta=0.5)
    expected = [0.5 * math.log(1 - q + q * math.exp(1 / 0.5)) for q in p.tolist()]
    torch.testing.assert_close(values, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    assert values[0] == 0 and values[-1] == pytest.approx(1.0)
    # other reward values; p = 0 / 1 give exactly r_incorrect / r_correct
    other = soft_step_values(p, beta=0.5, reward_correct=2.0, reward_incorrect=-1.0)
    assert other[0].item() == pytest.approx(-1.0) and other[-1].item() == pytest.approx(2.0)
    # a small beta (e^(1/beta) overflows float32) stays finite, between mean and max
    small = soft_step_values(p, beta=0.005)
    assert torch.isfinite(small).all() and small.dtype == p.dtype
    assert bool((small >= p - 1e-6).all()) and bool((small <= 1 + 1e-6).all())
    assert small[1].item() == pytest.approx(1 + 0.005 * math.log(0.25), rel=1e-5)
