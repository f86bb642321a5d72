"""Process-reward step splitting and potential-based shaping."""

import pytest

from dqo_ray.algo.process_rewards import shaped_step_rewards, step_ends


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
