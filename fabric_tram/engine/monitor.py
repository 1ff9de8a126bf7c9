"""What a run shows: the rank-0 progress bar, throughput and MFU counting every forward and backward an update
rule runs (its logs: ``engine/run_log.py``)."""

from __future__ import annotations

import time

from fabric_tram.contracts import forward_flops_per_token


def flops_per_step(model, tokens: float, seq_len: int, passes) -> float | None:
    """FLOPs of one optimizer step on this device: forward = F, backward = 2F, for every pass the rule runs
    (``passes``: forward, no-grad forward, backward)."""
    per_token = forward_flops_per_token(model, seq_len)
    if per_token is None:
        return None
    forward = per_token * tokens
    return forward * (passes.forward + passes.no_grad_forward) + 2 * forward * passes.backward


# dense peak FLOP/s of one GPU by the dtype of its matrix multiplies (datasheets, without 2:4 sparsity); a name
# fragment matches the device name (the longer fragment first: "H100 PCIe" before "H100", which is the SXM part)
PEAK_FLOPS = {
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51.2e12, "fp64": 51.2e12},
    "H100": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12, "fp64": 66.9e12},
    "H200": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12, "fp64": 66.9e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12, "fp64": 19.5e12},
}


def matmul_dtype(precision: str) -> str:
    """The dtype the matrix multiplies of a precision run in (float32 ones in TF32 when torch allows it)."""
    import torch

    if precision in ("bf16-mixed", "bf16-true"):
        return "bf16"
    if precision == "16-mixed":
        return "fp16"
    if precision == "64-true":
        return "fp64"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def peak_flops(device_name: str, precision: str) -> float | None:
    """The dense peak FLOP/s of a GPU named ``device_name`` for ``precision`` (None for a GPU not in the table)."""
    for fragment in sorted(PEAK_FLOPS, key=len, reverse=True):
        if fragment in device_name:
            return PEAK_FLOPS[fragment][matmul_dtype(precision)]
    return None


def available_flops(device, precision: str, override: float | None = None) -> float | None:
    """The peak FLOP/s that MFU divides by: ``trainer.peak_flops`` when set, else our table (CUDA only)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    import torch

    return peak_flops(torch.cuda.get_device_name(device), precision)


class Progress:
    """tqdm bar on rank 0 (step, loss, lr, tokens/s); silent on other ranks. Without the bar
    (``trainer.progress_bar=false``, e.g. output sent to a file), rank 0 prints one plain line at most every
    ``quiet_every`` seconds, so a slow run is never silent for minutes and a fast one prints nothing."""

    def __init__(self, fabric, start: int, total: int, enabled: bool, quiet_every: float = 60.0,
                 clock=time.perf_counter):  # fmt: skip
        self.bar = None
        self.total, self.quiet_every, self.clock = total, quiet_every, clock
        self.plain = not enabled and fabric.is_global_zero
        if enabled and fabric.is_global_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
        self.t0 = self.last_line = clock()

    def update(self, step: int, stats: dict) -> None:
        """A step whose values reached the host: move the bar and show them (or, without a bar, print them when
        ``quiet_every`` seconds have passed since the start or the last line)."""
        shown = {"loss": f"{stats['loss']:.4f}", "lr": f"{stats['lr']:.2e}"}
        if "tokens_per_s" in stats:
            shown["tok_s"] = f"{stats['tokens_per_s']:,.0f}"
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(shown)
        elif self.plain and self.clock() - self.last_line >= self.quiet_every:
            self.last_line = self.clock()
            values = ", ".join(f"{k} {v}" for k, v in shown.items())
            print(f"step {step}/{self.total}: {values} ({self.last_line - self.t0:.0f} s)", flush=True)

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
