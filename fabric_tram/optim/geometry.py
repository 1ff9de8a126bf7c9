"""Where the ascent happens: the perturbation e of each sharpness-aware rule (docs/algorithms.md).

Every rule's e has one shape, ``e = radius · direction(g) / ‖scaled(g)‖``; a geometry says what the two are:

    sam          e = ρ g / ‖g‖
    asam         e = ρ T² g / ‖T g‖,             T = |θ| + η
    fsam         e = γ (g/f) / sqrt(Σ g²/f),      f = 1 + η g²
    tram-*       e = d T² g / ‖T g‖              (ASAM's geometry, TRAM's radius: ‖e / T‖ = d)

The ascent gradient is not needed after e is formed (the descent pass computes its own), so e is built in the
gradients' own memory, in two sweeps: ``scale`` turns g into scaled(g) and returns its share of the squared
norm; ``finish`` turns scaled(g) into direction(g). Norms are sums over the local shards completed by
``shard_sum`` (the only collective), so every rank gets the same e under FSDP2; every denominator carries
``+ 1e-12``, so a zero gradient gives e = 0. The true gradient (divided by the fp16 loss scale, a power of two,
so exactly) is used, in at least float32. All the arithmetic is multi-tensor (``torch._foreach_*``) over groups
of tensors, and the radius, the norm and ‖e‖ stay on the device: no host synchronisation, no kernel per tensor.
"""

from __future__ import annotations

import torch

from fabric_tram.distributed import local, shard_sum
from fabric_tram.optim.weights import groups

EPS = 1e-12


def squared_norm(tensors: list[torch.Tensor], ord: float = 2) -> torch.Tensor:
    """Σ‖t‖² (``ord`` 2) or Σ‖t‖₁ (``ord`` 1) over a list, in float64, from one multi-tensor norm kernel."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    norms = torch.stack(torch._foreach_norm(tensors, ord)).double()
    return norms.pow(2).sum() if ord == 2 else norms.sum()


class Geometry:
    """A perturbation's shape, applied in place to one group of (weights, gradients, parameter indices)."""

    def scale(self, weights: list, grads: list, index: list[int]) -> torch.Tensor:
        """grads ← scaled(g); returns this group's Σ scaled(g)²."""
        raise NotImplementedError

    def finish(self, weights: list, grads: list, index: list[int]) -> None:
        """grads ← direction(g), from scaled(g)."""


class SAMGeometry(Geometry):
    def scale(self, weights, grads, index):
        return squared_norm(grads)  # scaled(g) = direction(g) = g


class ASAMGeometry(Geometry):
    """T = |θ| + η on every parameter, or, as the original ASAM code (``asam_like_original``), only on those named
    ``*weight*`` (LayerNorm weights included) with T = 1 elsewhere (``scaled`` says which, by parameter index)."""

    def __init__(self, eta: float, scaled: list[bool]):
        self.eta, self.scaled = eta, scaled

    def _times_t(self, weights, grads, index) -> None:
        """grads ← T · grads on the entries T applies to."""
        on = [j for j, i in enumerate(index) if self.scaled[i]]
        if on:
            t = torch._foreach_abs([weights[j] for j in on])
            torch._foreach_add_(t, self.eta)
            torch._foreach_mul_([grads[j] for j in on], t)

    def scale(self, weights, grads, index):
        self._times_t(weights, grads, index)  # T g
        return squared_norm(grads)

    def finish(self, weights, grads, index):
        self._times_t(weights, grads, index)  # T² g


class FisherGeometry(Geometry):
    """Fisher-SAM's diagonal f = 1 + η g² (Kim et al. 2022): the direction g / f is formed at once (the norm,
    sqrt(Σ g²/f), is read from it as Σ g · (g/f)); ``finish`` has nothing left to do."""

    def __init__(self, eta: float):
        self.eta = eta

    def scale(self, weights, grads, index):
        f = torch._foreach_mul(grads, grads)
        torch._foreach_mul_(f, self.eta)
        torch._foreach_add_(f, 1.0)
        direction = torch._foreach_div(grads, f)
        squared = squared_norm(torch._foreach_mul(grads, direction), ord=1)  # Σ g²/f, every term ≥ 0
        torch._foreach_copy_(grads, direction)
        return squared


def asam_geometry(config, names: list[str]) -> ASAMGeometry:
    """ASAM's T from a rule's config: η defaults to 0 (the paper's code), or 0.01 with ``asam_like_original``."""
    original = getattr(config, "asam_like_original", False)
    eta = config.eta if config.eta is not None else (0.01 if original else 0.0)
    return ASAMGeometry(eta, [not original or "weight" in name for name in names])


@torch.no_grad()
def ascent_gradients(params, loss_scale: float = 1.0) -> list[tuple[list, list, list]]:
    """Groups of (weights, gradients to form e in, parameter indices) of the parameters with a gradient: local
    shards, the true gradient (unscaled in place), in at least float32 (bf16 gradients are widened, a copy).
    The weights are the parameters' own tensors (written under ``torch.no_grad()``, not detached: optim/weights.py)."""
    index = [i for i, p in enumerate(params) if p.grad is not None]
    weights = [local(params[i]) for i in index]
    grads = [local(params[i].grad) for i in index]
    if any(g.dtype in (torch.bfloat16, torch.float16) for g in grads):  # bf16-true: e is formed in float32
        grads = [g.float() if g.dtype in (torch.bfloat16, torch.float16) else g for g in grads]
    if loss_scale != 1.0:
        torch._foreach_div_(grads, loss_scale)
    return list(groups(weights, grads, index))


@torch.no_grad()
def scale_gradients(geometry: Geometry, params, loss_scale: float = 1.0) -> tuple[list, torch.Tensor]:
    """First sweep, in the ascent gradients' memory: g ← scaled(g); returns the groups and ‖scaled(g)‖ (‖g‖,
    ‖T g‖ or sqrt(Σ g²/f)) over every shard, a device tensor."""
    return scale_parts(geometry, ascent_gradients(params, loss_scale), params)


@torch.no_grad()
def scale_parts(geometry: Geometry, parts: list, params) -> tuple[list, torch.Tensor]:
    """The first sweep on any vectors e is formed from (the ascent gradients, or copies of the base optimizer's
    momentum): v ← scaled(v) in place; returns the groups and ‖scaled(v)‖ over every shard."""
    total = torch.zeros((), dtype=torch.float64, device=local(params[0]).device)
    for weights, vectors, index in parts:
        total += geometry.scale(weights, vectors, index)
    return parts, shard_sum(total, params).sqrt()


@torch.no_grad()
def climb(geometry: Geometry, parts: list, params, coefficient) -> torch.Tensor:
    """Second sweep: e = coefficient · direction(g), θ += e in place; returns ‖e‖ over every shard.
    ``coefficient`` (radius / norm) may be a device tensor: nothing comes to the host."""
    e_sq = torch.zeros((), dtype=torch.float64, device=local(params[0]).device)
    for weights, e, index in parts:
        geometry.finish(weights, e, index)
        torch._foreach_mul_(e, coefficient.to(e[0].dtype) if torch.is_tensor(coefficient) else coefficient)
        e_sq += squared_norm(e)
        if any(x.dtype != w.dtype for x, w in zip(e, weights, strict=True)):  # bf16 weights: e rounded to them
            e = [x.to(w.dtype) for x, w in zip(e, weights, strict=True)]
        torch._foreach_add_(weights, e)
    return shard_sum(e_sq, params).sqrt()
