"""Hugging Face checkpoints: a hub id (through huggingface_hub and its cache) or a local folder.

Weights are read from safetensors only: nothing downloaded is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WEIGHT_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]


def resolve_checkpoint_folder(name_or_path: str, revision: str | None = None, extra_patterns: list | None = None
                              ) -> Path:  # fmt: skip
    """``bundled:NAME`` (shipped with fabric_tram), a local folder as is, or else a hub id fetched (or found in
    the cache) by huggingface_hub (``extra_patterns``: more files than config and weights, e.g. remote code)."""
    if name_or_path.startswith("bundled:"):
        from importlib.resources import files

        path = Path(str(files("fabric_tram") / "assets" / "models" / name_or_path[len("bundled:") :]))
        if not path.is_dir():
            raise FileNotFoundError(f"no bundled checkpoint {name_or_path!r} (looked in {path})")
        return path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"checkpoint folder {name_or_path!r} does not exist or is not a folder")
    from huggingface_hub import snapshot_download

    try:
        patterns = WEIGHT_PATTERNS + list(extra_patterns or [])
        return Path(snapshot_download(repo_id=name_or_path, revision=revision, allow_patterns=patterns))
    except Exception as err:  # offline without a cached copy, unknown repo, ...
        raise FileNotFoundError(
            f"could not get checkpoint {name_or_path!r} from the Hugging Face hub or its cache "
            f"({type(err).__name__}: {err}). "
            "Pass a local folder holding config.json and model.safetensors, or go online once to fill the cache."
        ) from err


def load_hf_state_dict(name_or_path: str, revision: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Return (state dict, config.json as a dict) of a Hugging Face checkpoint, read from safetensors."""
    from safetensors.torch import load_file

    folder = resolve_checkpoint_folder(name_or_path, revision)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; a Hugging Face checkpoint folder needs one")
    hf_config = json.loads(config_file.read_text())
    files = safetensors_files(folder)
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    return state, hf_config


def safetensors_files(folder: Path) -> list[str]:
    """The safetensors files holding a checkpoint's weights (one, or the shards its index names); a folder with
    only pickled weights (``pytorch_model.bin``) is refused, naming what it holds and how to convert it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    found = ", ".join(sorted(p.name for p in folder.iterdir()))
    raise FileNotFoundError(
        f"{folder} has no model.safetensors (found: {found}). Only safetensors weights are read, never pickles "
        "(pytorch_model.bin); convert the checkpoint with `save_pretrained(..., safe_serialization=True)`."
    )


def build_pretrained(cls, config, hub_ids: dict[str, str], config_from_hf):
    """``cls(config)``, or with ``config.pretrained`` set: the model sized by the checkpoint's config.json (through
    ``config_from_hf``) with its weights loaded (``cls.load_hf_state_dict`` refuses any mismatch). ``hub_ids`` maps
    preset names to hub ids."""
    if config.pretrained is None:
        return cls(config)
    state, hf_config = load_hf_state_dict(hub_ids.get(config.pretrained, config.pretrained), config.revision)
    model = cls(config_from_hf(config, hf_config))
    model.load_hf_state_dict(state)
    return model


def mismatches(ours: dict, theirs: dict) -> list[str]:
    """What keeps state dict ``theirs`` from loading into a model whose state dict is ``ours``: missing and
    unexpected names and differing shapes (the first six of each), one phrase per kind; empty when it fits."""
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    shapes = [f"{k} {tuple(theirs[k].shape)} vs {tuple(ours[k].shape)}"
              for k in sorted(set(ours) & set(theirs)) if ours[k].shape != theirs[k].shape]  # fmt: skip
    found = (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
    return [f"{what}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}" for what, keys in found if keys]


def refuse_conflicting_sizes(config, presets: dict, size_keys: tuple, checkpoint: dict) -> None:
    """With ``model.pretrained`` set the sizes come from the checkpoint's config.json; a preset other than the
    default ``tiny``, or a size set explicitly, that disagrees with them is an error naming each difference."""
    chosen = dict(presets[config.preset]) if config.preset != "tiny" else {}
    chosen.update({k: getattr(config, k) for k in size_keys if getattr(config, k) is not None})
    conflicts = [f"{k}={v} (config) vs {checkpoint[k]} (checkpoint)" for k, v in chosen.items() if checkpoint[k] != v]
    if conflicts:
        raise ValueError(
            f"model.pretrained={config.pretrained!r} does not match model.preset={config.preset!r} and the sizes "
            f"set: {'; '.join(conflicts)}. With a checkpoint the sizes come from its config.json: leave the preset "
            "at tiny and the sizes unset, or pick the checkpoint that matches the preset"
        )
