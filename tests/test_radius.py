"""TRAM's radius (optim/radius.py): the calibrated scale, the transforms, d every N steps; through the engine:
k = 1 vs 4 and resume mid- and after calibration, exactly (float64). 1 vs 2 processes: tests/test_distributed.py."""

import csv
import io
import json
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
        calibration_start=0,
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


@pytest.mark.parametrize("stop", [2, 5])
def test_a_radius_restored_from_its_state_continues_as_the_uninterrupted_one(stop):
    """The radius's state through torch.save/load (as a checkpoint holds it), stopped mid-calibration (2 of 4
    steps) or after it (step 6 then reuses step 5's radius under radius_every=2): every later radius equals the
    uninterrupted policy's. The run-level resume tests below go through the engine."""
    values = [2e-4, 1e-4, 4e-4, 3e-4, 5e-4, 6e-4, 3.6e-4, 8e-4]  # the scale: 0.5 / median(2e-4, 1e-4, 4e-4, 3e-4)

    def run(policy, steps):
        return [float(policy(s, d(values[s - 1]) if policy.measures(s) else None)) for s in steps]

    full = TrustRegionRadius(radius_config(radius_every=2))
    expected = run(full, range(1, len(values) + 1))
    stopped = TrustRegionRadius(radius_config(radius_every=2))
    run(stopped, range(1, stop + 1))
    saved = io.BytesIO()
    torch.save(stopped.state_dict(), saved)
    saved.seek(0)
    resumed = TrustRegionRadius(radius_config(radius_every=2))
    resumed.load_state_dict(torch.load(saved, weights_only=True), torch.device("cpu"))
    assert expected[4:] == pytest.approx([1.25, 1.25, 0.9, 0.9])  # steps 6 and 8 reuse the radius before
    assert run(resumed, range(stop + 1, len(values) + 1)) == expected[stop:]


def test_the_default_cap_is_radius_target_under_auto_and_holds_on_every_step_after_calibration():
    policy = TrustRegionRadius(radius_config(max_radius="auto", calibration_steps=2))
    growing = [1e-4 * 1.5**k for k in range(30)]  # a d that keeps growing, as tram-init's drift from θ_0
    radii = [float(policy(step, d(v))) for step, v in enumerate(growing, start=1)]
    assert radii == [0.5] * 30  # scale · d = 0.5 · 1.5^(step-1) from step 3 on: above the cap, held at it
    assert float(policy.logged()["radius_capped"]) == 1.0
    small = [float(policy(step, d(v))) for step, v in enumerate([2e-5, 5e-5, 8e-5], start=31)]
    assert small == pytest.approx([0.1, 0.25, 0.4]) and float(policy.logged()["radius_capped"]) == 0.0
    summary = policy.summary()
    assert summary["steps_after_calibration"] == 31 and summary["max_radius"] == 0.5
    assert summary["capped_fraction"] == pytest.approx(28 / 31)  # steps 3-30 above the cap, 31-33 below it
    assert summary["median_radius_over_target"] == 1.0 and summary["behaved_as_asam"]
    assert "behaved as ASAM at ρ = 0.5" in policy.describe("tram-init")


def test_no_cap_with_a_numeric_scale_unless_set_and_none_restores_the_uncapped_radius():
    fixed = TrustRegionRadius(radius_config(radius_scale=1000.0, max_radius="auto"))
    assert float(fixed(1, d(0.01))) == pytest.approx(10.0) and fixed.logged() == {}  # the paper's raw d: no cap
    assert fixed.summary()["capped_fraction"] is None and "no cap" in fixed.describe("tram-prev")
    assert float(TrustRegionRadius(radius_config(radius_scale=1000.0, max_radius=2.0))(1, d(0.01))) == 2.0
    uncapped = TrustRegionRadius(radius_config(max_radius="none", calibration_steps=1))
    uncapped(1, d(1e-4))
    assert float(uncapped(2, d(1e-3))) == pytest.approx(5.0)  # ten times radius_target, as before the cap


def test_a_cap_below_radius_target_holds_while_calibrating_too():
    policy = TrustRegionRadius(radius_config(max_radius=0.2, calibration_steps=2, calibration_start=1))
    assert [float(policy(step, d(1e-4))) for step in (1, 2, 3, 4)] == [0.2, 0.2, 0.2, 0.2]
    assert float(policy.scale) == pytest.approx(0.5 / 1e-4)  # the scale still targets radius_target


def test_the_window_opens_after_calibration_start_and_ignores_d_before_it():
    policy = TrustRegionRadius(radius_config(calibration_steps=2, calibration_start=3, radius_every=2))
    assert [s for s in range(1, 12) if policy.measures(s)] == [1, 2, 3, 4, 5, 6, 8, 10]
    seen = [float(policy(step, d(v))) for step, v in enumerate([9.0, 9.0, 9.0, 2e-4, 1e-4], start=1)]
    assert seen == [0.5] * 5 and "radius_capped" not in policy.logged()
    assert float(policy.scale) == pytest.approx(0.5 / 1e-4)  # the median of steps 4-5 only
    assert float(policy(6, d(3e-4))) == pytest.approx(1.5) and policy.summary()["capped_fraction"] is None


def test_the_message_says_asam_only_when_most_steps_were_capped():
    policy = TrustRegionRadius(radius_config(max_radius="auto", calibration_steps=1))
    for step, v in enumerate([1e-4, 2e-4, 5e-5, 5e-5], start=1):  # after calibration: 1 of 3 steps capped
        policy(step, d(v))
    assert float(policy.logged()["radius_capped"]) == 0.0
    summary = policy.summary()
    assert summary["capped_fraction"] == pytest.approx(1 / 3) and not summary["behaved_as_asam"]
    assert summary["median_radius_over_target"] == pytest.approx(0.5)
    assert "at the cap (max_radius 0.5) on 33% of them" in policy.describe("tram-prev")
    assert "ASAM" not in policy.describe("tram-prev")


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
        ("optimizer.radius_target=-0.5", "radius_target must be > 0, got -0.5"),  # validated once, with one bound
        ("optimizer.radius_target=0", "radius_target must be > 0, got 0.0: a zero radius never perturbs"),
        ("optimizer.max_radius=big", "max_radius must be auto .* none, or a number >= 0; got 'big'"),
        ("optimizer.max_radius=-1", "max_radius must be auto"),
        ("optimizer.calibration_start=-2", "calibration_start must be warmup .* or an integer >= 0, got -2"),
        ("optimizer.calibration_start=soon", "calibration_start must be warmup"),
    ],
)
def test_bad_radius_settings_are_refused_at_config_time(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        small_config(tmp_path, tmp_path / "run", "tram-prev", extra=[override])
    assert not (tmp_path / "run").exists()  # before anything is written


def test_the_radius_sentinels_are_values_once_the_config_is_resolved(tmp_path):
    """calibration_start=warmup is the schedule's warm-up, max_radius auto is radius_target under radius_scale=auto
    and no cap under a numeric scale, none is no cap: numbers (or null) from config time on, in config.yaml too."""
    warm = small_config(tmp_path, tmp_path / "run", "tram-prev", extra=["schedule.warmup_steps=7",
                                                                        "optimizer.radius_target=0.3"])  # fmt: skip
    assert warm.optimizer.calibration_start == 7 and warm.optimizer.max_radius == 0.3
    numeric = small_config(tmp_path, tmp_path / "run", "tram-prev", extra=["optimizer.radius_scale=2"])
    assert numeric.optimizer.max_radius is None
    assert small_config(tmp_path, tmp_path / "run", "tram-prev").optimizer.calibration_start == 0  # no warm-up
    set_ = small_config(tmp_path, tmp_path / "run", "tram-x", extra=["optimizer.calibration_start=3",
                                                                     "optimizer.max_radius=none"])  # fmt: skip
    assert set_.optimizer.calibration_start == 3 and TrustRegionRadius(set_.optimizer).max_radius is None


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
    # a seed and rate where steps 4-5 are inside the cap and step 6 is at it
    extra = [*CALIBRATED, "optimizer.radius_every=2", "trainer.save_every=1", "model.dropout=0.1", "trainer.seed=4"]
    extra.append("optimizer.lr=0.3")
    full = train(small_config(corpus, tmp_path / "full", "tram-prev", steps=6, extra=extra))
    train(small_config(corpus, tmp_path / "cut", "tram-prev", steps=stop, extra=extra))
    resumed = train(small_config(corpus, tmp_path / "cut", "tram-prev", steps=6, extra=[*extra, "trainer.resume=auto"]))
    keys = ("loss", "d", "radius", "e_norm", "radius_scale", "radius_capped")
    assert [{k: s.get(k) for k in keys} for s in resumed.history] == [
        {k: s.get(k) for k in keys} for s in full.history[stop:]
    ]
    assert {s.get("radius_capped") for s in full.history[3:]} == {0.0, 1.0}  # the cap bites on some steps
    assert max_param_diff(trajectory(resumed)["params"], trajectory(full)["params"]) == 0.0
    summary = [json.loads((tmp_path / r / "results.json").read_text())["rule"] for r in ("full", "cut")]
    assert summary[0] == summary[1] and summary[0]["radius"]["steps_after_calibration"] == 3  # the whole run's


def test_tram_init_drifting_stays_inside_the_cap_and_the_run_says_it_behaved_as_asam(corpus, tmp_path, capsys):
    """tram-init's d (the KL to θ_0) grows as SGD drifts from the start: calibrated in the window after the
    warm-up, its radius would run away; capped, it holds ASAM's ρ and the run says so."""
    extra = ["optimizer.base=sgd", "optimizer.calibration_steps=2", "schedule.warmup_steps=2", "trainer.log_every=1"]
    run = train(small_config(corpus, tmp_path / "run", "tram-init", steps=10, extra=extra))
    h = run.history
    assert [s["radius"] for s in h[:4]] == [0.5] * 4  # the warm-up and the window climb radius_target
    window = sorted(s["d"] for s in h[2:4])
    assert h[4]["radius_scale"] == pytest.approx(0.5 / window[0], rel=EXACT_REL)  # steps 3-4's d, not 1-2's
    after = h[4:]
    assert all(s["d"] > window[1] for s in after)  # the drift: d keeps growing past the window
    assert all(s["radius"] == 0.5 and s["radius_capped"] == 1.0 for s in after)  # min(scale · d, 0.5)
    results = json.loads((tmp_path / "run" / "results.json").read_text())["rule"]["radius"]
    assert results == {"steps_after_calibration": 6, "max_radius": 0.5, "capped_fraction": 1.0,
                       "median_radius_over_target": 1.0, "behaved_as_asam": True}  # fmt: skip
    assert "For most of the run tram-init behaved as ASAM at ρ = 0.5" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "run" / "logs" / "csv" / "metrics.csv").open()))
    assert [r["radius_capped"] for r in rows if r.get("radius_capped")][-6:] == ["1.0"] * 6  # logged per step
