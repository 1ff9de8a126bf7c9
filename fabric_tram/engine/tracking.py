"""Experiment tracking beside the run folder's own logs: Weights & Biases and MLflow through Lightning's loggers.

``trainer.loggers`` names the backends: ``csv`` (always written: the reports read it), ``tensorboard`` (when
installed), ``wandb`` (``pip install -e ".[wandb]"``) and ``mlflow`` (``".[mlflow]"``), with their usual settings
in ``trainer.wandb.*`` and ``trainer.mlflow.*`` and their own environment variables honoured where a setting is
left out (``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_MODE``, ``WANDB_API_KEY``; ``MLFLOW_TRACKING_URI``,
``MLFLOW_EXPERIMENT_NAME``). Everything runs on rank 0 only: one tracked run per training run, whatever the
number of processes.

- The resolved config is logged as the run's hyper-parameters; every metric the CSV file gets goes to each backend
  with its step (Fabric's ``log_dict``).
- A resumed run continues the same tracked run: its id is kept in the run folder (``logs/wandb-run-id``,
  ``logs/mlflow-run-id``) and read back by ``trainer.resume``.
- A backend that cannot start (no credentials, a server out of reach, a package not installed) is an error of one
  line before anything is written or trained, not a crash at step N.
- ``fabric-tram sweep`` groups its runs: a W&B group named after the sweep, an MLflow parent run.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from fabric_tram.config import _plain, to_dict
from fabric_tram.tracking_config import DEFAULT_PROJECT


def id_file(run_dir: str | Path, backend: str) -> Path:
    return Path(run_dir) / "logs" / f"{backend}-run-id"


def saved_id(run_dir: str | Path, backend: str, resuming: bool) -> str | None:
    """The tracked run a resumed run continues (None for a new run)."""
    path = id_file(run_dir, backend)
    return path.read_text().strip() if resuming and path.is_file() else None


def tracking_loggers(t) -> list:
    """The W&B and MLflow loggers ``trainer.loggers`` asks for (not started yet: see :func:`start_tracking`), on
    rank 0 only: another rank builds none (an MLflow client alone would already initialise a SQLite store, and two
    processes doing it at once collide). The rank is the launcher's (torchrun's RANK), known before Fabric is."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:
        return []
    loggers = []
    folder_name = Path(t.run_dir).name
    resuming = t.resume is not None
    if "wandb" in t.loggers:
        try:
            import wandb  # noqa: F401
            from lightning.pytorch.loggers import WandbLogger
        except ImportError as err:
            raise ModuleNotFoundError(f"trainer.loggers has wandb: pip install -e '.[wandb]' ({err})") from err
        w = t.wandb
        run_id = saved_id(t.run_dir, "wandb", resuming) or secrets.token_hex(4)  # W&B's form: 8 of [0-9a-z]
        loggers.append(
            WandbLogger(
                project=w.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                entity=w.entity,
                name=w.name or folder_name,
                group=w.group,
                tags=list(w.tags) or None,
                id=run_id,
                resume="allow",
                save_dir=str(Path(t.run_dir) / "logs"),
                log_model=False,
                **({"mode": w.mode} if w.mode else {}),
            )  # fmt: skip
        )
    if "mlflow" in t.loggers:
        try:
            import mlflow  # noqa: F401
            from lightning.pytorch.loggers import MLFlowLogger
        except ImportError as err:
            raise ModuleNotFoundError(f"trainer.loggers has mlflow: pip install -e '.[mlflow]' ({err})") from err
        m = t.mlflow
        tags = {str(k): str(v) for k, v in m.tags.items()}
        if m.parent_run_id:
            tags["mlflow.parentRunId"] = m.parent_run_id
        loggers.append(
            MLFlowLogger(
                experiment_name=m.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT,
                run_name=m.run_name or folder_name,
                tracking_uri=m.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
                tags=tags or None,
                run_id=saved_id(t.run_dir, "mlflow", resuming),
            )  # fmt: skip
        )
    return loggers


def backend_of(logger) -> str | None:
    return {"WandbLogger": "wandb", "MLFlowLogger": "mlflow"}.get(type(logger).__name__)


def start_tracking(loggers, config) -> str | None:
    """Start each tracking backend (rank 0, before anything is written): create or reopen its run and log the
    resolved config as hyper-parameters. Returns why one could not start (one line), or None."""
    for logger in loggers:
        backend = backend_of(logger)
        if backend is None:
            continue
        reopened = backend == "mlflow" and getattr(logger, "_run_id", None) is not None
        try:
            logger.experiment  # noqa: B018  (creates the W&B run or the MLflow run: where credentials and servers fail)
            if not reopened:  # MLflow refuses to change a logged parameter: a resumed run keeps its first config
                logger.log_hyperparams(_plain(to_dict(config)))
        except Exception as err:  # wandb.errors.UsageError, CommError, mlflow's MlflowException, OSError, ...
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return (
                f"trainer.loggers: {backend} could not start ({type(err).__name__}: {detail}); check its settings "
                f"(trainer.{backend}.*) and credentials, or leave {backend} out of trainer.loggers. Nothing was "
                "trained or written"
            )
    return None


def end_tracking(loggers, status: str) -> None:
    """End each tracked run with ``status`` (FINISHED, FAILED or KILLED: a run stopped by a signal, to be resumed),
    so that the next run in this process starts its own (wandb otherwise reuses a run left open)."""
    for logger in loggers:
        backend = backend_of(logger)
        if backend == "mlflow":
            logger.finalize(status)
        elif backend == "wandb" and getattr(logger, "_experiment", None) is not None:
            logger._experiment.finish(exit_code=0 if status == "FINISHED" else 1)
            logger._experiment = None


def record_ids(loggers, run_dir: str | Path) -> None:
    """Keep each tracked run's id in the run folder, for a resume to continue it (rank 0)."""
    for logger in loggers:
        backend = backend_of(logger)
        if backend is not None:
            path = id_file(run_dir, backend)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(str(logger.version if backend == "wandb" else logger.run_id))


def sweep_overrides(config, name: str, folder: Path) -> list[str]:
    """What each run of a sweep gets so that the backends show the sweep together: the W&B group (the sweep's
    name unless one is set) and, for MLflow, a parent run, created once and kept in the sweep's ``folder`` (an
    interrupted sweep, run again, adds to the same parent)."""
    t = config.trainer
    out = []
    if "wandb" in t.loggers and not t.wandb.group:
        out.append(f"trainer.wandb.group={name}")
    if "mlflow" in t.loggers and not t.mlflow.parent_run_id:
        from mlflow.tracking import MlflowClient

        m = t.mlflow
        client = MlflowClient(tracking_uri=m.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        experiment = m.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        kept = Path(folder) / "mlflow-parent-run-id"
        if kept.is_file():
            parent_id = kept.read_text().strip()
        else:
            parent_id = client.create_run(experiment_id, run_name=name, tags={"fabric_tram.sweep": name}).info.run_id
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(parent_id)
        out.append(f"trainer.mlflow.parent_run_id={parent_id}")
    return out
