"""Reading fabric_tram's first checkpoint format, in this one place (nothing writes it any more).

Format 1 (before resharding; ``meta.json`` without ``"format"``): ``state`` written by ``fabric.save`` (the model,
the optimizer and the step), and in each ``rank-<r>.pt`` the rank's RNG, the rule's whole state and the loss
scaler. It loads only on the number of processes that wrote it; its next checkpoint is in the current format.
"""

from __future__ import annotations

from pathlib import Path

from fabric_tram.contracts import unwrap_optimizer
from fabric_tram.engine.checkpoint_errors import CheckpointError
from fabric_tram.engine.checkpoint_parts import scaler_part, set_rng_state
from fabric_tram.optim.base import implementation_kept

FORMAT_1_RANK_KEYS = {"rng", "rule"}  # what each rank-<r>.pt holds (and the loss scaler, None without one)


def written_in_format_1(meta: dict) -> bool:
    return meta.get("format", 1) < 2


def check_format_1(fabric, path: Path, meta: dict) -> None:
    """Refuse another number of processes (the first format does not reshard), saying how to go on."""
    if meta["world_size"] != fabric.world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {meta['world_size']} processes in fabric_tram's first checkpoint "
            f"format, which does not reshard; this run has {fabric.world_size}. Resume it with --devices/"
            "--num-nodes as it was written (its next checkpoints are then in the resharding format)"
        )


def refuse_format_1_export(path: Path, meta: dict) -> None:
    if written_in_format_1(meta):
        raise CheckpointError(
            f"{path} is a checkpoint of fabric_tram's first format; resume the run for one step with this "
            "version (its next checkpoint is in the current format), then export that one"
        )


def load_format_1(fabric, path: Path, meta: dict, target, per_rank: dict | None, loading, restore) -> int:
    """Restore ``target`` (a RunState) from a first-format checkpoint; the step it holds. ``loading`` and
    ``restore`` turn a failure into the current format's errors (engine/checkpoint_files.py)."""
    if target.weights_only:
        loading(lambda: fabric.load(path / "state", {"model": target.model}, strict=False))
        return int(meta["step"])
    remainder: dict = {}
    state = {"model": target.model, "optimizer": target.optimizer}
    with implementation_kept(unwrap_optimizer(target.optimizer)):
        loading(lambda: remainder.update(fabric.load(path / "state", state)))
    rank_file = path / f"rank-{fabric.global_rank}.pt"
    restore(rank_file, lambda: set_rng_state(per_rank["rng"]))
    restore(rank_file, lambda: target.rule.load_state_dict(per_rank["rule"]))
    restore(rank_file, lambda: scaler_part(target.fabric).load_state_dict(per_rank.get("scaler")))
    return int(remainder.get("step", meta["step"]))
