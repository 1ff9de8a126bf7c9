"""Where the ascent happens: the perturbation e of each sharpness-aware rule (docs/algorithms.md).

Every rule's e has one shape, ``e = radius · direction(g) / ‖scaled(g)‖``; a geometry says what the two are:

    sam          e = ρ g / ‖g‖
    asam         e = ρ T² g / ‖T g‖,             T = |θ| + η
    fsam         e = γ (g/f) / sqrt(Σ g²/f),      f = 1 + η g²
    tram-*       e = d T² g / ‖T g‖              (ASAM's geometry, TRAM's radius: ‖e / T‖ = d)

Norms are sums over the local shards completed by ``shard_sum`` (the only collective), so every rank gets the
same e under FSDP2; every denominator carries ``+ 1e-12``, so a zero gradient gives e = 0. Gradients are read
as the true gradient (divided by the fp16 loss scale, a power of two, so exactly) in at least float32. All the
arithmetic is multi-tensor (``torch._foreach_*``) over groups of tensors, and the radius, the norm and ‖e‖ stay
on the device: no host synchronisation, and no kernel per parameter tensor.
"""

from __future__ import annotations

import torch

from fabric_tram.distributed import local, shard_sum
from fabric_tram.optim.weights import groups

EPS = 1e-12


def squared_norm(tensors: list[torch.Tensor], ord: float = 2) -> torch.Tensor:
    """Σ‖t‖² (``ord`` 2) or Σ‖t‖₁ (``ord`` 1) over a list, in float64, from one multi-tensor norm kernel."""
    norms = torch.stack(torch._foreach_norm(tensors, ord)).double()
    return norms.pow(2).sum() if ord == 2 else norms.sum()


class Geometry:
    """A perturbation's shape, on aligned lists of weights and true gradients (one group at a time):
    ``squared`` is this group's share of ‖scaled(g)‖², ``direction`` the unnormalised e (new tensors)."""

    def squared(self, weights: list, grads: list, index: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def direction(self, weights: list, grads: list, index: list[int]) -> list[torch.Tensor]:
        raise NotImplementedError


class SAMGeometry(Geometry):
    def squared(self, weights, grads, index):
        return squared_norm(grads)

    def direction(self, weights, grads, index):
        return torch._foreach_mul(grads, 1.0)  # a copy: e is formed in it


class ASAMGeometry(Geometry):
    """T = |θ| + η on every parameter, or, as the original ASAM code (``asam_like_original``), only on those named
    ``*weight*`` (LayerNorm weights included) with T = 1 elsewhere (``scaled`` says which, by parameter index)."""

    def __init__(self, eta: float, scaled: list[bool]):
        self.eta, self.scaled = eta, scaled

    def _tg(self, weights, grads, index) -> tuple[list, list, list]:
        """(T g for the scaled entries, T for them, g for the others)."""
        on = [j for j, i in enumerate(index) if self.scaled[i]]
        off = [grads[j] for j, i in enumerate(index) if not self.scaled[i]]
        t = torch._foreach_abs([weights[j] for j in on])
        torch._foreach_add_(t, self.eta)
        return torch._foreach_mul(t, [grads[j] for j in on]), t, off

    def squared(self, weights, grads, index):
        tg, _, off = self._tg(weights, grads, index)
        return squared_norm(tg) + (squared_norm(off) if off else 0.0)

    def direction(self, weights, grads, index):
        tg, t, off = self._tg(weights, grads, index)
        torch._foreach_mul_(tg, t)  # T² g
        scaled, unscaled = iter(tg), iter(torch._foreach_mul(off, 1.0) if off else [])
        return [next(scaled) if self.scaled[i] else next(unscaled) for i in index]


class FisherGeometry(Geometry):
    """Fisher-SAM's diagonal f = 1 + η g² (Kim et al. 2022)."""

    def __init__(self, eta: float):
        self.eta = eta

    def _g_over_f(self, grads) -> list[torch.Tensor]:
        f = torch._foreach_mul(grads, grads)
        torch._foreach_mul_(f, self.eta)
        torch._foreach_add_(f, 1.0)
        return torch._foreach_div(grads, f)

    def squared(self, weights, grads, index):
        return squared_norm(torch._foreach_mul(grads, self._g_over_f(grads)), ord=1)  # Σ g²/f, each term ≥ 0

    def direction(self, weights, grads, index):
        return self._g_over_f(grads)


def asam_geometry(config, names: list[str]) -> ASAMGeometry:
    """ASAM's T from a rule's config: η defaults to 0 (the paper's code), or 0.01 with ``asam_like_original``."""
    original = getattr(config, "asam_like_original", False)
    eta = config.eta if config.eta is not None else (0.01 if original else 0.0)
    return ASAMGeometry(eta, [not original or "weight" in name for name in names])


def true_gradients(params, loss_scale: float = 1.0):
    """Groups of (weights, true gradients in at least float32, parameter indices) of the parameters with a
    gradient: local shards, divided by the fp16 loss scale when there is one."""
    index = [i for i, p in enumerate(params) if p.grad is not None]
    weights = [local(params[i]).detach() for i in index]
    grads = [local(params[i].grad).detach() for i in index]
    grads = [g if g.dtype == torch.promote_types(g.dtype, torch.float32) else g.float() for g in grads]
    for w, g, idx in groups(weights, grads, index):
        yield w, (torch._foreach_div(g, loss_scale) if loss_scale != 1.0 else g), idx


@torch.no_grad()
def scaled_gradient_norm(geometry: Geometry, params, loss_scale: float = 1.0) -> torch.Tensor:
    """‖scaled(g)‖ over every parameter and every shard (‖g‖, ‖T g‖ or sqrt(Σ g²/f)), the same on every rank."""
    total = torch.zeros((), dtype=torch.float64, device=local(params[0]).device)
    for weights, grads, index in true_gradients(params, loss_scale):
        total += geometry.squared(weights, grads, index)
    return shard_sum(total, params).sqrt()


@torch.no_grad()
def climb(geometry: Geometry, params, coefficient, loss_scale: float = 1.0) -> torch.Tensor:
    """θ += e with e = coefficient · direction(g), in place on the local shards; returns ‖e‖ over every shard.
    ``coefficient`` may be a device tensor (radius / norm, never brought to the host)."""
    e_sq = torch.zeros((), dtype=torch.float64, device=local(params[0]).device)
    for weights, grads, index in true_gradients(params, loss_scale):
        e = geometry.direction(weights, grads, index)
        torch._foreach_mul_(e, coefficient.to(e[0].dtype) if torch.is_tensor(coefficient) else coefficient)
        e_sq += squared_norm(e)
        if any(x.dtype != w.dtype for x, w in zip(e, weights, strict=True)):  # bf16 weights: e rounded to them
            e = [x.to(w.dtype) for x, w in zip(e, weights, strict=True)]
        torch._foreach_add_(weights, e)
    return shard_sum(e_sq, params).sqrt()
