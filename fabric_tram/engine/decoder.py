"""What ``fabric-tram generate`` runs: a decoder with its tokenizer and the ids it stops on, from a run folder, a
checkpoint, or a folder ``fabric-tram export`` wrote."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fabric_tram.config import load_config
from fabric_tram.contracts import is_decoder
from fabric_tram.data.tokenizer import load_tokenizer
from fabric_tram.engine.export import load_checkpoint_model
from fabric_tram.engine.token_ids import base_checkpoint_file, read_json, stop_ids
from fabric_tram.models import build_model

OUR_DECODERS = {"gpt2": "gpt2", "llama": "llama", "qwen2": "llama", "mistral": "llama"}  # model_type -> family


@dataclass
class Decoder:
    model: object  # with new_cache(), max_positions and forward(ids, cache=)
    tokenizer: object  # a tokenizers.Tokenizer
    eos_ids: tuple[int, ...]


def load_decoder(source: str | Path) -> Decoder:
    """The decoder of a run folder or checkpoint (its weights, its task's tokenizer, its base checkpoint's stop
    ids), or of a folder ``fabric-tram export`` wrote (any causal LM transformers can build, through
    ``model.name=hf``, where it is no family of ours)."""
    source = Path(source)
    if (source / "config.json").is_file() and not (source / "meta.json").is_file():  # an exported folder
        config = json.loads((source / "config.json").read_text())
        family = OUR_DECODERS.get(config.get("model_type"))
        model_keys = [f"model.name={family}"] if family else ["model.name=hf", "model.head=causal-lm"]
        section = load_config(None, [*model_keys, f"model.pretrained={source}", "task.name=lm",
                                     "optimizer.name=adam"]).model  # fmt: skip
        tokenizer = load_tokenizer(str(source))
        generation = read_json(source / "generation_config.json" if (source / "generation_config.json").is_file()
                               else None)  # fmt: skip
        return Decoder(build_model(section).eval(), tokenizer, stop_ids(config, generation, tokenizer))
    model, config, _ = load_checkpoint_model(source)
    if not is_decoder(model):
        raise ValueError(
            f"{source}: model {config.model.name!r} with task {config.task.name!r} is not a decoder (generate needs "
            "a language model: task.name=lm)"
        )
    tokenizer = load_tokenizer(config.task.tokenizer)
    pretrained = getattr(config.model, "pretrained", None)
    base = read_json(base_checkpoint_file(pretrained, "config.json"))
    if not base and getattr(model, "hf", None) is not None:  # model.name=hf: its config is the checkpoint's
        base = model.hf.config.to_dict()
    generation = read_json(base_checkpoint_file(pretrained, "generation_config.json"))
    return Decoder(model, tokenizer, stop_ids(base, generation, tokenizer))
