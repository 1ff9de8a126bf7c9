"""Optimizers: base optimizers, update rules (ALGORITHMS.md), divergences and LR schedules, all registered."""
from fabric_tram.optim import base, divergences, schedules  # noqa: F401  (fill the registries)
from fabric_tram.optim.rule import UpdateRule, build_base_optimizer, build_update_rule  # noqa: F401
