"""Trust-region regularisers (ALGORITHMS.md): ``trpo``, ``r3f``, ``mesa``: one gradient pass whose loss carries
``λ D``; the same objects serve the ``asam+`` combinations in both of their passes.
"""
from __future__ import annotations

from typing import Optional

import torch

from fabric_tram.engine.step import StepContext
from fabric_tram.optim.noise import InputNoise
from fabric_tram.optim.rule import UpdateRule
from fabric_tram.optim.trust_region import DivergenceMeter, WeightReference, store_weights
from fabric_tram.tasks.base import LossOutput


def check_nonnegative(config, *names) -> None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None and value < 0:
            raise ValueError(f"optimizer.{name} must be >= 0, got {value}")


class Regulariser:
    """Adds ``λ Σ D(target ‖ current)`` to each micro-batch's loss sum (normalised like the loss by the engine)."""

    forward_passes = 0  # extra forwards with gradient per pass
    no_grad_forward_passes = 1  # target forwards per pass

    def __init__(self, config, model, params):
        check_nonnegative(config, "lam")
        self.lam = config.lam
        self.meter = DivergenceMeter(config.divergence)
        self.params = params
        self._target: Optional[LossOutput] = None

    def target(self, ctx, batch) -> LossOutput:
        raise NotImplementedError

    def hooks(self, ctx: StepContext) -> dict:
        def before(i, batch):
            if i == 0:
                ctx.count_pass("no_grad_forward")
            self._target = self.target(ctx, batch)

        def on_output(i, batch, out):
            value = self.meter.add(self._target, out)  # gradient through the current branch only
            self._target = None
            return self.lam * value

        return {"before": before, "on_output": on_output}

    def before_base_step(self, ctx) -> None:
        """Runs with θ = θ_{s−1} restored, just before the base optimizer steps."""

    def after_step(self, ctx) -> None:
        """Runs after the base optimizer step."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PreviousIterate(Regulariser):
    """trpo: target p(·|x; θ_{s−2}); the buffer becomes θ_{s−1} before the base step (zero at step 1)."""

    def __init__(self, config, model, params):
        super().__init__(config, model, params)
        self.reference = WeightReference(params, target_mode=config.target_mode)

    def target(self, ctx, batch):
        return self.reference.target(ctx, batch)

    def before_base_step(self, ctx):
        store_weights(self.reference.buffers, self.params)

    def state_dict(self):
        return {"previous_iterate": self.reference.buffers}

    def load_state_dict(self, state):
        _load_buffers(self.reference.buffers, state["previous_iterate"])


class ExponentialAverage(Regulariser):
    """mesa: target p(·|x; θ_ema), the EMA kept in fp32 and updated after every base step."""

    def __init__(self, config, model, params):
        super().__init__(config, model, params)
        if not 0.0 <= config.ema_decay <= 1.0:
            raise ValueError(f"optimizer.ema_decay must be in [0, 1], got {config.ema_decay}")
        self.decay = config.ema_decay
        self.reference = WeightReference(params, dtype=torch.float32, target_mode=config.target_mode)

    def target(self, ctx, batch):
        return self.reference.target(ctx, batch)

    def after_step(self, ctx):
        self.reference.update_ema(self.decay)

    def state_dict(self):
        return {"ema": self.reference.buffers}

    def load_state_dict(self, state):
        _load_buffers(self.reference.buffers, state["ema"])


class NoisedInputs(Regulariser):
    """r3f: symmetric divergence between p(·|x+z; θ) and p(·|x; θ), gradient through both branches; the noised
    branch starts from the detached embedding lookup (as fairseq)."""

    forward_passes, no_grad_forward_passes = 1, 0

    def __init__(self, config, model, params, seed: int = 0):
        super().__init__(config, model, params)
        check_nonnegative(config, "sigma")
        self.noise = InputNoise(model, config.sigma, config.noise, seed, config.embedding_module)

    def hooks(self, ctx):
        def on_output(i, batch, out):
            if i == 0:
                ctx.count_pass("forward")
            with self.noise.forward(ctx, batch, detach=True) as kwargs:
                noised = ctx.loss_fn(ctx.model, batch, **kwargs)
            return self.lam * self.meter.add(noised, out)

        return {"on_output": on_output}


def _load_buffers(buffers, saved) -> None:
    if len(buffers) != len(saved) or any(b.shape != s.shape for b, s in zip(buffers, saved)):
        raise ValueError("the checkpoint's update-rule buffers do not match this model's parameters (shards)")
    with torch.no_grad():
        for b, s in zip(buffers, saved):
            b.copy_(s)


REGULARISERS = {"trpo": PreviousIterate, "mesa": ExponentialAverage, "r3f": NoisedInputs}


class RegularizedRule(UpdateRule):
    """One gradient pass whose loss is ``L + λ D``: trpo, r3f, mesa."""

    kind = "trpo"

    def __init__(self, config, model, optimizer):
        super().__init__(config, model, optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        self.regulariser = REGULARISERS[self.kind](config, model, params)

    @classmethod
    def pass_counts(cls) -> tuple[int, int, int]:
        reg = REGULARISERS[cls.kind]
        return 1 + reg.forward_passes, reg.no_grad_forward_passes, 1

    @classmethod
    def divergence_gradients(cls) -> int:
        return 1 + REGULARISERS[cls.kind].forward_passes

    def step(self, ctx: StepContext) -> dict:
        self.regulariser.meter.reset()
        result = ctx.forward_backward(**self.regulariser.hooks(ctx))
        self.regulariser.before_base_step(ctx)
        stats = ctx.clip_and_step()
        self.regulariser.after_step(ctx)
        return {"loss": result.loss, "d": self.regulariser.meter.mean(ctx), "regularizer": result.extra, **stats}

    def state_dict(self) -> dict:
        return self.regulariser.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.regulariser.load_state_dict(state)
