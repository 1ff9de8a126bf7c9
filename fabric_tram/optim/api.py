"""Any update rule inside your own PyTorch (or Fabric) loop, as davda54/sam is used:

    rule = fabric_tram.optim.api.UpdateRuleLoop("tram-prev", model, torch.optim.Adam(model.parameters(), 1e-4), loss_fn)
    for batch in loader:
        stats = rule.step(batch)      # every pass, the exact restore and the base step; stats["loss"], ["d"], ...

``loss_fn(model, batch, **forward_kwargs)`` is the tasks' batch-to-loss signature: it returns a
:class:`~fabric_tram.loss.LossOutput` or a tuple ``(loss_sum, count, logits, mask)``; ``count`` and
``mask`` may be None (one target, all positions valid), and a plain scalar loss is a mean over one target.
Rules with a divergence need the logits; a LossOutput that also carries ``log_probs`` (the log-softmax the loss
computed, in its graph, as :func:`~fabric_tram.loss.cross_entropy_sum` returns) spares them recomputing it.
``forward_kwargs`` must reach the model's forward (rules that noise the inputs pass ``input_noise`` there); for a
model whose forward has no ``input_noise`` argument, name its token-embedding module
(``embedding_module="embeddings.word_embeddings"``) and the noise is added by a hook.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch

from fabric_tram.contracts import loss_scaler
from fabric_tram.loss import as_loss_output
from fabric_tram.optim.step import StepContext, to_host
from fabric_tram.optim.update_rule import UpdateRule, is_rule, rule_class
from fabric_tram.registry import OPTIMIZERS


class LocalFabric:
    """What the step needs of Fabric, for one process without it: backward (through an fp16 GradScaler when
    given), gradient-sync control and all-reduce (both no-ops here)."""

    world_size, global_rank = 1, 0

    def __init__(self, device: torch.device, scaler: torch.amp.GradScaler | None = None):
        self.device, self.scaler = device, scaler

    def backward(self, tensor: torch.Tensor) -> None:
        (self.scaler.scale(tensor) if self.scaler is not None else tensor).backward()

    def no_backward_sync(self, module, enabled: bool = True):
        return contextlib.nullcontext()

    def all_reduce(self, tensor, reduce_op="sum"):
        return tensor


class _LocalOptimizer:
    """Steps a plain optimizer the way Fabric's wrapper does (through the scaler when there is one)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None):
        self.optimizer, self.scaler = optimizer, scaler

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self):
        if self.scaler is None:
            return self.optimizer.step()
        out = self.scaler.step(self.optimizer)
        self.scaler.update()
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

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        optimizer,
        loss_fn: Callable,
        *,
        grad_clip: float = 0.0,
        noise_sampler: Callable | None = None,
        fabric=None,
        scaler=None,
        **hyperparameters,
    ):
        entry = OPTIMIZERS.get(name)
        self.loss_fn = lambda m, batch, **kw: as_loss_output(loss_fn(m, batch, **kw))
        if fabric is None:
            fabric = LocalFabric(next(model.parameters()).device, scaler)
            optimizer = _LocalOptimizer(optimizer, scaler)
        else:  # the precision plugin's loss scaler, if any (Fabric scales the loss in its backward)
            scaler = loss_scaler(fabric)
        self.fabric, self.model, self.optimizer, self.grad_clip, self.scaler = (
            fabric,
            model,
            optimizer,
            grad_clip,
            scaler,
        )
        config = self._config(entry, hyperparameters)
        self.rule: UpdateRule = rule_class(name)(config, model, optimizer)
        if noise_sampler is not None:
            if self.rule.noise is None:
                raise TypeError(
                    f"{name!r} draws no input noise: noise_sampler applies to tram-x, tram-fisher, r3f, asam+r3f"
                )
            self.rule.noise.sampler = noise_sampler
        self.step_count = 0

    @staticmethod
    def _config(entry, hyperparameters: dict):
        if not is_rule(entry.name):
            if hyperparameters:
                raise TypeError(
                    f"{entry.name!r} is a base optimizer: it takes no hyperparameters here, "
                    f"got {sorted(hyperparameters)}"
                )
            return None
        valid = {f.name for f in dataclasses.fields(entry.config)} - {"base"}
        unknown = sorted(set(hyperparameters) - valid)
        if unknown:
            raise TypeError(
                f"unknown hyperparameter(s) {unknown} for {entry.name!r}; valid: {', '.join(sorted(valid))}"
            )
        config = entry.config(**hyperparameters)
        config.check()  # validated here, once, as config resolution does for the engine's sections
        return config

    def step(self, batch, micro_batches: list | None = None, n_targets: float | None = None) -> dict:
        """One optimizer step on ``batch`` (or on several ``micro_batches`` with their total ``n_targets``)."""
        self.step_count += 1
        batches = micro_batches if micro_batches is not None else [batch]
        n_global = (
            None
            if n_targets is None
            else torch.tensor(float(n_targets), dtype=torch.float64, device=self.fabric.device)
        )
        ctx = StepContext(
            fabric=self.fabric,
            model=self.model,
            optimizer=self.optimizer,
            loss_fn=self.loss_fn,
            micro_batches=batches,
            step=self.step_count,
            n_global=n_global,
            grad_clip=self.grad_clip,
            scaler=self.scaler,
            params=self.rule.params,
        )
        stats = {**self.rule.step(ctx), **{f"passes/{k}": v for k, v in ctx.passes.items()}}
        to_host([stats])  # a plain loop wants numbers; the step itself never waited on the device for them
        return stats

    def state_dict(self) -> dict:
        """The rule's persistent state (previous iterate, θ_0, EMA) and the step count, for your checkpoints."""
        return {"rule": self.rule.state_dict(), "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.rule.load_state_dict(state["rule"])
        self.step_count = state["step"]
