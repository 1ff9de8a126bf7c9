"""trainer.global_batch_size kept exactly however it is cut, and trainer.micro_batch_size=auto: the largest divisor of
the per-process batch whose estimate fits the preflight's share of the free memory (here the CPU's, set by the
test), printed, written to config.yaml, and the same run as the explicit setting; refused in one line when
even 1 does not fit or the numbers do not divide."""

import pytest
import torch
import yaml
from conftest import small_config

import fabric_tram.engine.preflight as preflight
from fabric_tram.config import ConfigError
from fabric_tram.engine.batch_size import resolve_batch_size
from fabric_tram.engine.estimate import estimate
from fabric_tram.engine.trainer import train

CPU = torch.device("cpu")


def auto_config(corpus, run_dir, global_batch=24, extra=()):
    return small_config(corpus, run_dir, "tram-prev", steps=2, extra=["trainer.micro_batch_size=auto",
                        f"trainer.global_batch_size={global_batch}", "optimizer.radius_scale=1", *extra])  # fmt: skip


def expected_micro(config, free: float, per_process: int) -> int | None:
    """Brute force over every divisor: the largest whose estimate is within 0.9 of ``free``."""
    fits = []
    for micro in range(1, per_process + 1):
        if per_process % micro == 0:
            config.trainer.micro_batch_size, config.trainer.accumulate = micro, per_process // micro
            if estimate(config, devices=1)["total_bytes"] <= 0.9 * free:
                fits.append(micro)
    return max(fits) if fits else None


@pytest.mark.parametrize("micro_fits", [1, 3, 8, 24])
def test_auto_takes_the_largest_divisor_that_fits_and_keeps_the_global_batch(corpus, tmp_path, monkeypatch,
                                                                             micro_fits):  # fmt: skip
    """Free memory set just above what the estimate needs at ``micro_fits`` (divisors of 24: 1 2 3 4 6 8 12 24):
    that one is chosen, accumulate makes up 24, and a brute force over every divisor agrees."""
    probe = small_config(corpus, tmp_path / "probe", "tram-prev", micro=micro_fits, accumulate=24 // micro_fits,
                         extra=["optimizer.radius_scale=1"])  # fmt: skip
    free = estimate(probe, devices=1)["total_bytes"] / 0.9 + 1
    monkeypatch.setattr(preflight, "cpu_available_bytes", lambda: free)
    config = auto_config(corpus, tmp_path / "run")
    note = resolve_batch_size(config, 1, CPU)
    assert (config.trainer.micro_batch_size, config.trainer.accumulate) == (micro_fits, 24 // micro_fits)
    assert expected_micro(auto_config(corpus, tmp_path / "x"), free, 24) == micro_fits
    assert note.startswith(f"trainer.micro_batch_size=auto: {micro_fits}, accumulate {24 // micro_fits} (global "
                           f"batch 24 = {micro_fits} × {24 // micro_fits} × 1 process(es))")  # fmt: skip
    larger = {1: 2, 3: 4, 8: 12}.get(micro_fits)
    assert (f"; {larger} would need" in note) == (larger is not None)


def test_an_auto_run_prints_and_records_its_choice_and_is_the_explicit_run(corpus, tmp_path, monkeypatch, capsys):
    probe = small_config(corpus, tmp_path / "probe", "tram-prev", micro=6, accumulate=4,
                         extra=["optimizer.radius_scale=1"])  # fmt: skip
    monkeypatch.setattr(preflight, "cpu_available_bytes", lambda: estimate(probe, devices=1)["total_bytes"] / 0.9 + 1)
    auto = train(auto_config(corpus, tmp_path / "auto"))
    assert "trainer.micro_batch_size=auto: 6, accumulate 4 (global batch 24" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["trainer"]
    assert (saved["micro_batch_size"], saved["accumulate"], saved["global_batch_size"]) == (6, 4, 24)
    explicit = train(small_config(corpus, tmp_path / "explicit", "tram-prev", micro=6, accumulate=4, steps=2,
                                  extra=["optimizer.radius_scale=1"]))  # fmt: skip
    assert [s["loss"] for s in auto.history] == [s["loss"] for s in explicit.history]
    assert all(s["n_local"] == explicit.history[i]["n_local"] for i, s in enumerate(auto.history))


def test_auto_is_refused_with_the_numbers_when_even_one_does_not_fit_and_nothing_is_written(corpus, tmp_path,
                                                                                            monkeypatch):  # fmt: skip
    monkeypatch.setattr(preflight, "cpu_available_bytes", lambda: 1024.0)
    with pytest.raises(ConfigError, match=r"micro_batch_size=auto: even a micro-batch of 1 does not fit. this run "
                                          r"needs about .* GiB per device"):  # fmt: skip
        train(auto_config(corpus, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_every_rank_takes_the_smallest_choice(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "cpu_available_bytes", lambda: 1e15)  # here 12 of 12 per process would fit
    config = auto_config(corpus, tmp_path / "run")
    resolve_batch_size(config, 2, CPU, agree=lambda micro: min(micro, 4))  # the other rank could take 4
    assert (config.trainer.micro_batch_size, config.trainer.accumulate, config.trainer.global_batch_size) == (4, 3, 24)


@pytest.mark.parametrize("overrides, world, message", [
    (["trainer.micro_batch_size=auto"], 1, "micro_batch_size=auto needs trainer.global_batch_size"),
    (["trainer.global_batch_size=25"], 2, "global_batch_size=25 does not divide into 2 process"),
    (["trainer.global_batch_size=24", "trainer.micro_batch_size=5"], 1, r"is 24 examples each, not a multiple of "
                                                                        r"trainer.micro_batch_size=5: choose a divisor"
                                                                        r" of 24 \(1, 2, 3, 4, 6, 8, 12, 24\)"),
    (["trainer.global_batch_size=24", "trainer.micro_batch_size=4", "trainer.accumulate=2"], 1,
     r"trainer.accumulate=2 disagrees with trainer.global_batch_size=24 = 4 × 6 × 1"),
    (["trainer.micro_batch_size=big"], 1, "micro_batch_size must be a positive integer or auto, got 'big'"),
    (["trainer.global_batch_size=0"], 1, "trainer.global_batch_size must be >= 1"),
])  # fmt: skip
def test_batch_settings_that_do_not_divide_are_refused_naming_the_fix(corpus, tmp_path, overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        config = small_config(corpus, tmp_path / "run", "sgd", extra=overrides)
        resolve_batch_size(config, world, CPU)


def test_a_global_batch_with_an_explicit_micro_batch_sets_accumulate(corpus, tmp_path):
    config = small_config(corpus, tmp_path / "run", "sgd", micro=3, extra=["trainer.global_batch_size=24"])
    assert resolve_batch_size(config, 2, CPU) is None
    assert (config.trainer.micro_batch_size, config.trainer.accumulate) == (3, 4)  # 3 × 4 × 2 = 24


def test_auto_leaves_the_preflights_margin_free(corpus, tmp_path, monkeypatch):
    """Free memory at 1/0.95 of what micro-batch 8 needs: 8 would take 95% of it, over the 90% a run may take, so
    a smaller one is chosen (the brute force over every divisor, with the margin written out, agrees)."""
    probe = small_config(corpus, tmp_path / "probe", "tram-prev", micro=8, accumulate=3,
                         extra=["optimizer.radius_scale=1"])  # fmt: skip
    free = estimate(probe, devices=1)["total_bytes"] / 0.95
    monkeypatch.setattr(preflight, "cpu_available_bytes", lambda: free)
    config = auto_config(corpus, tmp_path / "run")
    resolve_batch_size(config, 1, CPU)
    chosen = config.trainer.micro_batch_size
    assert chosen < 8 and chosen == expected_micro(auto_config(corpus, tmp_path / "x"), free, 24)
