"""What a gradient pass differentiates: the task loss, wrapped (as fairseq's R3F criterion wraps a loss).

An objective maps one micro-batch to its ``LossOutput``; :meth:`StepContext.forward_backward` runs it over the
step's micro-batches. The plain objective is ``fw.forward`` (optim/forwards.py). The wrappers:

    measuring     the loss, with d = D(target ‖ current) accumulated in a meter (no gradient: d is TRAM's radius)
    penalised     L + λ D(target ‖ current), gradient through the current branch (trpo, mesa)
    noise_penalty L + λ D_sym(p(x+z), p(x)), gradient through both branches, z on the detached lookup (r3f)
    on_noised     the loss on x + z (tram-fisher's ascent pass)

The target's no-grad forward runs first, under the dropout masks the current forward then draws again.
"""

from __future__ import annotations

import torch

from fabric_tram.loss import LossOutput
from fabric_tram.optim.divergences import check_divergence, divergence_sum
from fabric_tram.optim.forwards import Forwards
from fabric_tram.optim.noise import InputNoise
from fabric_tram.optim.step import Objective, StepContext
from fabric_tram.optim.targets import Target


class DivergenceMeter:
    """Σ D and the number of valid positions over a step's micro-batches; ``mean`` is all-reduced."""

    def __init__(self, name: str):
        check_divergence(name)  # an unknown name fails at set-up, before any step
        self.name = name
        self.total = self.count = None

    def reset(self) -> None:
        self.total = self.count = None

    def add(self, target: LossOutput, current: LossOutput) -> torch.Tensor:
        """Add one micro-batch; returns its Σ D over ``current``'s valid positions (with gradient through whichever
        side is in a graph when grad is enabled)."""
        (t, t_normalized), (c, c_normalized) = target.divergence_input(), current.divergence_input()
        total, count = divergence_sum(self.name, t, c, current.mask, normalized=(t_normalized, c_normalized))
        t, c = total.detach().double(), count.double()
        self.total = t if self.total is None else self.total + t
        self.count = c if self.count is None else self.count + c
        return total

    def mean(self, ctx: StepContext) -> torch.Tensor:
        """The step's mean D over every valid position of every rank, a device tensor (all-reduced)."""
        if self.total is None:
            return torch.zeros((), dtype=torch.float64, device=ctx.device)
        both = ctx.all_reduce_sum(torch.stack([self.total, self.count]))
        return both[0] / both[1].clamp(min=1)


def measuring(fw: Forwards, target: Target, meter: DivergenceMeter) -> Objective:
    """The plain loss; d between the target's output and the current one goes into ``meter``."""

    def objective(batch) -> LossOutput:
        reference = target.output(fw, batch)
        out = fw.forward(batch)
        with torch.no_grad():  # d is a radius, not a loss: no gradient through it
            meter.add(reference, out)
        return out

    return objective


def penalised(fw: Forwards, target: Target, meter: DivergenceMeter, lam: float) -> Objective:
    """L + λ Σ D(target ‖ current): the gradient flows through the current branch only (the target has none)."""

    def objective(batch) -> LossOutput:
        reference = target.output(fw, batch)
        out = fw.forward(batch)
        return out.with_regulariser(lam * meter.add(reference, out))

    return objective


def noise_penalty(fw: Forwards, noise: InputNoise, meter: DivergenceMeter, lam: float) -> Objective:
    """R3F: L + λ Σ D(p(·|x+z) ‖ p(·|x)) with gradient through both forwards; the noised branch starts from the
    detached embedding lookup (as fairseq), so the lookup's gradient comes from the clean branch alone."""

    def objective(batch) -> LossOutput:
        out = fw.forward(batch)
        with noise.applied(fw.step, batch, detach=True) as kwargs:
            noised = fw.forward(batch, **kwargs)
        return out.with_regulariser(lam * meter.add(noised, out))

    return objective


def on_noised(fw: Forwards, noise: InputNoise) -> Objective:
    """The plain loss on noised inputs x + z (tram-fisher's ascent pass)."""

    def objective(batch) -> LossOutput:
        with noise.applied(fw.step, batch) as kwargs:
            return fw.forward(batch, **kwargs)

    return objective
