"""The one batch-to-loss signature shared by tasks, the engine and the update rules' user-loop API."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class LossOutput:
    """What a task's ``loss(model, batch)`` returns.

    ``loss_sum`` is summed over the micro-batch's targets (never a mean: the engine divides by the step's global
    target count); ``logits`` and ``mask`` (valid positions, shape ``logits.shape[:-1]``) feed the divergences.
    """

    loss_sum: torch.Tensor
    count: torch.Tensor  # number of targets in the micro-batch (a 0-dim tensor)
    logits: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> LossOutput:
    """Token-summed cross-entropy in float32; positions labelled ``ignore_index`` are masked out."""
    mask = labels != ignore_index
    loss_sum = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    return LossOutput(loss_sum=loss_sum, count=mask.sum(), logits=logits, mask=mask)
