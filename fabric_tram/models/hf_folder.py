"""A model written as a Hugging Face folder: ``config.json`` and safetensors weights, sharded above a size.

Each family says what its Hugging Face form is (``model.to_hf(labels) -> (config, state dict)``, the inverse of
its ``load_hf_state_dict``); this module writes it: floating tensors cast to the dtype asked for, tied tensors
written once, one ``model.safetensors`` or, above ``max_shard_bytes``, ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json`` (transformers' layout).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default shard size


def save_hf_folder(model, folder: str | Path, dtype: str | None = None, labels: list[str] | None = None,
                   extra_config: dict | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:  # fmt: skip
    """Write ``model``'s Hugging Face form into ``folder`` (created); returns the files written."""
    from safetensors.torch import save_file

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    config, state = model.to_hf(labels)
    cast = DTYPES.get(dtype)
    tensors = {}
    for key, value in state.items():
        value = value.detach().cpu()
        if cast is not None and value.is_floating_point():
            value = value.to(cast)
        tensors[key] = value.contiguous().clone()  # no shared storage: safetensors refuses aliases
    some = next(iter(tensors.values()))
    config = {**config, "torch_dtype": str(some.dtype).removeprefix("torch."), **(extra_config or {})}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shards, current, size = [], {}, 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = value
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["config.json", "model.safetensors"]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return ["config.json", "model.safetensors.index.json", *names]
