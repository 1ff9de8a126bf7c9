"""``fabric-tram estimate``: per-device memory and FLOPs of one optimizer step, before paying for a run.

Parameters, gradients, base-optimizer state and update-rule buffers are counted exactly from the model's shapes
(built on the meta device) and divided by the world size under fsdp. Activations are an estimate from each model
family's count of the values a block keeps for its backward (``activation_elements_per_token``: GPT-2 17·C,
Korthikanti et al. 2022 without the attention scores that fused attention does not store; Llama 8·C + 2·kv + 4·I
for its GQA projections and SwiGLU), only the block inputs under activation checkpointing, plus the float32
logits and log-probabilities (only the logits, in their own dtype, under ``task.cross_entropy=chunked``), plus a
target forward's log-probabilities for the rules that run one, plus the divergence's output-sized gradients for the
regularisers; r3f holds two graphs.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from fabric_tram.config import Config, base_optimizer_name
from fabric_tram.contracts import (
    activation_elements_per_token,
    forward_flops_per_token,
    model_num_labels,
    model_sizes,
    model_sizing,
    tokens_per_example,
)
from fabric_tram.data.tokenizer import hub_file, is_hub_id
from fabric_tram.models import build_model
from fabric_tram.models.hub import resolve_checkpoint_folder
from fabric_tram.registry import MODELS, OPTIMIZERS

GIB = 1024**3


def sized_section(section):
    """The model section with ``pretrained`` replaced by the sizes it stands for (a preset name, a hub id of a
    preset, a ``bundled:`` or local checkpoint folder, a hub id whose config.json is cached): the architecture
    without reading any weights (an ``hf`` model: its ``init=random``, the checkpoint's config.json alone)."""
    name = getattr(section, "pretrained", None)
    if hasattr(section, "init"):
        return replace(section, init="random")
    if not name:
        return section
    family = model_sizing(MODELS.get(section.name).target)  # its presets, hub ids and config.json reader
    if family is None:
        raise ValueError(
            f"model {section.name!r} declares no sizing (a classmethod returning contracts.Sizing), so "
            f"model.pretrained={name!r} cannot be sized without loading it"
        )
    preset = {hub_id: preset for preset, hub_id in family.hub_ids.items()}.get(name, name)
    if preset in family.presets:
        return replace(section, pretrained=None, preset=preset)
    config_file = None
    if name.startswith("bundled:") or Path(name).expanduser().is_dir():
        config_file = resolve_checkpoint_folder(name) / "config.json"
    elif is_hub_id(name):
        try:
            config_file = Path(hub_file(name, "config.json", "model.pretrained"))
        except FileNotFoundError:
            config_file = None
    if config_file is None or not config_file.is_file():
        raise ValueError(f"cannot size model.pretrained={name!r} offline: use a preset name or a local folder")
    return family.from_hf(replace(section, pretrained=None), json.loads(config_file.read_text()))


def meta_model(config: Config) -> torch.nn.Module:
    """The model on the meta device (no weights read): sizes from the preset or the checkpoint's config.json."""
    with torch.device("meta"):
        return build_model(sized_section(config.model))


def optimizer_state_factor(config: Config) -> float:
    """Base-optimizer state per parameter element, in parameter-sized tensors, as the base optimizer's config
    declares it (``state_tensors``: Adam 2, SGD with momentum 1); 0 where it declares nothing."""
    declared = getattr(OPTIMIZERS.get(base_optimizer_name(config.optimizer)).config, "state_tensors", None)
    return float(declared(config.optimizer)) if declared else 0.0


def rule_declarations(name: str, section=None) -> dict:
    """What an update rule declares (``optim/update_rule.py``), read through the registry: passes per step (on
    average over a run with the optimizer ``section``: tram's radius_every), state held between steps, divergence
    gradients; a base optimizer alone is one forward and one backward."""
    target = OPTIMIZERS.get(name).target
    mean_passes = getattr(target, "mean_passes", None)
    return {
        "passes": tuple(
            mean_passes(section) if mean_passes and section is not None else getattr(target, "passes", (1, 0, 1))
        ),
        "state_factor": (
            target.state_factor_of(section)
            if hasattr(target, "state_factor_of") and section is not None
            else getattr(target, "state_factor", 0)
        ),
        "fp32_state": getattr(target, "fp32_state", 0),
        "divergence_gradients": getattr(target, "divergence_gradients", 0),
        "graphs_per_pass": getattr(target, "graphs_per_pass", 1),
    }


def cross_entropy_of(task_config) -> str:
    """The task's cross-entropy (``task.cross_entropy``: plain or chunked); plain for a task without the setting
    (a classifier's outputs are one row a sequence: no vocabulary-sized tensor to save)."""
    return getattr(task_config, "cross_entropy", "plain")


def estimate(config: Config, devices: int, num_nodes: int = 1) -> dict:
    model = meta_model(config)
    t = config.trainer
    world = devices * num_nodes
    shards = world if t.strategy == "fsdp" else 1
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)  # LoRA: the adapters only
    param_bytes = {"bf16-true": 2, "64-true": 8}.get(t.precision, 4)  # mixed precision keeps fp32 weights
    act_bytes = {"32-true": 4, "64-true": 8}.get(t.precision, 2)
    rule = rule_declarations(config.optimizer.name, config.optimizer)
    fwd, nograd, bwd = rule["passes"]
    rule_bytes = n_trained * (param_bytes * rule["state_factor"] + max(4, param_bytes) * rule["fp32_state"])
    sizes = model_sizes(model)
    L, C = sizes.get("n_layer", 0), sizes.get("n_embd", 0)
    B = t.micro_batch_size
    # tokens per sequence: the model's own count (a ViT's patches) or the task's sequence length
    T = tokens_per_example(model)
    T = T or getattr(config.task, "block_size", None) or getattr(config.task, "max_length", 1)
    # output rows: one distribution per token over the vocabulary (LM), or per sequence over the labels (classifier)
    labels = model_num_labels(model)
    V = sizes.get("vocab_size") or getattr(model.config, "vocab_size", 0)
    outputs = B * labels if labels else B * T * V
    per_token = activation_elements_per_token(model) or 17 * C
    block_full = B * T * per_token * act_bytes
    graphs = rule["graphs_per_pass"]  # forwards whose graphs are alive together in a pass (r3f: clean and noised)
    activations = {
        "without_checkpointing": graphs * L * block_full,
        "with_checkpointing": graphs * (L * B * T * C * act_bytes + block_full),
    }
    # what each graph's cross-entropy keeps: the plain one float32 logits and log-probabilities (2 × 4 bytes an
    # output); task.cross_entropy=chunked only the logits, in the dtype the model hands them (and a value a row)
    loss_bytes = act_bytes if cross_entropy_of(config.task) == "chunked" else 2 * 4
    logits = graphs * loss_bytes * outputs + ((1 if nograd else 0) + rule["divergence_gradients"]) * outputs * 4
    parts = {
        "parameters": n_params * param_bytes / shards,
        "gradients": n_trained * param_bytes / shards,
        "optimizer_state": n_trained * param_bytes * optimizer_state_factor(config) / shards,  # the weights' dtype
        "update_rule_buffers": rule_bytes / shards,
        "activations": activations["with_checkpointing" if t.activation_checkpointing else "without_checkpointing"]
        + logits,
    }
    tokens = B * T * t.accumulate
    per_token_flops = forward_flops_per_token(model, T)
    flops_fwd = float("nan") if per_token_flops is None else per_token_flops * tokens
    return {
        "world_size": world,
        "sharded_over": shards,
        "n_params": n_params,
        "n_trained": n_trained,
        "bytes": parts,
        "activations_without_checkpointing": activations["without_checkpointing"] + logits,
        "activations_with_checkpointing": activations["with_checkpointing"] + logits,
        "total_bytes": sum(parts.values()),
        "passes": {"forward": fwd, "no_grad_forward": nograd, "backward": bwd},
        "flops_per_step_per_device": flops_fwd * (fwd + nograd + 2 * bwd),
        "tokens_per_step_per_device": tokens,
    }


def format_estimate(config: Config, e: dict) -> str:
    b = e["bytes"]
    lines = [
        f"{config.model.name} ({e['n_params'] / 1e6:,.1f}M parameters"
        + (f", {e['n_trained'] / 1e6:,.3f}M trained" if e["n_trained"] != e["n_params"] else "")
        + f"), update rule {config.optimizer.name} "
        f"(base {base_optimizer_name(config.optimizer)}), {config.trainer.strategy}, {config.trainer.precision}, "
        f"{e['world_size']} device(s); per device:"
    ]
    for key in ("parameters", "gradients", "optimizer_state", "update_rule_buffers"):
        lines.append(f"  {key.replace('_', ' '):<22} {b[key] / GIB:9.2f} GiB")
    lines.append(
        f"  {'activations':<22} {e['activations_without_checkpointing'] / GIB:9.2f} GiB without checkpointing, "
        f"{e['activations_with_checkpointing'] / GIB:.2f} GiB with (this config: "
        f"{'on' if config.trainer.activation_checkpointing else 'off'})"
    )
    lines.append(f"  {'total':<22} {e['total_bytes'] / GIB:9.2f} GiB (+ framework and allocator overhead)")
    p = e["passes"]
    lines.append(
        f"  compute: {e['flops_per_step_per_device'] / 1e12:,.2f} TFLOP per step per device "
        f"({p['forward']:g} fwd + {p['no_grad_forward']:g} no-grad fwd + {p['backward']:g} bwd over "
        f"{e['tokens_per_step_per_device']:,} tokens)"
    )
    return "\n".join(lines)
