"""The forwards of a gradient pass, as their own object: what objectives and targets call, separate from the step
runner (``StepContext``: passes, normalisation, gradients, the base step), so a pass runs step → objective →
forwards and never back into the step.

Every forward is counted: the passes a step ran are these counts divided by its number of micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fabric_tram.distributed import reshard_after_no_grad_forward
from fabric_tram.loss import LossOutput


def zero_counts() -> dict:
    return {"forward": 0, "no_grad_forward": 0, "backward": 0}


@dataclass
class Forwards:
    """The model's forwards for one optimizer step, and what objectives and targets need around them: the step
    (input noise is a function of it), the device (dropout masks are replayed on it), the model (a target may
    switch its mode) and the compute dtype (what a target's logits are kept in)."""

    model: torch.nn.Module  # Fabric-wrapped
    loss_fn: Callable[..., LossOutput]  # task.loss(model, batch, **forward_kwargs)
    step: int  # 1-based optimizer step
    device: torch.device
    compute_dtype: torch.dtype | None = None  # mixed precision's autocast dtype
    counts: dict = field(default_factory=zero_counts)  # shared with the step runner, which counts backwards

    def forward(self, batch, **forward_kwargs) -> LossOutput:
        """The task's loss on ``batch`` (with gradient where grad is enabled): the plain objective."""
        self.counts["forward"] += 1
        return self.loss_fn(self.model, batch, **forward_kwargs)

    @torch.no_grad()
    def no_grad_forward(self, batch, **forward_kwargs) -> LossOutput:
        """A forward without gradient (a rule's target forward); FSDP2 is resharded afterwards (docs/design.md)."""
        self.counts["no_grad_forward"] += 1
        out = self.loss_fn(self.model, batch, **forward_kwargs)
        reshard_after_no_grad_forward(self.model)
        return out

    def target_output(self, batch, **forward_kwargs) -> LossOutput:
        """A target's distribution: a no-grad forward, its logits kept in the compute dtype only."""
        return self.no_grad_forward(batch, **forward_kwargs).as_target(self.compute_dtype)
