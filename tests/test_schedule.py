"""The shared learning-rate schedule gives, bit for bit, what the trainer and the warm start
each computed before they shared it (cached warm starts and measured runs depend on it)."""

import math

import pytest

from dqo_ray.train.schedule import lr_at


def trainer_before(step, warmup_steps, max_steps, schedule):
    """The trainer's former multiplier: warm-up, then decay to 0 at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup_steps) / max(1, max_steps - warmup_steps), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warm_start_before(step, lr, warmup_steps, steps, schedule):
    """The warm start's former rate: warm-up, then cosine to 10% of lr at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = steps - warmup_steps - 1
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_trainer_multiplier_is_unchanged(schedule):
    for max_steps in (1, 2, 7, 60, 601):
        for warmup in sorted({0, 1, 5, max_steps - 1}):
            if warmup >= max_steps:  # TrainerConfig refuses it
                continue
            for step in range(max_steps + 3):
                assert (lr_at(step, 1.0, warmup, max_steps, schedule)
                        == trainer_before(step, warmup, max_steps, schedule)), (step, warmup)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_warm_start_rate_is_unchanged(schedule):
    for lr in (3e-3, 1e-4, 0.7, 1.0):
        for steps in (1, 2, 20, 600, 1000):
            for warmup in (0, 1, 2, 30, 50, steps - 1, steps, steps + 3):
                for step in range(steps):
                    assert (lr_at(step, lr, warmup, steps - 1, schedule, min_lr_ratio=0.1)
                            == warm_start_before(step, lr, warmup, steps, schedule))


def test_shape():
    lrs = [lr_at(i, 1.0, 4, 19, min_lr_ratio=0.1) for i in range(20)]
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert lr_at(25, 2.0, 4, 19, "linear", min_lr_ratio=0.5) == 1.0  # floor held after the end
    assert lr_at(0, 2.0, 0, 0, min_lr_ratio=0.1) == pytest.approx(0.2)  # a single step: floor
    assert [lr_at(i, 1.0, 4, 19, "constant") for i in range(4, 20)] == [1.0] * 16
