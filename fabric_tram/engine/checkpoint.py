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
import random
import shutil
from pathlib import Path

import torch

CHECKPOINT_DIR = "checkpoints"
PREFIX = "step-"


class CheckpointError(ValueError):
    pass


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
    fabric.barrier()
    if fabric.global_rank == 0:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": fabric.world_size, **meta}, indent=2))
        if final.exists():  # re-saving the same step: move the old copy aside before replacing it
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
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
    path = Path(run_dir) / CHECKPOINT_DIR / "best.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"step": step, "validation_loss": metric}))
    tmp.replace(path)


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(
            f"{path} is not a complete fabric_tram checkpoint (no meta.json); pick a folder under RUN/checkpoints/"
        )
    return json.loads(meta_file.read_text())


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


def load_checkpoint(fabric, path: str | Path, model, optimizer, rule, model_section: dict) -> int:
    """Restore model, optimizer, rule state, loss scaler and this rank's RNG; return the step to continue from."""
    path = Path(path)
    meta = read_meta(path)
    check_compatible(meta, model_section, path)
    if optimizer is not None and meta["world_size"] != fabric.world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {meta['world_size']} processes, this run has {fabric.world_size}: "
            "per-rank RNG and data positions would not continue the same run; "
            "resume with the same --devices/--num-nodes"
        )
    state = {"model": model, "optimizer": optimizer} if optimizer is not None else {"model": model}
    try:
        remainder = fabric.load(path / "state", state, strict=optimizer is not None)
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {err}") from err
    rank_file = path / f"rank-{fabric.global_rank}.pt"
    if optimizer is not None:
        per_rank = torch.load(rank_file, weights_only=True)
        set_rng_state(per_rank["rng"])
        rule.load_state_dict(per_rank["rule"])
        scaler = getattr(fabric.strategy.precision, "scaler", None)
        if scaler is not None and per_rank.get("scaler"):
            scaler.load_state_dict(per_rank["scaler"])
    return int(remainder.get("step", meta["step"]))
