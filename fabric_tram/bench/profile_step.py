"""Where a rule's step spends its time: GPU kernel time by kind beside the wall clock, from torch.profiler.

    python benchmarks/profile_step.py --device cuda --size gpt2 --rules adam,tram-prev,tram-x,r3f
    python benchmarks/profile_step.py --device cpu --size tiny --rules adam,tram-prev     # the same code path

For each rule, one profiled step after warm-up: the wall time, the summed device-kernel time (on a CPU: the
summed self CPU time of the operators), their difference (time the device waited on the host: launches, Python,
host syncs), and the kernel time grouped by kind (matrix products, attention, softmax/KL, elementwise,
reductions, optimizer, copies), so a rule's cost over its pass floor can be placed.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from fabric_tram.bench.common import engine_optimizer, loss_fn, make_batch, make_model, synchronize, table, write_json
from fabric_tram.optim.api import UpdateRuleLoop

KINDS = (  # (kind, substrings of a kernel's or operator's lowercased name), the first match wins
    ("attention", ("flash", "attention", "fmha", "efficient")),
    ("matmul", ("gemm", "matmul", "mm", "cutlass", "sm90_xmma", "nvjet", "linear")),
    ("softmax", ("softmax", "log_softmax", "logsumexp", "vecdot", "cross_entropy", "nll")),
    ("foreach", ("adam", "multi_tensor", "foreach", "fused")),  # the base step and the rules' multi-tensor ops
    ("copy", ("copy", "memcpy", "memset", "cat", "fill", "to_copy")),
    ("reduce", ("reduce", "norm", "sum", "mean", "max")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "mul", "add", "sub", "exp", "div", "dropout", "gelu")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KINDS if any(k in lowered for k in keys)), "other")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="gpt2")
    parser.add_argument("--rules", default="adam,sam,tram-prev,tram-x,r3f,asam+r3f")
    parser.add_argument("--precision", default="bf16-mixed", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--top", type=int, default=8, help="kernels listed per rule")
    parser.add_argument("--out", default="benchmarks/results")
    return parser.parse_args()


def profile_rule(name: str, args, batch: dict, loss) -> dict:
    model = make_model(args.size, args.device)
    params = list(model.parameters())
    loop = UpdateRuleLoop(name, model, engine_optimizer(params, lr=1e-5), loss, grad_clip=1.0)
    for _ in range(3):
        loop.step(batch)
    synchronize(args.device)
    cuda = args.device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        loop.step(batch)
        synchronize(args.device)
        wall = time.perf_counter() - start
    by_kind, by_name, launches = defaultdict(float), defaultdict(float), 0
    for event in prof.events():
        if cuda and event.device_type == torch.autograd.DeviceType.CUDA:
            seconds = event.device_time / 1e6
        elif not cuda and event.device_type == torch.autograd.DeviceType.CPU:
            seconds = event.self_cpu_time_total / 1e6  # self times do not overlap: they sum to the busy time
        else:
            continue
        launches += 1
        by_kind[kind_of(event.name)] += seconds
        by_name[event.name] += seconds
    busy = sum(by_kind.values())
    top = sorted(by_name.items(), key=lambda item: -item[1])[: args.top]
    del loop, model, params
    return {"wall": wall, "busy": busy, "kernels": launches, "by_kind": dict(by_kind), "top": top}


def main() -> dict:
    args = arguments()
    batch = make_batch(args.size, args.device)
    loss = loss_fn(args.precision)
    results = {name: profile_rule(name, args, batch, loss) for name in args.rules.split(",")}
    kinds = [kind for kind, _ in KINDS] + ["other"]
    unit = "kernel" if args.device.startswith("cuda") else "op"
    rows = [
        [name, r["wall"] * 1e3, r["busy"] * 1e3, (r["wall"] - r["busy"]) * 1e3, r["kernels"]]
        + [r["by_kind"].get(kind, 0.0) * 1e3 for kind in kinds]
        for name, r in results.items()
    ]
    print(f"{args.device}, {args.size}, {args.precision}: one profiled step per rule, milliseconds")
    print(table(["rule", "wall", f"{unit} sum", "not covered", f"{unit}s"] + kinds, rows))
    for name, r in results.items():
        print(f"\n{name}: top {unit}s")
        print(table([unit, "ms"], [[n[:90], t * 1e3] for n, t in r["top"]]))
    print(f"written: {write_json(args.out, 'profile_step', results)}")
    return results


if __name__ == "__main__":
    main()
