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
    ``log_probs`` (optional): the float32 log-softmax of ``logits`` that the loss itself computed, in its graph;
    when present the divergences read it instead of recomputing it, and their gradient joins the loss's at that
    node, so one log-softmax backward serves both (the largest saving of a regulariser's step on a large vocabulary).
    """

    loss_sum: torch.Tensor
    count: torch.Tensor  # number of targets in the micro-batch (a 0-dim tensor)
    logits: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    log_probs: Optional[torch.Tensor] = None

    def divergence_input(self) -> tuple[torch.Tensor, bool]:
        """(log_probs, True) when the loss computed them, else (logits, False): what the divergences read."""
        return (self.log_probs, True) if self.log_probs is not None else (self.logits, False)

    def as_target(self) -> "LossOutput":
        """What a target distribution needs: the logits are dropped when log_probs exist (the loss is kept, detached)."""
        keep_logits = self.log_probs is None
        return LossOutput(self.loss_sum.detach(), self.count, self.logits if keep_logits else None, self.mask, self.log_probs)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> LossOutput:
    """Token-summed cross-entropy in float32; positions labelled ``ignore_index`` are masked out.

    Written as log-softmax + NLL (what ``cross_entropy`` does inside) to hand the log-probabilities to the divergences.
    """
    mask = labels != ignore_index
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    loss_sum = torch.nn.functional.nll_loss(log_probs.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                            ignore_index=ignore_index, reduction="sum")
    return LossOutput(loss_sum=loss_sum, count=mask.sum(), logits=logits, mask=mask, log_probs=log_probs)
