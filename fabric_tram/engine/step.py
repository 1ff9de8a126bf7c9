"""The step contract between the engine and the update rules.

The engine draws a step's micro-batches up front and hands an update rule a :class:`StepContext`. A rule runs
as many passes as it needs with :meth:`StepContext.forward_backward` (every pass replays the same micro-batches,
with explicit gradient-sync control and global normalisation) and :meth:`StepContext.no_grad_forward`, reads
shard-aware norms, and ends with :meth:`StepContext.clip_and_step`, the only place the base optimizer steps
(through Fabric, so that a loss scaler unscales and steps exactly once).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch

from fabric_tram.engine.distributed import all_reduce_sum, global_norm, reshard_after_no_grad_forward
from fabric_tram.tasks.base import LossOutput

# (micro-batch index, batch, the task's LossOutput) -> a loss-sum-like tensor added before the backward, or None
OutputHook = Callable[[int, dict, LossOutput], Optional[torch.Tensor]]
# (micro-batch index, batch) -> a context manager around the forward that yields extra forward kwargs
ForwardContext = Callable[[int, dict], ContextManager[dict]]


@dataclass
class PassResult:
    loss: float  # global mean of the task loss over the step's targets (regularisers excluded)
    extra: float  # global mean of what the hook added (the regulariser), same normalisation


@dataclass
class StepContext:
    fabric: object  # a Fabric, or anything with its small interface (see fabric_tram.optim.api)
    model: torch.nn.Module  # Fabric-wrapped
    optimizer: object  # Fabric-wrapped base optimizer
    loss_fn: Callable[..., LossOutput]  # task.loss(model, batch, **forward_kwargs)
    micro_batches: list
    step: int  # 1-based optimizer step
    n_global: Optional[torch.Tensor] = None  # targets of the whole step (all micro-batches, all ranks); None: from
    # the loss output, which needs a single micro-batch
    grad_clip: float = 0.0
    measure_grad_norm: bool = True  # the engine turns it off on steps it does not log (it costs a pass over the gradients)
    passes: dict = field(default_factory=lambda: {"forward": 0, "backward": 0, "no_grad_forward": 0})

    @property
    def world_size(self) -> int:
        return self.fabric.world_size

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward_backward(self, on_output: Optional[OutputHook] = None, before: Optional[Callable[[int, dict], None]] = None,
                         forward_context: Optional[ForwardContext] = None, sync: bool = True) -> PassResult:
        """One gradient pass over the step's micro-batches; leaves the step's mean gradient in ``p.grad``.

        Each micro-batch's backward uses ``loss_sum_local / N_global * W``: data-parallel strategies average
        gradients over the W ranks, so this yields the gradient of the mean over every target of the step.
        Gradient sync is skipped on all but the last micro-batch. ``sync=False`` (per-rank "m-sharpness")
        skips it on every micro-batch and normalises by this rank's own count: a per-rank mean gradient.
        ``before(i, batch)`` runs before micro-batch i's forward (the no-grad target forwards of the rules).
        """
        k = len(self.micro_batches)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.fabric.device)
        extra_sum = torch.zeros((), dtype=torch.float64, device=self.fabric.device)
        for i, batch in enumerate(self.micro_batches):
            if before is not None:
                before(i, batch)
            skip_sync = (not sync) or (self.world_size > 1 and i < k - 1)
            with self.fabric.no_backward_sync(self.model, enabled=skip_sync and self.world_size > 1):
                with (forward_context(i, batch) if forward_context else contextlib.nullcontext({})) as kwargs:
                    out = self.loss_fn(self.model, batch, **kwargs)
                total = out.loss_sum
                if on_output is not None:
                    extra = on_output(i, batch, out)
                    if extra is not None:
                        total = total + extra
                        extra_sum += extra.detach().double()
                count = torch.as_tensor(out.count, dtype=torch.float64, device=self.fabric.device)
                loss_sum += out.loss_sum.detach().double()
                del out  # its logits and log-probabilities must be freed as soon as the backward is done with them
                if self.n_global is None:
                    if k != 1:
                        raise ValueError("with several micro-batches, pass their global target count (n_global)")
                    self.n_global = all_reduce_sum(self.fabric, count)
                scale = (1.0 / float(self.local_count())) if not sync else self.world_size / float(self.n_global.clamp(min=1))
                self.fabric.backward(total * scale)
        self.passes["forward"] += 1
        self.passes["backward"] += 1
        n = self.n_global.clamp(min=1)
        return PassResult(loss=float(all_reduce_sum(self.fabric, loss_sum) / n), extra=float(all_reduce_sum(self.fabric, extra_sum) / n))

    def local_count(self) -> torch.Tensor:
        """Targets of this rank's micro-batches (for per-rank normalisation)."""
        counts = [b["labels"].ne(-100).sum() if isinstance(b, dict) and "labels" in b and b["labels"].dtype == torch.long else None
                  for b in self.micro_batches]
        if any(c is None for c in counts):
            raise ValueError("per-rank normalisation needs integer 'labels' in every micro-batch")
        return torch.stack(counts).sum().clamp(min=1)

    @torch.no_grad()
    def no_grad_forward(self, batch, forward_kwargs: Optional[dict] = None) -> LossOutput:
        """A forward without gradient (a rule's target forward); FSDP2 is resharded afterwards (DESIGN.md)."""
        out = self.loss_fn(self.model, batch, **(forward_kwargs or {}))
        reshard_after_no_grad_forward(self.model)
        return out

    def count_pass(self, kind: str) -> None:
        self.passes[kind] += 1

    def grads(self) -> list[Optional[torch.Tensor]]:
        return [p.grad for p in self.parameters]

    def grad_norm(self) -> torch.Tensor:
        """‖g‖ over all parameters and all shards (float32, identical on every rank)."""
        return global_norm(self.grads())

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(self.fabric, value)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def scaler(self):
        scaler = getattr(self.fabric.strategy.precision, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def loss_scale(self) -> float:
        """The fp16 loss scale in force (1.0 without a scaler): gradients in ``p.grad`` are multiplied by it."""
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def skip_step(self) -> dict:
        """Drop this step (an overflow in the ascent pass): no update, and the loss scaler backs off."""
        self.zero_grad()
        if self.scaler is not None:
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        return {"grad_norm": float("nan"), "skipped": True}

    def clip_and_step(self) -> dict:
        """Unscale (once), clip the global gradient norm, step the base optimizer through Fabric, zero grads."""
        scaler = self.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer.optimizer)  # the unwrapped optimizer: unscaled exactly once
        if self.grad_clip <= 0 and not self.measure_grad_norm and scaler is None:  # nothing needs the norm
            self.optimizer.step()
            self.zero_grad()
            return {"grad_norm": float("nan"), "skipped": False}
        norm = self.grad_norm()
        finite = bool(torch.isfinite(norm))
        if self.grad_clip > 0 and finite and float(norm) > self.grad_clip:
            factor = self.grad_clip / (float(norm) + 1e-6)
            for g in self.grads():
                if g is not None:
                    g.mul_(factor)
        self.optimizer.step()  # with a scaler: skipped on inf/nan, and the scale is updated
        self.zero_grad()
        return {"grad_norm": float(norm), "skipped": scaler is not None and not finite}
