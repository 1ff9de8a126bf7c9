"""``fabric-tram export RUN_DIR_OR_CHECKPOINT OUT_DIR``: a fine-tuned model as a folder that transformers loads
with its Auto classes (and vLLM, llama.cpp's converter or the hub take as it is).

The weights come from the checkpoint on one process, whatever number of processes wrote it (the state
reshards: engine/checkpoint_state.py); the model is built from the run's config.yaml with the sizes its base
checkpoint stands for (no base weights are read). The folder holds ``config.json`` (with the label names of a
classifier), the weights (``model.safetensors``, sharded above 5 GiB), the tokenizer (``tokenizer.json`` and a
``tokenizer_config.json``) or the image processor (``preprocessor_config.json``), and a short model card. It is
written next to ``OUT_DIR`` and renamed into place when complete; an existing non-empty ``OUT_DIR`` is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from fabric_tram.config import load_config, to_dict
from fabric_tram.contracts import adapter_layout, task_export_files, task_hf_head, task_peft_type
from fabric_tram.data.tokenizer import load_tokenizer
from fabric_tram.engine import checkpoint as ckpt
from fabric_tram.engine.checkpoint_files import check_checkpoint, load_checkpoint, read_meta
from fabric_tram.engine.checkpoint_format1 import refuse_format_1_export
from fabric_tram.engine.checkpoint_parts import RunState
from fabric_tram.engine.estimate import sized_section
from fabric_tram.engine.token_ids import END_OF_TEXT, base_checkpoint_file, base_token_ids
from fabric_tram.models import build_model
from fabric_tram.models.hf_folder import DTYPES, MAX_SHARD_BYTES, save_hf_folder
from fabric_tram.models.hub import resolve_checkpoint_folder
from fabric_tram.models.lora import adapted_modules, adapter_config, adapter_state, merge_lora
from fabric_tram.registry import TASKS


def load_checkpoint_model(path: str | Path):
    """(model on the CPU with the checkpoint's weights, the run's config, the checkpoint folder)."""
    checkpoint = ckpt.find_checkpoint(path)
    run_dir = checkpoint.parent.parent
    config = load_config(run_dir / "config.yaml", ["trainer.progress_bar=false"])
    checked = check_checkpoint(None, checkpoint, to_dict(config)["model"])  # the weights alone: no process group
    refuse_format_1_export(checkpoint, checked.meta)
    section = sized_section(config.model)
    if hasattr(section, "new_head"):  # the classifier's weights come from the checkpoint
        section = replace(section, new_head=False)
    model = build_model(section).double() if config.trainer.precision == "64-true" else build_model(section)
    load_checkpoint(None, RunState(model), checked)
    return model.eval(), config, checkpoint


def export(path: str | Path, out_dir: str | Path, dtype: str = "float32",
           max_shard_bytes: int = MAX_SHARD_BYTES, adapter: bool = False) -> list[str]:  # fmt: skip
    """Write the checkpoint's model as a Hugging Face folder at ``out_dir``; returns the files written. A LoRA run's
    adapters are merged into the weights, or with ``adapter`` written alone in peft's layout."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty: choose a new output folder (nothing was written)")
    model, config, checkpoint = load_checkpoint_model(path)
    if adapter and getattr(config.model, "lora", None) is None:
        raise ValueError(f"{checkpoint} is not a LoRA run (model.lora is unset): export it without --adapter")
    meta = read_meta(checkpoint)
    ids = token_ids(config)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if adapter:
            files = save_adapter_folder(model, config, tmp, dtype)
        else:
            if getattr(config.model, "lora", None) is not None:
                merge_lora(model)  # W + (alpha / r) B A: a plain model of the base architecture
            files = save_hf_folder(model, tmp, dtype, meta.get("labels"), ids, max_shard_bytes)
        writer = task_export_files(task_class(config))  # the task's own: its tokenizer or image processor
        files += writer(config.task, model, tmp, ids) if writer is not None else []
        generation = base_checkpoint_file(getattr(config.model, "pretrained", None), "generation_config.json")
        if generation is not None and not adapter:  # the base's sampling defaults and stop ids, as they were
            shutil.copyfile(generation, tmp / "generation_config.json")
            files.append("generation_config.json")
        (tmp / "README.md").write_text(model_card(config, checkpoint, meta, dtype))
        files.append("README.md")
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def save_adapter_folder(model, config, folder: Path, dtype: str) -> list[str]:
    """The adapters in peft's layout, for ``PeftModel.from_pretrained(base, folder)``: parameter names of the base
    checkpoint, which our families share with transformers where the layout is the same (GPT-2, Llama, hf)."""
    from safetensors.torch import save_file

    layout = adapter_layout(model)
    if layout is None:
        raise ValueError(
            f"model {config.model.name!r} names its modules unlike transformers' checkpoint, so peft could not place "
            "its adapters: export without --adapter (the adapters merged into the weights)"
        )
    if config.model.lora.modules_to_save:
        raise ValueError(
            f"model.lora.modules_to_save={config.model.lora.modules_to_save}: modules trained in full are not written "
            "in peft's adapter layout here; export without --adapter (the adapters merged into the weights)"
        )
    tensors = adapter_state(model, strip=layout["strip"])
    cast = DTYPES.get(dtype)
    tensors = {k: v.to(cast) if cast is not None and v.is_floating_point() else v for k, v in tensors.items()}
    settings = adapter_config(config.model.lora, adapted_modules(model), base_model_path(config.model.pretrained),
                              layout["fan_in_fan_out"], task_peft_type(task_class(config)))  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(settings, indent=2))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return ["adapter_config.json", "adapter_model.safetensors"]


def token_ids(config) -> dict:
    """bos/eos/pad ids for config.json: the base checkpoint's where it sets them (a chat model's end of turn is its
    eos, kept), else a decoder's end-of-text token as bos and eos (what generation stops on)."""
    ids = base_token_ids(getattr(config.model, "pretrained", None))
    name = getattr(config.task, "tokenizer", None)
    if task_hf_head(task_class(config)) == "causal-lm" and name is not None:  # a decoder's task
        eot = load_tokenizer(name).token_to_id(END_OF_TEXT)
        if eot is not None:
            ids = {"bos_token_id": eot, "eos_token_id": eot, **ids}
    return ids


def task_class(config):
    """The registered task entry of the run (a class declares its export knowledge; a factory, none)."""
    return TASKS.get(config.task.name).target


def base_model_path(pretrained: str | None) -> str | None:
    """The base checkpoint as an adapter names it: a local folder as an absolute path (a relative one would be
    read as a hub id from anywhere else), a bundled one as its folder, a hub id as it is."""
    if pretrained and (pretrained.startswith("bundled:") or Path(pretrained).expanduser().is_dir()):
        return str(resolve_checkpoint_folder(pretrained).resolve())
    return pretrained


def model_card(config, checkpoint: Path, meta: dict, dtype: str) -> str:
    """A short README.md: what the model was fine-tuned from, with what, on what, for how long, and its results."""
    m, t, o = config.model, config.task, config.optimizer
    base = getattr(m, "pretrained", None) or f"{m.name} preset {getattr(m, 'preset', '?')} (no pre-trained weights)"
    keys = ("lr", "rho", "radius_target", "max_radius", "radius_scale", "sigma", "lam", "base")
    settings = ", ".join(f"{k}={getattr(o, k)}" for k in keys if hasattr(o, k))
    domains = getattr(t, "train_domains", None) or getattr(t, "train_language", None) or ""
    results_file = checkpoint.parent.parent / "results.json"
    lines = [
        f"# {m.name} fine-tuned with {o.name}",
        "",
        "Written by `fabric-tram export` (fabric_tram: TRAM and its baselines on Lightning Fabric).",
        "",
        f"- base checkpoint: {base}",
        f"- update rule: `{o.name}` ({settings})",
        f"- task: `{t.name}`, data `{getattr(t, 'data_dir', '?')}`" + (f", trained on {domains}" if domains else ""),
        f"- steps: {meta['step']} of {meta.get('global_batch', '?')} examples each ({meta['world_size']} process(es))",
        f"- weights: {dtype}, from `{checkpoint}`",
    ]
    if results_file.is_file():
        summary = json.loads(results_file.read_text())
        lines += ["", f"## Results (step {summary.get('evaluated_step', summary.get('step'))})", ""]
        for split, per_domain in summary.get("results", {}).items():
            for domain, metrics in per_domain.items():
                shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
                lines.append(f"- {split} / {domain}: {shown}")
    return "\n".join(lines) + "\n"
