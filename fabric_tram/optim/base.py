"""Base optimizers: the only optimizers Fabric sees. Each entry builds a torch optimizer from parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fabric_tram.config import ConfigError
from fabric_tram.registry import register_optimizer


def implementation(params: list) -> dict:
    """Fused kernels when every parameter is on a GPU (one kernel per step for all of them); torch's own default
    elsewhere (on a CPU, where launches cost nothing, its per-tensor loop)."""
    on_gpu = bool(params) and all(getattr(p, "device", torch.device("cpu")).type == "cuda" for p in params)
    return {"fused": True} if on_gpu else {}


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
        **implementation(params),
    )  # fmt: skip
