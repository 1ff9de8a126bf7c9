"""Where the ascent happens: the perturbation e of each sharpness-aware rule (docs/algorithms.md).

Every rule's e has one shape, ``e = radius · direction(g) / ‖scaled(g)‖``; a geometry says what the two are:

    sam          e = ρ g / ‖g‖
    asam         e = ρ T² g / ‖T g‖,             T = |θ| + η
    fsam         e = γ (g/f) / sqrt(Σ g²/f),      f = 1 + η g²
    tram-*       e = d T² g / ‖T g‖              (ASAM's geometry, TRAM's radius: ‖e / T‖ = d)

Norms are sums over the local shards completed by ``shard_sum`` (the only collective), so every rank gets the
same e under FSDP2; every denominator carries ``+ 1e-12``, so a zero gradient gives e = 0. Gradients are read
as the true gradient (divided by the fp16 loss scale, a power of two, so exactly) in at least float32.
"""

from __future__ import annotations

import torch

from fabric_tram.distributed import local, shard_sum

EPS = 1e-12


class Geometry:
    """A perturbation's shape: ``squared`` sums to ‖scaled(g)‖², ``direction`` is the unnormalised e."""

    def squared(self, i: int, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def direction(self, i: int, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SAMGeometry(Geometry):
    def squared(self, i, p, g):
        return g.pow(2)

    def direction(self, i, p, g):
        return g


class ASAMGeometry(Geometry):
    """T = |θ| + η on every parameter, or, as the original ASAM code (``asam_like_original``), only on those named
    ``*weight*`` (LayerNorm weights included) with T = 1 elsewhere."""

    def __init__(self, eta: float, scaled: list[bool]):
        self.eta, self.scaled = eta, scaled

    def t(self, i: int, p: torch.Tensor) -> torch.Tensor | None:
        return local(p).detach().abs().add(self.eta) if self.scaled[i] else None

    def squared(self, i, p, g):
        t = self.t(i, p)
        return (g if t is None else t * g).pow(2)

    def direction(self, i, p, g):
        t = self.t(i, p)
        return g if t is None else t.pow(2) * g


class FisherGeometry(Geometry):
    """Fisher-SAM's diagonal f = 1 + η g² (Kim et al. 2022)."""

    def __init__(self, eta: float):
        self.eta = eta

    def squared(self, i, p, g):
        return g.pow(2) / (1.0 + self.eta * g.pow(2))

    def direction(self, i, p, g):
        return g / (1.0 + self.eta * g.pow(2))


def asam_geometry(config, names: list[str]) -> ASAMGeometry:
    """ASAM's T from a rule's config: η defaults to 0 (the paper's code), or 0.01 with ``asam_like_original``."""
    original = getattr(config, "asam_like_original", False)
    eta = config.eta if config.eta is not None else (0.01 if original else 0.0)
    return ASAMGeometry(eta, [not original or "weight" in name for name in names])


def _true_grad(p: torch.Tensor, loss_scale: float) -> torch.Tensor | None:
    if p.grad is None:
        return None
    g = local(p.grad).detach()
    g = g.to(torch.promote_types(g.dtype, torch.float32))  # at least fp32 (fp64 models keep fp64)
    return g / loss_scale if loss_scale != 1.0 else g


@torch.no_grad()
def scaled_gradient_norm(geometry: Geometry, params, loss_scale: float = 1.0) -> torch.Tensor:
    """‖scaled(g)‖ over every parameter and every shard (‖g‖, ‖T g‖ or sqrt(Σ g²/f)), the same on every rank."""
    total = torch.zeros((), dtype=torch.float64, device=local(params[0]).device)
    for i, p in enumerate(params):
        g = _true_grad(p, loss_scale)
        if g is not None:
            total += geometry.squared(i, p, g).sum()
    return shard_sum(total, params).sqrt()


@torch.no_grad()
def climb(geometry: Geometry, params, coefficient: float, loss_scale: float = 1.0) -> float:
    """θ += e with e = coefficient · direction(g), in place on the local shards; returns ‖e‖ over every shard."""
    e_sq = torch.zeros((), dtype=torch.float64, device=local(params[0]).device)
    for i, p in enumerate(params):
        g = _true_grad(p, loss_scale)
        if g is None:
            continue
        e = coefficient * geometry.direction(i, p, g)
        local(p).add_(e.to(local(p).dtype))
        e_sq += e.pow(2).sum()
    return float(shard_sum(e_sq, params).sqrt())
