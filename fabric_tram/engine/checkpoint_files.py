"""A checkpoint's files: the folder layout, the atomic write, reading and checking what each file holds.

Layout of ``RUN/checkpoints/step-00000042/`` (format 2):

- ``state/``: one distributed checkpoint (DCP) of the model, the base optimizer and the update rule's
  per-parameter buffers, by parameter name and global shape (engine/checkpoint_state.py): it reshards, so it
  loads on another number of processes;
- ``global.pt``: what is the same on every rank (the step, the rule's global state such as TRAM's calibrated
  radius, the loss scaler), written by rank 0;
- ``rank-<r>.pt``: what truly differs per rank: its random number generators;
- ``meta.json``: format, step, world size, the global batch (micro-batch × accumulate × world size: the data
  position is step × global batch), the model section and the optimizer (to refuse another one).

Everything is written into ``step-….tmp``, flushed and renamed once complete, so a crash mid-save leaves the
previous checkpoint loadable. Format 1 (before resharding: ``state`` written by ``fabric.save``, the rule's
state in the rank files) still loads on the number of processes that wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from fabric_tram.engine.checkpoint_errors import CheckpointError, DamagedCheckpoint
from fabric_tram.engine.checkpoint_format1 import (
    FORMAT_1_RANK_KEYS,
    check_format_1,
    load_format_1,
    written_in_format_1,
)
from fabric_tram.engine.checkpoint_parts import PER_RANK, SHARDED, SHARED, Part, RunState
from fabric_tram.engine.checkpoint_state import load_sharded, save_sharded
from fabric_tram.jsonfile import write_json

CHECKPOINT_DIR = "checkpoints"
PREFIX = "step-"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``.tmp`` folders of interrupted saves are ignored)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit() and (p / "meta.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name[len(PREFIX) :])


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder`` and the folders themselves to stable storage (before a rename makes
    them the newest checkpoint: after a power loss a renamed folder must not hold unflushed files)."""
    for path in [*sorted(folder.rglob("*")), folder]:
        _fsync(path)


FORMAT = 2


def _states(parts: list[Part], place: str) -> dict:
    return {part.key: part.state_dict() for part in parts if part.place == place}


def save_checkpoint(fabric, run_dir: str | Path, state: RunState, meta: dict, keep_last: int) -> Path:
    """Write checkpoint ``state.step`` (every rank calls it: the state is a collective write), part by part into
    the file each part names, and prune old ones."""
    step = state.step
    final = checkpoint_path(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if fabric.global_rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed save: never complete, safe to drop
        tmp.mkdir(parents=True)
    fabric.barrier()
    parts = state.parts()
    save_sharded(tmp / "state", _states(parts, SHARDED))
    torch.save(_states(parts, PER_RANK), tmp / f"rank-{fabric.global_rank}.pt")
    if fabric.global_rank == 0:
        torch.save(_states(parts, SHARED), tmp / "global.pt")
    fsync_tree(tmp)  # every rank flushes what it sees (its own shards among them)
    fabric.barrier()
    if fabric.global_rank == 0:
        info = {"format": FORMAT, "step": step, "world_size": fabric.world_size, **meta}
        (tmp / "meta.json").write_text(json.dumps(info, indent=2))
        fsync_tree(tmp)
        if final.exists():  # re-saving the same step: move the old copy aside before replacing it
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync(final.parent)  # the rename itself
        best = best_step(run_dir)
        for stale in list_checkpoints(run_dir)[:-keep_last]:
            if stale.name != f"{PREFIX}{best:08d}":  # never prune the best checkpoint
                shutil.rmtree(stale)
    fabric.barrier()
    return final


def best_step(run_dir: str | Path) -> int:
    path = Path(run_dir) / CHECKPOINT_DIR / "best.json"
    return json.loads(path.read_text())["step"] if path.is_file() else -1


def record_best(run_dir: str | Path, step: int, metric: float) -> None:
    write_json(Path(run_dir) / CHECKPOINT_DIR / "best.json", {"step": step, "validation_loss": metric})


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(
            f"{path} is not a complete fabric_tram checkpoint (no meta.json); pick a folder under RUN/checkpoints/"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedCheckpoint(f"{meta_file} is corrupt ({err}); resume from another checkpoint folder") from None
    if not isinstance(meta, dict) or "step" not in meta or "world_size" not in meta:
        raise DamagedCheckpoint(f"{meta_file} lacks the step or world size; resume from another checkpoint folder")
    return meta


def check_compatible(meta: dict, model_section: dict, path: Path) -> None:
    """Refuse a checkpoint of another model or preset, naming the keys that differ."""
    saved = meta.get("model", {})
    keys = ("name", "preset", "n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
    differ = [
        f"model.{k}: checkpoint {saved.get(k)!r} vs config {model_section.get(k)!r}"
        for k in keys
        if k in saved and k in model_section and saved.get(k) != model_section.get(k)
    ]
    if differ:
        raise CheckpointError(
            f"checkpoint {path} was written for another model ({'; '.join(differ)}); "
            "use the config it was trained with (its run folder's config.yaml)"
        )


def check_same_optimizer(meta: dict, optimizer: dict, path: Path) -> None:
    """Refuse to resume another update rule or base optimizer: their state does not fit (say which and what to do)."""
    differ = [f"optimizer.{k}: checkpoint {meta[f'optimizer{suffix}']!r} vs config {optimizer[k]!r}"
              for k, suffix in (("name", ""), ("base", "_base"))
              if f"optimizer{suffix}" in meta and meta[f"optimizer{suffix}"] != optimizer.get(k)]  # fmt: skip
    if differ:
        raise CheckpointError(
            f"checkpoint {path} was written by another optimizer ({'; '.join(differ)}), whose state (base-optimizer "
            f"moments, the rule's buffers: {', '.join(meta.get('rule_state', [])) or 'none'}) does not fit this run. "
            "Resume with the checkpoint's optimizer settings, or start a new trainer.run_dir"
        )


def _read(file: Path, what: str, required: set[str]) -> dict:
    try:
        state = torch.load(file, weights_only=True)
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{file} is missing: the checkpoint is incomplete") from None
    except Exception as err:  # a truncated or empty file: torch raises RuntimeError, EOFError, UnpicklingError...
        raise DamagedCheckpoint(f"{file} cannot be read ({type(err).__name__}: {err}); the file is damaged") from None
    if not isinstance(state, dict) or not required <= set(state):
        raise DamagedCheckpoint(f"{file} is not a fabric_tram {what} file")
    return state


def check_state_files(path: Path) -> None:
    """Cheap checks of the model/optimizer state before the (collective) load: present, not empty, and for a
    single file a complete zip archive (torch.save's format keeps its directory at the end of the file)."""
    state = path / "state"
    file = state / ".metadata" if state.is_dir() else state  # a distributed checkpoint's metadata names its shards
    if not file.is_file() or file.stat().st_size == 0:
        raise DamagedCheckpoint(f"{file} is missing or empty: the checkpoint is incomplete")
    if state.is_file() and not zipfile.is_zipfile(state):
        raise DamagedCheckpoint(f"{state} is truncated or corrupt (not a complete torch.save archive)")
    if state.is_dir():
        check_shard_files(state)


def check_shard_files(state: Path) -> None:
    """Every shard file a distributed checkpoint's metadata names is there and long enough for what it holds."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(state)).read_metadata().storage_data
    except Exception as err:  # unreadable metadata: EOFError, UnpicklingError, ...
        raise DamagedCheckpoint(f"{state / '.metadata'} cannot be read ({type(err).__name__}); it is damaged") from None
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = state / name
        if not shard.is_file() or shard.stat().st_size < size:
            have = shard.stat().st_size if shard.is_file() else "missing"
            raise DamagedCheckpoint(
                f"{shard} is truncated or missing ({have} of {size} bytes): the checkpoint is damaged"
            )


def check_global_batch(meta: dict, global_batch: int, layout: str, path: Path) -> None:
    """The data position is step × global batch: another global batch would not continue the same run."""
    saved = meta.get("global_batch")
    if saved is None or saved == global_batch:
        return
    world = meta["world_size"]
    was = f"{meta.get('micro_batch_size')} × {meta.get('accumulate')} × {world} process(es)"
    raise CheckpointError(
        f"checkpoint {path} was trained with {saved} examples per optimizer step ({was}); this run takes "
        f"{global_batch} ({layout}): the data position (step × examples per step) and the updates would not "
        f"continue the same run. Keep micro_batch_size × accumulate × processes = {saved}"
    )


@dataclass(frozen=True)
class CheckedCheckpoint:
    """What :func:`check_checkpoint` read from a checkpoint's small files, for :func:`load_checkpoint`."""

    path: Path
    meta: dict
    per_rank: dict | None  # this rank's file; None when the number of processes changed (or weights only)
    shared: dict | None  # global.pt (format 2, training)

    @property
    def same_world(self) -> bool:
        return self.per_rank is not None


def check_checkpoint(fabric, path: Path, model_section: dict, optimizer_section: dict | None = None,
                     global_batch: tuple[int, str] | None = None) -> CheckedCheckpoint:  # fmt: skip
    """Everything that can be checked without loading, on this rank. ``optimizer_section`` None: only the weights
    will be read (evaluation, export), so the optimizer and the data position are not compared."""
    meta = read_meta(path)
    check_compatible(meta, model_section, path)
    if optimizer_section is None:
        check_state_files(path)
        return CheckedCheckpoint(path, meta, None, None)
    format_1 = written_in_format_1(meta)
    if format_1:
        check_format_1(fabric, path, meta)
    check_same_optimizer(meta, optimizer_section, path)
    if global_batch is not None:
        check_global_batch(meta, *global_batch, path)
    check_state_files(path)
    per_rank = None
    if meta["world_size"] == fabric.world_size:
        required = FORMAT_1_RANK_KEYS if format_1 else {"rng"}
        per_rank = _read(path / f"rank-{fabric.global_rank}.pt", "per-rank state", required)
    shared = None if format_1 else _read(path / "global.pt", "global state", {"step", "rule"})
    return CheckedCheckpoint(path, meta, per_rank, shared)


def load_checkpoint(fabric, target: RunState, checked: CheckedCheckpoint) -> int:
    """Restore ``target``'s parts from the checkpoint ``checked`` describes (the model alone when ``target`` is
    weights only; this rank's RNG only on the same number of processes); return the step it holds."""
    path = checked.path
    if written_in_format_1(checked.meta):
        return load_format_1(fabric, path, checked.meta, target, checked.per_rank, lambda load: _loading(path, load),
                             _restore)  # fmt: skip
    parts = target.parts()
    sharded = [part for part in parts if part.place == SHARDED]
    state = _states(parts, SHARDED)

    def read_sharded() -> None:
        load_sharded(path / "state", state, {part.key for part in sharded if part.complete})
        for part in sharded:
            part.load_state_dict(state[part.key])

    _loading(path, read_sharded)
    if target.weights_only:
        return int(checked.meta["step"])
    for place, file, saved in ((SHARED, path / "global.pt", checked.shared),
                               (PER_RANK, path / f"rank-{fabric.global_rank}.pt", checked.per_rank)):  # fmt: skip
        for part in parts:
            if part.place == place and saved is not None and part.key in saved:
                _restore(file, lambda part=part, saved=saved: part.load_state_dict(saved[part.key]))
    return target.step


def _loading(path: Path, load) -> None:
    try:
        load()
    except (Exception, CheckpointException) as err:  # a foreign or damaged state (DCP's is a BaseException)
        what = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise CheckpointError(
            f"{path / 'state'} cannot be loaded into this model/optimizer ({type(err).__name__}: {what})"
        ) from err


def _restore(file: Path, load) -> None:
    """One part's state from ``file`` (an error naming the file if it does not fit)."""
    try:
        load()
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{file}: {err}") from None
