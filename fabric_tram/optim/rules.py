"""The paper's update rules, one class each, registered by name; each wraps any base optimizer (``optimizer.base``).

Formulas, defaults and decisions: docs/algorithms.md. Defaults marked (paper) are the paper's; the others are
ours. Each class says what differs from the plain step of ``UpdateRule.step`` (written once, in
``optim/update_rule.py``): its perturbation's geometry and radius, what each pass differentiates, its state.
Passes per step are forward (with gradient) / no-grad forward / backward; state is what the rule holds between
steps, in multiples of the parameter bytes.
"""

from __future__ import annotations

from fabric_tram.optim.geometry import FisherGeometry, SAMGeometry, asam_geometry
from fabric_tram.optim.noise import InputNoise
from fabric_tram.optim.objectives import DivergenceMeter, measuring, noise_penalty, on_noised, penalised
from fabric_tram.optim.radius import TrustRegionRadius, measured_share, unread_d_schedule
from fabric_tram.optim.rule_configs import (
    ASAMConfig,
    ASAMMESAConfig,
    ASAMR3FConfig,
    ASAMTRPOConfig,
    FSAMConfig,
    MESAConfig,
    R3FConfig,
    SAMConfig,
    TRAMConfig,
    TRAMFisherConfig,
    TRAMXConfig,
    TRPOConfig,
)
from fabric_tram.optim.targets import ExponentialAverage, InitialWeights, NoisedInputs, PreviousIterate
from fabric_tram.optim.update_rule import Passes, UpdateRule, register_rule


def input_noise(model, config) -> InputNoise:
    return InputNoise(model, config.sigma, config.noise, config.noise_seed, config.embedding_module)


# ------------------------------------------------------------------------------------------- sharpness-aware


@register_rule("sam", SAMConfig, "SAM: e = ρ g/‖g‖")
class SAM(UpdateRule):
    """SAM (Foret et al. 2021): e = ρ g/‖g‖."""

    passes, state_factor = Passes(2, 0, 2), 1  # the restore point

    def build_geometry(self):
        return SAMGeometry()

    def radius(self, ctx, d):
        return self.config.rho


@register_rule("asam", ASAMConfig, "ASAM: e = ρ T²g/‖Tg‖, T = |θ|+η")
class ASAM(UpdateRule):
    """ASAM (Kwon et al. 2021): e = ρ T²g/‖Tg‖ with T = |θ| + η."""

    passes, state_factor = Passes(2, 0, 2), 1

    def build_geometry(self):
        return asam_geometry(self.config, self.names)

    def radius(self, ctx, d):
        return self.config.rho


@register_rule("fsam", FSAMConfig, "Fisher-SAM: e = γ (g/f)/sqrt(Σg²/f), f = 1+ηg²")
class FSAM(UpdateRule):
    """Fisher-SAM (Kim et al. 2022) with the diagonal f = 1 + η g²: e = γ (g/f)/sqrt(Σ g²/f)."""

    passes, state_factor = Passes(2, 0, 2), 1

    def build_geometry(self):
        return FisherGeometry(self.config.eta)

    def radius(self, ctx, d):
        return self.config.gamma


# ------------------------------------------------------------------------------------------- TRAM


class TRAM(ASAM):
    """ASAM whose radius comes from the trust-region distance d between the target's outputs and the ascent
    pass's own, measured on the ascent pass: e = r T²g/‖Tg‖ with r = min(scale · t(d), max_radius)
    (``optim/radius.py``: the calibrated scale, the transform, d every N steps)."""

    passes = Passes(2, 1, 2)  # on a step that measures d; Passes(2, 0, 2) on the others (radius_every, ascent_every)

    def __init__(self, config, model, optimizer):
        super().__init__(config, model, optimizer)
        self.meter = DivergenceMeter(config.divergence)
        self.trust_radius = TrustRegionRadius(config)

    @classmethod
    def mean_passes(cls, config) -> tuple[float, float, float]:
        forward, _, backward = super().mean_passes(config)
        share = measured_share(getattr(config, "radius_every", 1), unread_d_schedule(config))
        return forward, cls.passes.no_grad_forward * share, backward  # d on the steps that take it

    def measures_d(self, ctx):
        return self.trust_radius.measures(ctx.step)

    def radius(self, ctx, d):
        return self.trust_radius(ctx.step, d)  # a device tensor: never brought to the host

    def keep_radius_current(self, ctx, d):
        self.trust_radius(ctx.step, d)  # recorded (calibration, the last radius); this step does not perturb

    def momentum_radius(self, ctx):
        return self.trust_radius.lagged(ctx.step)

    def measuring_objective(self, ctx):
        return measuring(ctx.forwards, self.target, self.meter)

    def logged(self):
        return self.trust_radius.logged()

    def summary(self):
        return {"radius": self.trust_radius.summary()}

    def describe(self):
        # the engine's resolved section has the rule's registry name; a user-loop config has only the class's
        return self.trust_radius.describe(getattr(self.config, "name", type(self).__name__))

    def ascent_objective(self, ctx):
        return measuring(ctx.forwards, self.target, self.meter) if self.measures_d(ctx) else ctx.forwards.forward

    global_keys = ("radius",)

    def global_state(self):
        return {"radius": self.trust_radius.state_dict()}

    def load_global_state(self, state):
        if "radius" not in state:
            raise ValueError(
                "the checkpoint holds no TRAM radius state (calibrated scale, last radius): it was written by "
                "another optimizer.name or an older fabric_tram; start a new trainer.run_dir"
            )
        self.trust_radius.load_state_dict(state["radius"], self.params[0].device)


@register_rule("tram-prev", TRAMConfig, "TRAM-θ_{t-1}: e = d T²g/‖Tg‖, d = D(p(θ_{s-2})‖p(θ_{s-1}))")
class TRAMPrev(TRAM):
    """TRAM-θ_{t−1}: d = D(p(·|x; θ_{s−2}) ‖ p(·|x; θ_{s−1})). Memory-optimal: the restore point is also the
    previous iterate (after the perturbation block it holds θ_{s−1}, the next step's θ_{s−2})."""

    state_factor = 1

    @classmethod
    def state_factor_of(cls, config) -> int:
        # along the momentum, the target forward runs while θ is perturbed: θ_{s−2} and the restore point θ_{s−1}
        # are needed at once, so the previous iterate gets its own buffers
        return 2 if getattr(config, "ascent_direction", "gradient") == "momentum" else 1

    def build_target(self):
        if self.direction == "momentum":
            return PreviousIterate(self.params, target_mode=self.config.target_mode)
        return PreviousIterate(
            self.params, buffers=self.backup, target_mode=self.config.target_mode, is_restore_point=True
        )


@register_rule("tram-init", TRAMConfig, "TRAM-θ_0: as tram-prev with target θ_0")
class TRAMInit(TRAM):
    """TRAM-θ_0: d = D(p(·|x; θ_0) ‖ p(·|x; θ_{s−1}))."""

    state_factor = 2  # θ_0 and the restore point

    def build_target(self):
        return InitialWeights(self.params, target_mode=self.config.target_mode)


@register_rule("tram-x", TRAMXConfig, "TRAM-x: d = D(p(x+z;θ)‖p(x;θ)), descent on clean x")
class TRAMX(TRAM):
    """TRAM-x: d = D(p(·|x + z; θ) ‖ p(·|x; θ)); the descent pass runs on clean inputs."""

    state_factor = 1

    def build_noise(self):
        return input_noise(self.model, self.config)

    def build_target(self):
        return NoisedInputs(self.noise)


@register_rule("tram-fisher", TRAMFisherConfig, "TRAM-Fisher: FSAM with g̃ from an ascent pass on x+z, descent on x")
class TRAMFisher(FSAM):
    """TRAM-Fisher: Fisher-SAM whose ascent pass runs on x + z (so g̃ carries the input trust region); the
    descent pass runs on clean inputs."""

    def build_noise(self):
        return input_noise(self.model, self.config)

    def ascent_objective(self, ctx):
        return on_noised(ctx.forwards, self.noise)


# ------------------------------------------------------------------------------------------- regularisers


class Regularised(UpdateRule):
    """A trust-region regulariser: every pass differentiates L + λ Σ D(target ‖ current) (one pass alone, or
    both passes of ASAM in the asam+ rules, which put this class before ASAM in their bases)."""

    def __init__(self, config, model, optimizer):
        super().__init__(config, model, optimizer)
        self.meter = DivergenceMeter(config.divergence)

    def ascent_objective(self, ctx):
        return penalised(ctx.forwards, self.target, self.meter, self.config.lam)

    def descent_objective(self, ctx):
        return self.ascent_objective(ctx)


@register_rule("trpo", TRPOConfig, "TRPO: L + λ D(p(θ_{s-2})‖p(θ))")
class TRPO(Regularised):
    """TRPO-style: L + λ D(p(·|x; θ_{s−2}) ‖ p(·|x; θ)); zero regulariser at step 1."""

    passes, state_factor, divergence_gradients = Passes(1, 1, 1), 1, 1

    def build_target(self):
        return PreviousIterate(self.params, target_mode=self.config.target_mode)


@register_rule("mesa", MESAConfig, "MESA: L + λ D(p(θ_ema)‖p(θ)), fp32 EMA")
class MESA(Regularised):
    """MESA: L + λ D(p(·|x; θ_ema) ‖ p(·|x; θ)), the EMA kept in float32 and updated after every base step."""

    passes, fp32_state, divergence_gradients = Passes(1, 1, 1), 1, 1

    def build_target(self):
        return ExponentialAverage(self.params, self.config.ema_decay, target_mode=self.config.target_mode)


@register_rule("r3f", R3FConfig, "R3F: L + λ KLsym(p(x+z),p(x)), through both branches")
class R3F(Regularised):
    """R3F (Aghajanyan et al. 2021): L + λ D_sym(p(·|x + z), p(·|x)), gradient through both branches."""

    # one gradient pass whose backward runs through both forwards' graphs: the cost of two backwards
    passes, divergence_gradients, graphs_per_pass = Passes(2, 0, 2), 2, 2

    def build_noise(self):  # no target and no state: the noised branch is part of the loss
        return input_noise(self.model, self.config)

    def ascent_objective(self, ctx):
        return noise_penalty(ctx.forwards, self.noise, self.meter, self.config.lam)


# ------------------------------------------------------------------------------ ASAM + regulariser (paper C.3)


@register_rule("asam+trpo", ASAMTRPOConfig, "ASAM whose loss carries TRPO's term in both passes")
class ASAMTRPO(TRPO, ASAM):
    """ASAM on TRPO's loss (both passes; target outputs recomputed in each)."""

    passes, state_factor, divergence_gradients = Passes(2, 2, 2), 2, 1


@register_rule("asam+mesa", ASAMMESAConfig, "ASAM whose loss carries MESA's term in both passes")
class ASAMMESA(MESA, ASAM):
    """ASAM on MESA's loss (both passes)."""

    passes, state_factor, fp32_state, divergence_gradients = Passes(2, 2, 2), 1, 1, 1


@register_rule("asam+r3f", ASAMR3FConfig, "ASAM whose loss carries R3F's term in both passes (same z)")
class ASAMR3F(R3F, ASAM):
    """ASAM on R3F's loss (both passes, the same z)."""

    passes, state_factor, divergence_gradients = Passes(4, 0, 4), 1, 2
