"""Bytes an update rule holds between steps per parameter byte, counted from its tensors; peak memory of a step
for adam vs tram-prev, each measured in its own process (a process's peak only grows)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import torch

from fabric_tram.bench.common import arguments, engine_optimizer, loss_fn, make_batch, make_model, table, write_json
from fabric_tram.bench.step_cost import RULES
from fabric_tram.optim.api import UpdateRuleLoop
from fabric_tram.registry import OPTIMIZERS, load_builtins


def held_bytes(loop: UpdateRuleLoop) -> int:
    """Per-parameter buffers and copies the rule keeps between steps (its saved state plus the restore backup);
    TRAM's radius state (a dict of calibration_steps + 2 scalars) is not per parameter and is left out."""
    rule = loop.rule
    per_parameter = [buffers for buffers in rule.state_dict().values() if isinstance(buffers, list)]
    tensors = {id(t): t for buffers in per_parameter for t in buffers}
    for t in getattr(rule, "backup", []) or []:
        tensors.setdefault(id(t), t)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_of_one_step(rule: str, size: str, device: str, precision: str) -> int:
    """Run in a child process: peak bytes during two steps of ``rule`` above what the process held before them
    (CUDA: the allocator's peak; CPU: the resident high-water mark, reset through /proc/self/clear_refs)."""
    model = make_model(size, device)
    loop = UpdateRuleLoop(rule, model, engine_optimizer(model.parameters(), lr=1e-5), loss_fn(precision))
    batch = make_batch(size, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            loop.step(batch)
        return torch.cuda.max_memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current resident size
        before = _rss_kib("VmRSS")
    except OSError:  # not Linux: fall back to the whole process's peak
        before = 0
    for _ in range(2):
        loop.step(batch)
    peak = _rss_kib("VmHWM") if before else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - before) * 1024


def main() -> dict:
    args = arguments(
        __doc__.splitlines()[0], lambda p: p.add_argument("--peak-child", default=None, help=argparse_hidden())
    )
    if args.peak_child:
        print(json.dumps({"peak": peak_of_one_step(args.peak_child, args.size, args.device, args.precision)}))
        return {}
    load_builtins()
    batch = make_batch(args.size, args.device)
    rows, results = [], {}
    for name in RULES:
        model = make_model(args.size, args.device)
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        loop = UpdateRuleLoop(name, model, engine_optimizer(model.parameters(), lr=1e-5), loss_fn(args.precision))
        loop.step(batch)
        factor = held_bytes(loop) / param_bytes
        target = OPTIMIZERS.get(name).target.held_per_param_byte(model.transformer.wte.weight.element_size())
        results[name] = {"held_per_param_byte": factor, "target": target}
        rows.append([name, factor, float(target), "yes" if factor <= target + 1e-9 else "no"])
    print(table(["rule", "held / param bytes", "target", "at target"], rows))
    peaks = {}
    for rule in ("adam", "tram-prev"):
        cmd = [
            sys.executable,
            "-m",
            "fabric_tram.bench.memory",
            "--peak-child",
            rule,
            "--size",
            args.size,
            "--device",
            args.device,
            "--precision",
            args.precision,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        peaks[rule] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    what = "CUDA allocator peak" if args.device.startswith("cuda") else "resident peak above the pre-step size"
    print(
        f"{what} of two steps: adam {peaks['adam'] / 2**20:.1f} MiB, tram-prev {peaks['tram-prev'] / 2**20:.1f} MiB "
        f"(+{(peaks['tram-prev'] - peaks['adam']) / 2**20:.1f} MiB; parameters {param_bytes / 2**20:.1f} MiB)"
    )
    payload = {
        "size": args.size,
        "device": args.device,
        "rules": results,
        "peak_bytes": peaks,
        "param_bytes": param_bytes,
    }
    print(f"written: {write_json(args.out, 'memory', payload)}")
    return payload


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
