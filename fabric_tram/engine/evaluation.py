"""Evaluation: the loop (metrics per domain or language, the same number of forwards on every rank), the
in-domain validation loss that selects the best checkpoint, and ``fabric-tram evaluate`` of a saved checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from fabric_tram.config import load_config
from fabric_tram.contracts import eval_sums
from fabric_tram.data.batching import eval_batches
from fabric_tram.distributed import all_reduce_sum, reshard_after_no_grad_forward
from fabric_tram.engine import checkpoint as ckpt
from fabric_tram.engine.setup import Run, setup
from fabric_tram.loss import IGNORE_INDEX


@torch.no_grad()
def evaluate(run: Run, split: str, max_batches: int = 0) -> dict[str, dict[str, float]]:
    """Metrics per domain (or language) of ``split``; every rank runs the same number of forwards."""
    fabric, task, model = run.fabric, run.task, run.model
    was_training = model.training
    model.eval()
    results = {}
    # besides the loss and its count, a task may add up more per batch (a classifier: its correct predictions)
    extra_sums = eval_sums(task)
    for name, data in task.eval_sets(split).items():
        totals = None
        for idx in eval_batches(
            len(data), run.config.trainer.micro_batch_size, fabric.world_size, fabric.global_rank, max_batches
        ):
            batch = task.collate([data[i] for i in idx] if idx else [data[0]], idx or [0])
            if not idx:  # this rank ran out of examples: a zero-weight batch keeps FSDP's collectives in step
                batch["labels"].fill_(IGNORE_INDEX)
            batch = fabric.to_device(batch)
            out = task.loss(model, batch)
            sums = {"loss_sum": out.loss_sum, "count": torch.as_tensor(out.count, device=out.loss_sum.device)}
            sums.update(extra_sums(out, batch) if extra_sums else {})
            values = torch.stack([v.double() for v in sums.values()])
            totals = values if totals is None else totals + values
        totals = all_reduce_sum(fabric, totals)
        loss_sum, count, *extra = totals.tolist()
        results[name] = task.metrics(loss_sum, count, **dict(zip(list(sums)[2:], extra, strict=True)))
    reshard_after_no_grad_forward(model)
    model.train(was_training)
    return results


def format_results(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = []
    for split, per_domain in results.items():
        lines.append(f"{split}:")
        for name, m in per_domain.items():
            lines.append(
                "  "
                + f"{name:<24}"
                + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())
            )
    return "\n".join(lines)


def evaluate_checkpoint(path: str | Path, overrides=(), splits=(), print_table: bool = False) -> dict:
    """Rebuild the run's model (config.yaml of its run folder + overrides), load the weights, evaluate;
    ``print_table``: print the results once (rank 0), as the ``evaluate`` command does."""
    checkpoint = ckpt.find_checkpoint(path)
    run_dir = checkpoint.parent.parent
    config = load_config(run_dir / "config.yaml", ["trainer.progress_bar=false", *overrides])
    run = setup(config, training=False)
    ckpt.load_weights(run, checkpoint)
    results = {
        split: evaluate(run, split, config.trainer.eval_batches) for split in (splits or config.trainer.eval_splits)
    }
    if print_table:
        run.fabric.print(format_results(results))
    return results
