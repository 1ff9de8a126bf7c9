"""Base optimizers: the only optimizers Fabric sees. Each entry builds a torch optimizer from parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fabric_tram.registry import register_optimizer


@dataclass
class AdamConfig:
    lr: float = 2e-5  # the paper's LM setting
    betas: list = field(default_factory=lambda: [0.9, 0.99])  # the paper's LM setting
    eps: float = 1e-8
    weight_decay: float = 0.0

    def state_tensors(self) -> int:
        """Parameter-sized tensors of state (the estimator reads it): exp_avg and exp_avg_sq."""
        return 2


@dataclass
class SGDConfig:
    lr: float = 5e-4  # the paper's vision setting
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def state_tensors(self) -> int:
        """Parameter-sized tensors of state (the estimator reads it): the momentum buffer, if any."""
        return 1 if self.momentum else 0


def _check(config) -> None:
    if config.lr < 0 or config.weight_decay < 0:
        raise ValueError(
            "optimizer.lr and optimizer.weight_decay must be >= 0, "
            f"got lr={config.lr}, weight_decay={config.weight_decay}"
        )


@register_optimizer(
    "adam", config=AdamConfig, description="Adam (L2 weight decay); 1 fwd + 1 bwd per step, 2x param bytes of state"
)
def build_adam(params, config: AdamConfig) -> torch.optim.Optimizer:
    _check(config)
    return torch.optim.Adam(
        params, lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay
    )


@register_optimizer("adamw", config=AdamConfig, description="AdamW (decoupled weight decay); 1 fwd + 1 bwd per step")
def build_adamw(params, config: AdamConfig) -> torch.optim.Optimizer:
    _check(config)
    return torch.optim.AdamW(
        params, lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay
    )


@register_optimizer(
    "sgd", config=SGDConfig, description="SGD with optional (Nesterov) momentum; 1 fwd + 1 bwd per step"
)
def build_sgd(params, config: SGDConfig) -> torch.optim.Optimizer:
    _check(config)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay
    )
