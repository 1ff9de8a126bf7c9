"""ε-sharpness (Keskar et al. 2017), as the paper measures it after Juneja et al. (2023): the largest relative rise
of the loss within a box around the weights, found by projected gradient ascent.

    box     C_ε = { δ : |δ_i| ≤ ε (|w_i| + 1) }
    value   100 · (max_{δ ∈ C_ε} L(w + δ) − L(w)) / (1 + L(w))

The maximum is approached by SGD ascent steps on δ (lr, each step's gradient accumulated over micro-batches),
each followed by the projection onto the box (a clamp per coordinate). The weights are restored exactly at the
end. Works on FSDP2 shards: the box and the clamp are per coordinate, so each rank clamps its own shard, and the
loss closure is expected to return an all-reduced mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


@torch.no_grad()
def _clamp_to_box(params, origin, epsilon: float) -> None:
    for p, w in zip(params, origin, strict=True):
        radius = epsilon * (w.abs() + 1.0)
        p.copy_(torch.maximum(torch.minimum(p, w + radius), w - radius))


def epsilon_sharpness(
    params: list[torch.nn.Parameter],
    loss_and_backward: Callable[[], float],
    loss_only: Callable[[], float],
    epsilon: float = 1e-5,
    lr: float = 8e-5,
    steps: int = 10,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """``loss_and_backward()`` runs the step's micro-batches' forward and backward (gradients accumulated into
    ``.grad``) and returns the mean loss; ``loss_only()`` evaluates the mean loss without gradients. Returns the
    loss at w, the largest loss found in the box, and the sharpness (100 × relative rise)."""
    if epsilon <= 0:
        raise ValueError(f"ε must be > 0, got {epsilon}")
    origin = [p.detach().clone() for p in params]
    base = loss_only()
    best = base
    try:
        for step in range(steps):
            for p in params:
                p.grad = None
            current = loss_and_backward()
            best = max(best, current)
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=lr)  # ascent: climb the loss
            _clamp_to_box(params, origin, epsilon)  # back into the ε-box
            if progress is not None:
                progress(step + 1, current)
        best = max(best, loss_only())
    finally:
        with torch.no_grad():
            for p, w in zip(params, origin, strict=True):
                p.copy_(w)
                p.grad = None
    return {"loss": base, "max_loss": best, "sharpness": 100.0 * (best - base) / (1.0 + base)}
