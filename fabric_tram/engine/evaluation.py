"""``fabric-tram evaluate``: score a saved checkpoint with the config of the run that wrote it."""
from __future__ import annotations

from pathlib import Path

from fabric_tram.config import load_config, to_dict
from fabric_tram.engine import checkpoint as ckpt
from fabric_tram.engine.trainer import evaluate, setup


def find_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    latest = ckpt.latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a run folder with checkpoints/")
    return latest


def evaluate_checkpoint(path: str | Path, overrides=(), splits=()) -> dict:
    """Rebuild the run's model (config.yaml of its run folder + overrides), load the weights, evaluate."""
    checkpoint = find_checkpoint(path)
    run_dir = checkpoint.parent.parent
    config = load_config(run_dir / "config.yaml", ["trainer.progress_bar=false", *overrides])
    run = setup(config, training=False)
    ckpt.load_checkpoint(run.fabric, checkpoint, run.model, None, None, to_dict(config)["model"])
    return {split: evaluate(run, split, config.trainer.eval_batches) for split in (splits or config.trainer.eval_splits)}
