"""What the engine asks of a model and of a task: each member, what uses it, and whether it is required.

``register_model`` and ``register_task`` check a class against these when it is registered, so a plugin that lacks
a required member is refused at import with one message naming each missing member and what it is for, instead of
an AttributeError deep in a run. Optional members change what the engine can do (FSDP per block, input noise by
argument, the estimator's sizes, export); the engine reads them through the accessors below, one each, with the
default it assumes when a member is left out (a test holds every other module to them).

A batch is a dict of tensors built by the task's ``collate``; the engine reads ``labels`` (the targets, padding
``IGNORE_INDEX``) where the task's loss and evaluation need them, and ``example_index`` (each example's global
index, so input noise is a function of the example) where the task provides it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

# member: what it is for (the engine's caller). Required members must be methods of the class.
TASK_REQUIRED = {
    "eval_sets": "eval_sets(split) -> {domain: examples}: evaluation, model selection, the analysis commands",
    "collate": "collate(examples, indices) -> batch dict: every micro-batch of training and evaluation",
    "loss": "loss(model, batch, **forward_kwargs) -> LossOutput (loss sum, count, logits, mask): every pass",
    "count_targets": "count_targets(batch) -> targets in a micro-batch: the step's normaliser before any backward",
    "metrics": "metrics(loss_sum, count) -> {name: value}: what evaluation reports per domain",
}
TASK_INSTANCE = {"train_set": "train_set: the training examples (indexable, with a length): the step sampler"}
TASK_OPTIONAL = {
    "train_domains": "the in-domain names (results tables, selection); default: none",
    "headline_metric": "the metric result tables report (default ppl)",
    "num_labels": "a classifier's label count, checked against the model's",
    "label_names": "a classifier's label names, written into checkpoints and exports",
    "vocab_size": "the tokenizer's size, checked against the model's embedding rows",
    "image_size": "the side images are resized to, checked against the model's",
    "eval_sums": "extra per-batch sums evaluation accumulates (accuracy's correct count)",
    "hf_head": "a class attribute: the transformers head its outputs need (causal-lm, ...): model.name=hf's Auto class",
    "peft_task_type": "a class attribute: peft's task type (CAUSAL_LM, SEQ_CLS, or None): export --adapter",
    "export_files": "export_files(task_config, model, folder, ids) -> files: what export writes beside the weights",
}
MODEL_REQUIRED = {"forward": "forward(*batch inputs, input_noise=None) -> logits: every pass"}
MODEL_OPTIONAL = {
    "block_class": "the transformer block class(es): FSDP2 shards, activation checkpointing and compile per block",
    "input_embedding": "a property: the token-embedding module (input noise, the tokenizer-size check)",
    "sizes": "a dict of the architecture's sizes (n_layer, n_embd, vocab_size, image_size): estimator, checks",
    "num_labels": "a classifier's output count (checked against the task's)",
    "forward_flops_per_token": "forward_flops_per_token(seq_len) -> FLOPs: MFU and the estimator",
    "activation_elements_per_token": "activation_elements_per_token() -> values a block keeps: the estimator",
    "tokens_per_example": "tokens_per_example() -> a ViT's patch count: the estimator",
    "to_hf": "to_hf(labels) -> (config.json, state dict): fabric-tram export",
    "new_cache": "new_cache() with max_positions and forward(ids, cache=): fabric-tram generate",
    "adapter_layout": "where LoRA adapters go in transformers' names: export --adapter",
    "lora_target_modules": "the modules LoRA adapts when model.lora.target_modules is empty (peft's default)",
    "sizing": "a classmethod -> Sizing(presets, hub_ids, from_hf): model.pretrained sized without its weights",
}


class ContractError(TypeError):
    """A registered model or task lacks a member the engine needs."""


def missing_members(cls, required: dict[str, str]) -> list[str]:
    return [name for name in required if not callable(getattr(cls, name, None))]


def refusal(kind: str, name: str, target, missing: list[str], required: dict[str, str]) -> str:
    where = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"
    lines = "; ".join(f"{member} — {required[member]}" for member in missing)
    return f"{kind} {name!r} ({where}) lacks what the engine needs: {lines} (docs/design.md, 'Contracts')"


def check_optimizer_entry(name: str, target, kind: str, config) -> None:
    """An update rule's config names the base optimizer it wraps (a ``base`` field); a base optimizer's has none:
    so "is this an update rule?" has one answer, the entry's kind, and a config that says otherwise is refused."""
    fields = getattr(config, "__dataclass_fields__", {})
    if kind == "update rule" and "base" not in fields:
        raise ContractError(
            f"update rule {name!r}: its config {getattr(config, '__name__', config)} has no base field (the base "
            "optimizer it wraps, e.g. base: str = 'adam')"
        )
    if kind == "base optimizer" and "base" in fields:
        raise ContractError(
            f"optimizer {name!r}: its config has a base field, which only an update rule has; register a rule with "
            "fabric_tram.optim.update_rule.register_rule"
        )


def check_task_class(name: str, target, kind: str = "", config=None) -> None:
    """A task registered as a class must have the required methods (a factory function is checked when built)."""
    if inspect.isclass(target):
        missing = missing_members(target, TASK_REQUIRED)
        if missing:
            raise ContractError(refusal("task", name, target, missing, TASK_REQUIRED))


def check_task(name: str, task) -> None:
    """A built task: its methods and its training set."""
    missing = missing_members(type(task), TASK_REQUIRED)
    required = {**TASK_REQUIRED, **TASK_INSTANCE}
    missing += [member for member in TASK_INSTANCE if not hasattr(task, member)]
    if missing:
        raise ContractError(refusal("task", name, type(task), missing, required))


def check_model_class(name: str, target, kind: str = "", config=None) -> None:
    """A model registered as a class must be an ``nn.Module`` with its own forward; a ``block_class`` must be a
    class or a tuple of classes, an ``input_embedding`` a property (the noise reads it from the class)."""
    if not inspect.isclass(target):
        return
    import torch

    problems = []
    if not issubclass(target, torch.nn.Module):
        problems.append("be a torch.nn.Module")
    elif target.forward is torch.nn.Module.forward:
        problems.append(f"define forward — {MODEL_REQUIRED['forward']}")
    blocks = inspect.getattr_static(target, "block_class", None)
    classes = isinstance(blocks, type) or (isinstance(blocks, tuple) and all(isinstance(b, type) for b in blocks))
    if blocks is not None and not (classes or isinstance(blocks, property)):
        problems.append(
            f"have block_class a class or a tuple of classes (got {blocks!r}) — {MODEL_OPTIONAL['block_class']}"
        )
    embedding = inspect.getattr_static(target, "input_embedding", None)
    if embedding is not None and not isinstance(embedding, property):
        problems.append(f"have input_embedding a property — {MODEL_OPTIONAL['input_embedding']}")
    if problems:
        where = f"{target.__module__}.{target.__qualname__}"
        raise ContractError(f"model {name!r} ({where}) must " + "; ".join(problems) + " (docs/design.md, 'Contracts')")


# ------------------------------------------------------------------------------------------- the wrappers

WRAPPERS = ("_FabricModule", "DistributedDataParallel", "OptimizedModule")  # their wrapped module: .module/_orig_mod


def unwrap(model):
    """The user's module inside Fabric's wrapper, DDP's or ``torch.compile``'s (FSDP2 shards in place: the
    sharded module itself)."""
    while type(model).__name__ in WRAPPERS:
        model = model._orig_mod if type(model).__name__ == "OptimizedModule" else model.module
    return model


OPTIMIZER_WRAPPERS = ("_FabricOptimizer", "_LocalOptimizer")  # each holds the torch optimizer as ``.optimizer``


def unwrap_optimizer(optimizer):
    """The torch optimizer inside Fabric's wrapper or the user-loop API's (``optim/api.py``), or ``optimizer``
    itself. Fabric's wrapper is a class made per optimizer (``FabricAdam`` derives from ``_FabricOptimizer`` and
    ``Adam``), so wrappers are known by their bases."""
    wrapped = any(base.__name__ in OPTIMIZER_WRAPPERS for base in type(optimizer).__mro__)
    return optimizer.optimizer if wrapped else optimizer


def loss_scaler(fabric):
    """The fp16 loss scaler of Fabric's precision plugin (``16-mixed``), or None."""
    return getattr(fabric.strategy.precision, "scaler", None)


# ------------------------------------------------------------------------------------------- a task's optional members
# one accessor each, with the default the engine assumes when a task leaves the member out (TASK_OPTIONAL)


def train_domains(task) -> list[str]:
    return list(getattr(task, "train_domains", None) or [])


def headline_metric(task) -> str:
    return getattr(task, "headline_metric", "ppl")


def task_num_labels(task) -> int | None:
    return getattr(task, "num_labels", None)


def label_names(task) -> list[str] | None:
    return getattr(task, "label_names", None)


def task_vocab_size(task) -> int | None:
    return getattr(task, "vocab_size", None)


def task_image_size(task) -> int | None:
    return getattr(task, "image_size", None)


def eval_sums(task):
    """``eval_sums(model, batch, out) -> {name: sum}``, or None."""
    return getattr(task, "eval_sums", None)


def task_hf_head(task) -> str | None:
    """The transformers head a task (its class or an instance) reads outputs from, or None where it says none."""
    return getattr(task, "hf_head", None)


def task_peft_type(task) -> str | None:
    return getattr(task, "peft_task_type", None)


def task_export_files(task):
    """``export_files(task_config, model, folder, ids) -> [file names]``, or None (the export then writes the
    weights and config.json alone)."""
    return getattr(task, "export_files", None)


# ------------------------------------------------------------------------------------------- a model's optional members
# one accessor each, reading the unwrapped module (MODEL_OPTIONAL)


def block_classes(model):
    """The transformer block class (or a tuple of them), or None."""
    return getattr(unwrap(model), "block_class", None)


def input_embedding(model):
    """The token-embedding module (a property of the class), or None."""
    module = unwrap(model)
    return module.input_embedding if isinstance(getattr(type(module), "input_embedding", None), property) else None


def model_sizes(model) -> dict:
    """The architecture's sizes (``sizes``, a dict on every family); {} for a model that declares none."""
    sizes = getattr(unwrap(model), "sizes", None)
    return sizes if isinstance(sizes, dict) else {}


def model_num_labels(model) -> int | None:
    """A classifier's output count (the model's ``num_labels``, or its config's); None for a language model."""
    module = unwrap(model)
    return getattr(module, "num_labels", None) or getattr(getattr(module, "config", None), "num_labels", None)


def forward_flops_per_token(model, seq_len: int) -> float | None:
    method = getattr(unwrap(model), "forward_flops_per_token", None)
    return None if method is None else method(seq_len)


def activation_elements_per_token(model) -> float | None:
    method = getattr(unwrap(model), "activation_elements_per_token", None)
    return None if method is None else method()


def tokens_per_example(model) -> int | None:
    method = getattr(unwrap(model), "tokens_per_example", None)
    return None if method is None else method()


def is_decoder(model) -> bool:
    """Whether the model generates text (``new_cache``)."""
    return callable(getattr(unwrap(model), "new_cache", None))


def adapter_layout(model) -> dict | None:
    return getattr(unwrap(model), "adapter_layout", None)


def lora_target_modules(model) -> list[str] | None:
    return getattr(unwrap(model), "lora_target_modules", None)


class Sizing(NamedTuple):
    """How a model family is sized without reading weights (the estimator, the preflight, export): its presets'
    sizes by name, the hub ids that stand for presets, and ``from_hf(section, config_json) -> section``."""

    presets: dict
    hub_ids: dict
    from_hf: Callable


def model_sizing(model_class) -> Sizing | None:
    """A registered model class's ``sizing()``, or None for a family that declares none."""
    method = getattr(model_class, "sizing", None)
    return None if method is None else method()
