"""Large-vocabulary cross-entropy: peak memory and time of one forward-backward of the loss alone, the plain
float32 log-softmax (``task.cross_entropy=plain``) against the chunked one (``chunked``), each in its own process
(a process's peak only grows); logits of shape (batch, seq, vocab) in bf16 (a mixed-precision model's) or fp32,
by default (4, 1024, 50257), 10% of the positions padding. Prints the loss of each, which must agree.

``--rules adam,tram-prev,...`` then times each rule's step with each loss on a ``--step-size`` model (the
benchmarks' sizes), interleaved: with the chunked loss the divergences read the logits and take their own
log-softmax instead of the loss's, which a regulariser or TRAM pays for on the steps that measure d."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from fabric_tram.bench.common import SIZES, engine_optimizer, interleave, make_batch, make_model, table, write_json
from fabric_tram.engine.cpu_memory import keep_freed_cpu_memory
from fabric_tram.loss import IGNORE_INDEX, chunked_cross_entropy_sum, cross_entropy_sum

LOSSES = {"plain": cross_entropy_sum, "chunked": chunked_cross_entropy_sum}


def _peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(mode: str, device: str, batch: int, seq: int, vocab: int, dtype: str, repeats: int) -> dict:
    if not device.startswith("cuda"):
        keep_freed_cpu_memory()  # time the work, not first-touch page faults (the peak is the same either way)
    torch.manual_seed(0)
    logits = torch.randn(batch, seq, vocab, dtype=getattr(torch, dtype), device=device, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    labels[:, -seq // 10 :] = IGNORE_INDEX  # right padding, as the collate writes it
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.startswith("cuda") else _peak_bytes(device)
    seconds, peak = [], None
    for _ in range(repeats):
        logits.grad = None
        start = time.perf_counter()
        out = LOSSES[mode](logits, labels)
        out.loss_sum.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        loss = float(out.loss_sum / out.count)
        del out
        peak = peak or _peak_bytes(device)  # of the first: kept freed memory may fragment over the later ones
    return {"loss": loss, "extra_peak_bytes": peak - base, "ms": 1e3 * statistics.median(seconds)}


def loss_with(cross_entropy, precision: str):
    """The benchmarks' loss with ``cross_entropy``: the logits as the model gives them (bf16 under autocast), so
    that the plain loss's float32 log-softmax is its own and not a cast made here."""

    def loss(model, batch, **forward_kwargs):
        with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = model(batch["input_ids"], **forward_kwargs)
        return cross_entropy(logits, batch["labels"])

    return loss


def rule_steps(args) -> dict:
    """Median seconds of each rule's step with each loss, interleaved, each on its own model and Adam."""
    from fabric_tram.optim.api import UpdateRuleLoop

    batch = make_batch(args.step_size, args.device, rows=args.step_rows)
    candidates = {}
    for rule in args.rules.split(","):
        for mode, cross_entropy in LOSSES.items():
            model = make_model(args.step_size, args.device)
            loop = UpdateRuleLoop(rule, model, engine_optimizer(model.parameters(), lr=1e-5),
                                  loss_with(cross_entropy, args.precision))  # fmt: skip
            candidates[(rule, mode)] = lambda lp=loop: lp.step(batch)
    seconds = interleave(candidates, args.device, args.repeats)
    return {rule: {mode: seconds[(rule, mode)] for mode in LOSSES} for rule in args.rules.split(",")}


def main() -> dict:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="of the logits")
    parser.add_argument("--repeats", type=int, default=3, help="forward-backwards timed (the median is reported)")
    parser.add_argument("--rules", default="", help="also time these rules' steps with each loss (comma-separated)")
    parser.add_argument("--step-size", default="small", choices=sorted(SIZES), help="the model of --rules")
    parser.add_argument("--step-rows", type=int, default=None, help="rows per step of --rules (default: the size's)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"], help="of --rules")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.batch, args.seq, args.vocab)
    if args.child:
        print(json.dumps(child(args.child, args.device, *shape, args.dtype, args.repeats)))
        return {}
    results = {}
    for mode in LOSSES:
        cmd = [sys.executable, "-m", "fabric_tram.bench.cross_entropy", "--device", args.device, "--batch",
               str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab), "--dtype", args.dtype,
               "--repeats", str(args.repeats), "--child", mode]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    logits_mib = args.batch * args.seq * args.vocab * torch.finfo(getattr(torch, args.dtype)).bits / 8 / 2**20
    print(f"logits {shape} {args.dtype}: {logits_mib:,.0f} MiB, {args.device}")
    rows = [[m, r["loss"], r["extra_peak_bytes"] / 2**20, r["ms"]] for m, r in results.items()]
    print(table(["cross-entropy", "loss", "extra peak (MiB)", "ms per forward-backward"], rows))
    payload = {"device": args.device, "shape": list(shape), "dtype": args.dtype, "logits_mib": logits_mib,
               "results": results}  # fmt: skip
    if args.rules:
        if not args.device.startswith("cuda"):
            keep_freed_cpu_memory()  # as the timing benchmarks: the rules' work, not first-touch page faults
        steps = rule_steps(args)
        _, _, _, vocab, block, rows = SIZES[args.step_size]
        print(f"steps: {args.step_size} ({args.step_rows or rows} x {block} tokens, vocabulary {vocab:,}), "
              f"{args.precision}, medians of {args.repeats} interleaved rounds")  # fmt: skip
        ratios = [[r, 1e3 * t["plain"], 1e3 * t["chunked"], t["chunked"] / t["plain"]] for r, t in steps.items()]
        print(table(["rule", "plain (ms)", "chunked (ms)", "chunked / plain"], ratios))
        payload["steps"] = {"size": args.step_size, "rows": args.step_rows or rows, "precision": args.precision,
                            "seconds": steps}  # fmt: skip
    print(f"written: {write_json(args.out, 'cross_entropy', payload)}")
    return payload


if __name__ == "__main__":
    main()
