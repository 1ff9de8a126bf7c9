"""The ready GPU check (a few minutes): 5 steps of the gpt2 preset with fsdp, bf16-mixed and tram-prev on the
GPUs present; asserts finite losses; prints the peak memory beside `fabric-tram estimate`'s prediction and
tokens/s beside adam's. Weights are randomly initialised (no download), data is the bundled demo corpus.

    python benchmarks/gpu_check.py                 # on a GPU machine
    python benchmarks/gpu_check.py --device cpu --preset tiny --block 64    # the same path on a CPU (tests)
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from fabric_tram.analysis.estimate import estimate
from fabric_tram.bench.common import write_json
from fabric_tram.config import load_config
from fabric_tram.engine.trainer import train


def run(rule: str, args) -> tuple[object, float]:
    config = load_config(
        None,
        [
            "model.name=gpt2",
            f"model.preset={args.preset}",
            "task.name=lm",
            "task.data_dir=demo",
            "task.tokenizer=gpt2",
            f"task.block_size={args.block}",
            f"optimizer.name={rule}",
            "optimizer.lr=2e-5",
            "trainer.strategy=fsdp",
            f"trainer.precision={args.precision}",
            f"trainer.accelerator={args.device}",
            f"trainer.micro_batch_size={args.batch}",
            f"trainer.max_steps={args.steps}",
            "trainer.eval_batches=1",
            "trainer.progress_bar=false",
            f"trainer.run_dir={args.out}/gpu_check-{rule}-{time.strftime('%Y%m%d-%H%M%S')}",
        ],
    )
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = train(config)
    tokens_per_s = sum(s["n_targets"] for s in result.history[1:]) / sum(
        s["n_targets"] / s["tokens_per_s"] for s in result.history[1:]
    )
    return result, tokens_per_s, config


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    tram, tram_tps, config = run("tram-prev", args)
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else float("nan")
    assert all(math.isfinite(s["loss"]) for s in tram.history), "non-finite loss under fsdp + bf16-mixed + tram-prev"
    adam, adam_tps, _ = run("adam", args)
    predicted = estimate(config, devices=tram.fabric.world_size)
    if tram.fabric.is_global_zero:
        print(
            f"devices: {tram.fabric.world_size} x "
            f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}"
        )
        print(f"losses (tram-prev): {[round(s['loss'], 4) for s in tram.history]}")
        print(
            f"peak memory per device: {peak / 2**30:.2f} GiB measured, "
            f"{predicted['total_bytes'] / 2**30:.2f} GiB estimated"
        )
        print(
            f"tokens/s: tram-prev {tram_tps:,.0f}, adam {adam_tps:,.0f} "
            f"(ratio {adam_tps / tram_tps:.2f}x; floor about 2.3-2.5x)"
        )
        payload = {
            "world_size": tram.fabric.world_size,
            "losses": [s["loss"] for s in tram.history],
            "peak_bytes": peak,
            "estimated_bytes": predicted["total_bytes"],
            "tokens_per_s": {"tram-prev": tram_tps, "adam": adam_tps},
        }
        print(f"written: {write_json(args.out, 'gpu_check', payload)}")
        return payload
    return {}


if __name__ == "__main__":
    main()
