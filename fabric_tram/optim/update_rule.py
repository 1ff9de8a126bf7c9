"""Update rules: what happens inside one optimizer step, written once (docs/algorithms.md).

An update rule is a class registered with ``@register_optimizer`` whose config has a ``base`` field (the base
optimizer it wraps; ``fabric_tram.config.rule_base``). The engine builds it with ``Rule(config, model,
optimizer)`` after Fabric has set up the model and the base optimizer, and calls ``rule.step(ctx)`` once per
optimizer step with a :class:`~fabric_tram.optim.step.StepContext`. A base optimizer alone runs as
:class:`UpdateRule` itself: one pass, one base step.

A rule says what differs by overriding a few methods (``optim/rules.py``):

- ``build_geometry``: the shape of the perturbation e (``optim/geometry.py``); None for a one-pass rule;
- ``radius``: e's radius (ρ, γ, or TRAM's scaled trust-region distance d);
- ``ascent_objective`` / ``descent_objective``: what each pass differentiates (``optim/objectives.py``);
- ``build_target``: the trust-region target (``optim/targets.py``), which owns the rule's persistent state and
  advances it around the base step.

Persistent per-parameter buffers go into ``parameter_state()`` (checkpoints save them resharded, by parameter
name), state that is not per parameter into ``global_state()``; transient buffers are never saved.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fabric_tram.config import base_optimizer_name
from fabric_tram.distributed import is_dtensor
from fabric_tram.optim.ascent_schedule import perturbs
from fabric_tram.optim.geometry import EPS, Geometry, climb, scale_gradients, scale_parts
from fabric_tram.optim.momentum import direction_groups, momentum_key, momentum_vectors
from fabric_tram.optim.noise import InputNoise
from fabric_tram.optim.objectives import DivergenceMeter
from fabric_tram.optim.step import Objective, StepContext, all_finite
from fabric_tram.optim.targets import Target
from fabric_tram.optim.weights import clone_weights, perturbed
from fabric_tram.registry import OPTIMIZERS, register_optimizer


class Passes(NamedTuple):
    """Passes per step over the step's micro-batches (FLOPs/MFU accounting, the estimator, the tests)."""

    forward: int  # forwards with gradient
    no_grad_forward: int  # target forwards
    backward: int  # backward passes, one per graph a backward runs through (r3f's runs through two: 2)


class UpdateRule:
    """The step every rule runs; as is, the plain one-pass step of its base optimizer."""

    passes = Passes(1, 0, 1)
    state_factor = 0  # copies of the parameters (in their dtype) held between steps: restore point, θ_0, ...
    fp32_state = 0  # at-least-float32 copies of the parameters held between steps (mesa's EMA)
    divergence_gradients = 0  # outputs whose divergence has a gradient in a pass (each holds an output-sized
    # gradient from the divergence's forward to the backward): 1 for trpo/mesa, 2 for r3f (both branches)
    graphs_per_pass = 1  # forwards whose graphs are alive together in one gradient pass (r3f: clean and noised)

    def __init__(self, config, model, optimizer):
        self.config, self.model, self.optimizer = config, model, optimizer  # config: validated when it was made
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.per_rank = getattr(config, "m_sharpness", False)  # m-sharpness: each rank's own ascent
        if self.per_rank and any(is_dtensor(p) for p in self.params):
            raise ValueError(
                "optimizer.m_sharpness (per-rank perturbations) is refused under sharding (fsdp): each "
                "rank holds only a slice of θ; use ddp, or set optimizer.m_sharpness=false"
            )
        self.meter: DivergenceMeter | None = None  # the step's d, where the rule has one
        self.ascent_every = getattr(config, "ascent_every", 1)  # perturb on one step in N (validated with the config)
        self.direction = getattr(config, "ascent_direction", "gradient")
        # the parts, in one order for every rule: the perturbation's shape and its restore point, the input noise,
        # then the target (which may use the restore point as its state, or the noise)
        self.geometry = self.build_geometry()
        self.backup = clone_weights(self.params) if self.geometry is not None else None  # the restore point
        # the state entry of the base optimizer's first moment, which the momentum direction reads (refused here
        # for an optimizer that keeps none)
        self.momentum_key = momentum_key(optimizer) if self.direction == "momentum" else None
        self.noise = self.build_noise()
        self.target = self.build_target()

    @classmethod
    def held_per_param_byte(cls, param_bytes: int) -> float:
        """Bytes held between steps per parameter byte, for parameters of ``param_bytes`` bytes per element."""
        return cls.state_factor + cls.fp32_state * max(4, param_bytes) / param_bytes

    # ------------------------------------------------------------------------------------------- what rules override

    def build_geometry(self) -> Geometry | None:
        return None

    def build_noise(self) -> InputNoise | None:
        """The input noise z of a rule that noises the inputs (tram-x, tram-fisher, r3f); None for the others."""
        return None

    def radius(self, ctx: StepContext, d: torch.Tensor | None) -> float | torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has a geometry but no radius")

    def measures_d(self, ctx: StepContext) -> bool:
        """Whether this step takes d (a rule with a meter: every step, unless it amortises d)."""
        return self.meter is not None

    def ascends(self, step: int) -> bool:
        """Whether optimizer step ``step`` perturbs the weights: every step of a rule with a geometry, or one in
        ``ascent_every`` (steps 1, 1 + N, 1 + 2N, ...: a function of the step, so a resumed run keeps the phase)."""
        return self.geometry is not None and perturbs(step, self.ascent_every)

    def keep_radius_current(self, ctx: StepContext, d: torch.Tensor) -> None:
        """A step that measured d without using a radius (a step that does not perturb): what a rule whose radius
        comes from d records of it (TRAM); nothing for the others."""

    def momentum_radius(self, ctx: StepContext) -> float | torch.Tensor:
        """The radius of a momentum-direction step, known before its one pass: the rule's own (ρ, γ); TRAM's
        comes from the d of an earlier step (``optim/radius.py``)."""
        return self.radius(ctx, None)

    def logged(self) -> dict:
        """Values of the rule's own state to log with each step (TRAM's calibrated scale)."""
        return {}

    def summary(self) -> dict:
        """How the rule behaved over the run, for ``results.json`` (TRAM: its radius against the cap); {} if
        there is nothing to say. ``describe()`` says it in words, or returns ''."""
        return {}

    def describe(self) -> str:
        return ""

    @classmethod
    def mean_passes(cls, config) -> tuple[float, float, float]:
        """Passes per step on average over a run with ``config``: a step that perturbs runs ``passes``; one that
        does not (``ascent_every``), or that perturbs along the momentum, runs half of the gradient passes (one
        pass where the perturbing step runs two: the regularisers' passes stay, asam+r3f's two graphs too) and
        the same no-grad forwards per pass."""
        p = cls.passes
        if not getattr(config, "ascent_direction", None) and getattr(config, "ascent_every", 1) == 1:
            return tuple(p)
        plain = (p.forward / 2, p.no_grad_forward / 2, p.backward / 2)
        every = getattr(config, "ascent_every", 1)
        if getattr(config, "ascent_direction", "gradient") == "momentum":
            return plain
        return tuple(half + (full - half) / every for half, full in zip(plain, p, strict=True))

    @classmethod
    def state_factor_of(cls, config) -> int:
        """Parameter copies held between steps with ``config`` (``state_factor``, unless the config changes it)."""
        return cls.state_factor

    def ascent_objective(self, ctx: StepContext) -> Objective:
        return ctx.forwards.forward

    def descent_objective(self, ctx: StepContext) -> Objective:
        return ctx.forwards.forward

    def build_target(self) -> Target:
        return Target()  # none, and no state

    def parameter_state(self) -> dict[str, list[torch.Tensor]]:
        """The rule's persistent per-parameter buffers, ``{key: [one per parameter of self.params]}`` (this
        rank's shards): checkpoints save them by parameter name, resharded on load (read in place)."""
        return self.target.state_dict()

    def global_state(self) -> dict:
        """The rule's persistent state that is not per parameter, the same on every rank (TRAM's radius)."""
        return {}

    def load_global_state(self, state: dict) -> None:
        if state:
            raise ValueError(f"this update rule holds no global state, but the checkpoint has: {sorted(state)}")

    def state_dict(self) -> dict:
        """Everything persistent, for the user-loop API: the per-parameter buffers and the global state."""
        return {**self.parameter_state(), **self.global_state()}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.load_global_state({k: state.pop(k) for k in list(state) if k in self.global_keys})
        self.target.load_state_dict(state)

    global_keys: tuple[str, ...] = ()  # the keys of global_state(), told apart from the buffers on load

    # ------------------------------------------------------------------------------------------- the step

    def step(self, ctx: StepContext) -> dict:
        """One optimizer step. Values stay device tensors (logged by the engine once, after the step); the host
        waits on the device only to decide whether a non-finite step is skipped: after the ascent pass of a
        sharpness-aware rule, and before the base step."""
        ascending = self.ascends(ctx.step)
        if ascending and self.momentum_key is not None:
            return self.momentum_step(ctx)
        measured = self.measures_d(ctx)
        if measured:
            self.meter.reset()
        ascent = ctx.forward_backward(self.ascent_objective(ctx), per_rank=self.per_rank)  # g at θ: the logged loss
        d = self.meter.mean(ctx) if measured else None  # the trust-region distance or the regulariser's D
        stats = {"loss": ascent.loss} if d is None else {"loss": ascent.loss, "d": d}
        if ascent.regulariser is not None:
            stats["regulariser"] = ascent.regulariser
        if not ascending and d is not None:  # a step between perturbations: its base step is on this gradient
            self.keep_radius_current(ctx, d)
        if ascending:
            radius = self.radius(ctx, d)
            # e is formed in the ascent gradients' memory: first g ← scaled(g) and its norm over every shard
            parts, norm = scale_gradients(self.geometry, self.params, ctx.loss_scale())
            stats.update(Tg_norm=norm, radius=radius)
            if not all_finite(ascent.loss, norm, radius, d, fabric=ctx.fabric):  # e.g. an fp16 overflow: skip
                return {**stats, "e_norm": float("nan"), **ctx.skip_step()}
            with perturbed(self.params, self.backup):  # backup ← w here; w ← backup on leaving, bit-exact
                # climb to the local maximum w + e(w)
                stats["e_norm"] = climb(self.geometry, parts, self.params, radius / (norm + EPS))
                del parts  # e was formed in the ascent gradients' memory: freed before the descent makes its own
                ctx.zero_grad()
                ctx.forward_backward(self.descent_objective(ctx))  # the sharpness-aware gradient, at w + e(w)
        self.target.before_base_step(restored=ascending)
        # the base optimizer steps (unscaled, clipped) with the last gradient, unless something is not finite
        stats.update(ctx.clip_and_step(ascent.loss))
        if not stats["skipped"]:
            self.target.after_base_step()
        return {**stats, **self.logged()}

    def momentum_step(self, ctx: StepContext) -> dict:
        """A step along the base optimizer's momentum (``optim/momentum.py``): e = −radius · direction(v) /
        ‖scaled(v)‖ from the first moment v after the previous step, one pass at θ + e (its gradient, loss and d),
        θ restored exactly, the base step from θ. Before the optimizer has state (step 1), e = 0."""
        radius = self.momentum_radius(ctx)
        measured = self.measures_d(ctx)
        if measured:
            self.meter.reset()
        objective = self.measuring_objective(ctx) if measured else self.descent_objective(ctx)
        vectors = momentum_vectors(self.optimizer, self.params, self.momentum_key)
        moved = vectors is not None
        stats = {"radius": radius}
        with perturbed(self.params, self.backup):  # backup ← θ here; θ ← backup on leaving, bit-exact
            if not moved:  # no first moment yet: no direction, e = 0
                stats.update(Tg_norm=0.0, e_norm=0.0)
            else:
                parts, norm = scale_parts(self.geometry, direction_groups(self.params, vectors), self.params)
                # move against v, along the coming update (the paper's sign)
                stats.update(Tg_norm=norm, e_norm=climb(self.geometry, parts, self.params, -radius / (norm + EPS)))
                del parts, vectors
            result = ctx.forward_backward(objective)  # the step's one pass, at θ + e
        stats["loss"] = result.loss  # the loss at θ + e: there is no pass at θ
        if result.regulariser is not None:
            stats["regulariser"] = result.regulariser
        if measured:
            stats["d"] = self.meter.mean(ctx)
            self.keep_radius_current(ctx, stats["d"])  # the radius of a later step
        self.target.before_base_step(restored=False)
        stats.update(ctx.clip_and_step(result.loss, stats["Tg_norm"] if moved else None))
        if not stats["skipped"]:
            self.target.after_base_step()
        return {**stats, **self.logged()}

    def measuring_objective(self, ctx: StepContext) -> Objective:
        """The pass's objective on a step that measures d along the momentum direction (TRAM: the loss with d
        taken against its target)."""
        return self.descent_objective(ctx)


def register_rule(name: str, config: type, what: str):
    """``@register_optimizer`` for an update rule, whose one-line description is ``what`` it does followed by what
    its class declares — passes per step and state held between steps — so they are never written twice."""

    def decorator(cls: type[UpdateRule]) -> type[UpdateRule]:
        register_optimizer(name, config=config, description=f"{what}; {cost(cls)}", kind="update rule")(cls)
        return cls

    return decorator


def cost(cls: type[UpdateRule]) -> str:
    """``2 fwd + 1 no-grad / 2 bwd; state 1x``, from the class's ``passes``, ``graphs_per_pass`` and state."""
    p = cls.passes
    passes = f"{p.forward} fwd" + (f" + {p.no_grad_forward} no-grad" if p.no_grad_forward else "")
    passes += f" / {p.backward} bwd" + (
        f" ({cls.graphs_per_pass} graphs per gradient pass)" if cls.graphs_per_pass > 1 else ""
    )
    state = [f"{cls.state_factor}x"] * bool(cls.state_factor) + [f"{cls.fp32_state}x fp32"] * bool(cls.fp32_state)
    return f"{passes}; state {' + '.join(state) or '0'} (× parameter bytes)"


def is_rule(name: str) -> bool:
    """Whether optimizer ``name`` is an update rule (the registry's answer: the entry's kind)."""
    return OPTIMIZERS.get(name).kind == "update rule"


def rule_class(name: str) -> type[UpdateRule]:
    """The class that runs ``optimizer.name``: the rule itself, or UpdateRule for a base optimizer."""
    return OPTIMIZERS.get(name).target if is_rule(name) else UpdateRule


def build_base_optimizer(section, params):
    name = base_optimizer_name(section)
    if is_rule(name):
        raise ValueError(f"optimizer.base={name!r} is an update rule; choose a base optimizer: adam, adamw, sgd")
    return OPTIMIZERS.get(name).target(params, section)


def build_update_rule(section, model, optimizer) -> UpdateRule:
    return rule_class(section.name)(section, model, optimizer)
