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


MMD_BANDWIDTHS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)  # the published code's default


def _imq_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of Σ_h (h² + ‖a_i − b_j‖²)^(−1/2), the inverse multiquadratic kernel."""
    sq = torch.cdist(a, b).pow(2)
    return sum((h * h + sq).rsqrt() for h in MMD_BANDWIDTHS).mean()


@register_divergence("mmd", description="MMD² between the sets of target and current output distributions (classification only)")
def mmd(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Biased MMD² estimate between the *sets* {p_i} and {q_i} of a micro-batch (one value, not per position)."""
    p, q = log_p.exp(), log_q.exp()
    return _imq_kernel_mean(p, p) + _imq_kernel_mean(q, q) - 2 * _imq_kernel_mean(p, q)


mmd.per_position = False


def check_divergence(name: str) -> None:
    """Raise at set-up for an unknown divergence name (the message lists the valid ones)."""
    DIVERGENCES.get(name)


CHUNK_ELEMENTS = 1 << 22  # positions × classes per chunk: 16 MiB per float32 temporary


def divergence_sum(name: str, target_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None,
                   chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ over valid positions of D(p_target ‖ q_current), number of valid positions); gradient flows through ``logits``."""
    fn = DIVERGENCES.get(name).target
    set_level = not getattr(fn, "per_position", True)
    if set_level and logits.dim() != 2:
        raise ValueError(f"divergence {name!r} compares sets of output distributions and is supported for "
                         "classification (logits of shape (batch, classes)) only; use kl, kl-reverse, kl-sym or l2")
    classes = logits.size(-1)
    chunk_size = chunk_size or max(1, CHUNK_ELEMENTS // classes)
    target_flat, current_flat = target_logits.reshape(-1, classes), logits.reshape(-1, classes)
    if mask is not None:
        index = mask.reshape(-1).nonzero().squeeze(1)
        target_flat, current_flat = target_flat.index_select(0, index), current_flat.index_select(0, index)
    dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least (an fp64 model keeps fp64)
    total = logits.new_zeros((), dtype=dtype)
    if set_level:  # one value for the micro-batch, weighted by its number of positions
        n = current_flat.size(0)
        value = fn(torch.log_softmax(target_flat.to(dtype), -1), torch.log_softmax(current_flat.to(dtype), -1)) if n else total
        return value * n, torch.tensor(n, device=logits.device)
    for start in range(0, current_flat.size(0), chunk_size):
        log_p = torch.log_softmax(target_flat[start:start + chunk_size].to(dtype), dim=-1)
        log_q = torch.log_softmax(current_flat[start:start + chunk_size].to(dtype), dim=-1)
        total = total + fn(log_p, log_q).sum()
    return total, torch.tensor(current_flat.size(0), device=logits.device)
