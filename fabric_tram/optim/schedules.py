"""Learning-rate schedules: pure functions of the 1-based step, so a resumed run needs no scheduler state.

Warm-up (decision, docs/algorithms.md): linear, ``lr * s / W`` for ``s = 1..W``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fabric_tram.registry import SCHEDULES, register_schedule


class ScheduleChecks:
    def check(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= getattr(self, "end_factor", 0.0) <= 1.0:
            raise ValueError(f"schedule.end_factor must be in [0, 1], got {self.end_factor}")
        if getattr(self, "power", 1.0) <= 0:
            raise ValueError(f"schedule.power must be > 0, got {self.power}")


@dataclass
class ConstantConfig(ScheduleChecks):
    warmup_steps: int = 0


@dataclass
class PolynomialConfig(ScheduleChecks):
    warmup_steps: int = 0
    power: float = 1.0  # 1: linear decay
    end_factor: float = 0.0  # lr at the last step, as a fraction of the peak


@dataclass
class CosineConfig(ScheduleChecks):
    warmup_steps: int = 0
    end_factor: float = 0.0


def _warmup(step: int, warmup: int) -> float | None:
    return step / warmup if step <= warmup else None


@register_schedule("constant", config=ConstantConfig, description="constant lr after an optional linear warm-up")
def constant(step: int, max_steps: int, config: ConstantConfig) -> float:
    w = _warmup(step, config.warmup_steps)
    return 1.0 if w is None else w


@register_schedule(
    "polynomial",
    config=PolynomialConfig,
    description="linear warm-up, then polynomial decay to end_factor at the last step (paper, LM)",
)
def polynomial(step: int, max_steps: int, config: PolynomialConfig) -> float:
    w = _warmup(step, config.warmup_steps)
    if w is not None:
        return w
    span = max(max_steps - config.warmup_steps, 1)
    remaining = max(0.0, 1.0 - (step - config.warmup_steps) / span)
    return config.end_factor + (1.0 - config.end_factor) * remaining**config.power


@register_schedule(
    "cosine",
    config=CosineConfig,
    description="linear warm-up, then cosine decay to end_factor at the last step (paper, vision)",
)
def cosine(step: int, max_steps: int, config: CosineConfig) -> float:
    w = _warmup(step, config.warmup_steps)
    if w is not None:
        return w
    progress = min(1.0, (step - config.warmup_steps) / max(max_steps - config.warmup_steps, 1))
    return config.end_factor + (1.0 - config.end_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor(section, step: int, max_steps: int) -> float:
    """The factor multiplying the peak lr at 1-based ``step`` under the schedule named by ``section.name`` (its
    values checked once, when the config was resolved)."""
    return SCHEDULES.get(section.name).target(step, max_steps, section)
