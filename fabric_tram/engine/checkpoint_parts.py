"""What a checkpoint holds, as parts that are saved and loaded through one interface (torchtitan's ``Stateful``):
each part gives its state (``state_dict``), takes it back (``load_state_dict``) and says where it lives.

- ``SHARDED`` parts (the model, the base optimizer, the update rule's per-parameter buffers) go into ``state/``,
  one distributed checkpoint of all of them, by parameter name and global shape, so they reshard on load;
- ``SHARED`` parts (the step, the rule's global state such as TRAM's calibrated radius, the loss scaler) go into
  ``global.pt``, written by rank 0 since every rank holds the same;
- ``PER_RANK`` parts (the random number generators) go into ``rank-<r>.pt`` and are read back only on the number of
  processes that wrote them (on another, each rank's stream starts afresh).

A checkpoint is written and read by iterating over the parts (engine/checkpoint_files.py), so a new kind of state
is one more part here and nothing else; what evaluation and export read is the model part alone.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fabric_tram.contracts import loss_scaler, unwrap_optimizer
from fabric_tram.engine.checkpoint_state import rule_tensors, unwrapped
from fabric_tram.optim.base import implementation_kept

SHARDED, SHARED, PER_RANK = "state", "global.pt", "rank-<r>.pt"


@dataclass(frozen=True)
class Part:
    """One piece of a checkpoint: ``key`` names it in its file, ``place`` is the file."""

    key: str
    place: str
    state_dict: Callable[[], Any]
    load_state_dict: Callable[[Any], None]
    complete: bool = True  # a sharded part whose every key the checkpoint must hold (the optimizer's need not:
    # parameters that never had a gradient have no state there)


@dataclass
class RunState:
    """What a checkpoint is saved from and restored into: the model, and for training also the optimizer and the
    update rule (without them, only the weights: evaluation, export). ``step`` is the step saved or restored."""

    model: torch.nn.Module
    optimizer: Any = None  # Fabric's wrapper or the torch optimizer
    rule: Any = None
    fabric: Any = None
    step: int = 0

    @property
    def weights_only(self) -> bool:
        return self.optimizer is None

    def parts(self) -> list[Part]:
        if self.weights_only:
            return [model_part(self.model)]
        return [
            model_part(self.model),
            optimizer_part(self.model, self.optimizer),
            rule_buffers_part(self.rule, self.model),
            Part("step", SHARED, lambda: self.step, self._set_step),
            Part("rule", SHARED, self.rule.global_state, self.rule.load_global_state),
            scaler_part(self.fabric),
            Part("rng", PER_RANK, rng_state, set_rng_state),
        ]

    def _set_step(self, step) -> None:
        self.step = int(step)


def model_part(model) -> Part:
    module, options = unwrapped(model), StateDictOptions(strict=True)
    return Part(
        "model",
        SHARDED,
        lambda: get_model_state_dict(module, options=options),
        lambda state: set_model_state_dict(module, state, options=options),
    )


def optimizer_part(model, optimizer) -> Part:
    module = unwrapped(model)
    torch_optimizer = unwrap_optimizer(optimizer)

    def load(state: dict) -> None:
        with implementation_kept(torch_optimizer):
            set_optimizer_state_dict(module, torch_optimizer, state)

    return Part("optim", SHARDED, lambda: get_optimizer_state_dict(module, torch_optimizer), load, complete=False)


def rule_buffers_part(rule, model) -> Part:
    # the buffers themselves (DTensor views of them under FSDP2) are the state: loading reads into them in place
    return Part("rule", SHARDED, lambda: rule_tensors(rule, model), lambda state: None)


def scaler_part(fabric) -> Part:
    """The fp16 loss scaler's state (None without one: nothing to restore)."""

    def load(state) -> None:
        scaler = loss_scaler(fabric)
        if scaler is not None and state:
            scaler.load_state_dict(state)

    def state():
        scaler = loss_scaler(fabric)
        return scaler.state_dict() if scaler is not None else None

    return Part("scaler", SHARED, state, load)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
