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

from torch.distributed.checkpoint.api import CheckpointException

from fabric_tram.config import load_config, to_dict
from fabric_tram.data.tokenizer import load_tokenizer
from fabric_tram.engine import checkpoint as ckpt
from fabric_tram.engine.checkpoint_files import check_compatible, check_state_files, read_meta
from fabric_tram.engine.checkpoint_state import load_weights
from fabric_tram.engine.estimate import sized_section
from fabric_tram.models import build_model
from fabric_tram.models.hf_folder import DTYPES, MAX_SHARD_BYTES, save_hf_folder
from fabric_tram.models.lora import adapter_config, adapter_state, merge_lora

SPECIAL_TOKENS = {  # tokenizer_config.json's roles, by the names the bundled and hub tokenizers use
    "eos_token": ("<|endoftext|>", "</s>", "[SEP]"),
    "bos_token": ("<|endoftext|>", "<s>", "[CLS]"),
    "pad_token": ("<pad>", "[PAD]"),
    "unk_token": ("<unk>", "[UNK]"),
    "cls_token": ("<s>", "[CLS]"),
    "sep_token": ("</s>", "[SEP]"),
    "mask_token": ("<mask>", "[MASK]"),
}


def load_checkpoint_model(path: str | Path):
    """(model on the CPU with the checkpoint's weights, the run's config, the checkpoint folder)."""
    checkpoint = ckpt.find_checkpoint(path)
    run_dir = checkpoint.parent.parent
    config = load_config(run_dir / "config.yaml", ["trainer.progress_bar=false"])
    meta = read_meta(checkpoint)
    check_compatible(meta, to_dict(config)["model"], checkpoint)
    check_state_files(checkpoint)
    if meta.get("format", 1) < 2:
        raise ckpt.CheckpointError(
            f"{checkpoint} is a checkpoint of fabric_tram's first format; resume the run for one step with this "
            "version (its next checkpoint is in the current format), then export that one"
        )
    section = sized_section(config.model)
    if hasattr(section, "new_head"):  # the classifier's weights come from the checkpoint
        section = replace(section, new_head=False)
    model = build_model(section).double() if config.trainer.precision == "64-true" else build_model(section)
    try:
        load_weights(checkpoint / "state", model)
    except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException
        raise ckpt.CheckpointError(f"{checkpoint / 'state'} cannot be loaded into this model ({err})") from err
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
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if adapter:
            files = save_adapter_folder(model, config, tmp, dtype)
        else:
            if getattr(config.model, "lora", None) is not None:
                merge_lora(model)  # W + (alpha / r) B A: a plain model of the base architecture
            files = save_hf_folder(model, tmp, dtype, meta.get("labels"), token_ids(config), max_shard_bytes)
        files += write_preprocessing(config, model, tmp)
        (tmp / "README.md").write_text(model_card(config, checkpoint, meta, dtype))
        files.append("README.md")
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


ADAPTER_TASKS = {"lm": "CAUSAL_LM", "nli": "SEQ_CLS"}  # peft's task types (none for images)


def save_adapter_folder(model, config, folder: Path, dtype: str) -> list[str]:
    """The adapters in peft's layout, for ``PeftModel.from_pretrained(base, folder)``: parameter names of the base
    checkpoint, which our families share with transformers where the layout is the same (GPT-2, Llama, hf)."""
    from safetensors.torch import save_file

    layout = getattr(model, "adapter_layout", None)
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
    settings = adapter_config(config.model.lora, config.model.pretrained, layout["fan_in_fan_out"],
                              ADAPTER_TASKS.get(config.task.name))  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(settings, indent=2))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return ["adapter_config.json", "adapter_model.safetensors"]


def token_ids(config) -> dict:
    """A decoder's end-of-text id as its bos/eos (what generation stops on)."""
    name = getattr(config.task, "tokenizer", None)
    if config.task.name != "lm" or name is None:
        return {}
    eot = load_tokenizer(name).token_to_id("<|endoftext|>")
    return {} if eot is None else {"bos_token_id": eot, "eos_token_id": eot}


def write_preprocessing(config, model, folder: Path) -> list[str]:
    """The tokenizer (text tasks) or the image processor (images) the model was trained with."""
    task = config.task
    if task.name == "image":
        from fabric_tram.data.images import processor_settings

        settings = processor_settings(task.processor)
        size = task.image_size or model.sizes["image_size"]
        processor = {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": size, "width": size},
            "resample": 2,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(settings["mean"]),
            "image_std": list(settings["std"]),
        }
        (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
        return ["preprocessor_config.json"]
    tokenizer = load_tokenizer(task.tokenizer)
    tokenizer.save(str(folder / "tokenizer.json"))
    vocab = tokenizer.get_vocab()
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for role, names in SPECIAL_TOKENS.items():
        found = next((n for n in names if n in vocab), None)
        if found is not None:
            settings[role] = found
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return ["tokenizer.json", "tokenizer_config.json"]


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


def load_decoder(source: str | Path):
    """(decoder with weights, tokenizer name or folder) from a run folder or checkpoint, or an exported folder."""
    source = Path(source)
    if (source / "config.json").is_file() and not (source / "meta.json").is_file():  # an exported folder
        model_type = json.loads((source / "config.json").read_text()).get("model_type")
        family = {"gpt2": "gpt2", "llama": "llama", "qwen2": "llama", "mistral": "llama"}.get(model_type)
        if family is None:
            raise ValueError(f"{source}/config.json: model_type {model_type!r} is not a decoder this can generate with")
        section = load_config(None, [f"model.name={family}", f"model.pretrained={source}", "task.name=lm",
                                     "optimizer.name=adam"]).model  # fmt: skip
        return build_model(section).eval(), str(source)
    model, config, _ = load_checkpoint_model(source)
    if not hasattr(model, "new_cache"):
        raise ValueError(f"{source}: model {config.model.name!r} is not a decoder (generate needs a language model)")
    return model, config.task.tokenizer
