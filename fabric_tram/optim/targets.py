"""Trust-region targets: the output distribution a rule compares the current one with (docs/algorithms.md).

A target's ``output(fw, batch)`` (``fw``: the step's forwards, optim/forwards.py) is a no-grad forward of the
same micro-batch under the dropout masks that the next (current) forward will draw, differing only in what the
rule means it to differ in:

    PreviousIterate     p(·|x; θ_{s−2})      tram-prev, trpo, asam+trpo
    InitialWeights      p(·|x; θ_0)          tram-init
    ExponentialAverage  p(·|x; θ_ema)        mesa, asam+mesa (the EMA in float32)
    NoisedInputs        p(·|x + z; θ)        tram-x

Weight targets hold their reference weights in buffers sharded like the parameters; they are the rule's
persistent state (``state_dict``) and are advanced around the base step (``before_base_step``/``after_base_step``).
"""

from __future__ import annotations

import contextlib

import torch

from fabric_tram.loss import LossOutput
from fabric_tram.optim.noise import InputNoise
from fabric_tram.optim.weights import clone_weights, load_buffers, store_weights, update_ema, weights_swapped_in

TARGET_MODES = ("train", "eval")


def replayed_rng(device: torch.device):
    """Random numbers drawn inside are rewound on exit: the next forward draws the same dropout masks."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type)


@contextlib.contextmanager
def _mode(model, target_mode: str):
    """``eval``: the published code's target forward without dropout; ``train``: as the current forward."""
    if target_mode == "eval" and model.training:
        model.eval()
        try:
            yield
        finally:
            model.train()
    else:
        yield


class Target:
    """A target distribution and the state that produces it (none here)."""

    def output(self, fw, batch) -> LossOutput:
        raise NotImplementedError

    def before_base_step(self, restored: bool = False) -> None:
        """Runs with θ = θ_{s−1} restored, just before the base optimizer steps; ``restored``: the step perturbed
        the weights along a fresh gradient, so the restore point already holds θ_{s−1}."""

    def after_base_step(self) -> None:
        """Runs after the base optimizer step."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(
                f"this update rule holds no state, but the checkpoint has: {sorted(state)}; "
                "was it written by another optimizer.name?"
            )


class WeightTarget(Target):
    """p(·|x; θ_ref) from reference weights held in ``buffers`` (a copy of θ_0 unless given)."""

    state_key = "reference_weights"

    def __init__(
        self,
        params,
        buffers: list[torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        target_mode: str = "train",
    ):
        self.params = params
        self.buffers = buffers if buffers is not None else clone_weights(params, dtype)
        self.target_mode = target_mode

    def output(self, fw, batch) -> LossOutput:
        with (
            replayed_rng(fw.device),
            weights_swapped_in(self.params, self.buffers),
            _mode(fw.model, self.target_mode),
        ):
            return fw.target_output(batch)

    def state_dict(self) -> dict:
        return {self.state_key: self.buffers}

    def load_state_dict(self, state: dict) -> None:
        load_buffers(self.buffers, _saved(state, self.state_key), self.state_key)


class PreviousIterate(WeightTarget):
    """θ_{s−2}: the buffers become θ_{s−1} before the base step (so at step 1 the target is θ_0 = θ_{s−1}).

    ``is_restore_point``: the buffers are also the sharpness-aware restore point (memory-optimal tram-prev),
    which the perturbation block has already set to θ_{s−1} on a step that perturbed along a fresh gradient;
    nothing is left to store then (on the steps between perturbations, ``ascent_every``, it is stored here).
    """

    state_key = "previous_iterate"

    def __init__(self, params, buffers=None, target_mode: str = "train", is_restore_point: bool = False):
        super().__init__(params, buffers, target_mode=target_mode)
        self.is_restore_point = is_restore_point

    def before_base_step(self, restored: bool = False) -> None:
        if not (self.is_restore_point and restored):  # a step that did not perturb (ascent_every) stores θ_{s−1}
            store_weights(self.buffers, self.params)


class InitialWeights(WeightTarget):
    """θ_0, fixed for the whole run."""

    state_key = "initial_weights"


class ExponentialAverage(WeightTarget):
    """θ_ema in at least float32 (float32 for bf16 or fp32 weights), updated after every base step:
    ema ← decay · ema + (1 − decay) · θ."""

    state_key = "ema"

    def __init__(self, params, decay: float, target_mode: str = "train"):
        at_least_fp32 = [b.to(torch.promote_types(b.dtype, torch.float32)) for b in clone_weights(params)]
        super().__init__(params, buffers=at_least_fp32, target_mode=target_mode)
        self.decay = decay

    def after_base_step(self) -> None:
        update_ema(self.buffers, self.params, self.decay)


class NoisedInputs(Target):
    """p(·|x + z; θ): the same weights on noised input embeddings (no state)."""

    def __init__(self, noise: InputNoise):
        self.noise = noise

    def output(self, fw, batch) -> LossOutput:
        with replayed_rng(fw.device), self.noise.applied(fw.step, batch) as kwargs:
            return fw.target_output(batch, **kwargs)


def _saved(state: dict, key: str):
    if key not in state:
        raise ValueError(
            f"the checkpoint holds no {key!r} for this update rule (it holds: {sorted(state) or 'nothing'}); "
            "was it written by another optimizer.name?"
        )
    return state[key]
