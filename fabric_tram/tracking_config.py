"""``trainer.loggers`` and the tracking backends' settings (``trainer.wandb``, ``trainer.mlflow``): plain data and
its checks, a leaf below the config layer (engine/tracking.py starts the backends)."""

from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS = ("csv", "tensorboard", "wandb", "mlflow")
DEFAULT_PROJECT = (
    "fabric-tram"  # W&B project and MLflow experiment when neither a setting nor the environment names one
)


@dataclass
class WandbSettings:
    project: str | None = None  # default: $WANDB_PROJECT, else fabric-tram
    entity: str | None = None  # default: $WANDB_ENTITY, else your default entity
    name: str | None = None  # the run's display name; default: the run folder's name
    group: str | None = None  # runs shown together (a sweep sets it to the sweep's name)
    tags: list = field(default_factory=list)
    mode: str | None = None  # online | offline | disabled; default: $WANDB_MODE, else online

    def check(self) -> None:
        if self.mode is not None and self.mode not in ("online", "offline", "disabled"):
            raise ValueError(f"trainer.wandb.mode must be online, offline or disabled, got {self.mode!r}")


@dataclass
class MLflowSettings:
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else ./mlruns
    experiment: str | None = None  # default: $MLFLOW_EXPERIMENT_NAME, else fabric-tram
    run_name: str | None = None  # default: the run folder's name
    tags: dict = field(default_factory=dict)
    parent_run_id: str | None = None  # a sweep's parent run (set by fabric-tram sweep)


def check_loggers(loggers: list) -> None:
    unknown = [name for name in loggers if name not in BACKENDS]
    if unknown:
        raise ValueError(f"trainer.loggers: {unknown} unknown; choose among {', '.join(BACKENDS)}")
