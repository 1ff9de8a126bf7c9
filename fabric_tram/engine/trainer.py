"""The training and evaluation loops on Fabric.

``train(config)`` runs a whole job: set-up (Fabric, task, model, base optimizer, update rule), optional resume,
the step loop (micro-batches drawn up front, one ``rule.step`` per optimizer step), periodic evaluation and
checkpoints, final evaluation written to ``RUN/results.json``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from fabric_tram.config import Config, ConfigError, dump_yaml, to_dict
from fabric_tram.data.batching import StepSampler, eval_batches
from fabric_tram.engine import checkpoint as ckpt
from fabric_tram.engine.distributed import all_reduce_sum, reshard_after_no_grad_forward
from fabric_tram.engine.fabric_setup import build_fabric, launched_by_fabric_cli
from fabric_tram.engine.monitor import Progress, build_loggers, flops_per_step
from fabric_tram.engine.step import StepContext
from fabric_tram.models import build_model
from fabric_tram.optim.rule import build_base_optimizer, build_update_rule
from fabric_tram.optim.schedules import lr_factor
from fabric_tram.registry import TASKS, load_builtins


@dataclass
class Run:
    config: Config
    fabric: object
    task: object
    model: torch.nn.Module
    optimizer: Optional[object] = None
    rule: Optional[object] = None
    start_step: int = 0  # optimizer steps already taken (a resumed run continues from here)
    history: list = field(default_factory=list)  # per-step stats on this rank
    results: dict = field(default_factory=dict)  # final evaluation, {split: {domain: metrics}}

    @property
    def run_dir(self) -> Path:
        return Path(self.config.trainer.run_dir)


def count_targets(task, batch: dict) -> int:
    if hasattr(task, "count_targets"):
        return int(task.count_targets(batch))
    return int((batch["labels"] != -100).sum())


def launch(fabric) -> None:
    if not launched_by_fabric_cli():  # a script started by `fabric run` must not launch again
        fabric.launch()


def _agree(fabric, error: Optional[str]) -> None:
    """Rank 0 decided about the run folder; every rank raises the same error (or none)."""
    error = fabric.broadcast(error, src=0) if fabric.world_size > 1 else error
    if error:
        raise ConfigError(error)


def prepare_run_dir(fabric, config: Config) -> Optional[Path]:
    """Refuse to overwrite an existing run; return the checkpoint to resume from, if any."""
    t = config.trainer
    run_dir = Path(t.run_dir)
    error, resume = None, None
    if fabric.global_rank == 0:
        has_run = (run_dir / "config.yaml").is_file()
        if t.resume not in (None, "auto"):
            resume = Path(t.resume)
            if not (resume / "meta.json").is_file():
                error = f"trainer.resume={t.resume!r} is not a complete checkpoint folder (no meta.json)"
        elif t.resume == "auto":
            resume = ckpt.latest_checkpoint(run_dir)
        elif has_run:
            error = (f"run folder {str(run_dir)!r} already holds a run (config.yaml); pass trainer.resume=auto to "
                     "continue it, or choose another trainer.run_dir. Nothing was written.")
        if error is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            target = run_dir / "config.yaml"
            if has_run and resume is not None:  # keep the original config; record what the resumed run used
                target = run_dir / f"config.resumed-{resume.name}.yaml"
            dump_yaml(config, target)
    _agree(fabric, error)
    resume = fabric.broadcast(str(resume) if resume else None, src=0) if fabric.world_size > 1 else resume
    return Path(resume) if resume else None


def setup(config: Config, training: bool = True, fabric=None) -> Run:
    load_builtins()
    t = config.trainer
    if fabric is None:
        fabric = build_fabric(t, loggers=build_loggers(t.run_dir) if training else None)
    launch(fabric)
    fabric.seed_everything(t.seed, verbose=False)  # identical initial weights on every rank
    task = TASKS.build(config.task.name, config.task)
    with fabric.init_module(empty_init=False):
        model = build_model(config.model)
    if t.activation_checkpointing:
        if not hasattr(model, "block_class"):
            raise ConfigError(f"model {config.model.name!r} declares no block_class: trainer.activation_checkpointing is unsupported")
        model.activation_checkpointing = True
    model = fabric.setup_module(model)
    run = Run(config, fabric, task, model)
    if training:
        # FSDP2: the optimizer must be built from the parameters *after* sharding
        run.optimizer = fabric.setup_optimizers(build_base_optimizer(config.optimizer, model.parameters()))
        run.rule = build_update_rule(config.optimizer, model, run.optimizer)
    torch.manual_seed(t.seed + 1000 * fabric.global_rank)  # per-rank dropout streams
    return run


def resume(run: Run, path: Path) -> None:
    run.start_step = ckpt.load_checkpoint(run.fabric, path, run.model, run.optimizer, run.rule, to_dict(run.config)["model"])


def save(run: Run, step: int) -> Path:
    meta = {"model": to_dict(run.config)["model"], "optimizer": run.config.optimizer.name}
    return ckpt.save_checkpoint(run.fabric, run.run_dir, step, run.model, run.optimizer, run.rule, meta, run.config.trainer.keep_last)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def training_step(run: Run, sampler: StepSampler, step: int) -> dict:
    """Optimizer step ``step`` (1-based): draw this rank's micro-batches, let the update rule run its passes."""
    fabric, task, t = run.fabric, run.task, run.config.trainer
    lr = run.config.optimizer.lr * lr_factor(run.config.schedule, step, t.max_steps)
    set_lr(run.optimizer, lr)
    micro_batches = [fabric.to_device(task.collate([task.train_set[i] for i in idx], idx)) for idx in sampler.step_indices(step - 1)]
    n_local = torch.tensor(float(sum(count_targets(task, b) for b in micro_batches)), dtype=torch.float64, device=fabric.device)
    ctx = StepContext(fabric=fabric, model=run.model, optimizer=run.optimizer, loss_fn=task.loss,
                      micro_batches=micro_batches, step=step, n_global=all_reduce_sum(fabric, n_local), grad_clip=t.grad_clip,
                      measure_grad_norm=step % t.log_every == 0 or step == t.max_steps)
    stats = run.rule.step(ctx)
    inputs = [b["input_ids"] for b in micro_batches if "input_ids" in b]
    return {"step": step, "lr": lr, "n_targets": float(ctx.n_global), "n_local": float(n_local),
            "tokens_local": float(sum(x.numel() for x in inputs)), "seq_len": max((x.shape[1] for x in inputs), default=1),
            **{f"passes/{k}": v for k, v in ctx.passes.items()}, **stats}


@torch.no_grad()
def evaluate(run: Run, split: str, max_batches: int = 0) -> dict[str, dict[str, float]]:
    """Metrics per domain (or language) of ``split``; every rank runs the same number of forwards."""
    fabric, task, model = run.fabric, run.task, run.model
    was_training = model.training
    model.eval()
    results = {}
    for name, data in task.eval_sets(split).items():
        totals = torch.zeros(2, dtype=torch.float64, device=fabric.device)
        for idx in eval_batches(len(data), run.config.trainer.micro_batch_size, fabric.world_size, fabric.global_rank, max_batches):
            batch = task.collate([data[i] for i in idx] if idx else [data[0]], idx or [0])
            if not idx:  # this rank ran out of examples: a zero-weight batch keeps FSDP's collectives in step
                batch["labels"].fill_(-100)
            out = task.loss(model, fabric.to_device(batch))
            totals += torch.stack([out.loss_sum.double(), out.count.double()])
        totals = all_reduce_sum(fabric, totals)
        results[name] = task.metrics(float(totals[0]), float(totals[1]))
    reshard_after_no_grad_forward(model)
    model.train(was_training)
    return results


def format_results(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = []
    for split, per_domain in results.items():
        lines.append(f"{split}:")
        for name, m in per_domain.items():
            lines.append("  " + f"{name:<24}" + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))
    return "\n".join(lines)


def train(config: Config, callbacks: tuple[Callable[[Run, dict], None], ...] = (), fabric=None) -> Run:
    """Run a whole training job; ``callbacks(run, stats)`` are called after every step on every rank."""
    run = setup(config, training=True, fabric=fabric)
    fabric, t = run.fabric, config.trainer
    resume_from = prepare_run_dir(fabric, config)
    if resume_from is not None:
        resume(run, resume_from)
        fabric.print(f"resumed from {resume_from} at step {run.start_step}")
    sampler = StepSampler(len(run.task.train_set), t.micro_batch_size, t.accumulate, fabric.world_size,
                          fabric.global_rank, seed=t.seed)
    progress = Progress(fabric, run.start_step, t.max_steps, t.progress_bar)
    available = _available_flops(fabric, t.precision)
    run.model.train()
    last_saved = run.start_step if resume_from is not None else -1
    for step in range(run.start_step + 1, t.max_steps + 1):
        t0 = time.perf_counter()
        stats = training_step(run, sampler, step)
        dt = time.perf_counter() - t0
        stats["tokens_per_s"] = stats["n_targets"] / dt
        flops = flops_per_step(_unwrapped(run.model), stats["tokens_local"], stats["seq_len"], run.rule)
        if flops is not None:
            stats["flops_per_s"] = flops / dt
            if available:
                stats["mfu"] = flops / dt / available
        stats["epoch"] = sampler.epoch_of(step)
        run.history.append(stats)
        progress.update(step, stats["loss"], stats["lr"], stats["tokens_per_s"])
        if step % t.log_every == 0 or step == t.max_steps:
            fabric.log_dict({k: v for k, v in stats.items() if isinstance(v, (int, float)) and k != "step"}, step=step)
        for callback in callbacks:
            callback(run, stats)
        if not math.isfinite(stats["loss"]):
            progress.write(f"step {step}: loss is {stats['loss']}")
        if t.save_every and step % t.save_every == 0:
            save(run, step)
            last_saved = step
        if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
            metrics = evaluate(run, "validation", t.eval_batches)
            fabric.log_dict({f"validation/{d}/{k}": v for d, m in metrics.items() for k, v in m.items()}, step=step)
            if t.select_best and _improves_best(run, metrics, step):
                if last_saved != step:
                    save(run, step)
                    last_saved = step
                if fabric.is_global_zero:
                    ckpt.record_best(run.run_dir, step, in_domain_loss(run.task, metrics))
                fabric.barrier()
    progress.close()
    if last_saved != t.max_steps and run.start_step < t.max_steps:
        save(run, t.max_steps)
    evaluated_step = t.max_steps
    if t.select_best:
        final_validation = evaluate(run, "validation", t.eval_batches)
        if _improves_best(run, final_validation, t.max_steps):
            if fabric.is_global_zero:
                ckpt.record_best(run.run_dir, t.max_steps, in_domain_loss(run.task, final_validation))
            fabric.barrier()
        else:  # evaluate the weights of the best checkpoint, as the paper's model selection
            evaluated_step = ckpt.best_step(run.run_dir)
            ckpt.load_checkpoint(fabric, ckpt.checkpoint_path(run.run_dir, evaluated_step), run.model, None, None,
                                 to_dict(config)["model"])
    run.results = {split: evaluate(run, split, t.eval_batches) for split in t.eval_splits}
    fabric.log_dict({f"final/{s}/{d}/{k}": v for s, r in run.results.items() for d, m in r.items() for k, v in m.items()}, step=t.max_steps)
    if fabric.is_global_zero:
        train_domains = list(getattr(run.task, "train_domains", []))
        summary = {"step": t.max_steps, "evaluated_step": evaluated_step, "optimizer": config.optimizer.name, "seed": t.seed,
                   "train_domains": train_domains, "results": run.results}
        (run.run_dir / "results.json").write_text(json.dumps(summary, indent=2))
        fabric.print(format_results(run.results))
        if train_domains:
            from fabric_tram.analysis.results import write_run_results

            fabric.print(write_run_results(run.run_dir, run.results, train_domains, config.optimizer.name))
    for logger in fabric.loggers:
        logger.finalize("success")
    fabric.barrier()  # no rank leaves (and may exit, or abort at exit) while rank 0 still writes the run's files
    return run


def in_domain_loss(task, metrics: dict) -> float:
    """Token-weighted validation loss over the training domains (every domain when the task has none)."""
    names = [d for d in getattr(task, "train_domains", []) if d in metrics] or list(metrics)
    tokens = sum(metrics[d].get("tokens", 1.0) for d in names)
    return sum(metrics[d]["loss"] * metrics[d].get("tokens", 1.0) for d in names) / max(tokens, 1e-12)


def _improves_best(run: Run, metrics: dict, step: int) -> bool:
    previous = run.run_dir / ckpt.CHECKPOINT_DIR / "best.json"
    current = in_domain_loss(run.task, metrics)
    best = json.loads(previous.read_text())["validation_loss"] if previous.is_file() else math.inf
    return bool(run.fabric.broadcast(current < best, src=0)) if run.fabric.world_size > 1 else current < best


def _unwrapped(model):
    return getattr(model, "module", model)


def _available_flops(fabric, precision: str) -> Optional[float]:
    from lightning.fabric.utilities.throughput import get_available_flops

    dtype = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}.get(precision, torch.float32)
    try:
        return get_available_flops(fabric.device, dtype) if fabric.device.type == "cuda" else None
    except Exception:  # unknown device
        return None
