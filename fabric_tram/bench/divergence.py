"""Large-vocabulary d: peak memory of the chunked computation (fabric_tram) vs a naive full float32
log-softmax of the whole batch, each in its own process; logits given in bf16, shape (batch, seq, vocab),
by default (16, 1024, 50257), the naive one measured at batch 4 and scaled (it would not fit in 24 GB)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import torch

from fabric_tram.bench.common import table, write_json


def child(mode: str, batch: int, device: str, seq: int = 1024, vocab: int = 50257) -> dict:
    torch.manual_seed(0)
    shape = (batch, seq, vocab)
    target = torch.randn(shape, dtype=torch.bfloat16, device=device)
    current = torch.randn(shape, dtype=torch.bfloat16, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        if mode == "chunked":
            from fabric_tram.optim.divergences import divergence_sum

            total, count = divergence_sum("kl", target, current)
            d = float(total / count)
        else:
            log_p, log_q = target.float().log_softmax(-1), current.float().log_softmax(-1)
            d = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    peak = (
        torch.cuda.max_memory_allocated()
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {"d": d, "extra_peak_bytes": peak - base}


def main() -> dict:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16, help="batch of the chunked measurement")
    parser.add_argument("--naive-batch", type=int, default=4, help="batch of the naive one (scaled to --batch)")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.device, args.seq, args.vocab)))
        return {}
    results = {}
    for mode, batch in (("chunked", args.batch), ("naive", args.naive_batch)):
        cmd = [
            sys.executable,
            "-m",
            "fabric_tram.bench.divergence",
            "--device",
            args.device,
            "--seq",
            str(args.seq),
            "--vocab",
            str(args.vocab),
            "--child",
            mode,
            str(batch),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[mode] = {"batch": batch, **json.loads(out.stdout.strip().splitlines()[-1])}
    scaled = results["naive"]["extra_peak_bytes"] * args.batch / args.naive_batch
    mib = 2**20
    print(
        table(
            ["computation", "batch", "extra peak (MiB)", f"at batch {args.batch} (MiB)"],
            [
                [
                    "chunked (fabric_tram)",
                    args.batch,
                    results["chunked"]["extra_peak_bytes"] / mib,
                    results["chunked"]["extra_peak_bytes"] / mib,
                ],
                ["naive float32", args.naive_batch, results["naive"]["extra_peak_bytes"] / mib, scaled / mib],
            ],
        )
    )
    payload = {
        "device": args.device,
        "shape": [args.batch, args.seq, args.vocab],
        "results": results,
        "naive_scaled_bytes": scaled,
    }
    print(f"written: {write_json(args.out, 'divergence', payload)}")
    return payload


if __name__ == "__main__":
    main()
