"""Optimizers: base optimizers, the update rules of docs/algorithms.md, divergences and LR schedules, all registered."""

from fabric_tram.optim import base, divergences, rules, schedules  # noqa: F401  (fill the registries)
from fabric_tram.optim.update_rule import UpdateRule, build_base_optimizer, build_update_rule  # noqa: F401
