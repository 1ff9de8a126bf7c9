"""Checkpoints that resume exactly, written atomically.

Layout of ``RUN/checkpoints/step-00000042/``:

- ``state``: ``fabric.save`` of model + base-optimizer state + step (one file; a folder of per-rank shards
  under fsdp);
- ``rank-<r>.pt``: what differs per rank (RNG states, the update rule's state, the loss scaler);
- ``meta.json``: step, world size, model section (to refuse a checkpoint of another model).

Everything is written into ``step-….tmp`` and renamed once complete, so a crash mid-save leaves the previous
checkpoint loadable. The data position is the step number (see ``fabric_tram.data.batching``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zipfile
from pathlib import Path

import torch

from fabric_tram.jsonfile import write_json

CHECKPOINT_DIR = "checkpoints"
PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint file is missing, empty, truncated or corrupt (``resume=auto`` falls back to an older one)."""


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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def save_checkpoint(fabric, run_dir: str | Path, step: int, model, optimizer, rule, meta: dict, keep_last: int) -> Path:
    final = checkpoint_path(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if fabric.global_rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed save: never complete, safe to drop
        tmp.mkdir(parents=True)
    fabric.barrier()
    fabric.save(tmp / "state", {"model": model, "optimizer": optimizer, "step": step})
    scaler = getattr(fabric.strategy.precision, "scaler", None)
    per_rank = {
        "rng": rng_state(),
        "rule": rule.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    torch.save(per_rank, tmp / f"rank-{fabric.global_rank}.pt")
    fsync_tree(tmp)  # every rank flushes what it sees (its own shards among them)
    fabric.barrier()
    if fabric.global_rank == 0:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": fabric.world_size, **meta}, indent=2))
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


def read_rank_file(path: Path, rank: int) -> dict:
    """This rank's part of a checkpoint (RNG, rule state, loss scaler), read before anything is loaded."""
    rank_file = path / f"rank-{rank}.pt"
    try:
        state = torch.load(rank_file, weights_only=True)
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{rank_file} is missing: the checkpoint is incomplete") from None
    except Exception as err:  # a truncated or empty file: torch raises RuntimeError, EOFError, UnpicklingError...
        what = f"{type(err).__name__}: {err}"
        raise DamagedCheckpoint(f"{rank_file} cannot be read ({what}); the file is damaged") from None
    if not isinstance(state, dict) or not {"rng", "rule"} <= set(state):
        raise DamagedCheckpoint(f"{rank_file} is not a fabric_tram per-rank state file")
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


def check_checkpoint(fabric, path: Path, model_section: dict, optimizer_section: dict | None) -> dict:
    """Everything that can be checked without loading, on this rank; returns this rank's per-rank state."""
    meta = read_meta(path)
    check_compatible(meta, model_section, path)
    if meta["world_size"] != fabric.world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {meta['world_size']} processes, this run has {fabric.world_size}: "
            "per-rank RNG and data positions would not continue the same run; "
            "resume with the same --devices/--num-nodes"
        )
    if optimizer_section is not None:
        check_same_optimizer(meta, optimizer_section, path)
    check_state_files(path)
    return read_rank_file(path, fabric.global_rank)


def load_checkpoint(fabric, path: str | Path, model, optimizer, rule, model_section: dict, optimizer_section=None,
                    checked: dict | None = None) -> int:  # fmt: skip
    """Restore model, optimizer, rule state, loss scaler and this rank's RNG; return the step to continue from.

    Every file is checked before anything is loaded (a :class:`CheckpointError` names the file), unless
    ``checked`` holds this rank's state already read by :func:`check_checkpoint`; with ``optimizer`` None only
    the model's weights are read.
    """
    path = Path(path)
    per_rank = checked
    if optimizer is not None and per_rank is None:
        per_rank = check_checkpoint(fabric, path, model_section, optimizer_section)
    elif optimizer is None:
        check_compatible(read_meta(path), model_section, path)
        check_state_files(path)
    state = {"model": model, "optimizer": optimizer} if optimizer is not None else {"model": model}
    try:
        remainder = fabric.load(path / "state", state, strict=optimizer is not None)
    except Exception as err:  # a foreign or damaged state: RuntimeError, KeyError, EOFError, ...
        raise CheckpointError(
            f"{path / 'state'} cannot be loaded into this model/optimizer ({type(err).__name__}: {err})"
        ) from err
    if optimizer is not None:
        set_rng_state(per_rank["rng"])
        try:
            rule.load_state_dict(per_rank["rule"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{path / f'rank-{fabric.global_rank}.pt'}: {err}") from None
        scaler = getattr(fabric.strategy.precision, "scaler", None)
        if scaler is not None and per_rank.get("scaler"):
            scaler.load_state_dict(per_rank["scaler"])
    return int(remainder.get("step", read_meta(path)["step"]))
