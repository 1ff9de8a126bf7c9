"""The training job on Fabric: ``train(config)`` = setup → resume → fit → final weights → evaluate → results.

``fit`` is the step loop: a step's micro-batches are drawn up front and one ``rule.step`` runs all its passes;
after each step come logging, periodic checkpoints and periodic evaluation (``after_step``). The final
checkpoint is written, the weights of the best checkpoint are put back when ``trainer.select_best`` asks for it
(``select_final_weights``), every evaluation split is scored and ``RUN/results.json`` written
(``write_results``). Paper tables are written by the callers of ``train`` (the CLI and the recipes).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable

import torch

from fabric_tram.config import Config
from fabric_tram.contracts import headline_metric, train_domains, unwrap
from fabric_tram.data.batching import StepSampler
from fabric_tram.distributed import all_reduce_sum
from fabric_tram.engine import checkpoint as ckpt
from fabric_tram.engine.batches import step_batches
from fabric_tram.engine.checkpoint import improves_best, record_best, resume, save
from fabric_tram.engine.evaluation import evaluate, format_results
from fabric_tram.engine.interrupt import StopRequest, TrainingInterrupted, stop_on_signals
from fabric_tram.engine.monitor import Progress, available_flops, flops_per_step
from fabric_tram.engine.run_log import RunCSVLogger
from fabric_tram.engine.setup import Run, prepare_run_dir, setup
from fabric_tram.engine.tracking import end_tracking
from fabric_tram.jsonfile import write_json
from fabric_tram.optim.schedules import lr_factor
from fabric_tram.optim.step import StepContext, to_host
from fabric_tram.optim.update_rule import Passes

Callback = Callable[[Run, dict], None]
# the autocast dtype of the mixed precisions: a target forward's logits are kept in it (docs/design.md)
MIXED_PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def train(config: Config, callbacks: tuple[Callback, ...] = (), fabric=None) -> Run:
    """Run a whole training job; ``callbacks(run, stats)`` are called after every step on every rank."""
    run = setup(config, training=True, fabric=fabric)
    try:
        train_run(run, callbacks)
    except BaseException as err:  # the tracked runs end with the run: killed (to be resumed) or failed
        stopped = isinstance(err, (TrainingInterrupted, KeyboardInterrupt))
        end_tracking(run.fabric.loggers, "KILLED" if stopped else "FAILED")
        raise
    return run


def train_run(run: Run, callbacks: tuple[Callback, ...]) -> None:
    """From the run folder (a new run, or the checkpoint to resume) to the results."""
    config = run.config
    resume_from = prepare_run_dir(run.fabric, config)
    if resume_from is not None:
        used = resume(run, resume_from, fallback=config.trainer.resume == "auto")
        run.last_saved = run.start_step
        finished = run.run_dir / "results.json"
        if run.start_step >= config.trainer.max_steps and finished.is_file():  # nothing left: no second evaluation
            run.results = json.loads(finished.read_text())["results"]
            run.fabric.print(f"{run.run_dir} finished at step {run.start_step} already ({finished}); nothing to do")
            end_tracking(run.fabric.loggers, "FINISHED")
            return
        run.fabric.print(f"resumed from {used} at step {run.start_step}")
    elif config.trainer.resume == "auto":
        run.fabric.print(f"trainer.resume=auto: no complete checkpoint in {run.run_dir}, starting from step 0")
    for logger in run.fabric.loggers:  # the CSV log keeps its rows up to the step resumed from, once each
        if isinstance(logger, RunCSVLogger):
            logger.resume_from_step(run.start_step)
    with stop_on_signals() as stop:
        try:
            fit(run, callbacks, stop)
        except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, this step unsaved
            raise TrainingInterrupted(stopped_at_once(run), signal.SIGINT) from None
    select_final_weights(run)
    run.results = {split: evaluate(run, split, config.trainer.eval_batches) for split in config.trainer.eval_splits}
    write_results(run)


def fit(run: Run, callbacks: tuple[Callback, ...] = (), stop: StopRequest | None = None) -> None:
    """The step loop from ``run.start_step + 1`` to ``trainer.max_steps``.

    A step's values stay on the device; they reach the host together, once per logged step (and on steps that
    save, evaluate or skip), so the host never waits for the device in between. Throughput is measured over the
    steps since the previous such step (a host clock per step would time kernel launches, not the device).
    A SIGTERM or Ctrl-C recorded in ``stop`` ends the loop after the step: a checkpoint, then
    :class:`~fabric_tram.engine.interrupt.TrainingInterrupted`.
    """
    fabric, t = run.fabric, run.config.trainer
    sampler = StepSampler(
        len(run.task.train_set), t.micro_batch_size, t.accumulate, fabric.world_size, fabric.global_rank, seed=t.seed
    )
    progress = Progress(fabric, run.start_step, t.max_steps, t.progress_bar)
    peak = available_flops(fabric.device, t.precision, t.peak_flops)
    pending, since = [], time.perf_counter()
    run.model.train()
    for step, micro_batches in step_batches(run.task, sampler, run.start_step + 1, t.max_steps, t.data_workers):
        stats = training_step(run, micro_batches, step)
        stats["epoch"] = sampler.epoch_of(step)
        run.history.append(stats)
        pending.append(stats)
        if callbacks or stats.get("nonfinite") or is_logged(t, step) or is_saved(t, step) or is_evaluated(t, step):
            to_host(pending)
            now = time.perf_counter()
            add_throughput(run, pending, now - since, peak)
            pending, since = [], now
            progress.update(step, stats)
        else:
            progress.advance(step)
        for callback in callbacks:
            callback(run, stats)
        after_step(run, step, stats, progress)
        synced = fabric.world_size == 1 or not pending  # several ranks agree where the host waits anyway
        signum = stop.agreed(fabric) if stop is not None and synced else 0
        if signum:
            progress.close()
            stop_with_checkpoint(run, step, signum)
    progress.close()


def stopped_at_once(run: Run) -> str:
    """What a second Ctrl-C left: the steps done, and the checkpoint a resume would start from."""
    done = run.start_step + len(run.history)
    complete = ckpt.list_checkpoints(run.run_dir)
    where = (
        f"the newest complete checkpoint is {complete[-1]} (step {ckpt.step_of(complete[-1])}); run the same "
        "command with trainer.resume=auto to continue from it"
        if complete
        else "no checkpoint had been saved, so the same command starts over"
    )
    return f"stopped at once by a second Ctrl-C after step {done} of {run.config.trainer.max_steps}, unsaved: {where}"


def stop_with_checkpoint(run: Run, step: int, signum: int) -> None:
    """Save step ``step`` (every rank) unless it was just saved, flush the logs, and stop."""
    if run.last_saved != step:
        save(run, step)
        run.last_saved = step
    flush_logs(run)
    name = signal.Signals(signum).name
    raise TrainingInterrupted(
        f"stopped by {name} after step {step} of {run.config.trainer.max_steps}: "
        f"{ckpt.checkpoint_path(run.run_dir, step)} saved; run the same command with trainer.resume=auto to continue",
        signum,
    )


def is_logged(t, step: int) -> bool:
    return step % t.log_every == 0 or step == t.max_steps


def is_saved(t, step: int) -> bool:
    return bool(t.save_every) and step % t.save_every == 0


def is_evaluated(t, step: int) -> bool:
    return bool(t.eval_every) and step % t.eval_every == 0 and step < t.max_steps


def training_step(run: Run, micro_batches: list[dict], step: int) -> dict:
    """Optimizer step ``step`` (1-based) on this rank's micro-batches: let the update rule run its passes."""
    fabric, task, t = run.fabric, run.task, run.config.trainer
    lr = run.config.optimizer.lr * lr_factor(run.config.schedule, step, t.max_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    micro_batches = [fabric.to_device(batch) for batch in micro_batches]
    n_local = (
        torch.stack([torch.as_tensor(task.count_targets(b)) for b in micro_batches])
        .sum()
        .to(fabric.device, torch.float64)
    )
    ctx = StepContext(
        fabric=fabric,
        model=run.model,
        optimizer=run.optimizer,
        loss_fn=task.loss,
        micro_batches=micro_batches,
        step=step,
        n_global=all_reduce_sum(fabric, n_local),
        n_local=n_local,
        grad_clip=t.grad_clip,
        scaler=run.scaler,
        compute_dtype=MIXED_PRECISION_DTYPES.get(t.precision),
        params=run.rule.params,
    )
    stats = run.rule.step(ctx)
    inputs = [b["input_ids"] for b in micro_batches if "input_ids" in b]
    return {
        "step": step,
        "lr": lr,
        "n_targets": ctx.n_global,
        "n_local": n_local,
        "tokens_local": float(sum(x.numel() for x in inputs)),
        "seq_len": max((x.shape[1] for x in inputs), default=1),
        **{f"passes/{k}": v for k, v in ctx.passes.items()},
        **stats,
    }


def add_throughput(run: Run, entries: list[dict], seconds: float, peak: float | None) -> None:
    """Targets per second, and FLOPs per second (and MFU against ``peak``) counting every pass the rule ran,
    over ``entries``, the steps of the last ``seconds``; each entry gets the interval's rate."""
    model = unwrap(run.model)
    targets = sum(e["n_targets"] for e in entries)
    flops = [flops_per_step(model, e["tokens_local"], e["seq_len"], counted_passes(e)) for e in entries]
    for entry in entries:
        entry["tokens_per_s"] = targets / seconds
        if None not in flops:
            entry["flops_per_s"] = sum(flops) / seconds
            if peak:
                entry["mfu"] = sum(flops) / seconds / peak


def counted_passes(entry: dict) -> Passes:
    """The passes a step ran, as counted by its context (a TRAM step that reuses its radius skips the target's)."""
    return Passes(*(entry[f"passes/{k}"] for k in Passes._fields))


class NonFiniteError(FloatingPointError):
    """A step's loss or gradient was not finite and ``trainer.on_nonfinite=stop``."""


def after_step(run: Run, step: int, stats: dict, progress: Progress) -> None:
    """Non-finite steps, logging, periodic checkpoints, periodic evaluation (and the best checkpoint's record);
    the logs are flushed to disk at every checkpoint and evaluation, so a crash loses no logged step before them."""
    fabric, t = run.fabric, run.config.trainer
    if stats.get("nonfinite"):
        check_nonfinite(run, step, stats, progress)
    if is_logged(t, step):
        fabric.log_dict({k: v for k, v in stats.items() if isinstance(v, (int, float)) and k != "step"}, step=step)
    if is_saved(t, step):
        save(run, step)
        run.last_saved = step
        flush_logs(run)
    if is_evaluated(t, step):
        metrics = evaluate(run, "validation", t.eval_batches)
        fabric.log_dict({f"validation/{d}/{k}": v for d, m in metrics.items() for k, v in m.items()}, step=step)
        if t.select_best and improves_best(run, metrics):
            if run.last_saved != step:
                save(run, step)
                run.last_saved = step
            record_best(run, step, metrics)
        flush_logs(run)


def check_nonfinite(run: Run, step: int, stats: dict, progress: Progress) -> None:
    """The step was skipped (nothing updated); stop, or count it, as ``trainer.on_nonfinite`` says."""
    run.nonfinite_steps += 1
    stats["nonfinite_steps"] = run.nonfinite_steps
    what = (f"step {step}: the loss or its gradient is not finite (loss {stats['loss']}, gradient norm "
            f"{stats.get('grad_norm')}); the step was skipped and nothing was updated")  # fmt: skip
    if run.config.trainer.on_nonfinite == "stop":
        flush_logs(run)
        raise NonFiniteError(
            f"{what}. Lower optimizer.lr, keep trainer.grad_clip > 0, or set "
            "trainer.on_nonfinite=skip to skip such steps and count them (nonfinite_steps)"
        )
    progress.write(f"{what} ({run.nonfinite_steps} so far; trainer.on_nonfinite=skip)")


def flush_logs(run: Run) -> None:
    for logger in run.fabric.loggers:
        logger.save()


def select_final_weights(run: Run) -> None:
    """Write the final checkpoint; with ``trainer.select_best``, put back the weights of the checkpoint with the
    lowest in-domain validation loss (the paper's model selection) unless the final weights are the best."""
    t = run.config.trainer
    if run.last_saved != t.max_steps and run.start_step < t.max_steps:
        save(run, t.max_steps)
    run.evaluated_step = t.max_steps
    if not t.select_best:
        return
    final_validation = evaluate(run, "validation", t.eval_batches)
    if improves_best(run, final_validation):
        record_best(run, t.max_steps, final_validation)
    else:
        run.evaluated_step = ckpt.best_step(run.run_dir)
        ckpt.load_weights(run, ckpt.checkpoint_path(run.run_dir, run.evaluated_step))


def write_results(run: Run) -> None:
    """Log the final metrics, write ``RUN/results.json`` (rank 0) and end the loggers; no rank returns before
    rank 0 has written (a rank that exits early may abort the others' collectives)."""
    fabric, config = run.fabric, run.config
    fabric.log_dict(
        {f"final/{s}/{d}/{k}": v for s, r in run.results.items() for d, m in r.items() for k, v in m.items()},
        step=config.trainer.max_steps,
    )
    if fabric.is_global_zero:
        summary = {
            "step": config.trainer.max_steps,
            "evaluated_step": run.evaluated_step,
            "optimizer": config.optimizer.name,
            "seed": config.trainer.seed,
            "train_domains": train_domains(run.task),
            "metric": headline_metric(run.task),  # what result tables report
            "results": run.results,
            "rule": run.rule.summary(),  # TRAM: its radius against the cap after calibration
        }
        write_json(run.run_dir / "results.json", summary)  # a diverged metric is null, not a bare NaN
        fabric.print(format_results(run.results))
        if run.rule.describe():
            fabric.print(run.rule.describe())
    for logger in fabric.loggers:
        logger.finalize("success")
    end_tracking(fabric.loggers, "FINISHED")
    fabric.barrier()
