"""LoRA adapters on any model, through peft: added when the model is built (``model.lora``), merged for export, or
written in peft's adapter layout (``adapter_config.json`` + ``adapter_model.safetensors``) that ``PeftModel``
loads onto the base checkpoint.

peft's ``inject_adapter_in_model`` replaces each targeted linear layer by a LoRA layer holding the original as
``base_layer`` and the adapters as ``lora_A.default`` / ``lora_B.default``; everything else is frozen here, except
the modules named in ``modules_to_save`` (a new classification head), which train in full.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fabric_tram.contracts import lora_target_modules

ADAPTER = "default"  # peft's adapter name


def peft_module():
    try:
        import peft
    except ImportError as err:
        raise ImportError("model.lora needs peft: pip install -e '.[lora]'") from err
    return peft


def module_suffixes(model: nn.Module, kind: type | tuple = nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if name and isinstance(module, kind)}


def add_lora(model: nn.Module, lora) -> nn.Module:
    """Adapters on the linear layers named by ``lora.target_modules``; every other parameter frozen except those of
    ``lora.modules_to_save``. Unknown names are refused with the model's own linear-layer names."""
    peft = peft_module()
    linear = sorted(module_suffixes(model, nn.Linear) | conv1d_suffixes(model))
    targets = list(lora.target_modules) or default_target_modules(model, linear)
    unknown = [name for name in targets if name not in linear]
    if unknown:
        raise ValueError(
            f"model.lora.target_modules: {unknown} name no linear layer of this model; its linear layers are "
            f"named {', '.join(linear)}"
        )
    modules = [name for name, _ in model.named_modules() if name]
    unknown = [s for s in lora.modules_to_save if not any(m == s or m.endswith(f".{s}") for m in modules)]
    if unknown:
        raise ValueError(
            f"model.lora.modules_to_save: {unknown} name no module of this model (a module's name or the end of its "
            f"path, as peft matches them: e.g. {', '.join(sorted(module_suffixes(model))[:6])})"
        )
    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none",
    )  # fmt: skip
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in name or ".lora_B." in name or in_saved_module(name, lora.modules_to_save))
    return model


def in_saved_module(parameter: str, modules_to_save) -> bool:
    """Whether a parameter lies in a module trained in full: one whose path ends with a name of ``modules_to_save``
    (``classifier``, or ``classifier.out_proj`` for that layer alone), at any depth (``hf.classifier``), as peft
    matches them."""
    path = "." + parameter.rpartition(".")[0] + "."
    return any(f".{name}." in path for name in modules_to_save)


def default_target_modules(model: nn.Module, linear: list[str]) -> list[str]:
    """What LoRA adapts when ``model.lora.target_modules`` is empty: the model's ``lora_target_modules`` (peft's
    per-architecture default, or our families' same roles), refused where the model declares none."""
    declared = lora_target_modules(model)
    if not declared:
        raise ValueError(
            f"model.lora.target_modules is empty and {type(model).__name__} has no default (peft knows none for its "
            f"architecture): name the linear layers to adapt; this model's are named {', '.join(linear)}"
        )
    return list(declared)


def adapted_modules(model: nn.Module) -> list[str]:
    """The names (last dotted part) of the modules that carry adapters, sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name, _ in lora_layers(model)})


def lora_summary(model: nn.Module, lora) -> str:
    """One line for the start of a LoRA run: what was adapted, and what trains, of how much."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    how = "as named" if lora.target_modules else "peft's default for this architecture"
    saved = f"; trained in full: {', '.join(lora.modules_to_save)}" if lora.modules_to_save else ""
    return (
        f"model.lora: rank {lora.r} adapters on {', '.join(adapted_modules(model))} ({how}) in "
        f"{len(lora_layers(model))} layers{saved}; {trained:,} trained parameters of {total:,} "
        f"({100 * trained / max(total, 1):.2f}%)"
    )


def conv1d_suffixes(model: nn.Module) -> set[str]:
    """transformers' GPT-2-style ``Conv1D`` layers (a linear with its weight stored transposed)."""
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and type(m).__name__ == "Conv1D"}


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    return any(".lora_A." in name for name, _ in model.named_parameters())


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + (alpha/r)·B A) and put the base layer back in its place: the
    model then has its original module and parameter names."""
    for name, layer in lora_layers(model):
        layer.merge(safe_merge=True)
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], layer.get_base_layer())
    return model


def adapter_state(model: nn.Module, strip: str = "") -> dict[str, torch.Tensor]:
    """The adapters (and fully trained modules) under peft's saved names, ``base_model.model.<name>.lora_A.weight``,
    ``strip`` removed from the front of each name (the ``hf.`` of the hf family)."""
    state = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = (
            name.removeprefix(strip)
            .replace(f".lora_A.{ADAPTER}.", ".lora_A.")
            .replace(f".lora_B.{ADAPTER}.", ".lora_B.")
        )
        state[f"base_model.model.{name}"] = param.detach().cpu().contiguous().clone()
    return state


def adapter_config(lora, targets: list[str], base: str, fan_in_fan_out: bool, task_type: str | None) -> dict:
    """peft's ``adapter_config.json`` for these adapters (on the modules ``targets``) on the checkpoint ``base``."""
    peft = peft_module()
    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(targets),
        modules_to_save=list(lora.modules_to_save) or None, fan_in_fan_out=fan_in_fan_out, bias="none",
        base_model_name_or_path=base, task_type=task_type,
    )  # fmt: skip
    out = config.to_dict()
    out["target_modules"] = sorted(out["target_modules"])  # a set in peft's object: JSON needs a list
    if out.get("modules_to_save") is not None:
        out["modules_to_save"] = list(out["modules_to_save"])
    out["peft_type"] = str(getattr(out["peft_type"], "value", out["peft_type"]))
    if out.get("task_type") is not None:
        out["task_type"] = str(getattr(out["task_type"], "value", out["task_type"]))
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in out.items()}
