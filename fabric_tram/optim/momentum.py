"""The momentum direction (``optimizer.ascent_direction=momentum``, after Momentum-SAM, Becker, Altrock and Risse
2024, arXiv 2401.12033): the perturbation is formed from the base optimizer's first moment v instead of a fresh
gradient, so a step needs one forward-backward, at θ + e, and the base step is applied from θ.

    e = −radius · direction(v) / ‖scaled(v)‖       (the rule's geometry: SAM's v, ASAM's T²v, Fisher's v/f)

The sign is the paper's: the weights move *against* v, along the update the optimizer is about to take (v
accumulates gradients and the step is θ − lr·v, or θ − lr·m̂/√v̂ for Adam), not up a gradient — the published
code subtracts ρ·v/‖v‖ before the pass and adds it back after. v is read before this step's base step updates
it: it is the moment after step s − 1. Before the base optimizer has any state (step 1) v is absent and e = 0.
"""

from __future__ import annotations

import torch

from fabric_tram.contracts import unwrap_optimizer
from fabric_tram.distributed import local
from fabric_tram.optim.weights import groups

MOMENTUM_STATE = {  # torch optimizer class name -> the state entry that holds its first moment
    "Adam": "exp_avg",
    "AdamW": "exp_avg",
    "SGD": "momentum_buffer",
}
MOMENTUM_BASES = "adam, adamw, or sgd with momentum > 0"


def momentum_key(optimizer) -> str:
    """The state entry of ``optimizer`` (a torch optimizer, or Fabric's wrapper of one) that holds its first
    moment; refused where it keeps none (plain SGD, or an optimizer this does not know)."""
    torch_optimizer = unwrap_optimizer(optimizer)
    name = type(torch_optimizer).__name__
    key = MOMENTUM_STATE.get(name)
    if key is None or (name == "SGD" and not torch_optimizer.defaults.get("momentum")):
        raise ValueError(
            f"optimizer.ascent_direction=momentum reads the base optimizer's first moment, and {name}"
            f"{' without momentum' if name == 'SGD' else ''} keeps none: use {MOMENTUM_BASES}, or "
            "ascent_direction=gradient"
        )
    return key


def momentum_vectors(optimizer, params, key: str) -> list[torch.Tensor] | None:
    """v of each parameter (its local shard), or None before the base optimizer has stepped (no state yet)."""
    state = unwrap_optimizer(optimizer).state
    vectors = [state[p].get(key) if p in state else None for p in params]
    if all(v is None for v in vectors):
        return None
    if any(v is None for v in vectors):  # a parameter that never had a gradient: nothing to move it along
        vectors = [torch.zeros_like(p) if v is None else v for p, v in zip(params, vectors, strict=True)]
    return vectors


@torch.no_grad()
def direction_groups(params, vectors) -> list[tuple[list, list, list]]:
    """Groups of (weights, a float32-or-wider copy of v to form e in, parameter indices), local shards: e is formed
    in these copies (never in the optimizer's state), which are dropped once e is applied. The weights are the
    parameters' own tensors, written under ``torch.no_grad()`` (optim/weights.py)."""
    index = list(range(len(params)))
    weights = [local(p) for p in params]
    moments = [local(v) for v in vectors]
    if all(v.dtype in (torch.float32, torch.float64) for v in moments):
        copies = torch._foreach_mul(moments, 1.0)  # one multi-tensor copy (v · 1 is v for every float)
    else:  # bf16/fp16 moments: widened to float32, a tensor at a time
        copies = [v.to(torch.promote_types(v.dtype, torch.float32), copy=True) for v in moments]
    return list(groups(weights, copies, index))
