"""The step contract between the engine and the update rules.

The engine draws a step's micro-batches up front and hands an update rule a :class:`StepContext`. A rule runs
as many passes as it needs with :meth:`StepContext.forward_backward` (every pass replays the same micro-batches,
with explicit gradient-sync control and global normalisation), reads shard-aware norms, and ends with
:meth:`StepContext.clip_and_step`, the only place the base optimizer steps (through Fabric, so the loss scaler
unscales and steps once).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fabric_tram.engine.distributed import all_reduce_sum, global_norm, sum_of_squares
from fabric_tram.tasks.base import LossOutput

# called with (micro-batch index, batch, the task's LossOutput); returns a loss-sum-like tensor to add to the
# micro-batch's loss before its backward (a regulariser), or None
OutputHook = Callable[[int, dict, LossOutput], Optional[torch.Tensor]]


@dataclass
class PassResult:
    loss: float  # global mean of the task loss over the step's targets (regularisers excluded)
    loss_sum_local: torch.Tensor
    extra_sum_local: torch.Tensor  # sum of what the hook added (in loss units, before normalisation)


@dataclass
class StepContext:
    fabric: object
    model: torch.nn.Module  # Fabric-wrapped
    optimizer: object  # Fabric-wrapped base optimizer
    loss_fn: Callable[..., LossOutput]  # task.loss(model, batch, **forward_kwargs)
    micro_batches: list[dict]
    step: int  # 1-based optimizer step
    n_global: torch.Tensor  # targets of the whole step: all micro-batches, all ranks (float64)
    grad_clip: float = 0.0
    passes: dict = field(default_factory=lambda: {"forward": 0, "backward": 0, "no_grad_forward": 0})

    @property
    def world_size(self) -> int:
        return self.fabric.world_size

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward_backward(self, on_output: Optional[OutputHook] = None, forward_kwargs: Optional[Callable[[int, dict], dict]] = None) -> PassResult:
        """One gradient pass over the step's micro-batches; leaves the step's mean gradient in ``p.grad``.

        Each micro-batch's backward uses ``loss_sum_local / N_global * W``: data-parallel strategies average
        gradients over the W ranks, so this yields the gradient of the mean over every target of the step.
        Gradient sync is skipped on all but the last micro-batch.
        """
        k = len(self.micro_batches)
        scale = self.world_size / float(self.n_global.clamp(min=1))
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.fabric.device)
        extra_sum = torch.zeros((), dtype=torch.float64, device=self.fabric.device)
        for i, batch in enumerate(self.micro_batches):
            with self.fabric.no_backward_sync(self.model, enabled=self.world_size > 1 and i < k - 1):
                out = self.loss_fn(self.model, batch, **(forward_kwargs(i, batch) if forward_kwargs else {}))
                total = out.loss_sum
                if on_output is not None:
                    extra = on_output(i, batch, out)
                    if extra is not None:
                        total = total + extra
                        extra_sum += extra.detach().double()
                self.fabric.backward(total * scale)
            loss_sum += out.loss_sum.detach().double()
        self.passes["forward"] += 1
        self.passes["backward"] += 1
        mean = all_reduce_sum(self.fabric, loss_sum) / self.n_global.clamp(min=1)
        return PassResult(loss=float(mean), loss_sum_local=loss_sum, extra_sum_local=extra_sum)

    def grads(self) -> list[Optional[torch.Tensor]]:
        return [p.grad for p in self.parameters]

    def grad_norm(self) -> torch.Tensor:
        """‖g‖ over all parameters and all shards (float32, identical on every rank)."""
        return global_norm(self.grads())

    def sum_of_squares(self, tensors) -> torch.Tensor:
        return sum_of_squares(tensors)

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(self.fabric, value)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def loss_scale(self) -> float:
        """The fp16 loss scale in force (1.0 without a scaler): gradients in ``p.grad`` are multiplied by it."""
        scaler = getattr(self.fabric.strategy.precision, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def clip_and_step(self) -> dict:
        """Unscale (once), clip the global gradient norm, step the base optimizer through Fabric, zero grads."""
        precision = self.fabric.strategy.precision
        scaler = getattr(precision, "scaler", None)
        if scaler is not None:
            scaler.unscale_(self.optimizer.optimizer)  # the unwrapped optimizer: unscaled exactly once
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
