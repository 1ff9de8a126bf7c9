"""The update rules' config dataclasses: each rule's section is assembled from these field groups (its base
optimizer's keys are added flat by the config layer). Every field is validated here, once, at config time
(``Wrapped.check``); the rules and their parts trust what they are given.
"""

from __future__ import annotations

from dataclasses import dataclass

from fabric_tram.config import ConfigError
from fabric_tram.optim.base import nonnegative
from fabric_tram.optim.noise import NOISE_KINDS
from fabric_tram.optim.radius import check_radius_fields, radius_cap
from fabric_tram.optim.targets import TARGET_MODES
from fabric_tram.registry import DIVERGENCES


@dataclass
class Wrapped:
    base: str = "adam"  # the base optimizer that takes the final step: adam, adamw, sgd

    def check(self) -> None:
        """Refuse bad values of any rule's fields at config time (run again by the rule itself, for the API)."""
        nonnegative(self, "rho", "gamma", "eta", "sigma", "lam")  # radius_target: > 0, in check_radius_fields
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
        if isinstance(self, Perturbing):
            self.check_ascent()


@dataclass
class PerRank:
    m_sharpness: bool = False  # per-rank perturbations (DDP only; refused under fsdp)


ASCENT_DIRECTIONS = ("gradient", "momentum")


@dataclass
class Perturbing(PerRank):
    """What every rule that perturbs the weights has: how often, and along what (docs/algorithms.md)."""

    ascent_every: int = 1  # perturb on one step in N (from step 1); the others are the base step on the clean gradient
    ascent_direction: str = "gradient"  # gradient: a fresh ascent pass | momentum: the base optimizer's first moment

    def check_ascent(self) -> None:
        if not isinstance(self.ascent_every, int) or self.ascent_every < 1:
            raise ConfigError(f"optimizer.ascent_every must be an integer >= 1, got {self.ascent_every!r}")
        if self.ascent_direction not in ASCENT_DIRECTIONS:
            raise ConfigError(
                f"optimizer.ascent_direction must be one of {', '.join(ASCENT_DIRECTIONS)}, got "
                f"{self.ascent_direction!r}"
            )
        if self.ascent_direction != "momentum":
            return
        if isinstance(self, TRAMFisherConfig):
            raise ConfigError(
                "optimizer.ascent_direction=momentum is not defined for tram-fisher: its trust region is the noised "
                "ascent pass that supplies g̃, which the momentum direction does without; use ascent_direction="
                "gradient, or fsam"
            )
        if self.m_sharpness:
            raise ConfigError(
                "optimizer.m_sharpness=true with ascent_direction=momentum: the momentum is the same on every rank, "
                "so there is no per-rank perturbation; set one of them back"
            )
        if self.base == "sgd" and not getattr(self, "momentum", 0):
            raise ConfigError(
                "optimizer.ascent_direction=momentum reads the base optimizer's first moment, and sgd without "
                "momentum keeps none: set optimizer.momentum > 0 (e.g. 0.9), or use base adam or adamw"
            )


@dataclass
class ASAMFields:
    eta: float | None = None  # T = |θ| + η; null: 0 (paper's code), or 0.01 with asam_like_original
    asam_like_original: bool = False  # original ASAM: T only on parameters named '*weight*', T = 1 elsewhere


@dataclass
class DivergenceFields:
    """What a trust-region rule or regulariser compares the outputs with, declared once for both."""

    divergence: str = "kl"  # kl, kl-reverse, kl-sym, l2 (mmd: classification only)
    target_mode: str = "train"  # train: target forward under the same dropout masks; eval: as the published code


@dataclass
class TrustRegionFields(DivergenceFields):
    radius_scale: float | str = "auto"  # r = scale · t(d); auto: calibrated (optim/radius.py, docs/algorithms.md)
    radius_target: float = 0.5  # auto: the radius climbed while calibrating, and the median radius after (ASAM's ρ)
    calibration_steps: int = 20  # auto: optimizer steps that calibrate the scale
    calibration_start: int | str = "warmup"  # auto: steps before the calibration window; warmup: the lr warm-up's
    radius_transform: str = "linear"  # t(d): linear (d) or sqrt (√(2d), a distance like ρ)
    radius_every: int = 1  # take d (the target forward) every N steps where a perturbing step reads it; reuse it
    max_radius: float | str | None = "auto"  # cap; auto: radius_target under radius_scale=auto (the paper's r <= ρ)

    def resolve_with(self, config) -> None:
        """The sentinels become values, once: ``calibration_start=warmup`` the schedule's warm-up steps (the window
        then opens where d stops growing with the learning rate; docs/algorithms.md, "TRAM's radius"), and
        ``max_radius`` auto/none the cap they stand for (a number, or null for none)."""
        if self.calibration_start == "warmup":
            self.calibration_start = int(getattr(config.schedule, "warmup_steps", 0))
        self.max_radius = radius_cap(self)


@dataclass
class NoiseFields:
    sigma: float = 0.1  # σ of the input-embedding noise (R3F's setting; TRAM-x's is unreported)
    noise: str = "normal"  # normal | uniform in [-σ, σ]
    noise_seed: int = 0  # z = f(noise_seed, step, example index)
    embedding_module: str | None = None  # for models without an input_noise argument: its token-embedding module


@dataclass
class RegulariserFields(DivergenceFields):
    lam: float = 0.1  # λ, weight of the regulariser


@dataclass
class SAMConfig(Perturbing, Wrapped):
    rho: float = 0.05  # (paper)


@dataclass
class ASAMConfig(ASAMFields, Perturbing, Wrapped):
    rho: float = 0.5  # (paper)


@dataclass
class FSAMConfig(Perturbing, Wrapped):
    gamma: float = 0.1  # (paper)
    eta: float = 0.1  # f = 1 + η g² (paper)


@dataclass
class TRAMConfig(TrustRegionFields, ASAMFields, Perturbing, Wrapped):
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
