"""What a run shows: the rank-0 progress bar, throughput and MFU counting every forward and backward an update
rule runs (its logs: ``engine/run_log.py``)."""

from __future__ import annotations

import time


def flops_per_step(model, tokens: float, seq_len: int, passes) -> float | None:
    """FLOPs of one optimizer step on this device: forward = F, backward = 2F, for every pass the rule runs
    (``passes``: forward, no-grad forward, backward)."""
    per_token = getattr(model, "forward_flops_per_token", None)
    if per_token is None:
        return None
    forward = per_token(seq_len) * tokens
    return forward * (passes.forward + passes.no_grad_forward) + 2 * forward * passes.backward


def available_flops(device, precision: str) -> float | None:
    """The device's peak FLOP/s for the precision (CUDA only; None where unknown)."""
    import torch
    from lightning.fabric.utilities.throughput import get_available_flops

    dtype = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}.get(
        precision, torch.float32
    )
    try:
        return get_available_flops(device, dtype) if device.type == "cuda" else None
    except Exception:  # unknown device
        return None


class Progress:
    """tqdm bar on rank 0 (step, loss, lr, tokens/s); silent elsewhere or when disabled."""

    def __init__(self, fabric, start: int, total: int, enabled: bool):
        self.bar = None
        if enabled and fabric.is_global_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
        self.t0 = time.perf_counter()

    def update(self, step: int, stats: dict) -> None:
        """A step whose values reached the host: move the bar and show them."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            postfix = {"loss": f"{stats['loss']:.4f}", "lr": f"{stats['lr']:.2e}"}
            if "tokens_per_s" in stats:
                postfix["tok_s"] = f"{stats['tokens_per_s']:,.0f}"
            self.bar.set_postfix(postfix)

    def advance(self, step: int) -> None:
        """A step whose values stay on the device: move the bar only."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
