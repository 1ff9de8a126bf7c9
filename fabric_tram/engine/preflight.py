"""The preflight: a run that cannot fit is refused with the numbers before any model is built, instead of being
killed by the operating system (or running out of GPU memory) minutes later.

The estimate is ``fabric-tram estimate``'s (engine/estimate.py: parameters, gradients, optimizer state, rule
buffers, activations and logits per device); it is compared with what the device has free now — a GPU's free
memory, or on a CPU the memory the kernel reports available, shared by the node's processes — less a margin for
what the estimate leaves out (framework, allocator, data). ``trainer.preflight=false`` turns it off.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fabric_tram.engine.estimate import GIB, estimate

MARGIN = 0.9  # the share of the free memory the estimate may take: the rest is for what it does not count


def cpu_available_bytes() -> float:
    """What the kernel reports available (MemAvailable: free plus what it can reclaim), for the whole machine."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def available_bytes(device: torch.device, processes_on_node: int) -> tuple[float, str]:
    """Free bytes for one process on ``device``, and how they were measured (for the message)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return float(free), f"{torch.cuda.get_device_name(device)} has {free / GIB:.1f} of {total / GIB:.1f} GiB free"
    available = cpu_available_bytes()
    share = f", shared by {processes_on_node} processes" if processes_on_node > 1 else ""
    return available / processes_on_node, f"the CPU has {available / GIB:.1f} GiB of memory available{share}"


def preflight_skipped(config, world_size: int) -> str | None:
    """Why the preflight cannot judge this run (the estimator cannot size its model: a plugin without sizes, a
    checkpoint config out of reach), said at start instead of skipping in silence; None when it can."""
    try:
        estimate(config, devices=world_size)
    except (ValueError, KeyError, AttributeError, NotImplementedError, FileNotFoundError) as err:
        return (
            f"the memory preflight was skipped: model {config.model.name!r} cannot be estimated "
            f"({type(err).__name__}: {err}); the run starts without knowing whether it fits"
        )
    return None


def preflight_error(config, world_size: int, device: torch.device) -> str | None:
    """Why the run cannot fit on ``device`` (one line with the numbers and the remedies), or None. A model the
    estimator cannot size is not refused here (:func:`preflight_skipped` says so)."""
    t = config.trainer
    try:
        e = estimate(config, devices=world_size)
    except (ValueError, KeyError, AttributeError, NotImplementedError, FileNotFoundError):
        return None
    nodes = max(1, int(t.num_nodes))
    free, where = available_bytes(device, max(1, world_size // nodes))
    needed = e["total_bytes"]
    if needed <= MARGIN * free:
        return None
    parts = ", ".join(f"{k.replace('_', ' ')} {v / GIB:.1f}" for k, v in e["bytes"].items())
    remedies = []
    if t.strategy != "fsdp" or world_size == 1:
        remedies.append("more devices with trainer.strategy=fsdp (parameters, gradients and state are divided)")
    if not t.activation_checkpointing:
        remedies.append("trainer.activation_checkpointing=true")
    if t.micro_batch_size > 1:
        remedies.append(f"a smaller trainer.micro_batch_size (now {t.micro_batch_size}) with a larger accumulate")
    if t.precision in ("32-true", "64-true"):
        remedies.append("trainer.precision=bf16-mixed")
    return (
        f"this run needs about {needed / GIB:.1f} GiB per device ({parts} GiB; fabric-tram estimate) but {where}: "
        f"it would not fit. Try {'; '.join(remedies) or 'a smaller model'}; or trainer.preflight=false to start anyway"
    )
