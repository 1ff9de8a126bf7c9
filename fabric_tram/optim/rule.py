"""Update rules: what happens inside one optimizer step. A base optimizer alone is the one-pass rule.

An update rule is a class registered with ``@register_optimizer`` whose config has a ``base`` field (the base
optimizer it wraps). The engine builds it with ``Rule(config, model, optimizer)`` after Fabric has set up the
model and the base optimizer, and calls ``rule.step(ctx)`` once per optimizer step with a
:class:`~fabric_tram.engine.step.StepContext`. Persistent per-parameter state goes into ``state_dict()``
(saved per rank by checkpoints); transient buffers are never saved.
"""
from __future__ import annotations

from fabric_tram.engine.step import StepContext
from fabric_tram.registry import OPTIMIZERS


class UpdateRule:
    """Base class of the update rules; as is, it is the plain one-pass step of its base optimizer."""

    # passes per step (for FLOPs/MFU accounting and the smoke tests' counts)
    forward_passes, backward_passes, no_grad_forward_passes = 1, 1, 0
    state_factor = 0  # bytes held between steps per parameter byte (buffers, copies)

    def __init__(self, config, model, optimizer):
        self.config, self.model, self.optimizer = config, model, optimizer
        self.forward_passes, self.no_grad_forward_passes, self.backward_passes = self.pass_counts()

    @classmethod
    def pass_counts(cls) -> tuple[int, int, int]:
        """(forward with gradient, no-grad forward, backward) passes over the step's micro-batches."""
        return cls.forward_passes, cls.no_grad_forward_passes, cls.backward_passes

    @classmethod
    def divergence_gradients(cls) -> int:
        """Outputs whose divergence has a gradient in a pass (each holds an output-sized gradient from the
        divergence's forward to the backward): 0 here, 1 for trpo/mesa, 2 for r3f (both branches)."""
        return 0

    def step(self, ctx: StepContext) -> dict:
        result = ctx.forward_backward()
        stats = ctx.clip_and_step()
        return {"loss": result.loss, **stats}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} holds no state, but the checkpoint has: {sorted(state)}")


def is_rule(target) -> bool:
    return isinstance(target, type) and issubclass(target, UpdateRule)


def base_optimizer_name(section) -> str:
    """The registry name of the torch optimizer to build: the rule's ``base``, or the section itself."""
    return section.base if is_rule(OPTIMIZERS.get(section.name).target) else section.name


def build_base_optimizer(section, params):
    name = base_optimizer_name(section)
    target = OPTIMIZERS.get(name).target
    if is_rule(target):
        raise ValueError(f"optimizer.base={name!r} is an update rule; choose a base optimizer: adam, adamw, sgd")
    return target(params, section)


def build_update_rule(section, model, optimizer) -> UpdateRule:
    target = OPTIMIZERS.get(section.name).target
    return target(section, model, optimizer) if is_rule(target) else UpdateRule(section, model, optimizer)
