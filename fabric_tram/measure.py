"""The paper's analysis of trained runs (Table 6, appendices B.7, B.8): ε-sharpness per domain or language, and
CKA between pre-trained and fine-tuned representations, from a run's checkpoint (``fabric-tram sharpness`` and
``fabric-tram cka``). The mathematics is in ``analysis/sharpness.py`` and ``analysis/cka.py``; this module loads
the runs, walks each domain's batches and writes ``RUN/analysis/{sharpness,cka}-SPLIT.json``.

Representations (what CKA compares), as the tasks define them: encoders (NLI, images) the first token's final
hidden state, the one the classification head reads; decoders (language modelling) the mean of the final hidden
states over a sequence's positions.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from fabric_tram.analysis.cka import StreamedLinearCKA
from fabric_tram.analysis.sharpness import epsilon_sharpness
from fabric_tram.config import load_config
from fabric_tram.contracts import unwrap
from fabric_tram.data.batching import eval_batches
from fabric_tram.distributed import all_reduce_sum, reshard_after_no_grad_forward
from fabric_tram.engine import checkpoint as ckpt
from fabric_tram.engine.setup import Run, setup
from fabric_tram.jsonfile import write_json
from fabric_tram.loss import IGNORE_INDEX


def load_run(checkpoint: str | Path, overrides=(), with_weights: bool = True) -> tuple[Run, Path]:
    """The run of a checkpoint folder (or a run folder's newest checkpoint), its weights loaded; evaluation mode."""
    path = ckpt.find_checkpoint(checkpoint)
    config = load_config(path.parent.parent / "config.yaml", ["trainer.progress_bar=false", *overrides])
    run = setup(config, training=False)
    if with_weights:
        ckpt.load_weights(run, path)
    run.model.eval()
    return run, path


def check_split(run: Run, split: str, domains: list[str]) -> dict:
    """The evaluation sets of ``split``, limited to ``domains``; a missing split or domain is an error now."""
    sets = run.task.eval_sets(split)
    missing = [d for d in domains if d not in sets]
    if missing:
        raise ValueError(f"domain(s) {missing} not in the {split} split; available: {', '.join(sets)}")
    return {d: sets[d] for d in (domains or sets)}


def batches(run: Run, data, batch_size: int, limit: int):
    """The domain's first ``limit`` batches (0: all) of ``batch_size``, dealt out to the ranks in turn: the same
    examples whatever the number of processes."""
    for idx in eval_batches(len(data), batch_size, run.fabric.world_size, run.fabric.global_rank, limit):
        batch = run.task.collate([data[i] for i in idx] if idx else [data[0]], idx or [0])
        if not idx:  # this rank ran out: a zero-weight batch keeps the ranks' collectives in step
            batch["labels"].fill_(IGNORE_INDEX)
        yield run.fabric.to_device(batch)


def sharpness(checkpoint, split: str = "validation", domains=(), epsilon: float = 1e-5, lr: float = 8e-5,
              steps: int = 10, batch_size: int = 32, accumulate: int = 4, overrides=()) -> dict:  # fmt: skip
    """ε-sharpness of a checkpoint per domain: ``steps`` projected ascent steps, each on ``accumulate`` batches of
    ``batch_size`` (the domain's first ones, the same every step), the loss their token-weighted mean."""
    if epsilon <= 0:
        raise ValueError(f"--epsilon must be > 0, got {epsilon}")
    run, path = load_run(checkpoint, overrides)
    sets = check_split(run, split, list(domains))
    params = [p for p in run.model.parameters() if p.requires_grad]
    results = {}
    bar = progress(run, len(sets) * steps, "ε-sharpness (ascent steps)")
    for name, data in sets.items():
        fixed = list(batches(run, data, batch_size, accumulate))

        with_grad, loss_only = partial(mean_loss, run, fixed, True), partial(mean_loss, run, fixed, False)
        results[name] = epsilon_sharpness(params, with_grad, loss_only, epsilon, lr, steps, lambda *_: bar.update())
        run.fabric.print(f"  {name:<24} sharpness={results[name]['sharpness']:.4f}  loss={results[name]['loss']:.4f}")
    bar.close()
    settings = {"epsilon": epsilon, "lr": lr, "steps": steps, "batch_size": batch_size, "accumulate": accumulate}
    return write(run, path, f"sharpness-{split}", {"checkpoint": str(path), "split": split, **settings,
                                                  "results": results})  # fmt: skip


def mean_loss(run: Run, fixed: list[dict], backward: bool) -> float:
    """The target-weighted mean loss over ``fixed`` batches (all ranks); with ``backward``, its gradient too."""
    device = run.fabric.device
    count = sum(torch.as_tensor(run.task.count_targets(b)).to(device, torch.float64) for b in fixed)
    count = all_reduce_sum(run.fabric, count)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in fixed:
        with torch.set_grad_enabled(backward):
            out = run.task.loss(run.model, batch)
            if backward:  # × world size: data parallelism averages gradients over the ranks (as the trainer's step)
                run.fabric.backward(out.loss_sum * run.fabric.world_size / count)
        total += torch.stack([out.loss_sum.detach().double(), torch.as_tensor(out.count).to(total)])
    if not backward:  # FSDP2 keeps the root unsharded after a forward without backward; the ascent needs shards
        reshard_after_no_grad_forward(run.model)
    total = all_reduce_sum(run.fabric, total)
    return float(total[0] / total[1].clamp(min=1))


def representations(model, batch: dict) -> torch.Tensor:
    """(B, C): the first token's final state (encoders: what the head reads), or the mean over a sequence's
    target positions (decoders)."""
    inner = unwrap(model)
    forward_method(inner, "hidden_states")
    if "pixel_values" in batch:
        return inner.hidden_states(batch["pixel_values"])[:, 0]
    if "attention_mask" in batch:
        return inner.hidden_states(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))[:, 0]
    hidden = inner.hidden_states(batch["input_ids"])
    keep = (batch["labels"] != IGNORE_INDEX).unsqueeze(-1).to(hidden.dtype)
    return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)


def forward_method(module, name: str) -> None:
    """An FSDP2-sharded module gathers its root parameters only around ``forward``: register ``name`` as another
    entry point that does (once)."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if isinstance(module, FSDPModule) and not getattr(module, f"_fsdp_{name}", False):
        register_fsdp_forward_method(module, name)
        setattr(module, f"_fsdp_{name}", True)


@torch.no_grad()
def cka(pretrained: str, checkpoint, split: str = "validation", domains=(), batch_size: int = 32, limit: int = 0,
        overrides=()) -> dict:  # fmt: skip
    """Linear CKA per domain between the representations of ``pretrained`` (a hub id or Hugging Face folder of
    the same architecture, built with the run's config) and the checkpoint's."""
    run, path = load_run(checkpoint, overrides)
    base, _ = load_run(checkpoint, [*overrides, f"model.pretrained={pretrained}"], with_weights=False)
    ours = {k: tuple(v.shape) for k, v in unwrap(run.model).state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in unwrap(base.model).state_dict().items()}
    if ours != theirs:
        differ = sorted(set(ours) ^ set(theirs)) or [k for k in ours if ours[k] != theirs[k]]
        raise ValueError(f"{pretrained} is not the checkpoint's architecture (differs at {', '.join(differ[:4])})")
    sets = check_split(run, split, list(domains))
    results = {}
    bar = progress(run, len(sets), "CKA (domains)")
    for name, data in sets.items():
        meter = None
        for batch in batches(run, data, batch_size, limit):
            keep = batch["labels"] != IGNORE_INDEX
            rows = keep if keep.dim() == 1 else keep.any(-1)  # padding examples out
            x, y = representations(base.model, batch)[rows], representations(run.model, batch)[rows]
            meter = meter or StreamedLinearCKA(x.shape[-1], y.shape[-1], x.device)
            meter.update(x, y)
        for tensor in meter.sums():
            tensor.copy_(all_reduce_sum(run.fabric, tensor))
        reshard_after_no_grad_forward(run.model)
        reshard_after_no_grad_forward(base.model)
        results[name] = {"cka": meter.value(), "examples": float(meter.n)}
        bar.update()
        run.fabric.print(f"  {name:<24} cka={results[name]['cka']:.4f}")
    bar.close()
    return write(run, path, f"cka-{split}", {"checkpoint": str(path), "pretrained": pretrained, "split": split,
                                             "results": results})  # fmt: skip


def progress(run: Run, total: int, what: str):
    """A progress bar on rank 0 (standard error), silent on the other ranks."""
    from tqdm import tqdm

    return tqdm(total=total, desc=what, disable=not run.fabric.is_global_zero, leave=False)


def write(run: Run, path: Path, stem: str, summary: dict) -> dict:
    if run.fabric.is_global_zero:
        folder = path.parent.parent / "analysis"
        folder.mkdir(exist_ok=True)
        write_json(folder / f"{stem}.json", summary)
    return summary
