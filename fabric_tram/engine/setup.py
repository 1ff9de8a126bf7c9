"""Setting up a job: Fabric, task, model, base optimizer and update rule (``setup``), and the run folder
(``prepare_run_dir``: never overwrite a run; find the checkpoint to resume from)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fabric_tram.config import Config, ConfigError, dump_yaml
from fabric_tram.contracts import (
    block_classes,
    check_task,
    input_embedding,
    loss_scaler,
    model_num_labels,
    model_sizes,
    task_image_size,
    task_num_labels,
    task_vocab_size,
)
from fabric_tram.distributed import agreed_min, first_error_of_any_rank
from fabric_tram.engine.batch_size import resolve_batch_size
from fabric_tram.engine.checkpoint_files import latest_checkpoint
from fabric_tram.engine.fabric_setup import build_fabric, launched_by_fabric_cli
from fabric_tram.engine.preflight import preflight_error, preflight_skipped
from fabric_tram.engine.run_log import build_loggers
from fabric_tram.engine.tracking import record_ids, start_tracking
from fabric_tram.models import build_model
from fabric_tram.models.lora import lora_summary
from fabric_tram.optim.update_rule import build_base_optimizer, build_update_rule
from fabric_tram.registry import TASKS


@dataclass
class Run:
    config: Config
    fabric: object
    task: object
    model: torch.nn.Module
    optimizer: object | None = None
    rule: object | None = None
    start_step: int = 0  # optimizer steps already taken (a resumed run continues from here)
    history: list = field(default_factory=list)  # per-step stats on this rank
    results: dict = field(default_factory=dict)  # final evaluation, {split: {domain: metrics}}
    last_saved: int = -1  # the step of the newest checkpoint this run wrote or resumed from
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient (trainer.on_nonfinite=skip)
    evaluated_step: int | None = None  # the step whose weights the final evaluation scored

    @property
    def run_dir(self) -> Path:
        return Path(self.config.trainer.run_dir)

    @property
    def scaler(self):
        """The fp16 loss scaler of the precision plugin (None without one)."""
        return loss_scaler(self.fabric)


def launch(fabric) -> None:
    if not launched_by_fabric_cli():  # a script started by `fabric run` must not launch again
        fabric.launch()


def agree(fabric, error: str | None) -> None:
    """Rank 0 decided; every rank raises the same error (or none)."""
    error = fabric.broadcast(error, src=0) if fabric.world_size > 1 else error
    if error:
        raise ConfigError(error)


def prepare_run_dir(fabric, config: Config) -> Path | None:
    """Refuse to overwrite an existing run; return the checkpoint to resume from, if any."""
    t = config.trainer
    run_dir = Path(t.run_dir)
    error, resume = None, None
    if fabric.global_rank == 0:
        has_run = (run_dir / "config.yaml").is_file()
        if run_dir.exists() and not run_dir.is_dir():
            error = f"trainer.run_dir={str(run_dir)!r} is an existing file, not a folder; choose another run_dir"
        elif t.resume not in (None, "auto"):
            resume = Path(t.resume)
            if not (resume / "meta.json").is_file():
                error = f"trainer.resume={t.resume!r} is not a complete checkpoint folder (no meta.json)"
        elif t.resume == "auto":
            resume = latest_checkpoint(run_dir)
        elif has_run:
            error = (
                f"run folder {str(run_dir)!r} already holds a run (config.yaml); pass trainer.resume=auto to "
                "continue it, or choose another trainer.run_dir. Nothing was written."
            )
        if error is None:  # the tracking backends start before anything is written: one that cannot says so
            error = start_tracking(fabric.loggers, config)
        if error is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            target = run_dir / "config.yaml"
            if has_run and resume is not None:  # keep the original config; record what the resumed run used
                target = run_dir / f"config.resumed-{resume.name}.yaml"
            dump_yaml(config, target)
            record_ids(fabric.loggers, run_dir)
    agree(fabric, error)
    resume = fabric.broadcast(str(resume) if resume else None, src=0) if fabric.world_size > 1 else resume
    return Path(resume) if resume else None


def build_task(config: Config):
    task = TASKS.build(config.task.name, config.task)
    check_task(config.task.name, task)  # a task built by a factory function is checked here (contracts.py)
    return task


def check_splits(task, config: Config) -> None:
    """Read every evaluation split the run will need now: a missing or empty one fails before the first step,
    not after hours of training (the LM task tokenises and caches them, work the run needs anyway)."""
    t = config.trainer
    needed = [*t.eval_splits, *(["validation"] if t.eval_every or t.select_best else [])]
    for split in dict.fromkeys(needed):
        task.eval_sets(split)


def steps_from_epochs(t, examples: int, world_size: int) -> None:
    """``trainer.max_epochs`` > 0: ``max_steps`` = the steps that cover that many passes over the training set
    (the last one may spill into the next epoch's first examples). Data position is a function of the step, so a
    run resumed mid-epoch continues exactly."""
    if t.max_epochs:
        t.max_steps = max(1, math.ceil(t.max_epochs * examples / (t.micro_batch_size * t.accumulate * world_size)))


def check_task_fits_model(task, model, config: Config) -> None:
    """A tokenizer with more ids than the model's embedding table has rows would index past it (a device-side
    assert on a GPU, hours in): refuse it now. Fewer is allowed: hub tables are often padded (Qwen2, GPT-2
    variants). A classifier must have one output per label of the task."""
    labels = task_num_labels(task)
    outputs = model_num_labels(model)
    if labels is not None and outputs is not None and labels != outputs:
        names = getattr(config.task, "labels", None)
        listed = f" ({', '.join(map(str, names))})" if names else ""
        raise ConfigError(
            f"the task has {labels} labels{listed} but model.num_labels={outputs}: set model.num_labels={labels}"
        )
    size = task_image_size(task)
    model_size = model_sizes(model).get("image_size")
    if size is not None and model_size is not None and size != model_size:
        raise ConfigError(
            f"the task resizes images to {size}×{size} but the model takes {model_size}×{model_size} (its position "
            f"embeddings fix it): set task.image_size={model_size}, or task.processor to the checkpoint's folder"
        )
    tokens = task_vocab_size(task)
    embedding = input_embedding(model)
    rows = getattr(embedding, "num_embeddings", None)
    if tokens is not None and rows is not None and tokens > rows:
        raise ConfigError(
            f"task.tokenizer={config.task.tokenizer!r} has {tokens} tokens but the model's embedding table has "
            f"{rows} rows: they belong to different models. Use the checkpoint's own tokenizer (its folder holds "
            "tokenizer.json) or a model whose vocab_size covers the tokenizer"
        )


def setup(config: Config, training: bool = True, fabric=None) -> Run:
    t = config.trainer
    if fabric is None:
        fabric = build_fabric(t, loggers=build_loggers(t) if training else None)
    launch(fabric)
    chosen = resolve_batch_size(config, fabric.world_size, fabric.device, agree=lambda micro: agreed_min(fabric, micro))
    if chosen:
        fabric.print(chosen)
    if training and t.preflight:  # before anything is built: a run that cannot fit says so now, with the numbers
        skipped = preflight_skipped(config, fabric.world_size)
        if skipped:
            fabric.print(skipped)
        error = first_error_of_any_rank(fabric, preflight_error(config, fabric.world_size, fabric.device))
        if error:
            raise ConfigError(error)
    fabric.seed_everything(t.seed, verbose=False)  # identical initial weights on every rank
    task = build_task(config)
    if training:
        check_splits(task, config)
        steps_from_epochs(t, len(task.train_set), fabric.world_size)
    with fabric.init_module(empty_init=False):
        model = build_model(config.model)
    if getattr(config.model, "lora", None) is not None:  # what was adapted, and what trains of how much
        fabric.print(lora_summary(model, config.model.lora))
    check_task_fits_model(task, model, config)
    per_block = {"trainer.strategy=fsdp": t.strategy == "fsdp", "trainer.compile": t.compile,
                 "trainer.activation_checkpointing": t.activation_checkpointing}  # fmt: skip
    blocks_needed = [what for what, on in per_block.items() if on]
    if blocks_needed and getattr(model, "no_blocks_reason", None):  # an hf model whose layers we cannot find
        raise ConfigError(f"{' and '.join(blocks_needed)}: {model.no_blocks_reason}")
    if t.activation_checkpointing:
        if block_classes(model) is None:
            raise ConfigError(
                f"model {config.model.name!r} declares no block_class: trainer.activation_checkpointing is unsupported"
            )
        model.activation_checkpointing = True
    if t.compile:
        compile_blocks(model, t.compile_backend)
    model = fabric.setup_module(model)
    run = Run(config, fabric, task, model)
    if training:
        # FSDP2: the optimizer must be built from the parameters *after* sharding
        # only what trains (LoRA: the adapters); every rule then acts on these parameters alone
        trainable = [p for p in model.parameters() if p.requires_grad]
        run.optimizer = fabric.setup_optimizers(build_base_optimizer(config.optimizer, trainable))
        run.rule = build_update_rule(config.optimizer, model, run.optimizer)
    torch.manual_seed(t.seed + 1000 * fabric.global_rank)  # per-rank dropout streams
    return run


def compile_blocks(model: torch.nn.Module, backend: str) -> None:
    """``torch.compile`` each transformer block (the model's ``block_class``; the whole model if it declares none),
    before FSDP2 wraps them, as torchtitan does: the rules' weight swaps are in place, their noise is applied
    outside the blocks and their no-grad target forwards are a grad-mode variant compiled once, so nothing
    recompiles after the first step (a test counts it)."""
    block_class = block_classes(model)
    blocks = [m for m in model.modules() if block_class is not None and isinstance(m, block_class)]
    for module in blocks or [model]:
        module.compile(backend=backend)
