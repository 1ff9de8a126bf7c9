"""The paper's update rules, registered by name. Each wraps any base optimizer (``optimizer.base``).

Defaults marked (paper) are the paper's; the others are ours (ALGORITHMS.md marks them as decisions).
Passes per step are forward (with gradient) / no-grad forward / backward; state is what the rule holds between
steps, in multiples of the parameter bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fabric_tram.optim.regularizers import RegularizedRule
from fabric_tram.optim.sharpness import SharpnessRule
from fabric_tram.registry import register_optimizer


# ------------------------------------------------------------------------------------------- configs


@dataclass
class Wrapped:
    base: str = "adam"  # the base optimizer that takes the final step: adam, adamw, sgd


@dataclass
class PerRank:
    m_sharpness: bool = False  # per-rank perturbations (DDP only; refused under fsdp)


@dataclass
class ASAMFields:
    eta: Optional[float] = None  # T = |θ| + η; null: 0 (paper's code), or 0.01 with asam_like_original
    asam_like_original: bool = False  # original ASAM: T only on parameters named '*weight*', T = 1 elsewhere


@dataclass
class TrustRegionFields:
    divergence: str = "kl"  # kl, kl-reverse, kl-sym, l2 (mmd: classification only)
    radius_scale: float = 1.0  # multiplies d (the published code's d is 1/(B·V) of ours; see ALGORITHMS.md)
    max_radius: Optional[float] = None  # optional clamp of the radius (the paper's d <= ρ bound)
    target_mode: str = "train"  # train: target forward under the same dropout masks; eval: as the published code


@dataclass
class NoiseFields:
    sigma: float = 0.1  # σ of the input-embedding noise (R3F's setting; TRAM-x's is unreported)
    noise: str = "normal"  # normal | uniform in [-σ, σ]
    noise_seed: int = 0  # z = f(noise_seed, step, example index)
    embedding_module: Optional[str] = None  # for models without an input_noise argument: its token-embedding module


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


# ------------------------------------------------------------------------------------------- rules


def _rule(name: str, config, description: str, base: type, **attributes):
    """Register a rule class: ``base`` with the class attributes that make it this rule.

    ``state_factor``: bytes the rule holds between steps per parameter byte (ALGORITHMS.md; mesa's EMA is fp32).
    """
    cls = type(name.replace("-", "_").replace("+", "_").upper(), (base,), {"__doc__": description, "__module__": __name__, **attributes})
    register_optimizer(name, config=config, description=description)(cls)
    return cls


SAM = _rule("sam", SAMConfig, "SAM: e = ρ g/‖g‖; 2 fwd / 2 bwd; state 1x params", SharpnessRule, direction="sam", state_factor=1)
ASAM = _rule("asam", ASAMConfig, "ASAM: e = ρ T²g/‖Tg‖, T = |θ|+η; 2 fwd / 2 bwd; state 1x", SharpnessRule, direction="asam", state_factor=1)
FSAM = _rule("fsam", FSAMConfig, "Fisher-SAM: e = γ (g/f)/sqrt(Σg²/f), f = 1+ηg²; 2 fwd / 2 bwd; state 1x", SharpnessRule, direction="fisher", state_factor=1)
TRAM_PREV = _rule("tram-prev", TRAMConfig, "TRAM-θ_{t-1}: e = d T²g/‖Tg‖, d = D(p(θ_{s-2})‖p(θ_{s-1})); 2 fwd + 1 no-grad / 2 bwd; state 1x",
                  SharpnessRule, direction="asam", trust_region="prev", state_factor=1)
TRAM_INIT = _rule("tram-init", TRAMConfig, "TRAM-θ_0: as tram-prev with target θ_0; 2 fwd + 1 no-grad / 2 bwd; state 2x",
                  SharpnessRule, direction="asam", trust_region="init", state_factor=2)
TRAM_X = _rule("tram-x", TRAMXConfig, "TRAM-x: d = D(p(x+z;θ)‖p(x;θ)), descent on clean x; 2 fwd + 1 no-grad / 2 bwd; state 1x",
               SharpnessRule, direction="asam", trust_region="noise", state_factor=1)
TRAM_FISHER = _rule("tram-fisher", TRAMFisherConfig, "TRAM-Fisher: FSAM with g̃ from an ascent pass on x+z, descent on x; 2 fwd / 2 bwd; state 1x",
                    SharpnessRule, direction="fisher", noised_ascent=True, state_factor=1)
TRPO = _rule("trpo", TRPOConfig, "TRPO: L + λ D(p(θ_{s-2})‖p(θ)); 1 fwd + 1 no-grad / 1 bwd; state 1x", RegularizedRule, kind="trpo", state_factor=1)
R3F = _rule("r3f", R3FConfig, "R3F: L + λ KLsym(p(x+z),p(x)), through both branches; 2 fwd / 1 bwd (two graphs); state 0", RegularizedRule, kind="r3f", state_factor=0)
MESA = _rule("mesa", MESAConfig, "MESA: L + λ D(p(θ_ema)‖p(θ)), fp32 EMA; 1 fwd + 1 no-grad / 1 bwd; state 1x", RegularizedRule, kind="mesa", state_factor=1)
ASAM_TRPO = _rule("asam+trpo", ASAMTRPOConfig, "ASAM whose loss carries TRPO's term in both passes; 2 fwd + 2 no-grad / 2 bwd; state 2x",
                  SharpnessRule, direction="asam", regulariser_kind="trpo", state_factor=2)
ASAM_R3F = _rule("asam+r3f", ASAMR3FConfig, "ASAM whose loss carries R3F's term in both passes (same z); 4 fwd / 2 bwd; state 1x",
                 SharpnessRule, direction="asam", regulariser_kind="r3f", state_factor=1)
ASAM_MESA = _rule("asam+mesa", ASAMMESAConfig, "ASAM whose loss carries MESA's term in both passes; 2 fwd + 2 no-grad / 2 bwd; state 2x",
                  SharpnessRule, direction="asam", regulariser_kind="mesa", state_factor=2)
