"""Any update rule inside your own PyTorch (or Fabric) loop, as davda54/sam is used:

    rule = fabric_tram.optim.api.UpdateRuleLoop("tram-prev", model, torch.optim.Adam(model.parameters(), 1e-4), loss_fn)
    for batch in loader:
        stats = rule.step(batch)      # every pass, the exact restore and the base step; stats["loss"], ["d"], ...

``loss_fn(model, batch, **forward_kwargs)`` is the tasks' batch-to-loss signature: it returns a
:class:`~fabric_tram.tasks.base.LossOutput` or a tuple ``(loss_sum, count, logits, mask)``; ``count`` and
``mask`` may be None (one target, all positions valid), and a plain scalar loss is a mean over one target.
Rules with a divergence need the logits; a LossOutput that also carries ``log_probs`` (the log-softmax the loss
computed, in its graph, as :func:`~fabric_tram.tasks.base.cross_entropy_sum` returns) spares them recomputing it. ``forward_kwargs`` must reach the model's forward (rules that noise
the inputs pass ``input_noise`` there); for a model whose forward has no ``input_noise`` argument, name its
token-embedding module (``embedding_module="embeddings.word_embeddings"``) and the noise is added by a hook.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional

import torch

from fabric_tram.engine.step import StepContext
from fabric_tram.optim.rule import UpdateRule, is_rule
from fabric_tram.registry import OPTIMIZERS, load_builtins
from fabric_tram.tasks.base import LossOutput


def as_loss_output(result: Any) -> LossOutput:
    """Normalise what a user's loss function returns to a LossOutput."""
    if isinstance(result, LossOutput):
        return result
    if isinstance(result, torch.Tensor):
        return LossOutput(loss_sum=result, count=torch.tensor(1.0, device=result.device))
    if isinstance(result, (tuple, list)) and 1 <= len(result) <= 4:
        loss_sum, count, logits, mask = (*result, None, None, None)[:4]
        if count is None:
            count = torch.tensor(1.0, device=loss_sum.device)
        return LossOutput(loss_sum, torch.as_tensor(count, device=loss_sum.device), logits, mask)
    raise TypeError("loss_fn must return a LossOutput, a scalar loss, or a tuple (loss_sum, count, logits, mask)")


class _Precision:
    def __init__(self, scaler):
        self.scaler = scaler


class _Strategy:
    def __init__(self, scaler):
        self.precision = _Precision(scaler)


class LocalFabric:
    """The part of Fabric's interface the step uses, for one process without Fabric (optionally a GradScaler)."""

    world_size, global_rank = 1, 0

    def __init__(self, device: torch.device, scaler: Optional[torch.amp.GradScaler] = None):
        self.device = device
        self.strategy = _Strategy(scaler)

    def backward(self, tensor: torch.Tensor) -> None:
        scaler = self.strategy.precision.scaler
        (scaler.scale(tensor) if scaler is not None else tensor).backward()

    def no_backward_sync(self, module, enabled: bool = True):
        return contextlib.nullcontext()

    def all_reduce(self, tensor, reduce_op="sum"):
        return tensor


class _LocalOptimizer:
    """Steps a plain optimizer the way Fabric's wrapper does (through the scaler when there is one)."""

    def __init__(self, optimizer: torch.optim.Optimizer, fabric: LocalFabric):
        self.optimizer, self.fabric = optimizer, fabric

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self):
        scaler = self.fabric.strategy.precision.scaler
        if scaler is None:
            return self.optimizer.step()
        out = scaler.step(self.optimizer)
        scaler.update()
        return out

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


class UpdateRuleLoop:
    """Apply update rule ``name`` (``"sam"``, ``"tram-prev"``, ...; ``"adam"`` etc. give the plain step) in a loop.

    ``hyperparameters`` are the rule's config fields (``rho``, ``gamma``, ``eta``, ``sigma``, ``lam``,
    ``radius_scale``, ``max_radius``, ``divergence``, ``embedding_module``, ...); ``grad_clip`` clips the final
    gradient's global norm (0: off); ``noise_sampler(step, example_index, embeddings) -> z`` replaces our noise;
    ``fabric``: pass yours when model and optimizer went through ``fabric.setup``; ``scaler``: a GradScaler for
    fp16 without Fabric.
    """

    def __init__(self, name: str, model: torch.nn.Module, optimizer, loss_fn: Callable, *, grad_clip: float = 0.0,
                 noise_sampler: Optional[Callable] = None, fabric=None, scaler=None, **hyperparameters):
        load_builtins()
        entry = OPTIMIZERS.get(name)
        self.loss_fn = lambda m, batch, **kw: as_loss_output(loss_fn(m, batch, **kw))
        if fabric is None:
            device = next(model.parameters()).device
            fabric = LocalFabric(device, scaler)
            optimizer = _LocalOptimizer(optimizer, fabric)
        self.fabric, self.model, self.optimizer, self.grad_clip = fabric, model, optimizer, grad_clip
        config = self._config(entry, hyperparameters)
        self.rule: UpdateRule = entry.target(config, model, optimizer) if is_rule(entry.target) else UpdateRule(config, model, optimizer)
        if noise_sampler is not None:
            for holder in (self.rule, getattr(self.rule, "regulariser", None)):
                if getattr(holder, "noise", None) is not None:
                    holder.noise.sampler = noise_sampler
        self.step_count = 0

    @staticmethod
    def _config(entry, hyperparameters: dict):
        if not is_rule(entry.target):
            if hyperparameters:
                raise TypeError(f"{entry.name!r} is a base optimizer: it takes no hyperparameters here, got {sorted(hyperparameters)}")
            return None
        valid = {f.name for f in dataclasses.fields(entry.config)} - {"base"}
        unknown = sorted(set(hyperparameters) - valid)
        if unknown:
            raise TypeError(f"unknown hyperparameter(s) {unknown} for {entry.name!r}; valid: {', '.join(sorted(valid))}")
        return entry.config(**hyperparameters)

    def step(self, batch, micro_batches: Optional[list] = None, n_targets: Optional[float] = None) -> dict:
        """One optimizer step on ``batch`` (or on several ``micro_batches`` with their total ``n_targets``)."""
        self.step_count += 1
        batches = micro_batches if micro_batches is not None else [batch]
        n_global = None if n_targets is None else torch.tensor(float(n_targets), dtype=torch.float64, device=self.fabric.device)
        ctx = StepContext(fabric=self.fabric, model=self.model, optimizer=self.optimizer, loss_fn=self.loss_fn,
                          micro_batches=batches, step=self.step_count, n_global=n_global, grad_clip=self.grad_clip)
        stats = self.rule.step(ctx)
        return {**stats, **{f"passes/{k}": v for k, v in ctx.passes.items()}}

    def state_dict(self) -> dict:
        """The rule's persistent state (previous iterate, θ_0, EMA) and the step count, for your checkpoints."""
        return {"rule": self.rule.state_dict(), "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.rule.load_state_dict(state["rule"])
        self.step_count = state["step"]
