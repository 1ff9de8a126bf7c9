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


KL_FAMILY = ("kl", "kl-reverse", "kl-sym")


def _kl_rows(lp: torch.Tensor, lq: torch.Tensor, name: str) -> torch.Tensor:
    forward = (lp.exp() * (lp - lq)).sum(-1) if name in ("kl", "kl-sym") else 0.0
    reverse = (lq.exp() * (lq - lp)).sum(-1) if name in ("kl-reverse", "kl-sym") else 0.0
    return forward + reverse


class ChunkedKL(torch.autograd.Function):
    """Σ over valid rows of a KL-family divergence, chunked over rows in forward *and* backward.

    Nothing vocabulary-sized is saved for the backward (it recomputes each chunk's log-softmaxes): autograd
    through log_softmax/exp/product would keep several float32 (positions × vocabulary) tensors per micro-batch.
    Gradients, per row, with p = softmax(target), q = softmax(current):
      KL(p‖q): d/dcurrent = q − p,            d/dtarget = p ⊙ (log p − log q − KL(p‖q))
      KL(q‖p): d/dcurrent = q ⊙ (log q − log p − KL(q‖p)),   d/dtarget = p − q
    """

    @staticmethod
    def forward(ctx, target, current, weight, name: str, chunk: int, dtype: torch.dtype):
        total = current.new_zeros((), dtype=dtype)
        for s in range(0, current.size(0), chunk):
            lp = torch.log_softmax(target[s:s + chunk].to(dtype), -1)
            lq = torch.log_softmax(current[s:s + chunk].to(dtype), -1)
            total = total + (_kl_rows(lp, lq, name) * weight[s:s + chunk]).sum()
        ctx.save_for_backward(target, current, weight)
        ctx.name, ctx.chunk, ctx.dtype = name, chunk, dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        target, current, weight = ctx.saved_tensors
        need_t, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_t = torch.empty_like(target) if need_t else None
        grad_c = torch.empty_like(current) if need_c else None
        for s in range(0, current.size(0), ctx.chunk):
            lp = torch.log_softmax(target[s:s + ctx.chunk].to(ctx.dtype), -1)
            lq = torch.log_softmax(current[s:s + ctx.chunk].to(ctx.dtype), -1)
            p, q = lp.exp(), lq.exp()
            scale = (weight[s:s + ctx.chunk] * grad_total).to(ctx.dtype).unsqueeze(-1)
            g_t = torch.zeros_like(lp) if need_t else None
            g_c = torch.zeros_like(lq) if need_c else None
            if ctx.name in ("kl", "kl-sym"):
                if need_c:
                    g_c += q - p
                if need_t:
                    g_t += p * (lp - lq - (p * (lp - lq)).sum(-1, keepdim=True))
            if ctx.name in ("kl-reverse", "kl-sym"):
                if need_c:
                    g_c += q * (lq - lp - (q * (lq - lp)).sum(-1, keepdim=True))
                if need_t:
                    g_t += p - q
            if need_t:
                grad_t[s:s + ctx.chunk] = (g_t * scale).to(grad_t.dtype)
            if need_c:
                grad_c[s:s + ctx.chunk] = (g_c * scale).to(grad_c.dtype)
        return grad_t, grad_c, None, None, None, None


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
    if name in KL_FAMILY:  # masked rows weigh 0; no row copies, nothing vocabulary-sized kept for the backward
        dtype = torch.promote_types(logits.dtype, torch.float32)
        weight = (mask.reshape(-1).to(dtype) if mask is not None else current_flat.new_ones(current_flat.size(0), dtype=dtype))
        total = ChunkedKL.apply(target_flat, current_flat, weight, name, chunk_size, dtype)
        count = weight.sum().round().long() if mask is not None else torch.tensor(current_flat.size(0), device=logits.device)
        return total, count
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
