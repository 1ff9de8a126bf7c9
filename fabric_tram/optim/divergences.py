"""Per-position divergences between a target distribution p and the current one q (docs/algorithms.md, "The
divergence").

Each entry maps float32 log-probabilities ``(log_p, log_q)`` of shape (positions, classes) to one value per
position. :func:`divergence_sum` applies one over the valid positions in chunks, so no float32
(batch, seq, vocab) copy of a whole micro-batch is ever held.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fabric_tram.loss import chunk_rows
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


@register_divergence(
    "mmd", description="MMD² between the sets of target and current output distributions (classification only)"
)
def mmd(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Biased MMD² estimate between the *sets* {p_i} and {q_i} of a micro-batch (one value, not per position)."""
    p, q = log_p.exp(), log_q.exp()
    return _imq_kernel_mean(p, p) + _imq_kernel_mean(q, q) - 2 * _imq_kernel_mean(p, q)


mmd.per_position = False


KL_FAMILY = ("kl", "kl-reverse", "kl-sym")


def _as_log_probs(scores: torch.Tensor, normalized: bool, dtype: torch.dtype) -> torch.Tensor:
    return scores.to(dtype) if normalized else torch.log_softmax(scores.to(dtype), -1)


def _weighted_dot(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Σ_rows w_r Σ_v x_rv y_rv; ``w`` None: every row weighs 1, and the sum is one dot product over the chunk
    (a read of both, no temporary), where per-row weights need a product per row first."""
    if w is None:
        return torch.dot(x.reshape(-1), y.reshape(-1))
    return torch.dot(torch.linalg.vecdot(x, y), w)


class KLChunk(NamedTuple):
    g_t: tuple[torch.Tensor, int] | None  # d/dlog p and its sign, where the target branch needs a gradient
    g_c: tuple[torch.Tensor, int] | None  # d/dlog q and its sign, where the current branch needs one
    value: tuple[torch.Tensor, int]  # (v, sign): the chunk's divergence is sign · Σ v δ per row
    delta: torch.Tensor  # δ = log p − log q
    p: torch.Tensor | None  # the probabilities, where computed (the log-softmax of logits inputs reuses them)
    q: torch.Tensor | None


def _kl_chunk(lp: torch.Tensor, lq: torch.Tensor, name: str, need_t: bool = False, need_c: bool = False) -> KLChunk:
    """The KL-family gradients of one chunk with respect to the log-probabilities as free variables (p = e^log p,
    q = e^log q, δ = log p − log q), each as (tensor, sign), where asked:
      KL(p‖q) = Σ p δ:        d/dlog q = −p,             d/dlog p = p (1 + δ)
      KL(q‖p) = −Σ q δ:       d/dlog q = q (1 − δ),      d/dlog p = −q
      the sum, m = p − q:     d/dlog q = −(m + q δ),     d/dlog p = m + p δ,     value Σ m δ
    the value's factor v with its sign (value = sign Σ v δ), δ, p and q; a sign is left to the caller's weighting.
    δ is taken elementwise first: Σ p log p − Σ p log q would cancel (both near the entropy; their difference is
    the KL, 1e-4 a position late in a run)."""
    forward, reverse = name in ("kl", "kl-sym"), name in ("kl-reverse", "kl-sym")
    p = lp.exp() if forward else None
    q = lq.exp() if reverse else None
    delta = lp - lq
    if forward and reverse:
        m = p - q
        g_t = (torch.addcmul(m, p, delta), 1) if need_t else None
        g_c = (torch.addcmul(m, q, delta), -1) if need_c else None
        return KLChunk(g_t, g_c, (m, 1), delta, p, q)
    if forward:
        g_t = (torch.addcmul(p, p, delta), 1) if need_t else None
        return KLChunk(g_t, (p, -1) if need_c else None, (p, 1), delta, p, q)
    g_c = (torch.addcmul(q, q, delta, value=-1), 1) if need_c else None
    return KLChunk((q, -1) if need_t else None, g_c, (q, -1), delta, p, q)


def _kl_total(value, delta, w, gradients) -> torch.Tensor:
    """Σ_rows w_r KL-family(row) of one chunk, ``value`` = (v, sign) from :func:`_kl_chunk`. Where a gradient is
    ±v itself (−p: KL(p‖q) through the current branch, as trpo and mesa take it; −q: KL(q‖p) through the
    target), its weighted form G = ±w·v already holds the weights: the sum is one dot product of G with δ, no
    per-row product written. ``gradients``: ((g, sign), G) of each branch that has one."""
    v, v_sign = value
    for (g, g_sign), weighted in gradients:
        if g is v:  # G = g_sign · w · v, so Σ w v δ = g_sign · G·δ
            return v_sign * g_sign * torch.dot(weighted.reshape(-1), delta.reshape(-1))
    return v_sign * _weighted_dot(v, delta, w)


class ChunkedKL(torch.autograd.Function):
    """Σ over valid rows of a KL-family divergence, chunked over rows, nothing vocabulary-sized built whole.

    Each input is either logits or, when ``normalized``, log-probabilities already computed by the loss
    (``LossOutput.log_probs``): then no log-softmax is recomputed, and the gradient goes to the loss's own
    log-softmax node, whose backward runs once for the loss and the divergence together. The forward computes,
    chunk by chunk from the same exponentials, the value and the weighted gradient of each input that needs one
    (through the log-softmax, g − softmax · Σ g, for logits inputs); the backward only scales them by the
    incoming gradient. So each input needing a gradient holds one tensor of its size from forward to backward,
    and the inputs themselves are not kept (a regulariser's no-grad target is freed right after the forward).
    ``uniform``: every row weighs 1 (no mask), so the value's sums need no per-row products.
    """

    @staticmethod
    def forward(
        ctx,
        target,
        current,
        weight,
        name: str,
        chunk: int,
        dtype: torch.dtype,
        normalized: tuple[bool, bool],
        uniform: bool = False,
    ):
        need_t, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grads = [torch.empty_like(x) if need else None for x, need in ((target, need_t), (current, need_c))]
        total = current.new_zeros((), dtype=dtype)
        for s in range(0, current.size(0), chunk):
            w = weight[s : s + chunk]
            lp = _as_log_probs(target[s : s + chunk], normalized[0], dtype)
            lq = _as_log_probs(current[s : s + chunk], normalized[1], dtype)
            kl_chunk = _kl_chunk(lp, lq, name, need_t, need_c)
            branches = [  # (its grad, (g, sign), its probabilities, its log-probabilities, normalized) needing one
                branch
                for branch in (
                    (grads[0], kl_chunk.g_t, kl_chunk.p, lp, normalized[0]),
                    (grads[1], kl_chunk.g_c, kl_chunk.q, lq, normalized[1]),
                )
                if branch[0] is not None
            ]
            weighted = []  # w · sign · g before the log-softmax, in the grad's own chunk where the dtypes agree
            for grad, (g, sign), *_ in branches:
                scale = (sign * w).unsqueeze(-1)
                weighted.append(torch.mul(g, scale, out=grad[s : s + chunk]) if g.dtype == grad.dtype else g * scale)
            pairs = [(branch[1], wg) for branch, wg in zip(branches, weighted, strict=True)]
            total = total + _kl_total(kl_chunk.value, kl_chunk.delta, None if uniform else w, pairs)
            for (grad, _, probs, log_probs, is_log_probs), wg in zip(branches, weighted, strict=True):
                if not is_log_probs:  # through the log-softmax of logits: wg − softmax · Σ wg
                    softmax = probs if probs is not None else log_probs.exp()
                    wg = wg.addcmul_(softmax, wg.sum(-1, keepdim=True), value=-1)
                if wg.data_ptr() != grad[s : s + chunk].data_ptr():
                    grad[s : s + chunk] = wg
        ctx.grads = grads
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # out of place: a graph kept with retain_graph=True may run this backward again
        return *(g * grad_total.to(g.dtype) if g is not None else None for g in ctx.grads), *(None,) * 6


def check_divergence(name: str) -> None:
    """Raise at set-up for an unknown divergence name (the message lists the valid ones)."""
    DIVERGENCES.get(name)


def divergence_sum(
    name: str,
    target: torch.Tensor,
    current: torch.Tensor,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    normalized: tuple[bool, bool] = (False, False),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ over valid positions of D(p_target ‖ q_current), number of valid positions); gradient flows through the
    inputs that require it. ``target``/``current`` are logits, or log-probabilities where ``normalized`` says so
    (the same value either way: log-softmax is idempotent; log-probabilities save recomputing it)."""
    fn = DIVERGENCES.get(name).target
    set_level = not getattr(fn, "per_position", True)
    if set_level and current.dim() != 2:
        raise ValueError(
            f"divergence {name!r} compares sets of output distributions and is supported for "
            "classification (logits of shape (batch, classes)) only; use kl, kl-reverse, kl-sym or l2"
        )
    classes = current.size(-1)
    chunk_size = chunk_size or chunk_rows(classes, current.device)
    target_flat, current_flat = target.reshape(-1, classes), current.reshape(-1, classes)
    dtype = torch.promote_types(current.dtype, torch.float32)  # fp32 at least (an fp64 model keeps fp64)
    if name in KL_FAMILY:  # masked rows weigh 0; no row copies, nothing vocabulary-sized kept for the backward
        weight = (
            mask.reshape(-1).to(dtype) if mask is not None else current_flat.new_ones(current_flat.size(0), dtype=dtype)
        )
        total = ChunkedKL.apply(
            target_flat, current_flat, weight, name, chunk_size, dtype, tuple(normalized), mask is None
        )
        count = (
            weight.sum().round().long()
            if mask is not None
            else torch.tensor(current_flat.size(0), device=current.device)
        )
        return total, count
    if mask is not None:
        index = mask.reshape(-1).nonzero().squeeze(1)
        target_flat, current_flat = target_flat.index_select(0, index), current_flat.index_select(0, index)
    total = current.new_zeros((), dtype=dtype)
    if set_level:  # one value for the micro-batch, weighted by its number of positions
        n = current_flat.size(0)
        value = (
            fn(_as_log_probs(target_flat, normalized[0], dtype), _as_log_probs(current_flat, normalized[1], dtype))
            if n
            else total
        )
        return value * n, torch.tensor(n, device=current.device)
    for start in range(0, current_flat.size(0), chunk_size):
        log_p = _as_log_probs(target_flat[start : start + chunk_size], normalized[0], dtype)
        log_q = _as_log_probs(current_flat[start : start + chunk_size], normalized[1], dtype)
        total = total + fn(log_p, log_q).sum()
    return total, torch.tensor(current_flat.size(0), device=current.device)
