"""Checkpoints of a run, in one place: saving one, resuming from one (on any number of processes), choosing
one (a run folder's newest complete checkpoint, the best on validation), loading a checkpoint's weights (for
evaluation, analysis and export), and the ranks' agreement about all of it.

What a checkpoint holds, part by part, is engine/checkpoint_parts.py; the files — layout, atomic write, checks —
engine/checkpoint_files.py; the resharding state engine/checkpoint_state.py; the first format's reader
engine/checkpoint_format1.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from fabric_tram.config import base_optimizer_name, to_dict
from fabric_tram.contracts import label_names, train_domains
from fabric_tram.distributed import first_error_of_any_rank
from fabric_tram.engine.checkpoint_files import (
    CHECKPOINT_DIR,
    CheckpointError,
    DamagedCheckpoint,
    best_step,
    check_checkpoint,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    step_of,
)
from fabric_tram.engine.checkpoint_files import record_best as write_best
from fabric_tram.engine.checkpoint_parts import RunState
from fabric_tram.loss import token_weighted_loss

if TYPE_CHECKING:  # the run is built by engine/setup.py, which imports this module
    from fabric_tram.engine.setup import Run

__all__ = ["CHECKPOINT_DIR", "CheckpointError", "DamagedCheckpoint", "best_step", "checkpoint_path",
           "list_checkpoints", "step_of"]  # fmt: skip


def global_batch(run: Run) -> tuple[int, str]:
    """Examples per optimizer step over every process, and how they are made up (for messages)."""
    t, world = run.config.trainer, run.fabric.world_size
    return t.micro_batch_size * t.accumulate * world, f"{t.micro_batch_size} × {t.accumulate} × {world} process(es)"


# ------------------------------------------------------------------------------------------- saving


def save(run: Run, step: int) -> Path:
    t = run.config.trainer
    meta = {
        "model": to_dict(run.config)["model"],
        "optimizer": run.config.optimizer.name,
        "optimizer_base": base_optimizer_name(run.config.optimizer),
        "rule_state": sorted(run.rule.state_dict()),
        "global_batch": global_batch(run)[0],
        "micro_batch_size": t.micro_batch_size,
        "accumulate": t.accumulate,
        "labels": label_names(run.task),  # a classifier's class names, for an exported model
    }
    state = RunState(run.model, run.optimizer, run.rule, run.fabric, step)
    return save_checkpoint(run.fabric, run.run_dir, state, meta, t.keep_last)


# ------------------------------------------------------------------------------------------- resuming


def resume(run: Run, path: Path, fallback: bool = False) -> Path:
    """Continue from checkpoint ``path``; with ``fallback`` (``trainer.resume=auto``), from the newest complete
    checkpoint at or before it that is not damaged, saying which were skipped. Returns the one used.

    Another number of processes is fine as long as the examples per step are the same (the data position is
    step × examples per step); then every rank's random streams start afresh, which the run says."""
    model_section = to_dict(run.config)["model"]
    optimizer_section = {"name": run.config.optimizer.name, "base": base_optimizer_name(run.config.optimizer)}
    older = [c for c in reversed(list_checkpoints(run.run_dir)) if step_of(c) < step_of(path)]
    for candidate in [path, *(older if fallback else [])]:
        error, checked = None, None
        try:
            checked = check_checkpoint(run.fabric, candidate, model_section, optimizer_section, global_batch(run))
        except DamagedCheckpoint as err:
            error = str(err)
        error = first_error_of_any_rank(run.fabric, error)
        if error is None:
            state = RunState(run.model, run.optimizer, run.rule, run.fabric)
            run.start_step = load_checkpoint(run.fabric, state, checked)
            if not checked.same_world:
                run.fabric.print(resharded_note(checked.meta["world_size"], run.fabric.world_size))
            return candidate
        if not fallback:
            raise DamagedCheckpoint(error)
        run.fabric.print(
            f"trainer.resume=auto: checkpoint {candidate.name} is damaged ({error}); trying the one before"
        )
    raise CheckpointError(
        f"trainer.resume=auto: no checkpoint in {run.run_dir / CHECKPOINT_DIR} can be resumed from (the "
        "last one tried is damaged, see above); remove the damaged folders, or start another trainer.run_dir"
    )


def resharded_note(saved_world: int, world: int) -> str:
    return (
        f"resumed a checkpoint of {saved_world} process(es) on {world}: the weights, the optimizer, the update "
        "rule's state and the data position continue exactly; each process's random stream (dropout) starts "
        "afresh, so with dropout > 0 the run goes on differently from an uninterrupted one"
    )


# ------------------------------------------------------------------------------------------- choosing


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or a run folder's newest complete checkpoint."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a run folder with checkpoints/")
    return latest


def in_domain_loss(task, metrics: dict) -> float:
    """Token-weighted validation loss over the training domains (every domain when the task has none)."""
    return token_weighted_loss(metrics, train_domains(task))


def improves_best(run: Run, metrics: dict) -> bool:
    """Whether ``metrics`` beat the best in-domain validation loss recorded so far (rank 0 decides for all)."""
    previous = run.run_dir / CHECKPOINT_DIR / "best.json"
    current = in_domain_loss(run.task, metrics)
    best = json.loads(previous.read_text())["validation_loss"] if previous.is_file() else math.inf
    return bool(run.fabric.broadcast(current < best, src=0)) if run.fabric.world_size > 1 else current < best


def record_best(run: Run, step: int, metrics: dict) -> None:
    if run.fabric.is_global_zero:
        write_best(run.run_dir, step, in_domain_loss(run.task, metrics))
    run.fabric.barrier()


# ------------------------------------------------------------------------------------------- weights


def load_weights(run: Run, path: str | Path) -> int:
    """Put checkpoint ``path``'s weights into ``run.model`` (written by any number of processes); its step."""
    checked = check_checkpoint(run.fabric, Path(path), to_dict(run.config)["model"])
    return load_checkpoint(run.fabric, RunState(run.model), checked)
