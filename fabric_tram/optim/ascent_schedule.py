"""Which optimizer steps perturb the weights under ``optimizer.ascent_every=k``: steps 1, 1 + k, 1 + 2k, ..., a
function of the step alone, so that a resumed run keeps the phase (docs/algorithms.md, "The ascent every k
steps"). One place for the rule that perturbs (``UpdateRule.ascends``) and the radius that skips a d no
perturbing step would read (``radius.takes_d``)."""

from __future__ import annotations


def perturbs(step: int, ascent_every: int) -> bool:
    """Whether 1-based optimizer step ``step`` is an ascent step: 1, 1 + k, 1 + 2k, ..."""
    return (step - 1) % ascent_every == 0


def next_perturbing_step(step: int, ascent_every: int) -> int:
    """The first ascent step after ``step``."""
    return step + ascent_every - (step - 1) % ascent_every
