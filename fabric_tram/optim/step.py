"""The step contract between the engine and the update rules.

The engine draws a step's micro-batches up front and hands an update rule a :class:`StepContext`. A rule runs
as many gradient passes as it needs with :meth:`StepContext.forward_backward` (every pass replays the same
micro-batches, with explicit gradient-sync control and global normalisation), each pass through an *objective*
(a batch-to-``LossOutput`` function built from ``ctx.forwards.forward`` (optim/forwards.py), possibly wrapped
by a trust-region target or a regulariser: ``optim/objectives.py``), and ends with
:meth:`StepContext.clip_and_step`, the only place the base optimizer steps (through Fabric, so that a loss
scaler unscales and steps exactly once).

Every forward goes through ``ctx.forwards`` (its own object: objectives and targets never call back into the
step), which counts them: the passes a step ran are those counts divided by the number of micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from fabric_tram.contracts import unwrap_optimizer
from fabric_tram.distributed import all_reduce_sum, global_norm, local
from fabric_tram.loss import LossOutput
from fabric_tram.optim.forwards import Forwards, zero_counts
from fabric_tram.optim.weights import groups

Objective = Callable[[dict], LossOutput]  # one micro-batch -> its LossOutput (forward included)


@dataclass
class PassResult:
    """A pass's means over the step's targets, as device tensors (nothing is brought to the host)."""

    loss: torch.Tensor  # global mean of the task loss (regularisers excluded)
    regulariser: torch.Tensor | None  # global mean of the regulariser the objective added (None: it added none)


@dataclass
class StepContext:
    """What an update rule sees of one optimizer step.

    ``fabric``: a Fabric, or anything with its small interface (``device``, ``world_size``, ``backward``,
    ``no_backward_sync``, ``all_reduce``; see ``fabric_tram.optim.api.LocalFabric``).
    ``n_global``/``n_local``: the step's target counts over all ranks / on this rank (all micro-batches). The
    engine counts them before the first backward, whose scale needs them; None: taken from the single
    micro-batch's ``LossOutput.count`` after its forward (the user-loop API with one micro-batch).
    """

    fabric: object
    model: torch.nn.Module  # Fabric-wrapped
    optimizer: object  # Fabric-wrapped base optimizer
    loss_fn: Callable[..., LossOutput]  # task.loss(model, batch, **forward_kwargs)
    micro_batches: list
    step: int  # 1-based optimizer step
    n_global: torch.Tensor | None = None
    n_local: torch.Tensor | None = None
    grad_clip: float = 0.0
    scaler: torch.amp.GradScaler | None = None  # the fp16 loss scaler in force (None without one)
    compute_dtype: torch.dtype | None = None  # mixed precision's autocast dtype: what target logits are kept in
    counts: dict = field(default_factory=zero_counts)
    # the trainable parameters, as the update rule listed them once at its set-up (``UpdateRule.params``); None:
    # walked from the model at each use (a walk of every module, about 0.1 ms a step on a small CPU model)
    params: list[torch.nn.Parameter] | None = None

    def __post_init__(self):
        if self.scaler is not None and not self.scaler.is_enabled():
            self.scaler = None

    @cached_property
    def forwards(self) -> Forwards:
        """What objectives and targets call (optim/forwards.py); it counts forwards into the same counts."""
        return Forwards(self.model, self.loss_fn, self.step, self.device, self.compute_dtype, self.counts)

    @property
    def world_size(self) -> int:
        return self.fabric.world_size

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        if self.params is not None:
            return self.params
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def passes(self) -> dict[str, int]:
        """Passes over the step's micro-batches so far: forwards with gradient, no-grad forwards, backwards."""
        k = len(self.micro_batches)
        return {
            "forward": self.counts["forward"] // k,
            "no_grad_forward": self.counts["no_grad_forward"] // k,
            "backward": self.counts["backward"] // k,
        }

    # ------------------------------------------------------------------------------------------- one pass

    def forward_backward(self, objective: Objective | None = None, per_rank: bool = False) -> PassResult:
        """One gradient pass of ``objective`` (default: the plain loss) over the step's micro-batches; leaves the
        step's mean gradient in ``p.grad``.

        Each micro-batch's backward uses ``objective_sum_local / N_global * W``: data-parallel strategies
        average gradients over the W ranks, so this yields the gradient of the mean over every target of the
        step. Gradient sync is skipped on all but the last micro-batch. ``per_rank`` ("m-sharpness") skips it on
        every micro-batch and normalises by this rank's own count: a per-rank mean gradient.
        """
        objective = objective or self.forwards.forward
        k = len(self.micro_batches)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        regulariser_sum = None
        for i, batch in enumerate(self.micro_batches):
            skip_sync = self.world_size > 1 and (per_rank or i < k - 1)
            with self.fabric.no_backward_sync(self.model, enabled=skip_sync):
                forwards_before = self.counts["forward"]
                out = objective(batch)
                graphs = max(1, self.counts["forward"] - forwards_before)  # r3f: clean and noised, both in the graph
                total = out.objective_sum()
                loss_sum += out.loss_sum.detach().double()
                if out.regulariser is not None:
                    term = out.regulariser.detach().double()
                    regulariser_sum = term if regulariser_sum is None else regulariser_sum + term
                self._count_targets(out, k)
                del out  # its logits and log-probabilities must be freed as soon as the backward is done with them
                self.fabric.backward(total * self._scale(per_rank).to(total.dtype))
            self.counts["backward"] += graphs  # a backward through two graphs costs two backwards
        n = self.n_global.clamp(min=1)
        reg = None if regulariser_sum is None else all_reduce_sum(self.fabric, regulariser_sum) / n
        return PassResult(loss=all_reduce_sum(self.fabric, loss_sum) / n, regulariser=reg)

    def _count_targets(self, out: LossOutput, k: int) -> None:
        if self.n_global is not None:
            return
        if k != 1:
            raise ValueError("with several micro-batches, pass their global target count (n_global)")
        self.n_local = torch.as_tensor(out.count, dtype=torch.float64, device=self.device)
        self.n_global = all_reduce_sum(self.fabric, self.n_local)

    def _scale(self, per_rank: bool) -> torch.Tensor:
        """The backward's normalisation, a device tensor (the counts never come to the host)."""
        if per_rank:  # no averaging over ranks: this rank's own mean
            if self.n_local is None:
                raise ValueError("per-rank normalisation (m-sharpness) needs this rank's target count (n_local)")
            return 1.0 / self.n_local.clamp(min=1)
        return self.world_size / self.n_global.clamp(min=1)

    # ------------------------------------------------------------------------------------------- gradients

    def grads(self) -> list[torch.Tensor | None]:
        return [p.grad for p in self.parameters]

    def grad_norm(self) -> torch.Tensor:
        """‖g‖ over all parameters and all shards (float32, identical on every rank)."""
        return global_norm(self.grads())

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(self.fabric, value)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def loss_scale(self) -> float:
        """The fp16 loss scale in force (1.0 without a scaler): gradients in ``p.grad`` are multiplied by it."""
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def skip_step(self) -> dict:
        """Drop this step (a non-finite ascent pass): no update. With a loss scaler it is an fp16 overflow and the
        scaler backs off; without one the step is marked ``nonfinite`` (the trainer stops or counts it)."""
        self.zero_grad()
        if self.scaler is not None:
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        return {"grad_norm": float("nan"), "skipped": True, "nonfinite": self.scaler is None}

    def clip_gradients(self) -> torch.Tensor:
        """Scale the gradients in ``p.grad`` down to global norm ``grad_clip`` if above it (0: never); returns the
        norm before clipping (over every shard; identical on every rank). Multi-tensor and on the device: the
        factor min(1, c / (‖g‖ + 1e-6)) is applied whatever the norm, so no value comes to the host."""
        norm = self.grad_norm()
        if self.grad_clip > 0:
            factor = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
            with torch.no_grad():  # a DTensor's to_local() then hands back its shard without an autograd function
                grads = [local(g) for g in self.grads() if g is not None]
                for group in groups(grads):
                    torch._foreach_mul_(group[0], factor.to(group[0][0].dtype))
        return norm

    def clip_and_step(self, *also_finite: torch.Tensor) -> dict:
        """Unscale (once), clip, step the base optimizer through Fabric, zero the gradients.

        A non-finite gradient (or a non-finite value among ``also_finite``, such as the pass's loss) never reaches
        the weights: with a loss scaler it is an fp16 overflow (the scaler skips the step and backs off); without
        one the step is skipped and marked ``nonfinite``. Deciding this is the step's one host synchronisation.
        """
        if self.scaler is not None:
            self.scaler.unscale_(unwrap_optimizer(self.optimizer))  # the unwrapped optimizer: unscaled exactly once
        norm = self.clip_gradients()
        finite = all_finite(norm, *also_finite)
        if finite or self.scaler is not None:
            self.optimizer.step()  # with a scaler: skipped on inf/nan, and the scale is updated
        self.zero_grad()
        return {"grad_norm": norm, "skipped": not finite, "nonfinite": not finite and self.scaler is None}


def all_finite(*values, fabric=None) -> bool:
    """Whether every value (0-dim device tensors, Python numbers or None) is finite, with one transfer to the host;
    with ``fabric``, on every rank (one all-reduce first: under m-sharpness the ranks' values differ).

    The tensors are summed in float64 and the sum tested: a sum is finite exactly when every term is (an inf or a
    nan propagates, inf - inf is nan), unless finite terms overflow float64 — beyond 1e307, which no loss or norm
    of a working run reaches (float32 values cannot: they are below 3.4e38). Fewer operations than a test per
    value: this runs on every step, and each tiny operation costs launch time on a GPU and host time on a CPU."""
    numbers_finite = all(math.isfinite(v) for v in values if v is not None and not torch.is_tensor(v))
    total = None
    for v in values:
        if torch.is_tensor(v):
            total = v.detach().double() if total is None else total + v.detach().double()
    if total is None:
        return numbers_finite
    if fabric is not None:
        bad = all_reduce_sum(fabric, (~torch.isfinite(total)).double())
        return float(bad) == 0.0 and numbers_finite
    return math.isfinite(float(total)) and numbers_finite


def to_host(entries: list[dict]) -> None:
    """Replace the 0-dim device tensors in ``entries`` (a step's stats) by Python floats, in place, with one
    transfer for all of them: the only way values of a step reach the host, after the step."""
    places = [(entry, key) for entry in entries for key, value in entry.items() if torch.is_tensor(value)]
    if not places:
        return
    devices = {entry[key].device for entry, key in places}
    if len(devices) > 1:  # e.g. counts on the CPU beside losses on the GPU: gather on one device first
        values = torch.stack([entry[key].detach().double().reshape(()).cpu() for entry, key in places])
    else:
        values = torch.stack([entry[key].detach().double().reshape(()) for entry, key in places])
    for (entry, key), value in zip(places, values.tolist(), strict=True):
        entry[key] = value
