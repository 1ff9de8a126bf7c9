"""The paper's update rules, one class each, registered by name; each wraps any base optimizer (``optimizer.base``).

Formulas, defaults and decisions: docs/algorithms.md. Defaults marked (paper) are the paper's; the others are
ours. Each class says what differs from the plain step of ``UpdateRule.step`` (written once, in
``optim/update_rule.py``): its perturbation's geometry and radius, what each pass differentiates, its state.
Passes per step are forward (with gradient) / no-grad forward / backward; state is what the rule holds between
steps, in multiples of the parameter bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from fabric_tram.config import ConfigError
from fabric_tram.optim.base import nonnegative
from fabric_tram.optim.geometry import FisherGeometry, SAMGeometry, asam_geometry
from fabric_tram.optim.noise import NOISE_KINDS, InputNoise
from fabric_tram.optim.objectives import DivergenceMeter, measuring, noise_penalty, on_noised, penalised
from fabric_tram.optim.radius import TrustRegionRadius, check_radius_fields
from fabric_tram.optim.targets import TARGET_MODES, ExponentialAverage, InitialWeights, NoisedInputs, PreviousIterate
from fabric_tram.optim.update_rule import Passes, UpdateRule
from fabric_tram.registry import DIVERGENCES, register_optimizer

# ------------------------------------------------------------------------------------------- configs


@dataclass
class Wrapped:
    base: str = "adam"  # the base optimizer that takes the final step: adam, adamw, sgd

    def check(self) -> None:
        """Refuse bad values of any rule's fields at config time (run again by the rule itself, for the API)."""
        nonnegative(self, "rho", "gamma", "eta", "sigma", "lam", "radius_target")
        check_radius_fields(self)
        if getattr(self, "divergence", None) is not None and self.divergence not in DIVERGENCES:
            raise ConfigError(f"optimizer.divergence: {DIVERGENCES.describe_unknown(self.divergence)}")
        if getattr(self, "target_mode", "train") not in TARGET_MODES:
            raise ConfigError(
                f"optimizer.target_mode must be one of {', '.join(TARGET_MODES)}, got {self.target_mode!r}"
            )
        if getattr(self, "noise", "normal") not in NOISE_KINDS:
            raise ConfigError(f"optimizer.noise must be one of {', '.join(NOISE_KINDS)}, got {self.noise!r}")
        if not 0.0 <= getattr(self, "ema_decay", 0.0) <= 1.0:
            raise ConfigError(f"optimizer.ema_decay must be in [0, 1], got {self.ema_decay}")


@dataclass
class PerRank:
    m_sharpness: bool = False  # per-rank perturbations (DDP only; refused under fsdp)


@dataclass
class ASAMFields:
    eta: float | None = None  # T = |θ| + η; null: 0 (paper's code), or 0.01 with asam_like_original
    asam_like_original: bool = False  # original ASAM: T only on parameters named '*weight*', T = 1 elsewhere


@dataclass
class TrustRegionFields:
    divergence: str = "kl"  # kl, kl-reverse, kl-sym, l2 (mmd: classification only)
    radius_scale: float | str = "auto"  # r = scale · t(d); auto: calibrated (optim/radius.py, docs/algorithms.md)
    radius_target: float = 0.5  # auto: the radius climbed while calibrating, and the median radius after (ASAM's ρ)
    calibration_steps: int = 20  # auto: optimizer steps that calibrate the scale
    calibration_start: int | str = "warmup"  # auto: steps before the calibration window; warmup: the lr warm-up's
    radius_transform: str = "linear"  # t(d): linear (d) or sqrt (√(2d), a distance like ρ)
    radius_every: int = 1  # take d (the target forward) every N optimizer steps, reuse the radius in between
    max_radius: float | str | None = "auto"  # cap; auto: radius_target under radius_scale=auto (the paper's r <= ρ)
    target_mode: str = "train"  # train: target forward under the same dropout masks; eval: as the published code

    def resolve_with(self, config) -> None:
        """``calibration_start=warmup`` becomes the schedule's warm-up steps (the window then opens where d stops
        growing with the learning rate; docs/algorithms.md, "TRAM's radius")."""
        if self.calibration_start == "warmup":
            self.calibration_start = int(getattr(config.schedule, "warmup_steps", 0))


@dataclass
class NoiseFields:
    sigma: float = 0.1  # σ of the input-embedding noise (R3F's setting; TRAM-x's is unreported)
    noise: str = "normal"  # normal | uniform in [-σ, σ]
    noise_seed: int = 0  # z = f(noise_seed, step, example index)
    embedding_module: str | None = None  # for models without an input_noise argument: its token-embedding module


@dataclass
class RegulariserFields:
    lam: float = 0.1  # λ, weight of the regulariser
    divergence: str = "kl"
    target_mode: str = "train"


@dataclass
class SAMConfig(PerRank, Wrapped):
    rho: float = 0.05  # (paper)


@dataclass
class ASAMConfig(ASAMFields, PerRank, Wrapped):
    rho: float = 0.5  # (paper)


@dataclass
class FSAMConfig(PerRank, Wrapped):
    gamma: float = 0.1  # (paper)
    eta: float = 0.1  # f = 1 + η g² (paper)


@dataclass
class TRAMConfig(TrustRegionFields, ASAMFields, PerRank, Wrapped):
    pass


@dataclass
class TRAMXConfig(NoiseFields, TRAMConfig):
    pass


@dataclass
class TRAMFisherConfig(NoiseFields, FSAMConfig):
    pass


@dataclass
class TRPOConfig(RegulariserFields, Wrapped):
    pass


@dataclass
class MESAConfig(RegulariserFields, Wrapped):
    ema_decay: float = 0.999


@dataclass
class R3FConfig(NoiseFields, Wrapped):
    lam: float = 0.1
    divergence: str = "kl-sym"  # (paper's R3F: symmetric KL)


@dataclass
class ASAMTRPOConfig(TRPOConfig, ASAMConfig):
    pass


@dataclass
class ASAMMESAConfig(MESAConfig, ASAMConfig):
    pass


@dataclass
class ASAMR3FConfig(R3FConfig, ASAMConfig):
    pass


def input_noise(model, config) -> InputNoise:
    return InputNoise(model, config.sigma, config.noise, config.noise_seed, config.embedding_module)


# ------------------------------------------------------------------------------------------- sharpness-aware


@register_optimizer("sam", config=SAMConfig, description="SAM: e = ρ g/‖g‖; 2 fwd / 2 bwd; state 1x params")
class SAM(UpdateRule):
    """SAM (Foret et al. 2021): e = ρ g/‖g‖."""

    passes, state_factor = Passes(2, 0, 2), 1  # the restore point

    def build_geometry(self):
        return SAMGeometry()

    def radius(self, ctx, d):
        return self.config.rho


@register_optimizer("asam", config=ASAMConfig, description="ASAM: e = ρ T²g/‖Tg‖, T = |θ|+η; 2 fwd / 2 bwd; state 1x")
class ASAM(UpdateRule):
    """ASAM (Kwon et al. 2021): e = ρ T²g/‖Tg‖ with T = |θ| + η."""

    passes, state_factor = Passes(2, 0, 2), 1

    def build_geometry(self):
        return asam_geometry(self.config, self.names)

    def radius(self, ctx, d):
        return self.config.rho


@register_optimizer(
    "fsam", config=FSAMConfig, description="Fisher-SAM: e = γ (g/f)/sqrt(Σg²/f), f = 1+ηg²; 2 fwd / 2 bwd; state 1x"
)
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

    passes = Passes(2, 1, 2)  # on a step that measures d; Passes(2, 0, 2) on the others (radius_every > 1)

    def __init__(self, config, model, optimizer):
        super().__init__(config, model, optimizer)
        self.meter = DivergenceMeter(config.divergence)
        self.trust_radius = TrustRegionRadius(config)

    @classmethod
    def mean_passes(cls, config) -> tuple[float, float, float]:
        every = getattr(config, "radius_every", 1)
        return cls.passes.forward, cls.passes.no_grad_forward / every, cls.passes.backward

    def measures_d(self, ctx):
        return self.trust_radius.measures(ctx.step)

    def radius(self, ctx, d):
        return self.trust_radius(ctx.step, d)  # a device tensor: never brought to the host

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


@register_optimizer(
    "tram-prev",
    config=TRAMConfig,
    description="TRAM-θ_{t-1}: e = d T²g/‖Tg‖, d = D(p(θ_{s-2})‖p(θ_{s-1})); 2 fwd + 1 no-grad / 2 bwd; state 1x",
)
class TRAMPrev(TRAM):
    """TRAM-θ_{t−1}: d = D(p(·|x; θ_{s−2}) ‖ p(·|x; θ_{s−1})). Memory-optimal: the restore point is also the
    previous iterate (after the perturbation block it holds θ_{s−1}, the next step's θ_{s−2})."""

    state_factor = 1

    def build_target(self):
        return PreviousIterate(
            self.params, buffers=self.backup, target_mode=self.config.target_mode, is_restore_point=True
        )


@register_optimizer(
    "tram-init",
    config=TRAMConfig,
    description="TRAM-θ_0: as tram-prev with target θ_0; 2 fwd + 1 no-grad / 2 bwd; state 2x",
)
class TRAMInit(TRAM):
    """TRAM-θ_0: d = D(p(·|x; θ_0) ‖ p(·|x; θ_{s−1}))."""

    state_factor = 2  # θ_0 and the restore point

    def build_target(self):
        return InitialWeights(self.params, target_mode=self.config.target_mode)


@register_optimizer(
    "tram-x",
    config=TRAMXConfig,
    description="TRAM-x: d = D(p(x+z;θ)‖p(x;θ)), descent on clean x; 2 fwd + 1 no-grad / 2 bwd; state 1x",
)
class TRAMX(TRAM):
    """TRAM-x: d = D(p(·|x + z; θ) ‖ p(·|x; θ)); the descent pass runs on clean inputs."""

    state_factor = 1

    def build_target(self):
        self.noise = input_noise(self.model, self.config)
        return NoisedInputs(self.noise)


@register_optimizer(
    "tram-fisher",
    config=TRAMFisherConfig,
    description="TRAM-Fisher: FSAM with g̃ from an ascent pass on x+z, descent on x; 2 fwd / 2 bwd; state 1x",
)
class TRAMFisher(FSAM):
    """TRAM-Fisher: Fisher-SAM whose ascent pass runs on x + z (so g̃ carries the input trust region); the
    descent pass runs on clean inputs."""

    def __init__(self, config, model, optimizer):
        super().__init__(config, model, optimizer)
        self.noise = input_noise(model, config)

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


@register_optimizer(
    "trpo", config=TRPOConfig, description="TRPO: L + λ D(p(θ_{s-2})‖p(θ)); 1 fwd + 1 no-grad / 1 bwd; state 1x"
)
class TRPO(Regularised):
    """TRPO-style: L + λ D(p(·|x; θ_{s−2}) ‖ p(·|x; θ)); zero regulariser at step 1."""

    passes, state_factor, divergence_gradients = Passes(1, 1, 1), 1, 1

    def build_target(self):
        return PreviousIterate(self.params, target_mode=self.config.target_mode)


@register_optimizer(
    "mesa", config=MESAConfig, description="MESA: L + λ D(p(θ_ema)‖p(θ)), fp32 EMA; 1 fwd + 1 no-grad / 1 bwd; state 1x"
)
class MESA(Regularised):
    """MESA: L + λ D(p(·|x; θ_ema) ‖ p(·|x; θ)), the EMA kept in float32 and updated after every base step."""

    passes, fp32_state, divergence_gradients = Passes(1, 1, 1), 1, 1

    def build_target(self):
        return ExponentialAverage(self.params, self.config.ema_decay, target_mode=self.config.target_mode)


@register_optimizer(
    "r3f",
    config=R3FConfig,
    description="R3F: L + λ KLsym(p(x+z),p(x)), through both branches; 2 fwd / 2 bwd (one through two graphs); state 0",
)
class R3F(Regularised):
    """R3F (Aghajanyan et al. 2021): L + λ D_sym(p(·|x + z), p(·|x)), gradient through both branches."""

    # one gradient pass whose backward runs through both forwards' graphs: the cost of two backwards
    passes, divergence_gradients, graphs_per_pass = Passes(2, 0, 2), 2, 2

    def __init__(self, config, model, optimizer):
        super().__init__(config, model, optimizer)
        self.noise = input_noise(model, config)  # no target and no state: the noised branch is part of the loss

    def ascent_objective(self, ctx):
        return noise_penalty(ctx.forwards, self.noise, self.meter, self.config.lam)


# ------------------------------------------------------------------------------ ASAM + regulariser (paper C.3)


@register_optimizer(
    "asam+trpo",
    config=ASAMTRPOConfig,
    description="ASAM whose loss carries TRPO's term in both passes; 2 fwd + 2 no-grad / 2 bwd; state 2x",
)
class ASAMTRPO(TRPO, ASAM):
    """ASAM on TRPO's loss (both passes; target outputs recomputed in each)."""

    passes, state_factor, divergence_gradients = Passes(2, 2, 2), 2, 1


@register_optimizer(
    "asam+mesa",
    config=ASAMMESAConfig,
    description="ASAM whose loss carries MESA's term in both passes; 2 fwd + 2 no-grad / 2 bwd; state 2x",
)
class ASAMMESA(MESA, ASAM):
    """ASAM on MESA's loss (both passes)."""

    passes, state_factor, fp32_state, divergence_gradients = Passes(2, 2, 2), 1, 1, 1


@register_optimizer(
    "asam+r3f",
    config=ASAMR3FConfig,
    description="ASAM whose loss carries R3F's term in both passes (same z); 4 fwd / 4 bwd (two graphs each); state 1x",
)
class ASAMR3F(R3F, ASAM):
    """ASAM on R3F's loss (both passes, the same z)."""

    passes, state_factor, divergence_gradients = Passes(4, 0, 4), 1, 2
