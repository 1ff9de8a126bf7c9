"""Engine overhead: adam through fabric_tram's training step vs a minimal hand-written PyTorch loop on the same
model, data and precision, interleaved; reported as the engine's tokens/s over the loop's (target >= 0.97).

The loop steps the Adam the engine builds (fused kernels where torch has them, optim/base.py), so the ratio is
what the engine adds; a third row, the loop with torch's default Adam (per-tensor on a CPU), shows what the
engine's choice of kernels gives a user who would have written that loop; a fourth, the loop with nanoGPT's and
llm.c's `clip_grad_norm_` every step, prices the gradient norm, which the engine takes every step too (for its
non-finite guard and clipping)."""

from __future__ import annotations

import copy

import torch

from fabric_tram.bench.common import (
    SIZES,
    arguments,
    engine_optimizer,
    interleave,
    operators_per_call,
    table,
    trainer_model_settings,
    write_json,
)
from fabric_tram.config import load_config
from fabric_tram.contracts import unwrap
from fabric_tram.data.batching import StepSampler
from fabric_tram.engine.batches import StepBatches
from fabric_tram.engine.setup import setup
from fabric_tram.engine.trainer import training_step
from fabric_tram.loss import IGNORE_INDEX
from fabric_tram.optim.base import implementation

TARGET = 0.97


def main() -> dict:
    args = arguments(__doc__.splitlines()[0], timing=True)
    batch = SIZES[args.size][5]
    config = load_config(
        None,
        [
            *trainer_model_settings(args.size),
            "optimizer.name=adam",
            "optimizer.lr=1e-4",
            "trainer.grad_clip=0",
            f"trainer.micro_batch_size={batch}",
            f"trainer.precision={args.precision}",
            f"trainer.accelerator={args.device}",
            "trainer.devices=1",
            "trainer.max_steps=1000000",
            "trainer.run_dir=runs/bench_engine",
            f"trainer.keep_freed_cpu_memory={not args.system_malloc}",
        ],
    )
    run = setup(config, training=True)
    sampler = StepSampler(len(run.task.train_set), batch, 1, 1, 0)
    model = copy.deepcopy(unwrap(run.model)).to(args.device)  # the same weights, no engine
    optimizer = engine_optimizer(model.parameters(), lr=1e-4, betas=(0.9, 0.99))
    default_model = copy.deepcopy(model)
    default_optimizer = torch.optim.Adam(default_model.parameters(), lr=1e-4, betas=(0.9, 0.99))
    clipped_model = copy.deepcopy(model)
    clipped_optimizer = engine_optimizer(clipped_model.parameters(), lr=1e-4, betas=(0.9, 0.99))
    autocast = args.precision == "bf16-mixed"
    state = {"engine": 0, "loop": 0, "default": 0, "clipped": 0}
    batches = StepBatches(run.task, sampler)  # once, as the trainer's step_batches builds it

    def engine_step():
        state["engine"] += 1
        training_step(run, batches[state["engine"] - 1], state["engine"])

    def loop_step(which: str = "loop", model=model, optimizer=optimizer, clip: bool = False):
        state[which] += 1
        idx = sampler.step_indices(state[which] - 1)[0]
        b = run.task.collate([run.task.train_set[i] for i in idx], idx)
        ids, labels = b["input_ids"].to(args.device), b["labels"].to(args.device)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids)
        torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
        ).backward()
        if clip:  # nanoGPT's and llm.c's step: the gradient norm every step, clipped at 1.0
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def default_loop_step():
        loop_step("default", default_model, default_optimizer)

    def clipped_loop_step():
        loop_step("clipped", clipped_model, clipped_optimizer, clip=True)

    candidates = {"engine": engine_step, "loop": loop_step, "default": default_loop_step, "clipped": clipped_loop_step}
    median = interleave(candidates, args.device, args.repeats)
    ratio = median["loop"] / median["engine"]  # tokens/s ratio: same tokens per step
    operators = {name: operators_per_call(fn)[0] for name, fn in candidates.items()}
    print(f"size {args.size}, {args.device}, {args.precision}, allocator: {args.allocator}")
    labels = {
        "loop": "hand-written loop",
        "default": "hand-written loop, torch's default Adam",
        "clipped": "hand-written loop with clip_grad_norm_",
        "engine": "fabric_tram (adam)",
    }
    rows = [[label, median[name] * 1e3, median["loop"] / median[name], "", f"{operators[name]:,}"]
            for name, label in labels.items()]  # fmt: skip
    rows[-1][3] = "yes" if ratio >= TARGET else "no"
    print(table(["", "step (ms)", "tokens/s vs loop", f">= {TARGET}", "operators / step"], rows))
    payload = {
        "size": args.size,
        "device": args.device,
        "precision": args.precision,
        "allocator": args.allocator,
        "engine_seconds": median["engine"],
        "loop_seconds": median["loop"],
        "loop_default_adam_seconds": median["default"],
        "loop_clipped_seconds": median["clipped"],
        "base_optimizer": dict(implementation(list(model.parameters()))) or "torch default",
        "engine_over_loop_tokens_per_s": ratio,
        "operators_per_step": operators,
    }
    print(f"written: {write_json(args.out, 'engine_overhead', payload)}")
    return payload


if __name__ == "__main__":
    main()
