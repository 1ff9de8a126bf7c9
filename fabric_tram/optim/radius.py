"""TRAM's radius: from the trust-region distance d to the ascent radius r (docs/algorithms.md, "TRAM's radius").

    r = min(scale · t(d), max_radius),   t(d) = d (``radius_transform=linear``) or √(2d) (``sqrt``)

``radius_scale`` is a number, or ``auto``: for the first ``calibration_steps`` optimizer steps the rule climbs a
fixed radius ``radius_target`` (ASAM's ρ, in the same ‖e/T‖ units) while it measures t(d); at the last of them
the scale is fixed to ``radius_target / median t(d)``, so that afterwards the radius keeps TRAM's step-to-step
variation around a magnitude someone chose. Zero and non-finite d (step 1 of tram-prev and tram-init, where the
target is the current model; a skipped step) are left out of the median.

``radius_every=N`` amortises d: the target forward runs, and d is taken, only on every N-th step (counted from
the first step after calibration; during calibration on every step); the steps in between reuse the last radius.

Everything here is a function of the optimizer step and of d, which is all-reduced: every rank holds the same
scale and radius. Both are device tensors (no host synchronisation, except one check when calibration ends),
saved in the rule's checkpoint state and restored exactly.
"""

from __future__ import annotations

import math

import torch

from fabric_tram.config import ConfigError

RADIUS_TRANSFORMS = ("linear", "sqrt")


def transformed(d: torch.Tensor, transform: str) -> torch.Tensor:
    """t(d): ``sqrt`` is √(2d) because, to second order, a KL divergence is half a squared distance in the Fisher
    metric; its square root is then a distance, in the units of ρ."""
    return torch.sqrt(2 * d.clamp(min=0)) if transform == "sqrt" else d


class TrustRegionRadius:
    """The radius of a TRAM rule at each step, and whether the step measures d (``measures``)."""

    def __init__(self, config):
        self.auto = config.radius_scale == "auto"
        self.fixed_scale = None if self.auto else float(config.radius_scale)
        self.target = float(config.radius_target)
        self.calibration_steps = int(config.calibration_steps) if self.auto else 0
        self.every = int(config.radius_every)
        self.transform = config.radius_transform
        self.max_radius = config.max_radius
        self.samples: torch.Tensor | None = None  # t(d) of each calibration step (NaN: left out)
        self.scale: torch.Tensor | None = None  # the calibrated scale, once calibration has ended
        self.last: torch.Tensor | None = None  # the last measured radius, reused until the next measurement

    def calibrating(self, step: int) -> bool:
        return step <= self.calibration_steps

    def measures(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) runs the target forward and takes d."""
        return self.calibrating(step) or (step - self.calibration_steps - 1) % self.every == 0

    def __call__(self, step: int, d: torch.Tensor | None):
        """The radius of step ``step``; ``d`` is None on the steps that do not measure it."""
        if d is None:
            if self.last is None:  # only reachable by a resume that lost its radius: refuse rather than guess
                raise RuntimeError(f"step {step} reuses the last TRAM radius, but none was measured or restored")
            return self.last
        t = transformed(d, self.transform)
        if self.calibrating(step):
            self._record(step, t)
            return self.target if self.max_radius is None else min(self.target, self.max_radius)  # while measuring
        scale = self.scale if self.auto else self.fixed_scale
        radius = scale * t
        if self.max_radius is not None:
            radius = torch.clamp(radius, max=self.max_radius)
        self.last = radius
        return radius

    def _record(self, step: int, t: torch.Tensor) -> None:
        if self.samples is None:
            self.samples = torch.full((self.calibration_steps,), math.nan, dtype=torch.float64, device=t.device)
        usable = torch.isfinite(t) & (t > 0)
        self.samples[step - 1] = torch.where(usable, t.double(), torch.full_like(t, math.nan, dtype=torch.float64))
        if step == self.calibration_steps:
            median = torch.nanmedian(self.samples)  # the lower middle value for an even count; NaN if none usable
            if not (torch.isfinite(median) and median > 0):  # the one host synchronisation of calibration
                raise ValueError(
                    f"optimizer.radius_scale=auto: d was zero or not finite on all {self.calibration_steps} "
                    "calibration steps, so there is no scale to calibrate; check that the target differs from the "
                    "model (dropout, noise), raise optimizer.calibration_steps, or set optimizer.radius_scale to a "
                    "number"
                )
            self.scale = self.target / median

    def logged(self) -> dict:
        """The scale in effect, for the step's log (nothing while calibrating)."""
        scale = self.scale if self.auto else None
        return {} if scale is None else {"radius_scale": scale}

    def state_dict(self) -> dict:
        return {"samples": self.samples, "scale": self.scale, "last": self.last}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        def on_device(value):
            return value.to(device) if isinstance(value, torch.Tensor) else value

        self.samples, self.scale, self.last = (on_device(state[k]) for k in ("samples", "scale", "last"))


def check_radius_fields(config) -> None:
    scale = getattr(config, "radius_scale", 1.0)
    if scale != "auto" and not (isinstance(scale, (int, float)) and scale >= 0):
        raise ConfigError(f"optimizer.radius_scale must be auto or a number >= 0, got {scale!r}")
    if getattr(config, "radius_transform", "linear") not in RADIUS_TRANSFORMS:
        raise ConfigError(
            f"optimizer.radius_transform must be one of {', '.join(RADIUS_TRANSFORMS)}, got {config.radius_transform!r}"
        )
    for key in ("radius_every", "calibration_steps"):
        if getattr(config, key, 1) < 1:
            raise ConfigError(f"optimizer.{key} must be an integer >= 1, got {getattr(config, key)}")
