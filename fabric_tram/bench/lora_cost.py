"""LoRA against full fine-tuning, side by side: step time and peak memory of the trainer's own step for each rule,
each (mode, rule) in its own process (a process's peak only grows), on the SmolLM2 recipe's model and data.

    python benchmarks/lora_cost.py                                  # SmolLM2-135M (recipes/smollm2_demo.py's)
    python benchmarks/lora_cost.py --checkpoint none --steps 2      # a tiny random Llama (the test runs this)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from fabric_tram.bench.common import synchronize, table, write_json
from fabric_tram.bench.memory import _rss_kib
from fabric_tram.config import load_config
from fabric_tram.data.batching import StepSampler
from fabric_tram.engine.batches import StepBatches
from fabric_tram.engine.setup import setup
from fabric_tram.engine.trainer import training_step

PROJECTIONS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"  # attention and MLP
TRAM = ["optimizer.calibration_steps=2", "optimizer.calibration_start=0"]  # calibrated in the 2 warm-up steps


def arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/smollm2-135m-instruct", help="'none': a random Llama")
    parser.add_argument("--preset", default="tiny", help="with --checkpoint none: the Llama preset (llama-3.2-1b, ...)")
    parser.add_argument("--precision", default="32-true", help="trainer.precision (bf16-mixed on a GPU)")
    parser.add_argument("--rules", default="adam,asam,tram-prev")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "RULE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def config_for(args, mode: str, rule: str):
    model = ["model.name=llama"]
    if args.checkpoint == "none":
        model += [f"model.preset={args.preset}", "task.tokenizer=gpt2"]
    else:
        model += [f"model.pretrained={args.checkpoint}", f"task.tokenizer={args.checkpoint}"]
    if mode == "lora":
        lora = f"model.lora.r={args.r}", f"model.lora.alpha={2 * args.r}", f"model.lora.target_modules={PROJECTIONS}"
        model += list(lora)
    return load_config(None, [
        *model, "task.name=lm", "task.data_dir=demo", f"task.block_size={args.block}", "task.train_domains=[jargon]",
        f"optimizer.name={rule}", "optimizer.lr=1e-4", *(TRAM if rule.startswith("tram") else []),
        f"trainer.micro_batch_size={args.batch}", f"trainer.precision={args.precision}",
        f"trainer.accelerator={args.device}", "trainer.devices=1", "trainer.max_steps=1000000",
        "trainer.log_every=1000000", "trainer.progress_bar=false", "trainer.preflight=false",
        f"trainer.run_dir={args.out}/lora_cost-run",
    ])  # fmt: skip


def measure(args, mode: str, rule: str) -> dict:
    """In a child process: seconds per trainer step and the peak memory of the steps above what the built run
    held before them (CPU: the resident high-water mark, reset through /proc/self/clear_refs; CUDA: the
    allocator's peak)."""
    run = setup(config_for(args, mode, rule), training=True)
    sampler = StepSampler(len(run.task.train_set), args.batch, 1, 1, 0)
    batches = StepBatches(run.task, sampler)
    step = 0

    def one_step():
        nonlocal step
        step += 1
        training_step(run, batches[step - 1], step)

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _rss_kib("VmRSS") * 1024
    for _ in range(2):
        one_step()
    synchronize(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        one_step()
    synchronize(args.device)
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
    params = list(run.model.parameters())
    return {
        "mode": mode,
        "rule": rule,
        "ms_per_step": seconds * 1e3,
        "peak_above_start_mib": (peak - before) / 2**20,
        "trained_parameters": sum(p.numel() for p in params if p.requires_grad),
        "parameters": sum(p.numel() for p in params),
    }


def main(argv=None) -> dict:
    args = arguments(argv)
    if args.child:
        print(json.dumps(measure(args, *args.child)))
        return {}
    rows, given = [], list(sys.argv[1:] if argv is None else argv)
    for rule in args.rules.split(","):
        for mode in ("full", "lora"):
            cmd = [sys.executable, "-m", "fabric_tram.bench.lora_cost", *given, "--child", mode, rule]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"{mode} {rule} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{mode} {rule}: {rows[-1]['ms_per_step']:.0f} ms/step", flush=True)
    full = {r["rule"]: r for r in rows if r["mode"] == "full"}
    model = args.checkpoint if args.checkpoint != "none" else f"random {args.preset}"
    print(f"{model}, {args.batch} × {args.block} tokens, {args.precision}, {args.device}; LoRA r = {args.r} on "
          f"{PROJECTIONS}")  # fmt: skip
    print(table(
        ["rule", "mode", "trained parameters", "ms / step", "vs full", "peak above start (MiB)", "vs full"],
        [[r["rule"], r["mode"], f"{r['trained_parameters']:,} of {r['parameters']:,}", f"{r['ms_per_step']:.0f}",
          f"{r['ms_per_step'] / full[r['rule']]['ms_per_step']:.2f}", f"{r['peak_above_start_mib']:.0f}",
          f"{r['peak_above_start_mib'] / max(full[r['rule']]['peak_above_start_mib'], 1e-9):.2f}"] for r in rows],
    ))  # fmt: skip
    result = {"model": model, "precision": args.precision, "device": args.device, "r": args.r, "batch": args.batch,
              "block": args.block, "rows": rows}  # fmt: skip
    write_json(args.out, "lora_cost", result)
    return result


if __name__ == "__main__":
    main()
