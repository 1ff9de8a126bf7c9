"""Per-position divergences between a target distribution p and the current one q (ALGORITHMS.md, "The divergence").

Each entry maps float32 log-probabilities ``(log_p, log_q)`` of shape (positions, classes) to one value per
position. :func:`divergence_sum` applies one over the valid positions in chunks, so no float32
(batch, seq, vocab) copy of a whole micro-batch is ever held.
"""
from __future__ import annotations

import torch

from fabric_tram.registry import DIVERGENCES, register_divergence


@register_divergence("kl", description="forward KL(p_target || q_current) = sum p (log p - log q) (paper default)")
def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@register_divergence("kl-reverse", description="reverse KL(q_current || p_target)")
def kl_reverse(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return kl(log_q, log_p)


@register_divergence("kl-sym", description="KL(p||q) + KL(q||p), the sum (as fairseq's R3F)")
def kl_sym(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return kl(log_p, log_q) + kl(log_q, log_p)


@register_divergence("l2", description="||p - q||_2 on the probability vectors")
def l2(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() - log_q.exp()).pow(2).sum(-1).sqrt()


def divergence_sum(name: str, target_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None,
                   chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ over valid positions of D(p_target ‖ q_current), number of valid positions); gradient flows through ``logits``."""
    fn = DIVERGENCES.get(name).target
    classes = logits.size(-1)
    target_flat, current_flat = target_logits.reshape(-1, classes), logits.reshape(-1, classes)
    if mask is not None:
        index = mask.reshape(-1).nonzero().squeeze(1)
        target_flat, current_flat = target_flat.index_select(0, index), current_flat.index_select(0, index)
    dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least (an fp64 model keeps fp64)
    total = logits.new_zeros((), dtype=dtype)
    for start in range(0, current_flat.size(0), chunk_size):
        log_p = torch.log_softmax(target_flat[start:start + chunk_size].to(dtype), dim=-1)
        log_q = torch.log_softmax(current_flat[start:start + chunk_size].to(dtype), dim=-1)
        total = total + fn(log_p, log_q).sum()
    return total, torch.tensor(current_flat.size(0), device=logits.device)
