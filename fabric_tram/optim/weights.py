"""Weight arithmetic of the update rules: copies, exact restores, swaps, the perturbation block, the EMA.

Everything is in place on the local shards (``local(p)``), so it is the same code under FSDP2, where each rank
holds a slice of every parameter, and the buffers are sharded exactly like the parameters.
"""

from __future__ import annotations

import contextlib

import torch

from fabric_tram.distributed import local


@torch.no_grad()
def clone_weights(params, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    return [local(p).detach().clone().to(dtype or local(p).dtype) for p in params]


@torch.no_grad()
def restore_weights(params, backup: list[torch.Tensor]) -> None:
    """θ ← backup, an exact in-place copy (never θ + e − e)."""
    for p, b in zip(params, backup, strict=True):
        local(p).copy_(b)


@torch.no_grad()
def store_weights(backup: list[torch.Tensor], params) -> None:
    """backup ← θ (in place: the buffer is reused every step)."""
    for b, p in zip(backup, params, strict=True):
        b.copy_(local(p))


@contextlib.contextmanager
def perturbed(params, backup: list[torch.Tensor]):
    """The sharpness-aware block: ``backup ← θ`` on entry; whatever moves θ inside (the climb to θ + e and the
    descent pass at θ + e) is undone on exit by ``θ ← backup``, exactly, after the descent backward has finished
    (activation checkpointing recomputes at θ + e, as the forward ran)."""
    store_weights(backup, params)
    try:
        yield
    finally:
        restore_weights(params, backup)


def _exchange(p: torch.Tensor, buffer: torch.Tensor) -> None:
    """Swap a parameter's local values with a buffer's, one parameter-sized temporary."""
    lp = local(p)
    tmp = lp.clone()
    lp.copy_(buffer)
    buffer.copy_(tmp)


@contextlib.contextmanager
def weights_swapped_in(params, buffers: list[torch.Tensor]):
    """Run with the buffers' values in the parameters, then put both back bit-exactly.

    Same dtype: swapped in place (swapping twice is exact). Otherwise (an fp32 EMA of bf16 weights) the
    parameters are backed up for the duration.
    """
    same = all(b.dtype == local(p).dtype for p, b in zip(params, buffers, strict=True))
    with torch.no_grad():
        saved = None if same else clone_weights(params)
        for p, b in zip(params, buffers, strict=True):
            _exchange(p, b) if same else local(p).copy_(b)
    try:
        yield
    finally:
        with torch.no_grad():
            if same:
                for p, b in zip(params, buffers, strict=True):
                    _exchange(p, b)
            else:
                restore_weights(params, saved)


@torch.no_grad()
def update_ema(ema: list[torch.Tensor], params, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · θ (in the EMA's own dtype, fp32 for mesa)."""
    for b, p in zip(ema, params, strict=True):
        b.mul_(decay).add_(local(p).to(b.dtype), alpha=1.0 - decay)


def load_buffers(buffers: list[torch.Tensor], saved: list[torch.Tensor], what: str) -> None:
    """Copy a checkpoint's per-parameter buffers (this rank's shards) into ours, refusing a mismatch."""
    if len(buffers) != len(saved) or any(b.shape != s.shape for b, s in zip(buffers, saved, strict=True)):
        raise ValueError(
            f"the checkpoint's {what} does not match this model's parameters (shards): "
            f"{len(saved)} tensors saved, {len(buffers)} here"
        )
    with torch.no_grad():
        for b, s in zip(buffers, saved, strict=True):
            b.copy_(s)
