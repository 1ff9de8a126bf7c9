"""Weight arithmetic of the update rules: copies, exact restores, swaps, the perturbation block, the EMA.

Everything is in place on the local shards (``local(p)``), so it is the same code under FSDP2, where each rank
holds a slice of every parameter, and the buffers are sharded exactly like the parameters. Every operation is a
multi-tensor (``torch._foreach_*``) kernel over groups of tensors: the number of kernels does not grow with the
number of parameter tensors (it grows with their bytes only past ``GROUP_BYTES``, which bounds the temporaries).
"""

from __future__ import annotations

import contextlib

import torch

from fabric_tram.distributed import local

# the most bytes one multi-tensor operation touches at once: a swap's temporary is at most this large (a whole
# parameter-sized temporary would be gigabytes on a large model); larger tensors form a group of their own
GROUP_BYTES = 1 << 28


def groups(*lists: list[torch.Tensor]):
    """Yield aligned slices of ``lists`` whose first list holds at most ``GROUP_BYTES`` per slice."""
    first, start, size = lists[0], 0, 0
    for i, t in enumerate(first):
        nbytes = t.numel() * t.element_size()
        if i > start and size + nbytes > GROUP_BYTES:
            yield tuple(lst[start:i] for lst in lists)
            start, size = i, 0
        size += nbytes
    if start < len(first):
        yield tuple(lst[start:] for lst in lists)


@torch.no_grad()
def locals_of(params) -> list[torch.Tensor]:
    """The tensors each parameter holds on this rank, themselves: written in place, under ``torch.no_grad()``
    (every function here runs under it), where a leaf's in-place write is allowed. No ``detach()``: that is one
    operator per tensor, and a two-pass step walked the parameters this way five to seven times (about 1,000
    operators of host time a step on GPT-2's 148 tensors)."""
    return [local(p) for p in params]


@torch.no_grad()
def clone_weights(params, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    return [local(p).clone().to(dtype or local(p).dtype) for p in params]


@torch.no_grad()
def copy_into(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """targets ← sources, exact element copies (dtypes may differ: a cast)."""
    for t, s in groups(targets, sources):
        torch._foreach_copy_(t, s)


def restore_weights(params, backup: list[torch.Tensor]) -> None:
    """θ ← backup, an exact in-place copy (never θ + e − e)."""
    copy_into(locals_of(params), backup)


def store_weights(backup: list[torch.Tensor], params) -> None:
    """backup ← θ (in place: the buffer is reused every step)."""
    copy_into(backup, locals_of(params))


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


@torch.no_grad()
def exchange(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """Swap the values of two aligned lists of tensors of one dtype, bit-exactly, a group at a time."""
    for x, y in groups(a, b):
        tmp = torch._foreach_mul(x, 1.0)  # a copy (x · 1 is x for every float, -0 and NaN included)
        torch._foreach_copy_(x, y)
        torch._foreach_copy_(y, tmp)


@contextlib.contextmanager
def weights_swapped_in(params, buffers: list[torch.Tensor]):
    """Run with the buffers' values in the parameters, then put both back bit-exactly.

    Same dtype: swapped in place (swapping twice is exact). Otherwise (an fp32 EMA of bf16 weights) the
    parameters are backed up for the duration.
    """
    weights = locals_of(params)
    same = all(b.dtype == w.dtype for w, b in zip(weights, buffers, strict=True))
    saved = None
    if same:
        exchange(weights, buffers)
    else:
        saved = clone_weights(params)
        copy_into(weights, buffers)
    try:
        yield
    finally:
        if same:
            exchange(weights, buffers)
        else:
            copy_into(weights, saved)


@torch.no_grad()
def update_ema(ema: list[torch.Tensor], params, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · θ (in the EMA's own dtype, at least float32 for mesa)."""
    keep, take = decay, 1.0 - decay
    for e, w in groups(ema, locals_of(params)):
        if any(x.dtype != y.dtype for x, y in zip(e, w, strict=True)):  # bf16 weights into an fp32 EMA: widen
            w = [x.to(y.dtype) for x, y in zip(w, e, strict=True)]
        torch._foreach_mul_(e, keep)
        torch._foreach_add_(e, w, alpha=take)


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
