"""Sharpness-aware rules (ALGORITHMS.md): ascent pass at θ → perturbation e → descent pass at θ + e over the
same micro-batches → exact restore → base-optimizer step with the descent gradient.

The perturbation, one line per rule (every denominator + 1e-12, all norms over every shard):

    sam          e = ρ g / ‖g‖
    asam         e = ρ T² g / ‖T g‖,             T = |θ| + η
    fsam         e = γ (g/f) / sqrt(Σ g²/f),      f = 1 + η g²
    tram-*       e = d T² g / ‖T g‖,             d = the step's trust-region distance (so ‖e/T‖ = d)
    tram-fisher  as fsam, with g̃ from an ascent pass on noised inputs
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fabric_tram.engine.distributed import is_dtensor, local, shard_sum
from fabric_tram.engine.step import StepContext
from fabric_tram.optim.noise import InputNoise
from fabric_tram.optim.regularizers import REGULARISERS, check_nonnegative
from fabric_tram.optim.rule import UpdateRule
from fabric_tram.optim.trust_region import DivergenceMeter, NoiseReference, WeightReference, clone_weights, restore_weights, store_weights

EPS = 1e-12


class SharpnessRule(UpdateRule):
    """Two passes; subclasses choose the direction, the radius, the trust-region target and a regulariser."""

    forward_passes, backward_passes, no_grad_forward_passes = 2, 2, 0
    direction = "sam"  # sam | asam | fisher
    trust_region: Optional[str] = None  # None | prev | init | noise: where d comes from (TRAM)
    regulariser_kind: Optional[str] = None  # trpo | r3f | mesa for the asam+ combinations
    noised_ascent = False  # tram-fisher: the ascent pass runs on x + z

    def __init__(self, config, model, optimizer, seed: int = 0):
        super().__init__(config, model, optimizer)
        check_nonnegative(config, "rho", "gamma", "eta", "sigma", "lam", "radius_scale", "max_radius")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.names = [n for n, _ in named]
        self.m_sharpness = getattr(config, "m_sharpness", False)
        if self.m_sharpness and any(is_dtensor(p) for p in self.params):
            raise ValueError("optimizer.m_sharpness (per-rank perturbations) is refused under sharding (fsdp): each "
                             "rank holds only a slice of θ; use ddp, or set optimizer.m_sharpness=false")
        self.backup = clone_weights(self.params)  # the restore point (for tram-prev also the previous iterate)
        self.meter = DivergenceMeter(getattr(config, "divergence", "kl"))
        self.reference = None
        if self.trust_region == "prev":  # memory-optimal: one buffer is restore point and previous iterate
            self.reference = WeightReference(self.params, buffers=self.backup, target_mode=config.target_mode)
        elif self.trust_region == "init":
            self.reference = WeightReference(self.params, target_mode=config.target_mode)
        self.noise = None
        if self.trust_region == "noise" or self.noised_ascent:
            self.noise = InputNoise(model, config.sigma, config.noise, config.noise_seed, config.embedding_module)
        if self.trust_region == "noise":
            self.reference = NoiseReference(self.noise.forward)
        self.regulariser = REGULARISERS[self.regulariser_kind](config, model, self.params) if self.regulariser_kind else None

    @classmethod
    def pass_counts(cls) -> tuple[int, int, int]:
        if cls.regulariser_kind:  # both passes carry the regulariser's forwards
            reg = REGULARISERS[cls.regulariser_kind]
            return 2 * (1 + reg.forward_passes), 2 * reg.no_grad_forward_passes, 2
        return 2, 1 if cls.trust_region else 0, 2

    @classmethod
    def divergence_gradients(cls) -> int:
        return 1 + REGULARISERS[cls.regulariser_kind].forward_passes if cls.regulariser_kind else 0

    # ------------------------------------------------------------------------------------------- passes

    def pass_hooks(self, ctx: StepContext, ascent: bool) -> dict:
        hooks = dict(self.regulariser.hooks(ctx)) if self.regulariser else {}
        if ascent and self.reference is not None:
            hooks = self._with_trust_region(ctx, hooks)
        if ascent and self.noised_ascent:
            hooks["forward_context"] = lambda i, batch: self.noise.forward(ctx, batch)
        if ascent and self.m_sharpness:
            hooks["sync"] = False
        return hooks

    def _with_trust_region(self, ctx: StepContext, hooks: dict) -> dict:
        """Add the target forward (before) and d's accumulation (after) to each ascent micro-batch."""
        inner_before, inner_output = hooks.get("before"), hooks.get("on_output")
        target = {}

        def before(i, batch):
            if i == 0:
                ctx.count_pass("no_grad_forward")
            target["output"] = self.reference.target(ctx, batch)
            if inner_before:
                inner_before(i, batch)

        def on_output(i, batch, out):
            with torch.no_grad():  # d is a radius, not a loss: no gradient through it
                self.meter.add(target.pop("output"), out)
            return inner_output(i, batch, out) if inner_output else None

        return {**hooks, "before": before, "on_output": on_output}

    def radius(self, ctx: StepContext) -> tuple[float, Optional[float]]:
        """(radius of e, d): ρ or γ for the SAM family; the scaled, clamped d for TRAM."""
        if self.trust_region is None:
            return (self.config.gamma if self.direction == "fisher" else self.config.rho), None
        d = self.meter.mean(ctx)
        radius = d * self.config.radius_scale
        if self.config.max_radius is not None:
            radius = min(radius, self.config.max_radius)
        return radius, d

    # ------------------------------------------------------------------------------------------- the step

    def step(self, ctx: StepContext) -> dict:
        self.meter.reset()
        if self.regulariser:
            self.regulariser.meter.reset()
        ascent = ctx.forward_backward(**self.pass_hooks(ctx, ascent=True))  # gradient g at θ (the logged loss)
        radius, d = self.radius(ctx)
        if self.regulariser:  # the regulariser's divergence at θ (the descent pass adds its own to the meter)
            d = self.regulariser.meter.mean(ctx)
        norm = self.direction_norm(ctx)  # ‖T g‖, ‖g‖ or sqrt(Σ g²/f), over every shard
        if not self._finite(ctx, norm, d if self.trust_region else None):  # fp16 overflow in the ascent pass: skip the whole step
            return {"loss": ascent.loss, "d": d, "Tg_norm": float(norm), "e_norm": float("nan"), **ctx.skip_step()}
        e_norm = self.perturb(ctx, radius / (float(norm) + EPS))  # climb to w + e(w)
        ctx.zero_grad()
        ctx.forward_backward(**self.pass_hooks(ctx, ascent=False))  # gradient at w + e(w)
        restore_weights(self.params, self.backup)  # back to w, exactly, after the descent backward
        if self.regulariser:
            self.regulariser.before_base_step(ctx)
        stats = ctx.clip_and_step()  # the base optimizer steps with the sharpness-aware gradient
        if self.regulariser:
            self.regulariser.after_step(ctx)
        out = {"loss": ascent.loss, "Tg_norm": float(norm), "e_norm": e_norm, "radius": radius, **stats}
        if d is not None:
            out["d"] = d
        if self.regulariser:
            out["regularizer"] = ascent.extra
        return out

    def _finite(self, ctx, norm: torch.Tensor, d: Optional[float]) -> bool:
        bad = torch.tensor(0.0 if (torch.isfinite(norm) and (d is None or math.isfinite(d))) else 1.0, device=ctx.fabric.device)
        return float(ctx.all_reduce_sum(bad)) == 0.0  # every rank agrees (m-sharpness ranks may differ)

    def _scale_t(self, i: int, p: torch.Tensor) -> Optional[torch.Tensor]:
        """T = |θ| + η for ASAM-style rules (T = 1 for non-'weight' parameters with asam_like_original)."""
        if self.direction != "asam":
            return None
        if getattr(self.config, "asam_like_original", False) and "weight" not in self.names[i]:
            return None
        return local(p).detach().abs().add(self._eta())

    def _eta(self) -> float:
        eta = self.config.eta
        return (0.01 if getattr(self.config, "asam_like_original", False) else 0.0) if eta is None else eta

    def _grad(self, p: torch.Tensor, loss_scale: float) -> Optional[torch.Tensor]:
        if p.grad is None:
            return None
        g = local(p.grad).detach()
        g = g.to(torch.promote_types(g.dtype, torch.float32))  # at least fp32 (fp64 models keep fp64)
        return g / loss_scale if self.direction == "fisher" else g  # the Fisher term needs the true gradient

    @torch.no_grad()
    def direction_norm(self, ctx: StepContext) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=ctx.fabric.device)
        scale = ctx.loss_scale()
        for i, p in enumerate(self.params):
            g = self._grad(p, scale)
            if g is None:
                continue
            if self.direction == "fisher":
                total += (g.pow(2) / (1.0 + self.config.eta * g.pow(2))).sum()
            else:
                t = self._scale_t(i, p)
                total += (g if t is None else t * g).pow(2).sum()
        return shard_sum(total, self.params).sqrt()

    @torch.no_grad()
    def perturb(self, ctx: StepContext, coef: float) -> float:
        """backup ← θ, then θ += e with e = coef · (T² g | g | g/f); returns ‖e‖ (over every shard)."""
        store_weights(self.backup, self.params)  # for tram-prev: B ← θ_{s−1}, the next previous iterate
        scale = ctx.loss_scale()
        e_sq = torch.zeros((), dtype=torch.float64, device=ctx.fabric.device)
        for i, p in enumerate(self.params):
            g = self._grad(p, scale)
            if g is None:
                continue
            if self.direction == "fisher":
                e = coef * g / (1.0 + self.config.eta * g.pow(2))
            else:
                t = self._scale_t(i, p)
                e = coef * (g if t is None else t.pow(2) * g)
            local(p).add_(e.to(local(p).dtype))
            e_sq += e.pow(2).sum()
        return float(shard_sum(e_sq, self.params).sqrt())

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        state = {}
        if self.trust_region == "prev":
            state["previous_iterate"] = self.backup
        if self.trust_region == "init":
            state["initial_weights"] = self.reference.buffers
        if self.regulariser:
            state.update(self.regulariser.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        from fabric_tram.optim.regularizers import _load_buffers

        if self.trust_region == "prev":
            _load_buffers(self.backup, state["previous_iterate"])
        if self.trust_region == "init":
            _load_buffers(self.reference.buffers, state["initial_weights"])
        if self.regulariser:
            self.regulariser.load_state_dict(state)
