"""A run's logs: CSV always (``RUN/logs/csv/metrics.csv``), TensorBoard when installed (``RUN/logs/tensorboard``),
and the tracking backends ``trainer.loggers`` names (W&B, MLflow: engine/tracking.py).

The CSV file survives crashes and resumes: rows are flushed at every checkpoint and evaluation (and every 100
steps), and a resumed run keeps the rows up to the step it resumed from, drops those the interrupted run logged
after its last checkpoint (they are logged again), and appends. So every step's row is there exactly once.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment

from fabric_tram.engine.tracking import tracking_loggers


class KeptMetricsWriter(_ExperimentWriter):
    """Lightning's CSV writer, which deletes an existing metrics file, made to keep its rows up to ``keep_until``."""

    def __init__(self, log_dir: str, keep_until: int):
        self.keep_until = keep_until
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("step") and int(float(row["step"])) <= self.keep_until]
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self.metrics_keys = sorted(header)


class RunCSVLogger(CSVLogger):
    """The CSV logger of a run folder; ``resume_from_step(step)`` before the first row keeps the earlier rows."""

    def __init__(self, run_dir: str | Path):
        super().__init__(root_dir=str(run_dir), name="logs", version="csv")
        self._keep_until = 0  # a fresh run (or one started over): earlier rows, if any, are not this run's

    def resume_from_step(self, step: int) -> None:
        self._keep_until = step

    @property
    @rank_zero_experiment
    def experiment(self) -> KeptMetricsWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = KeptMetricsWriter(self.log_dir, keep_until=self._keep_until)
        return self._experiment


def build_loggers(t) -> list:
    """The run's loggers from the trainer section: the CSV file always, TensorBoard when listed and installed, and
    the tracking backends ``trainer.loggers`` names (engine/tracking.py; started later, on rank 0)."""
    loggers = [RunCSVLogger(t.run_dir)]
    tensorboard = importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
    if "tensorboard" in t.loggers and tensorboard:
        loggers.append(TensorBoardLogger(root_dir=str(t.run_dir), name="logs", version="tensorboard"))
    return loggers + tracking_loggers(t)
