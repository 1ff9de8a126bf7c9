"""Engine overhead: adam through fabric_tram's training step vs a minimal hand-written PyTorch loop on the same
model, data and precision, interleaved; reported as the engine's tokens/s over the loop's (target >= 0.97)."""

from __future__ import annotations

import copy

import torch

from fabric_tram.bench.common import (
    SIZES,
    arguments,
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
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.99))
    autocast = args.precision == "bf16-mixed"
    state = {"engine": 0, "loop": 0}
    batches = StepBatches(run.task, sampler)  # once, as the trainer's step_batches builds it

    def engine_step():
        state["engine"] += 1
        training_step(run, batches[state["engine"] - 1], state["engine"])

    def loop_step():
        state["loop"] += 1
        idx = sampler.step_indices(state["loop"] - 1)[0]
        b = run.task.collate([run.task.train_set[i] for i in idx], idx)
        ids, labels = b["input_ids"].to(args.device), b["labels"].to(args.device)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids)
        torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
        ).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    median = interleave({"engine": engine_step, "loop": loop_step}, args.device, args.repeats)
    ratio = median["loop"] / median["engine"]  # tokens/s ratio: same tokens per step
    operators = {name: operators_per_call(fn)[0] for name, fn in (("engine", engine_step), ("loop", loop_step))}
    print(f"size {args.size}, {args.device}, {args.precision}, allocator: {args.allocator}")
    print(
        table(
            ["", "step (ms)", "tokens/s vs loop", f">= {TARGET}", "operators / step"],
            [
                ["hand-written loop", median["loop"] * 1e3, 1.0, "", f"{operators['loop']:,}"],
                [
                    "fabric_tram (adam)",
                    median["engine"] * 1e3,
                    ratio,
                    "yes" if ratio >= TARGET else "no",
                    f"{operators['engine']:,}",
                ],
            ],
        )
    )
    payload = {
        "size": args.size,
        "device": args.device,
        "precision": args.precision,
        "allocator": args.allocator,
        "engine_seconds": median["engine"],
        "loop_seconds": median["loop"],
        "engine_over_loop_tokens_per_s": ratio,
        "operators_per_step": operators,
    }
    print(f"written: {write_json(args.out, 'engine_overhead', payload)}")
    return payload


if __name__ == "__main__":
    main()
