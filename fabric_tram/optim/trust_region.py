"""Trust-region pieces: weight buffers, target distributions (reference weights or noised inputs), and the
divergence ``d`` accumulated over a step.

All weight arithmetic is in place on the local shards (``local(p)``), so it is the same code under FSDP2, where
each rank holds a slice of every parameter, and the buffers are sharded exactly like the parameters.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from fabric_tram.engine.distributed import local
from fabric_tram.optim.divergences import check_divergence, divergence_sum
from fabric_tram.tasks.base import LossOutput


# ----------------------------------------------------------------------------------------------- weights


@torch.no_grad()
def clone_weights(params, dtype: Optional[torch.dtype] = None) -> list[torch.Tensor]:
    return [local(p).detach().clone().to(dtype or local(p).dtype) for p in params]


@torch.no_grad()
def restore_weights(params, backup: list[torch.Tensor]) -> None:
    """θ ← backup, an exact in-place copy (never θ + e − e)."""
    for p, b in zip(params, backup):
        local(p).copy_(b)


@torch.no_grad()
def store_weights(backup: list[torch.Tensor], params) -> None:
    """backup ← θ (in place: the buffer is reused every step)."""
    for b, p in zip(backup, params):
        b.copy_(local(p))


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
    same = all(b.dtype == local(p).dtype for p, b in zip(params, buffers))
    with torch.no_grad():
        saved = None if same else clone_weights(params)
        for p, b in zip(params, buffers):
            _exchange(p, b) if same else local(p).copy_(b)
    try:
        yield
    finally:
        with torch.no_grad():
            if same:
                for p, b in zip(params, buffers):
                    _exchange(p, b)
            else:
                restore_weights(params, saved)


def replayed_rng(device: torch.device):
    """Random numbers drawn inside are rewound on exit: the next forward draws the same dropout masks."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type)


# ----------------------------------------------------------------------------------------------- targets


class WeightReference:
    """Target distributions p(·|x; θ_ref) from reference weights: the previous iterate, θ_0 or an EMA.

    The buffers start as a copy of the current weights (θ_0); ``buffers`` may be shared with the rule's
    restore backup (memory-optimal ``tram-prev``).
    """

    def __init__(self, params, buffers: Optional[list[torch.Tensor]] = None, dtype: Optional[torch.dtype] = None,
                 target_mode: str = "train"):
        if target_mode not in ("train", "eval"):
            raise ValueError(f"target_mode must be 'train' or 'eval', got {target_mode!r}")
        self.params = params
        self.buffers = buffers if buffers is not None else clone_weights(params, dtype)
        self.target_mode = target_mode

    def target(self, ctx, batch, forward_kwargs: Optional[dict] = None) -> LossOutput:
        """The no-grad target output for ``batch``, under the dropout masks the next forward will draw."""
        with replayed_rng(ctx.fabric.device), weights_swapped_in(self.params, self.buffers), _mode(ctx.model, self.target_mode):
            return ctx.no_grad_forward(batch, forward_kwargs).as_target()

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        for b, p in zip(self.buffers, self.params):
            b.mul_(decay).add_(local(p).to(b.dtype), alpha=1.0 - decay)


class NoiseReference:
    """Target distributions p(·|x + z; θ): the same weights on noised input embeddings (tram-x)."""

    def __init__(self, noise_forward):
        self.noise_forward = noise_forward  # (ctx, batch, detach) -> context manager yielding forward kwargs

    def target(self, ctx, batch, forward_kwargs: Optional[dict] = None) -> LossOutput:
        with replayed_rng(ctx.fabric.device), self.noise_forward(ctx, batch) as kwargs:
            return ctx.no_grad_forward(batch, kwargs).as_target()


@contextlib.contextmanager
def _mode(model, target_mode: str):
    if target_mode == "eval" and model.training:
        model.eval()
        try:
            yield
        finally:
            model.train()
    else:
        yield


class DivergenceMeter:
    """Σ D and the number of valid positions over a step's micro-batches; ``mean`` is all-reduced."""

    def __init__(self, name: str):
        check_divergence(name)  # an unknown name fails at set-up, before any step
        self.name = name
        self.total = self.count = None

    def reset(self) -> None:
        self.total = self.count = None

    def add(self, target: LossOutput, current: LossOutput) -> torch.Tensor:
        """Add one micro-batch; returns its Σ D over ``current``'s valid positions (with gradient through whichever
        side is in a graph when grad is enabled)."""
        (t, t_normalized), (c, c_normalized) = target.divergence_input(), current.divergence_input()
        total, count = divergence_sum(self.name, t, c, current.mask, normalized=(t_normalized, c_normalized))
        t, c = total.detach().double(), count.double()
        self.total = t if self.total is None else self.total + t
        self.count = c if self.count is None else self.count + c
        return total

    def mean(self, ctx) -> float:
        if self.total is None:
            return 0.0
        both = ctx.all_reduce_sum(torch.stack([self.total, self.count]))
        return float(both[0] / both[1].clamp(min=1))
