"""Experiment tracking on the real backends without a network (engine/tracking.py): Weights & Biases in offline
mode, its run file read back record by record, and MLflow on a local SQLite store, read back through MlflowClient.
Each checks what a user reads there against the run's own CSV log and config, field by field: the run's name,
project, tags and group, every hyper-parameter, every metric at its step; one tracked run after a resume and on 2
processes; a sweep grouped; a backend that cannot start is one line before anything is written."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import small_config
from launch import launch_two_processes

from fabric_tram.config import to_dict
from fabric_tram.engine.trainer import train

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")
ROOT = Path(__file__).resolve().parents[1]
TRACKED = ["trainer.save_every=2", "trainer.log_every=1", "trainer.wandb.mode=offline", "trainer.wandb.project=proj",
           "trainer.wandb.name=shown", "trainer.wandb.tags=[a,b]", "trainer.mlflow.experiment=exp",
           "trainer.mlflow.tags={team: x}", "trainer.loggers=[csv,wandb,mlflow]"]  # fmt: skip


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)


def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (``run-ID.wandb``): its LevelDB-style log of 32 KiB blocks, each record a
    7-byte header (checksum, length, type: full, first, middle, last) and a piece of a protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, position, pieces, records = path.read_bytes(), 7, b"", []  # 7: the file's ':W&B' header
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        piece, position = data[position + 7 : position + 7 + length], position + 7 + length
        pieces = piece if kind in (1, 2) else pieces + piece
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pieces)
            records.append(record)
    return records


def wandb_run(logs: Path) -> dict:
    """Every offline run folder of a run's ``logs/wandb``, merged: the run record, the config and the history."""
    import json

    runs = sorted((logs / "wandb").glob("offline-run-*/run-*.wandb"))
    out = {"ids": [], "config": {}, "history": {}}
    for path in runs:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                out["ids"].append(record.run.run_id)
                out["run"] = record.run
            elif kind == "config":
                out["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                row = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                out["history"].setdefault(int(row["trainer/global_step"]), {}).update(row)
    return out


def csv_rows(run_dir: Path) -> dict[int, dict]:
    rows = {}
    for row in csv.DictReader(open(run_dir / "logs" / "csv" / "metrics.csv")):
        rows.setdefault(int(row["step"]), {}).update({k: v for k, v in row.items() if v not in ("", None)})
    return rows


def as_number(value):
    return {"True": 1.0, "False": 0.0}.get(value, value) if isinstance(value, str) else value


def assert_same_metrics(tracked: dict[int, dict], rows: dict[int, dict], label: str) -> None:
    """Every metric of every CSV row, at its step, in the backend (booleans as 1/0, as both write them)."""
    assert set(tracked) == set(rows), label
    for step, row in rows.items():
        for key, value in row.items():
            if key in ("step",):
                continue
            assert key in tracked[step], (label, step, key)
            assert float(tracked[step][key]) == pytest.approx(float(as_number(value)), rel=1e-9), (label, step, key)


def flat(tree: dict, prefix: str = "") -> dict:
    """The config as MLflow's parameters: nested keys joined by '/', empty lists and mappings left out (Lightning's
    MLflow logger writes no parameter for them)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        elif not (isinstance(value, (list, tuple)) and not value):
            out[f"{prefix}{key}"] = value
    return out


def mlflow_run(tmp_path, experiment: str = "exp"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, runs


def mlflow_metrics(client, run) -> dict[int, dict]:
    out = {}
    for key in run.data.metrics:
        for metric in client.get_metric_history(run.info.run_id, key):
            out.setdefault(metric.step, {})[key] = metric.value
    return out


def test_both_backends_hold_the_config_and_every_metric_at_its_step_and_a_resume_continues_one_run(corpus, tmp_path):
    run_dir = tmp_path / "run"
    extra = [*TRACKED, f"trainer.mlflow.tracking_uri={store(tmp_path)}"]
    first = train(small_config(corpus, run_dir, "tram-prev", steps=2, extra=[*extra, "optimizer.radius_scale=1"]))
    resumed = train(small_config(corpus, run_dir, "tram-prev", steps=4,
                                 extra=[*extra, "optimizer.radius_scale=1", "trainer.resume=auto"]))  # fmt: skip
    assert resumed.start_step == 2
    rows = csv_rows(run_dir)
    assert sorted(rows) == [1, 2, 3, 4] and "d" in rows[2]
    # W&B: one run id over both processes, named and grouped as configured, the config and every metric
    w = wandb_run(run_dir / "logs")
    saved_id = (run_dir / "logs" / "wandb-run-id").read_text()
    assert w["ids"] == [saved_id, saved_id]  # two offline segments of one run: the resume reopened it
    assert (w["run"].project, w["run"].display_name, list(w["run"].tags)) == ("proj", "shown", ["a", "b"])
    config = to_dict(resumed.config)
    for section in ("model", "task", "optimizer", "trainer"):
        for key, value in config[section].items():
            if not isinstance(value, dict):
                assert w["config"][section][key] == (list(value) if isinstance(value, tuple) else value), (section, key)
    assert w["config"]["optimizer"]["name"] == "tram-prev" and w["config"]["trainer"]["max_steps"] == 4
    assert_same_metrics({s: r for s, r in w["history"].items()}, rows, "wandb")
    # MLflow: one run (FINISHED), its name, tags, every flattened config value as a parameter, every metric
    client, runs = mlflow_run(tmp_path)
    assert len(runs) == 1 and runs[0].info.run_id == (run_dir / "logs" / "mlflow-run-id").read_text()
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run" and run.data.tags["team"] == "x"
    params = flat(to_dict(first.config))  # MLflow keeps the first config (it refuses to change a parameter)
    for key, value in params.items():
        shown = str(list(value) if isinstance(value, tuple) else value)
        assert run.data.params[key] == shown, key
    assert_same_metrics(mlflow_metrics(client, run), rows, "mlflow")


@pytest.mark.distributed
def test_two_processes_make_one_tracked_run_each(tmp_path):
    args = [str(ROOT / "recipes" / "tiny_sample.py"), "trainer.max_steps=2", "trainer.eval_batches=1",
            "trainer.progress_bar=false", "trainer.loggers=[csv,wandb,mlflow]", "trainer.wandb.mode=offline",
            f"trainer.mlflow.tracking_uri={store(tmp_path)}", "trainer.mlflow.experiment=exp",
            f"trainer.run_dir={tmp_path / 'run'}"]  # fmt: skip
    launch_two_processes(args, cwd=tmp_path)
    w = wandb_run(tmp_path / "run" / "logs")
    assert len(w["ids"]) == 1 and sorted(w["history"]) == [1, 2]
    _, runs = mlflow_run(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted(csv_rows(tmp_path / "run")) == [1, 2]


def test_a_sweep_groups_its_runs(corpus, tmp_path):
    from click.testing import CliRunner

    from fabric_tram.cli import main

    recipe = ROOT / "recipes" / "tiny_sample.py"
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["sweep", str(recipe), "optimizer.name=adam", "optimizer.lr=1e-3,2e-3",
                                       "trainer.max_steps=1", "trainer.eval_batches=1", "trainer.progress_bar=false",
                                       f"task.data_dir={corpus}", "trainer.loggers=[csv,wandb,mlflow]",
                                       "trainer.wandb.mode=offline", f"trainer.mlflow.tracking_uri={store(tmp_path)}",
                                       "trainer.mlflow.experiment=exp", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output[-3000:]
    runs = sorted(p.parent.parent for p in out.rglob("logs/wandb-run-id"))
    assert len(runs) == 2
    assert [wandb_run(r / "logs")["run"].run_group for r in runs] == ["sweep", "sweep"]
    _, tracked = mlflow_run(tmp_path)
    parents = [r for r in tracked if r.data.tags.get("fabric_tram.sweep") == "sweep"]
    children = [r for r in tracked if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}


def test_a_resume_gives_the_loggers_the_tracked_run_its_folder_keeps_and_a_new_run_none(tmp_path):
    """What the W&B and MLflow loggers are told to continue (the run-level test above reads both back): the id kept
    in RUN/logs/ when resuming; none for a new run, or a folder that keeps none."""
    from fabric_tram.engine.tracking import id_file, saved_id

    for backend, kept in (("wandb", "a1b2c3d4"), ("mlflow", "0123456789abcdef")):
        assert id_file(tmp_path, backend) == tmp_path / "logs" / f"{backend}-run-id"
        assert saved_id(tmp_path, backend, resuming=True) is None
        id_file(tmp_path, backend).parent.mkdir(parents=True, exist_ok=True)
        id_file(tmp_path, backend).write_text(kept + "\n")
        assert saved_id(tmp_path, backend, resuming=True) == kept
        assert saved_id(tmp_path, backend, resuming=False) is None


def test_a_sweep_gives_its_runs_the_sweeps_name_as_wandb_group_unless_one_is_set(tmp_path):
    """The overrides a sweep adds to each run for W&B (the run-level test above reads the groups back, and MLflow's
    parent run): its name as the group; a group the user set is kept; nothing without the wandb logger."""
    from types import SimpleNamespace

    from fabric_tram.engine.tracking import sweep_overrides
    from fabric_tram.tracking_config import MLflowSettings, WandbSettings

    def config(loggers, group=None):
        return SimpleNamespace(trainer=SimpleNamespace(loggers=loggers, wandb=WandbSettings(group=group),
                                                       mlflow=MLflowSettings()))  # fmt: skip

    assert sweep_overrides(config(["csv", "wandb"]), "lr-sweep", tmp_path) == ["trainer.wandb.group=lr-sweep"]
    assert sweep_overrides(config(["csv", "wandb"], group="mine"), "lr-sweep", tmp_path) == []
    assert sweep_overrides(config(["csv", "tensorboard"]), "lr-sweep", tmp_path) == []


@pytest.mark.parametrize("backend", ["wandb", "mlflow"])
def test_a_backend_that_cannot_start_is_one_line_before_anything_is_written(corpus, tmp_path, backend):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path / "home"), "WANDB_DIR": str(tmp_path),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}  # fmt: skip
    env.pop("WANDB_API_KEY", None)
    env.pop("WANDB_MODE", None)
    settings = {
        "wandb": ["trainer.wandb.mode=online"],  # no credentials on this machine (HOME is empty)
        "mlflow": ["trainer.mlflow.tracking_uri=http://127.0.0.1:9"],
    }[backend]  # nothing listens there
    proc = subprocess.run([sys.executable, "-m", "fabric_tram.cli", "train", str(ROOT / "recipes" / "tiny_sample.py"),
                           f"task.data_dir={corpus}", f"trainer.loggers=[csv,{backend}]", *settings,
                           f"trainer.run_dir={tmp_path / 'run'}", "trainer.max_steps=1"],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: ConfigError: trainer.loggers: {backend} could not start ("), proc.stderr[-3000:]
    assert "Nothing was trained or written" in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_backends_and_modes_are_refused_with_the_config(corpus, tmp_path):
    from fabric_tram.config import ConfigError

    with pytest.raises(ConfigError, match=r"trainer.loggers: \['neptune'\] unknown; choose among csv"):
        small_config(corpus, tmp_path / "r", extra=["trainer.loggers=[csv,neptune]"])
    with pytest.raises(ConfigError, match="trainer.wandb.mode must be online, offline or disabled"):
        small_config(corpus, tmp_path / "r", extra=["trainer.wandb.mode=dryrun"])


def test_only_rank_0_builds_tracking_loggers(corpus, tmp_path, monkeypatch):
    """The in-process rule behind the 2-process test: a rank other than 0 builds no W&B or MLflow logger (two
    would make two tracked runs and collide on MLflow's SQLite store); rank 0 builds both."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    from fabric_tram.engine.tracking import tracking_loggers

    config = small_config(corpus, tmp_path / "run", "adam",
                          extra=[*TRACKED, f"trainer.mlflow.tracking_uri={store(tmp_path)}"])  # fmt: skip
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    assert tracking_loggers(config.trainer) == []
    monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)
    assert [type(x) for x in tracking_loggers(config.trainer)] == [WandbLogger, MLFlowLogger]
