"""The bugs tools/mutation_check.py plants, one at a time, by the part of the code they are planted in: each an
exact edit (its original text must occur once in the code) and the tests that must then fail. Add one with every
test that guards something new, in the file of the part it breaks."""

from __future__ import annotations

from . import engine, inputs, models, rules, schedules, step
from .mutation import Mutation

MUTATIONS: tuple[Mutation, ...] = (
    rules.MUTATIONS + step.MUTATIONS + schedules.MUTATIONS + engine.MUTATIONS + models.MUTATIONS + inputs.MUTATIONS
)

__all__ = ["MUTATIONS", "Mutation"]
