"""TRAM's radius (optim/radius.py): the calibrated scale, the transforms, d every N steps; through the engine:
k = 1 vs 4 and resume mid- and after calibration, exactly (float64). 1 vs 2 processes: tests/test_distributed.py."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import EXACT_ABS, EXACT_REL, assert_histories_match, max_param_diff, small_config, trajectory

from fabric_tram.config import ConfigError
from fabric_tram.engine.trainer import train
from fabric_tram.optim.radius import TrustRegionRadius


def radius_config(**overrides):
    fields = dict(
        radius_scale="auto",
        radius_target=0.5,
        calibration_steps=4,
        radius_transform="linear",
        radius_every=1,
        max_radius=None,
    )
    return SimpleNamespace(**{**fields, **overrides})


def d(value):
    return torch.tensor(value, dtype=torch.float64)


def test_calibration_climbs_the_target_then_fixes_the_scale_from_the_median_of_positive_d():
    policy = TrustRegionRadius(radius_config())
    # step 1 of tram-prev: d = 0 (the target is the model) and a skipped step's NaN are left out of the median
    seen = [policy(step, d(v)) for step, v in enumerate([0.0, 4e-4, math.nan, 1e-4], start=1)]
    assert seen == [0.5] * 4 and policy.logged()["radius_scale"] == pytest.approx(0.5 / 1e-4)  # median(4e-4, 1e-4)
    assert float(policy(5, d(3e-4))) == pytest.approx(0.5 / 1e-4 * 3e-4)  # then scale · d


def test_median_is_the_lower_middle_value_and_max_radius_clamps():
    policy = TrustRegionRadius(radius_config(max_radius=2.0))
    for step, v in enumerate([1e-3, 2e-3, 3e-3, 4e-3], start=1):
        policy(step, d(v))
    assert float(policy.scale) == pytest.approx(0.5 / 2e-3)
    assert float(policy(5, d(1e-2))) == 2.0  # 2.5 clamped


def test_sqrt_transform_is_the_square_root_of_twice_d():
    policy = TrustRegionRadius(radius_config(radius_transform="sqrt", calibration_steps=1))
    policy(1, d(0.02))  # √(2 · 0.02) = 0.2
    assert float(policy.scale) == pytest.approx(0.5 / 0.2)
    assert float(policy(2, d(0.08))) == pytest.approx(0.5 / 0.2 * 0.4)


def test_a_fixed_scale_never_calibrates():
    policy = TrustRegionRadius(radius_config(radius_scale=3.0))
    assert float(policy(1, d(0.1))) == pytest.approx(0.3) and policy.logged() == {}


def test_measurement_schedule_of_radius_every():
    auto = TrustRegionRadius(radius_config(calibration_steps=3, radius_every=4))
    assert [s for s in range(1, 17) if auto.measures(s)] == [1, 2, 3, 4, 8, 12, 16]  # every step while calibrating
    fixed = TrustRegionRadius(radius_config(radius_scale=1.0, radius_every=4))
    assert [s for s in range(1, 17) if fixed.measures(s)] == [1, 5, 9, 13]
    fixed(1, d(0.25))
    assert float(fixed(2, None)) == 0.25  # reused between measurements


def test_no_positive_d_while_calibrating_is_a_clear_error():
    policy = TrustRegionRadius(radius_config(calibration_steps=2))
    policy(1, d(0.0))
    with pytest.raises(ValueError, match="radius_scale=auto: d was zero or not finite on all 2 calibration steps"):
        policy(2, d(0.0))


@pytest.mark.parametrize(
    "override,message",
    [
        ("optimizer.radius_transform=cube", "radius_transform must be one of linear, sqrt, got 'cube'"),
        ("optimizer.radius_every=0", "radius_every must be an integer >= 1"),
        ("optimizer.calibration_steps=0", "calibration_steps must be an integer >= 1"),
        ("optimizer.radius_scale=big", "radius_scale must be auto or a number >= 0, got 'big'"),
        ("optimizer.radius_scale=-1", "radius_scale must be auto or a number >= 0"),
        ("optimizer.radius_target=-0.5", "radius_target must be >= 0"),
    ],
)
def test_bad_radius_settings_are_refused_at_config_time(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        small_config(tmp_path, tmp_path / "run", "tram-prev", extra=[override])
    assert not (tmp_path / "run").exists()  # before anything is written


# ------------------------------------------------------------------------------------------- through the engine

CALIBRATED = ["optimizer.calibration_steps=3", "optimizer.base=sgd"]


@pytest.mark.slow
def test_calibration_and_reuse_match_with_one_and_four_micro_batches(corpus, tmp_path):
    extra = [*CALIBRATED, "optimizer.radius_every=2", "optimizer.radius_transform=sqrt"]

    def run(micro, k):
        r = train(
            small_config(corpus, tmp_path / f"k{k}", "tram-prev", micro=micro, accumulate=k, steps=6, extra=extra)
        )
        return r.history, trajectory(r)["params"]

    (one, p1), (four, p4) = run(8, 1), run(2, 4)
    assert_histories_match(one, four, ("loss", "d", "radius", "e_norm", "radius_scale"), label="tram-prev")
    assert [s["passes/no_grad_forward"] for s in one] == [1, 1, 1, 1, 0, 1]  # d on steps 1-3, 4, 6
    assert one[4]["radius"] == one[3]["radius"]  # step 5 reuses step 4's radius
    positive = sorted(math.sqrt(2 * s["d"]) for s in one[:3] if s["d"] > 0)
    assert one[3]["radius_scale"] == pytest.approx(0.5 / positive[(len(positive) - 1) // 2], rel=EXACT_REL)
    assert max_param_diff(p1, p4) < EXACT_ABS


@pytest.mark.slow
@pytest.mark.parametrize("stop", [2, 4])  # mid-calibration; after it, on a step that reuses the last radius
def test_resume_mid_and_after_calibration_continues_exactly(corpus, tmp_path, stop):
    extra = [*CALIBRATED, "optimizer.radius_every=2", "trainer.save_every=1", "model.dropout=0.1"]
    full = train(small_config(corpus, tmp_path / "full", "tram-prev", steps=6, extra=extra))
    train(small_config(corpus, tmp_path / "cut", "tram-prev", steps=stop, extra=extra))
    resumed = train(small_config(corpus, tmp_path / "cut", "tram-prev", steps=6, extra=[*extra, "trainer.resume=auto"]))
    keys = ("loss", "d", "radius", "e_norm", "radius_scale")
    assert [{k: s.get(k) for k in keys} for s in resumed.history] == [
        {k: s.get(k) for k in keys} for s in full.history[stop:]
    ]
    assert max_param_diff(trajectory(resumed)["params"], trajectory(full)["params"]) == 0.0
