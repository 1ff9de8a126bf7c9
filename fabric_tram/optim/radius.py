"""TRAM's radius: from the trust-region distance d to the ascent radius r (docs/algorithms.md, "TRAM's radius").

    r = min(scale · t(d), max_radius),   t(d) = d (``radius_transform=linear``) or √(2d) (``sqrt``)

``radius_scale`` is a number, or ``auto``: the rule climbs a fixed radius ``radius_target`` (ASAM's ρ, in the same
‖e/T‖ units) until its calibration window has passed — ``calibration_start`` steps (by default the learning-rate
warm-up, during which d is still growing with the step size) and then ``calibration_steps`` steps whose t(d) it
records; at the window's last step the scale is fixed to ``radius_target / median t(d)``. Zero and non-finite d
(step 1 of tram-prev and tram-init, where the target is the current model; a skipped step) are left out of the
median. ``max_radius`` caps the radius (``auto``: at ``radius_target`` under ``radius_scale=auto``, so TRAM's
neighbourhood never leaves ASAM's ρ-ball, the paper's bound; no cap with a numeric scale).

``radius_every=N`` amortises d: the target forward runs, and d is taken, only on every N-th step (counted from
the first step after calibration; until then on every step); the steps in between reuse the last radius. With
``ascent_every=k`` (the gradient direction) a step that does not perturb skips its scheduled d when a later one
is scheduled before the next perturbing step uses a radius: its d would never be read (:func:`takes_d`).

Everything here is a function of the optimizer step and of d, which is all-reduced: every rank holds the same
scale and radius. Both are device tensors (no host synchronisation, except one check when calibration ends),
saved in the rule's checkpoint state with the uncapped radius of every step after calibration (what
:meth:`TrustRegionRadius.summary` reports at the end of a run), and restored exactly.
"""

from __future__ import annotations

import math

import torch

from fabric_tram.config import ConfigError
from fabric_tram.optim.ascent_schedule import next_perturbing_step, perturbs

RADIUS_TRANSFORMS = ("linear", "sqrt")


def transformed(d: torch.Tensor, transform: str) -> torch.Tensor:
    """t(d): ``sqrt`` is √(2d) because, to second order, a KL divergence is half a squared distance in the Fisher
    metric; its square root is then a distance, in the units of ρ."""
    return torch.sqrt(2 * d.clamp(min=0)) if transform == "sqrt" else d


def radius_cap(config) -> float | None:
    """The cap ``max_radius`` resolves to: ``auto`` is ``radius_target`` under ``radius_scale=auto`` (TRAM inside
    ASAM's ρ-ball) and no cap with a numeric scale (the paper's raw d); ``none``/null: no cap; a number: itself."""
    cap = config.max_radius
    if cap == "auto":
        return float(config.radius_target) if config.radius_scale == "auto" else None
    return None if cap is None or cap == "none" else float(cap)


def calibration_start(config) -> int:
    """Steps before the calibration window: a number, or ``warmup`` — the schedule's warm-up steps, filled in
    when the config is resolved (:meth:`TrustRegionFields.resolve_with`); unresolved (the user-loop API, which
    knows no schedule), 0."""
    start = getattr(config, "calibration_start", 0)
    return start if isinstance(start, int) else 0


def takes_d(step: int, calibrated_after: int, every: int, ascent_every: int = 1) -> bool:
    """Whether optimizer step ``step`` runs the target forward and takes d: every step while calibrating, then one
    in ``every``. A step that does not perturb (``ascent_every``: steps other than 1, 1 + k, ...) only records
    the radius the next perturbing step reuses, so when another d is scheduled before or on that step, its own
    would be overwritten unread and it is skipped: the trajectory is the same, the target forward is saved
    (docs/algorithms.md, "The ascent every k steps"). Along the momentum every recorded d is read later (the
    radius is lagged): pass ``ascent_every=1`` there."""
    if step <= calibrated_after:
        return True

    def scheduled(t: int) -> bool:
        return (t - calibrated_after - 1) % every == 0

    if not scheduled(step) or perturbs(step, ascent_every):
        return scheduled(step)
    return not any(scheduled(t) for t in range(step + 1, next_perturbing_step(step, ascent_every) + 1))


def unread_d_schedule(config) -> int:
    """The ascent schedule :func:`takes_d` skips unread d by: ``ascent_every`` along the gradient; 1 (skip nothing)
    along the momentum, whose radius is lagged, so every recorded d is read by a later step."""
    if getattr(config, "ascent_direction", "gradient") == "momentum":
        return 1
    return int(getattr(config, "ascent_every", 1))


def measured_share(every: int, ascent_every: int = 1) -> float:
    """The share of the steps after calibration that take d (:func:`takes_d`), over one period of both
    schedules: ``1/every`` when the ascent is on every step, ``1/k`` for ``ascent_every=k`` with ``every=1``."""
    period = math.lcm(every, ascent_every)
    return sum(takes_d(step, 0, every, ascent_every) for step in range(1, period + 1)) / period


class TrustRegionRadius:
    """The radius of a TRAM rule at each step, and whether the step measures d (``measures``)."""

    def __init__(self, config):
        self.auto = config.radius_scale == "auto"
        self.fixed_scale = None if self.auto else float(config.radius_scale)
        self.target = float(config.radius_target)
        self.start = calibration_start(config) if self.auto else 0
        self.calibration_steps = int(config.calibration_steps) if self.auto else 0
        self.every = int(config.radius_every)
        self.ascent_every = unread_d_schedule(config)  # a d taken between perturbations can go unread
        self.transform = config.radius_transform
        self.max_radius = radius_cap(config)
        self.samples: torch.Tensor | None = None  # t(d) of each calibration step (NaN: left out)
        self.scale: torch.Tensor | None = None  # the calibrated scale, once calibration has ended
        self.last: torch.Tensor | None = None  # the last measured radius, reused until the next measurement
        self.uncapped: list[torch.Tensor] = []  # scale · t(d) of each step after calibration, for the summary

    @property
    def calibrated_after(self) -> int:
        """The last step that climbs the fixed ``radius_target`` (0 without calibration)."""
        return self.start + self.calibration_steps

    def calibrating(self, step: int) -> bool:
        return step <= self.calibrated_after

    def measures(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) runs the target forward and takes d (:func:`takes_d`)."""
        return takes_d(step, self.calibrated_after, self.every, self.ascent_every)

    def lagged(self, step: int):
        """The radius of step ``step`` when its d is taken only after it has perturbed (along the momentum): the
        fixed ``radius_target`` while calibrating, then the last measured radius, capped; 0 before any."""
        if self.calibrating(step):
            return self.target if self.max_radius is None else min(self.target, self.max_radius)
        if self.last is None:  # nothing measured yet (a numeric scale's first step, where the momentum is 0 anyway)
            return 0.0
        return self.last if self.max_radius is None else torch.clamp(self.last, max=self.max_radius)

    def __call__(self, step: int, d: torch.Tensor | None):
        """The radius of step ``step``; ``d`` is None on the steps that do not measure it."""
        if self.calibrating(step):
            if step > self.start:
                self._record(step, transformed(d, self.transform))
            # the fixed radius while the window is ahead or open, inside the cap like every other
            return self.target if self.max_radius is None else min(self.target, self.max_radius)
        if d is not None:
            self.last = (self.scale if self.auto else self.fixed_scale) * transformed(d, self.transform)
        elif self.last is None:  # only reachable by a resume that lost its radius: refuse rather than guess
            raise RuntimeError(f"step {step} reuses the last TRAM radius, but none was measured or restored")
        self.uncapped.append(self.last)
        # the paper's bound: TRAM's radius never leaves the cap (ASAM's ρ-ball by default)
        return self.last if self.max_radius is None else torch.clamp(self.last, max=self.max_radius)

    def _record(self, step: int, t: torch.Tensor) -> None:
        if self.samples is None:
            self.samples = torch.full((self.calibration_steps,), math.nan, dtype=torch.float64, device=t.device)
        usable = torch.isfinite(t) & (t > 0)
        index = step - self.start - 1
        self.samples[index] = torch.where(usable, t.double(), torch.full_like(t, math.nan, dtype=torch.float64))
        if index == self.calibration_steps - 1:
            median = torch.nanmedian(self.samples)  # the lower middle value for an even count; NaN if none usable
            if not (torch.isfinite(median) and median > 0):  # the one host synchronisation of calibration
                raise ValueError(
                    f"optimizer.radius_scale=auto: d was zero or not finite on all {self.calibration_steps} "
                    "calibration steps, so there is no scale to calibrate; check that the target differs from the "
                    "model (dropout, noise), raise optimizer.calibration_steps, or set optimizer.radius_scale to a "
                    "number"
                )
            self.scale = self.target / median
            # the radius until the next measurement (what a lagged radius reads; a step that measures replaces it):
            # the calibrated median, scale · median = radius_target
            self.last = self.scale * median

    def logged(self) -> dict:
        """For the step's log after calibration: the scale in effect and whether the cap bit (1.0) or not (0.0)."""
        out = {} if self.scale is None else {"radius_scale": self.scale}
        if self.uncapped and self.max_radius is not None:
            out["radius_capped"] = (self.uncapped[-1] > self.max_radius).double()
        return out

    def summary(self) -> dict:
        """How the radius behaved after calibration (host values; at the end of a run): the steps, the cap, the
        fraction of steps at the cap and the median radius / ``radius_target``."""
        if not self.uncapped:
            return {"steps_after_calibration": 0}
        uncapped = torch.stack(self.uncapped).double()
        radius = uncapped if self.max_radius is None else uncapped.clamp(max=self.max_radius)
        out = {
            "steps_after_calibration": len(self.uncapped),
            "max_radius": self.max_radius,
            "capped_fraction": None if self.max_radius is None else float((uncapped > self.max_radius).double().mean()),
            "median_radius_over_target": float(radius.median() / self.target) if self.target > 0 else None,
        }
        out["behaved_as_asam"] = out["capped_fraction"] is not None and out["capped_fraction"] > 0.5
        return out

    def describe(self, name: str) -> str:
        """One paragraph for the end of a run: how often the cap bit, and, when on most steps, that the rule then
        was ASAM at ρ = the cap, paying for a target forward it did not use."""
        s = self.summary()
        n = s["steps_after_calibration"]
        if n == 0:
            return f"{name}: the run ended before its radius calibration did (step {self.calibrated_after})"
        median = s["median_radius_over_target"]
        text = f"{name}: median radius / radius_target {median:.2f} over the {n} steps after calibration"
        if s["capped_fraction"] is None:
            return text + " (no cap: optimizer.max_radius=none)"
        text += f"; at the cap (max_radius {s['max_radius']:g}) on {100 * s['capped_fraction']:.0f}% of them"
        if s["behaved_as_asam"]:
            text += (
                f". For most of the run {name} behaved as ASAM at ρ = {s['max_radius']:g}, at the cost of the "
                "extra no-grad forward per step that measured d"
            )
        return text

    def state_dict(self) -> dict:
        uncapped = torch.stack(self.uncapped) if self.uncapped else None
        return {"samples": self.samples, "scale": self.scale, "last": self.last, "uncapped": uncapped}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        def on_device(value):
            return value.to(device) if isinstance(value, torch.Tensor) else value

        self.samples, self.scale, self.last = (on_device(state[k]) for k in ("samples", "scale", "last"))
        uncapped = on_device(state.get("uncapped"))  # absent in checkpoints written before the summary existed
        self.uncapped = [] if uncapped is None else list(uncapped.unbind())


def check_radius_fields(config) -> None:
    target = getattr(config, "radius_target", 1.0)
    if not target > 0:
        raise ConfigError(
            f"optimizer.radius_target must be > 0, got {target}: a zero radius never perturbs, so the rule would "
            "train as its base optimizer at twice its cost; use optimizer.name=adam (or the base) for that"
        )
    cap = getattr(config, "max_radius", None)
    if not (cap in (None, "auto", "none") or isinstance(cap, (int, float)) and cap >= 0):
        raise ConfigError(
            f"optimizer.max_radius must be auto (radius_target under radius_scale=auto), none, or a number >= 0; "
            f"got {cap!r}"
        )
    start = getattr(config, "calibration_start", 0)
    if not (start == "warmup" or isinstance(start, int) and start >= 0):
        raise ConfigError(
            f"optimizer.calibration_start must be warmup (the schedule's warm-up steps) or an integer >= 0, got "
            f"{start!r}"
        )
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
