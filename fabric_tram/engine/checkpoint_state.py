"""A checkpoint's ``state/``: one ``torch.distributed.checkpoint`` (DCP) of its sharded parts (the model, the base
optimizer and the update rule's per-parameter buffers: engine/checkpoint_parts.py), so that it reshards on load.

Every tensor is saved with its global shape, by parameter name: under FSDP2 each rank writes its shard (the
rule's buffers — TRAM's θ_{t−1}, θ_0, MESA's EMA — as DTensors placed exactly like their parameters), otherwise
the one copy is written once. Loading reads whatever part of each tensor this rank holds now, so a checkpoint of
2 FSDP2 processes loads on 1 process (or the other way round), for training, evaluation or export. Parameter
names are those of the unwrapped model with the wrappers' segments (Fabric's, ``torch.compile``'s) removed, as
``torch.distributed.checkpoint.state_dict`` names them: compiled or not, sharded or not, the same keys.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

from fabric_tram.distributed import is_dtensor

WRAPPER_SEGMENTS = ("_forward_module.", "_orig_mod.", "_checkpoint_wrapped_module.")


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside Fabric's wrapper (FSDP2 shards it in place, so it is the sharded one)."""
    return model.module if type(model).__name__ == "_FabricModule" else model


def clean_name(name: str) -> str:
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def parameter_names(model: torch.nn.Module) -> dict[int, str]:
    """id(parameter) → its clean name (a tied parameter keeps its first name)."""
    return {id(p): clean_name(n) for n, p in unwrapped(model).named_parameters()}


def as_global(buffer: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A rule buffer (this rank's local shard) as a tensor of its parameter's global shape: a DTensor view placed
    like the parameter under FSDP2 (no copy: DCP writes and reads through it), the buffer itself otherwise."""
    if not is_dtensor(like):
        return buffer
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(buffer, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())


def rule_tensors(rule, model) -> dict[str, torch.Tensor]:
    """The rule's per-parameter buffers as ``{"KEY/PARAMETER NAME": tensor}``."""
    names = parameter_names(model)
    out = {}
    for key, buffers in rule.parameter_state().items():
        for param, buffer in zip(rule.params, buffers, strict=True):
            out[f"{key}/{names[id(param)]}"] = as_global(buffer, param)
    return out


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def save_sharded(path: Path, state: dict) -> None:
    """Write ``{part key: state}`` as the DCP folder ``path`` (a collective: every rank calls it)."""
    with warnings.catch_warnings():  # one process: DCP says it assumes so
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(path), no_dist=_no_dist())


def saved_keys(path: Path) -> set[str]:
    """The flattened keys a DCP folder holds (``model.transformer.wte.weight``, ``rule.previous_iterate/...``)."""
    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def load_sharded(path: Path, state: dict, complete: set[str]) -> None:
    """Read the DCP folder ``path`` into ``state`` (``{part key: its state}``, each tensor filled in place, in this
    rank's layout), refusing first, with the names, what the checkpoint lacks of the parts in ``complete``."""
    expected = {f"{key}.{name}" for key in complete for name in state[key]}
    missing = sorted(expected - saved_keys(path))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise KeyError(f"the checkpoint holds no {shown}: it was written for another model or update rule")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # partial: an optimizer here may hold state (initialised for loading) for parameters that never had a
        # gradient, which the checkpoint rightly lacks; every key of the complete parts was checked above
        dcp.load(
            state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=_no_dist()
        )
