"""A base checkpoint's files beside its weights, and the special-token ids they set: what an export keeps and what
``fabric-tram generate`` stops on. SmolLM2-Instruct ends a turn with ``<|im_end|>`` = 2, not ``<|endoftext|>`` = 0:
an export that rewrote its ids would make transformers' ``generate`` run past the end of every answer.
"""

from __future__ import annotations

import json
from pathlib import Path

from fabric_tram.data.tokenizer import hub_file, is_hub_id
from fabric_tram.models.hub import resolve_checkpoint_folder
from fabric_tram.tasks.export_files import as_ids

TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
END_OF_TEXT = "<|endoftext|>"


def base_checkpoint_file(name: str | None, filename: str) -> Path | None:
    """``filename`` of the checkpoint ``name`` (``bundled:NAME``, a local folder, or a hub id: from the hub's
    cache, or fetched), or None where there is no checkpoint, no such file, or no way to get it offline."""
    if not name:
        return None
    try:
        if name.startswith("bundled:") or Path(name).expanduser().is_dir():
            path = resolve_checkpoint_folder(name) / filename
        elif is_hub_id(name):
            path = Path(hub_file(name, filename, "model.pretrained"))
        else:
            return None
    except FileNotFoundError:
        return None
    return path if path.is_file() else None


def read_json(path: Path | None) -> dict:
    return json.loads(path.read_text()) if path is not None else {}


def base_token_ids(pretrained: str | None) -> dict:
    """bos/eos/pad ids that the base checkpoint's config.json sets ({} for none, or a base out of reach)."""
    config = read_json(base_checkpoint_file(pretrained, "config.json"))
    return {key: config[key] for key in TOKEN_ID_KEYS if config.get(key) is not None}


def stop_ids(config: dict, generation: dict, tokenizer) -> tuple[int, ...]:
    """The ids generation stops on: the generation config's eos ids and the model config's (a chat model lists
    its end-of-turn token in one, the end of text in the other), else the tokenizer's ``<|endoftext|>``."""
    ids = as_ids(generation.get("eos_token_id")) + as_ids(config.get("eos_token_id"))
    if not ids and tokenizer.token_to_id(END_OF_TEXT) is not None:
        ids = (tokenizer.token_to_id(END_OF_TEXT),)
    return tuple(dict.fromkeys(ids))  # each once, in order
