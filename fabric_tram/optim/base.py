"""Base optimizers: the only optimizers Fabric sees. Each entry builds a torch optimizer from parameters."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

from fabric_tram.config import ConfigError
from fabric_tram.registry import register_optimizer

# torch's fused optimizer kernels: one kernel over every parameter (and on a CPU a vectorised loop instead of
# about 9 operators per tensor). Measured on this package's CPU benchmark sizes (torch 2.13, Adam step alone):
# tiny 1.78 -> 0.24 ms, small 14.7 -> 3.2 ms, many-tensors 23.5 -> 5.5 ms against torch's CPU default.
FUSED_DEVICE_TYPES = frozenset({"cuda", "cpu"})


def implementation(params: list, sharded: bool = True) -> dict:
    """Fused kernels when every parameter is a floating-point tensor on one device type that has them (GPU and
    CPU), torch's own default elsewhere. Fused and per-tensor steps differ by rounding only (1e-16 in float64).
    ``sharded=False``: the optimizer's fused kernel has no DTensor rule (torch 2.13: SGD's), so FSDP2's sharded
    parameters take the default."""
    devices = {p.device.type for p in params}
    fused = len(devices) == 1 and devices <= FUSED_DEVICE_TYPES and all(p.is_floating_point() for p in params)
    if not sharded and any(isinstance(p, DTensor) for p in params):
        fused = False
    return {"fused": True} if fused else {}


# what a param group holds about the kernels, not the optimization: loading a state dict would overwrite it
IMPLEMENTATION_FLAGS = ("fused", "foreach")


@contextmanager
def implementation_kept(optimizer: torch.optim.Optimizer):
    """Loading an optimizer's state dict puts the saving run's kernel choice into each group; the choice belongs
    to the hardware this run is on (a checkpoint of one CPU process, fused, resumed by 2 FSDP2 processes with SGD,
    whose fused kernel has no DTensor rule, would fail at its first step), so it is put back after the load."""
    kept = [{flag: group.get(flag) for flag in IMPLEMENTATION_FLAGS} for group in optimizer.param_groups]
    try:
        yield
    finally:  # also after a failed load: resume=auto then loads an older checkpoint into the same optimizer
        for group, flags in zip(optimizer.param_groups, kept, strict=True):
            group.update(flags)


def nonnegative(section, *names: str) -> None:
    """Refuse negative values of the named fields (absent or null ones are skipped)."""
    for name in names:
        value = getattr(section, name, None)
        if value is not None and value < 0:
            raise ConfigError(f"optimizer.{name} must be >= 0, got {value}")


@dataclass
class AdamConfig:
    lr: float = 2e-5  # the paper's LM setting
    betas: list = field(default_factory=lambda: [0.9, 0.99])  # the paper's LM setting
    eps: float = 1e-8
    weight_decay: float = 0.0

    def check(self) -> None:
        nonnegative(self, "lr", "weight_decay", "eps")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), like [0.9, 0.99]; got {self.betas}")

    def state_tensors(self) -> int:
        """Parameter-sized tensors of state (the estimator reads it): exp_avg and exp_avg_sq."""
        return 2


@dataclass
class SGDConfig:
    lr: float = 5e-4  # the paper's vision setting
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def check(self) -> None:
        nonnegative(self, "lr", "momentum", "weight_decay")
        if self.nesterov and self.momentum <= 0:
            raise ConfigError("optimizer.nesterov=true needs optimizer.momentum > 0")

    def state_tensors(self) -> int:
        """Parameter-sized tensors of state (the estimator reads it): the momentum buffer, if any."""
        return 1 if self.momentum else 0


@register_optimizer(
    "adam", config=AdamConfig, description="Adam (L2 weight decay); 1 fwd + 1 bwd per step, 2x param bytes of state"
)
def build_adam(params, config: AdamConfig) -> torch.optim.Optimizer:
    AdamConfig.check(config)  # the section may be an update rule's, with Adam's keys flat
    params = list(params)
    return torch.optim.Adam(
        params, lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay,
        **implementation(params),
    )  # fmt: skip


@register_optimizer("adamw", config=AdamConfig, description="AdamW (decoupled weight decay); 1 fwd + 1 bwd per step")
def build_adamw(params, config: AdamConfig) -> torch.optim.Optimizer:
    AdamConfig.check(config)
    params = list(params)
    return torch.optim.AdamW(
        params, lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay,
        **implementation(params),
    )  # fmt: skip


@register_optimizer(
    "sgd", config=SGDConfig, description="SGD with optional (Nesterov) momentum; 1 fwd + 1 bwd per step"
)
def build_sgd(params, config: SGDConfig) -> torch.optim.Optimizer:
    SGDConfig.check(config)
    params = list(params)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay,
        **implementation(params, sharded=False),
    )  # fmt: skip
