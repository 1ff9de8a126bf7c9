"""Scale equivalence (c) on one process, atomic writes, keep-last-N, refusals; the run folder is never lost."""

import pytest
import torch
from conftest import max_param_diff, small_config, trajectory

from fabric_tram.config import ConfigError
from fabric_tram.engine import checkpoint as ckpt
from fabric_tram.engine.evaluation import evaluate_checkpoint
from fabric_tram.engine.trainer import train

DROPOUT = ["model.dropout=0.1"]  # so that the restored RNG state matters


def test_stop_after_step_2_and_resume_equals_uninterrupted(corpus, tmp_path):
    full = trajectory(
        train(small_config(corpus, tmp_path / "full", "adam", micro=2, accumulate=2, steps=4, extra=DROPOUT))
    )
    train(small_config(corpus, tmp_path / "stopped", "adam", micro=2, accumulate=2, steps=2, extra=DROPOUT))
    resumed = train(
        small_config(
            corpus,
            tmp_path / "stopped",
            "adam",
            micro=2,
            accumulate=2,
            steps=4,
            extra=DROPOUT + ["trainer.resume=auto"],
        )
    )
    assert resumed.start_step == 2
    assert trajectory(resumed)["steps"] == full["steps"][2:]
    assert max_param_diff(trajectory(resumed)["params"], full["params"]) == 0.0
    assert (tmp_path / "stopped" / "config.yaml").is_file()
    assert (tmp_path / "stopped" / "config.resumed-step-00000002.yaml").is_file()
    logs = tmp_path / "stopped" / "logs"  # the first run's metrics survive the resumed run
    assert (logs / "csv" / "metrics.csv").read_text().count("\n") >= 3 and (logs / "csv-2" / "metrics.csv").is_file()


def test_keep_last_and_interrupted_save_leaves_previous_loadable(corpus, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train(small_config(corpus, run_dir, "sgd", steps=4, extra=["trainer.save_every=1", "trainer.keep_last=2"]))
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-00000003", "step-00000004"]

    real_save = torch.save

    def crash_on_rank_file(obj, path, *a, **k):
        if str(path).endswith("rank-0.pt"):
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", crash_on_rank_file)
    with pytest.raises(OSError, match="simulated"):
        train(small_config(corpus, run_dir, "sgd", steps=6, extra=["trainer.save_every=1", "trainer.resume=auto"]))
    monkeypatch.setattr(torch, "save", real_save)
    assert (run_dir / "checkpoints" / "step-00000005.tmp").is_dir()  # the interrupted write...
    assert ckpt.latest_checkpoint(run_dir).name == "step-00000004"  # ...never shadows the last complete one
    run = train(small_config(corpus, run_dir, "sgd", steps=6, extra=["trainer.save_every=1", "trainer.resume=auto"]))
    assert run.start_step == 4 and ckpt.latest_checkpoint(run_dir).name == "step-00000006"
    assert not (run_dir / "checkpoints" / "step-00000005.tmp").exists()


def test_existing_run_folder_is_not_overwritten(corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(small_config(corpus, run_dir, "sgd", steps=1))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already holds a run.*trainer.resume=auto"):
        train(small_config(corpus, run_dir, "adam", steps=2))
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_checkpoint_of_another_model_is_refused_naming_keys(corpus, tmp_path):
    train(small_config(corpus, tmp_path / "a", "sgd", steps=1))
    config = small_config(
        corpus,
        tmp_path / "b",
        "sgd",
        steps=2,
        extra=["model.n_embd=36", f"trainer.resume={tmp_path / 'a' / 'checkpoints' / 'step-00000001'}"],
    )
    with pytest.raises(ckpt.CheckpointError, match=r"model.n_embd: checkpoint 33 vs config 36"):
        train(config)


def test_evaluate_command_reproduces_the_final_evaluation(corpus, tmp_path):
    run = train(small_config(corpus, tmp_path / "run", "adam", steps=2))
    again = evaluate_checkpoint(tmp_path / "run")
    for domain, metrics in run.results["validation"].items():
        assert again["validation"][domain] == pytest.approx(metrics)
