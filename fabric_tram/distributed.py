"""Collectives and shard-aware reductions (a leaf: torch only): the scalars that shape a step must be identical
on every rank.

Under FSDP2 every parameter and gradient is a DTensor holding one shard: sums of squares are taken over the
local shard and all-reduced over the shard group. Under DDP gradients are replicated after the backward, so a
local sum is already the global one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (a DTensor's local shard, or the tensor itself)."""
    return t.to_local() if is_dtensor(t) else t


def shard_group(tensors: Iterable[torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group over which the DTensors among ``tensors`` are sharded (None if none is)."""
    for t in tensors:
        if is_dtensor(t):
            mesh = t.device_mesh
            return mesh.get_group() if mesh.ndim == 1 else mesh.get_group(0)
    return None


def shard_sum(local_total: torch.Tensor, like: Iterable[torch.Tensor]) -> torch.Tensor:
    """Complete a sum taken over local shards: all-reduce over the shard group of ``like`` (if sharded)."""
    group = shard_group(like)
    if group is not None:  # sharded: each rank holds a slice of the vector
        dist.all_reduce(local_total, op=dist.ReduceOp.SUM, group=group)
    return local_total


@torch.no_grad()
def sum_of_squares(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """Σ t² over every element of every tensor, across all shards, in float32 (float64 for float64 tensors);
    the same on every rank. One multi-tensor norm kernel (per dtype) and one all-reduce; nothing leaves the device.
    Under no_grad: nothing to differentiate, no ``detach`` per tensor, and a DTensor's ``to_local()`` hands back its
    local tensor without an autograd function per tensor."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return torch.zeros(())
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    shards = [local(t) for t in tensors]
    widened = [t if t.dtype == dtype else t.to(dtype) for t in shards]
    total = torch.stack(torch._foreach_norm(widened)).pow(2).sum()
    return shard_sum(total, tensors)  # the sharded originals name the group to complete the sum over


def global_norm(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
    return sum_of_squares(tensors).sqrt()


def all_reduce_sum(fabric, value: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (data-parallel reduction of counts, losses, divergence sums)."""
    if fabric.world_size == 1:
        return value
    return fabric.all_reduce(value.detach().clone(), reduce_op="sum")


def reshard_after_no_grad_forward(model: torch.nn.Module) -> None:
    """FSDP2 leaves the root group unsharded after a forward without backward: reshard every FSDP module."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU copies of every parameter and buffer (under FSDP2 gathered; only rank 0 gets values).

    ``model`` may be Fabric-wrapped. Meant for exports and equivalence checks, not the hot path.
    """
    module = getattr(model, "_forward_module", model)
    module = getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module
    if any(is_dtensor(p) for p in module.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def first_error_of_any_rank(fabric, error: str | None) -> str | None:
    """Every rank learns whether any rank failed (before a collective load that would hang on the others)."""
    if fabric.world_size == 1:
        return error
    failed = fabric.all_reduce(torch.tensor(0.0 if error is None else 1.0, device=fabric.device), reduce_op="sum")
    return error or (f"{int(failed)} other rank(s) could not read their part of the checkpoint" if failed > 0 else None)


def agreed_min(fabric, value: int) -> int:
    """The smallest ``value`` of any rank, on every rank (a collective under several processes)."""
    if fabric.world_size == 1:
        return value
    return int(fabric.all_reduce(torch.tensor(float(value), device=fabric.device), reduce_op="min").item())
