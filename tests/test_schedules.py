"""LR schedules: pure functions of the 1-based step (a resumed run needs no scheduler state); values by hand."""

import math

import pytest

from fabric_tram.config import load_config
from fabric_tram.optim.schedules import lr_factor


def schedule(name: str, **keys):
    overrides = [f"schedule.name={name}", *(f"schedule.{k}={v}" for k, v in keys.items())]
    return load_config(None, ["model.name=gpt2", "task.name=lm", "optimizer.name=adam", *overrides]).schedule


def test_linear_warmup_is_lr_times_s_over_w_then_constant():
    s = schedule("constant", warmup_steps=4)
    assert [lr_factor(s, step, 10) for step in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(schedule("constant"), 1, 10) == 1.0  # no warm-up: the peak from step 1


def test_polynomial_decays_from_the_peak_after_warmup_to_end_factor_at_the_last_step():
    s = schedule("polynomial", warmup_steps=2, power=1.0, end_factor=0.0)
    # after warm-up: 1 - (step - 2) / (10 - 2)
    assert [lr_factor(s, step, 10) for step in (1, 2, 3, 6, 10)] == pytest.approx([0.5, 1.0, 0.875, 0.5, 0.0])
    squared = schedule("polynomial", warmup_steps=0, power=2.0, end_factor=0.1)
    # 0.1 + 0.9 * (1 - step / 10) ** 2
    assert lr_factor(squared, 5, 10) == pytest.approx(0.1 + 0.9 * 0.25)
    assert lr_factor(squared, 10, 10) == pytest.approx(0.1)


def test_cosine_decays_along_half_a_cosine_to_end_factor():
    s = schedule("cosine", warmup_steps=0, end_factor=0.0)
    assert lr_factor(s, 5, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(s, 10, 10) == pytest.approx(0.0, abs=1e-12)
    warm = schedule("cosine", warmup_steps=5, end_factor=0.2)
    assert lr_factor(warm, 5, 15) == 1.0  # the last warm-up step is the peak
    assert lr_factor(warm, 10, 15) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_negative_warmup_is_refused():
    with pytest.raises(ValueError, match="schedule.warmup_steps must be >= 0"):
        lr_factor(schedule("constant", warmup_steps=-1), 1, 10)
