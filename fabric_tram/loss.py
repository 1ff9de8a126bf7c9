"""The one batch-to-loss signature shared by the tasks, the engine and the update rules (a leaf: torch only).

A loss function ``loss_fn(model, batch, **forward_kwargs) -> LossOutput`` returns the loss *summed* over the
micro-batch's targets and their number; the engine divides by the step's global target count, so accumulation
and data parallelism give the gradient of one big batch (docs/design.md, "Normalisation").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

IGNORE_INDEX = -100  # the label of positions that are not targets (padding), as torch's cross-entropy


@dataclass
class LossOutput:
    """What a loss function returns for one micro-batch.

    ``loss_sum`` is summed over the micro-batch's targets (never a mean); ``count`` is their number;
    ``logits`` and ``mask`` (valid positions, shape ``logits.shape[:-1]``) feed the divergences.
    ``log_probs`` (optional): the float32 log-softmax of ``logits`` that the loss itself computed, in its graph;
    when present the divergences read it instead of recomputing it, and their gradient joins the loss's at that
    node, so one log-softmax backward serves both (the largest saving of a regulariser's step on a large vocabulary).
    ``regulariser`` (optional): a term a trust-region regulariser adds to the loss (``λ Σ D``, summed like the
    loss); the backward runs on ``loss_sum + regulariser``, the logged loss is ``loss_sum`` alone.
    """

    loss_sum: torch.Tensor
    count: torch.Tensor  # number of targets in the micro-batch (a 0-dim tensor)
    logits: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    regulariser: torch.Tensor | None = None

    def objective_sum(self) -> torch.Tensor:
        """What the backward differentiates: the loss sum plus the regulariser, if any."""
        return self.loss_sum if self.regulariser is None else self.loss_sum + self.regulariser

    def divergence_input(self) -> tuple[torch.Tensor, bool]:
        """(log_probs, True) when the loss computed them, else (logits, False): what the divergences read."""
        if self.log_probs is not None:
            return self.log_probs, True
        if self.logits is None:
            raise ValueError(
                "this update rule compares output distributions, but the loss function returned no "
                "logits: return a LossOutput (or a tuple loss_sum, count, logits, mask) with them"
            )
        return self.logits, False

    def as_target(self, compute_dtype: torch.dtype | None = None) -> LossOutput:
        """What a target distribution needs, held until the current forward's divergence is taken.

        Without ``compute_dtype``: the float32 log-probabilities the loss computed (the logits are dropped).
        With it (bf16/fp16 mixed precision): only the logits, cast back to the dtype they were computed in, a
        lossless cast that halves what a target holds; the divergence recomputes each chunk's log-softmax.
        """
        if compute_dtype is not None and self.logits is not None:
            return LossOutput(self.loss_sum.detach(), self.count, self.logits.to(compute_dtype), self.mask, None)
        keep_logits = self.log_probs is None
        return LossOutput(
            self.loss_sum.detach(), self.count, self.logits if keep_logits else None, self.mask, self.log_probs
        )

    def with_regulariser(self, term: torch.Tensor) -> LossOutput:
        return replace(self, regulariser=term if self.regulariser is None else self.regulariser + term)


def count_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The number of targets among ``labels`` (those not ``ignore_index``), a 0-dim tensor."""
    return (labels != ignore_index).sum()


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> LossOutput:
    """Token-summed cross-entropy in float32 (float64 models keep float64); positions labelled ``ignore_index``
    are masked out.

    Written as log-softmax + NLL (what ``cross_entropy`` does inside) to hand the log-probabilities to the divergences.
    """
    mask = labels != ignore_index
    log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    loss_sum = torch.nn.functional.nll_loss(
        log_probs.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    return LossOutput(loss_sum=loss_sum, count=mask.sum(), logits=logits, mask=mask, log_probs=log_probs)


# positions × classes per chunk (the chunked cross-entropy here, the chunked divergences of optim/divergences.py).
# CPU: 4 MiB per float32 temporary, so a chunk's few temporaries stay in a last-level cache (measured: 1<<22 was
# ~15% slower on a 32 MiB L3); GPU: 64 MiB, few enough chunks at a 50,257-token vocabulary (~25 for 8,192
# positions) that kernel launches do not dominate.
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}


def chunk_rows(classes: int, device: torch.device) -> int:
    return max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"]) // classes)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Σ over target rows of log-sum-exp(x) − x[label], the rows taken a chunk at a time in float32 (float64 stays
    float64): nothing the size of the logits is built in float32, forward or backward. The forward keeps one
    log-sum-exp per row; the backward forms softmax − one-hot again, chunk by chunk, into a gradient in the
    logits' own dtype (what the plain loss's cast hands back too)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, chunk: int) -> torch.Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        valid = labels != ignore_index
        safe = labels.masked_fill(~valid, 0)  # any in-range id: the row weighs 0
        lse = torch.empty(logits.size(0), dtype=dtype, device=logits.device)
        total = torch.zeros((), dtype=dtype, device=logits.device)
        for s in range(0, logits.size(0), chunk):
            x = logits[s : s + chunk].to(dtype)
            lse[s : s + chunk] = torch.logsumexp(x, dim=-1)
            picked = x.gather(1, safe[s : s + chunk, None]).squeeze(1)
            total += torch.where(valid[s : s + chunk], lse[s : s + chunk] - picked, 0.0).sum()
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, safe, valid, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, logits.size(0), ctx.chunk):
            rows = slice(s, s + ctx.chunk)
            p = torch.exp(logits[rows].to(lse.dtype) - lse[rows, None])  # softmax
            p.scatter_add_(1, safe[rows, None], torch.full_like(p[:, :1], -1.0))  # − one-hot
            p *= (valid[rows].to(p.dtype) * grad_total.to(p.dtype))[:, None]
            grad[rows] = p
        return grad, None, None, None


def chunked_cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None
) -> LossOutput:
    """:func:`cross_entropy_sum` without a float32 log-softmax the size of the logits (``task.cross_entropy=
    chunked``): equal to it (float64, tested), a logits-sized float32 tensor lighter in the forward and two in the
    backward. It hands no log-probabilities to the divergences: they read the logits and take each chunk's
    log-softmax themselves (an extra pass over the logits on a step that measures d)."""
    mask = labels != ignore_index
    classes = logits.size(-1)
    chunk = chunk_size or chunk_rows(classes, logits.device)
    loss_sum = ChunkedCrossEntropy.apply(logits.reshape(-1, classes), labels.reshape(-1), ignore_index, chunk)
    return LossOutput(loss_sum=loss_sum, count=mask.sum(), logits=logits, mask=mask)


def as_loss_output(result: Any) -> LossOutput:
    """Normalise what a user's loss function returns: a LossOutput, a scalar loss (a mean over one target), or
    a tuple ``(loss_sum, count, logits, mask)`` whose count and mask may be None."""
    if isinstance(result, LossOutput):
        return result
    if isinstance(result, torch.Tensor):
        return LossOutput(loss_sum=result, count=torch.tensor(1.0, device=result.device))
    if isinstance(result, (tuple, list)) and 1 <= len(result) <= 4:
        loss_sum, count, logits, mask = (*result, None, None, None)[:4]
        if count is None:
            count = torch.tensor(1.0, device=loss_sum.device)
        return LossOutput(loss_sum, torch.as_tensor(count, device=loss_sum.device), logits, mask)
    raise TypeError("loss_fn must return a LossOutput, a scalar loss, or a tuple (loss_sum, count, logits, mask)")


def token_weighted_loss(metrics: dict[str, dict], domains: list[str]) -> float:
    """The loss over ``domains`` of an evaluation's per-domain ``metrics``, each domain weighted by its number of
    targets (``tokens`` for language modelling, ``examples`` for classification): the loss of all their targets
    together, never a mean of per-domain means. Every domain when none of ``domains`` was evaluated. The in-domain
    validation loss that chooses the best checkpoint (engine) and a sweep's setting (analysis)."""
    names = [d for d in domains if d in metrics] or list(metrics)
    counts = {}
    for d in names:
        count = metrics[d].get("tokens", metrics[d].get("examples"))
        if count is None:
            raise ValueError(f"the metrics of domain {d!r} have no target count (tokens or examples) to weight by")
        counts[d] = count
    total = sum(counts.values())
    return sum(metrics[d]["loss"] * counts[d] for d in names) / max(total, 1e-12)
