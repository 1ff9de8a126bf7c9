"""What a task writes beside an exported model so that transformers reads inputs as the run did: a text task its
tokenizer (``tokenizer.json``, ``tokenizer_config.json`` with the special tokens config.json's ids name), the image
task its processor (``preprocessor_config.json``). A task class declares its writer as ``export_files``
(contracts.py); engine/export.py calls it without knowing which task it is."""

from __future__ import annotations

import json
from pathlib import Path

from fabric_tram.contracts import model_sizes
from fabric_tram.data.tokenizer import load_tokenizer

SPECIAL_TOKENS = {  # tokenizer_config.json's roles, by the names the bundled and hub tokenizers use
    "eos_token": ("<|endoftext|>", "</s>", "[SEP]"),
    "bos_token": ("<|endoftext|>", "<s>", "[CLS]"),
    "pad_token": ("<pad>", "[PAD]"),
    "unk_token": ("<unk>", "[UNK]"),
    "cls_token": ("<s>", "[CLS]"),
    "sep_token": ("</s>", "[SEP]"),
    "mask_token": ("<mask>", "[MASK]"),
}


def as_ids(value) -> tuple[int, ...]:
    """A config's token id field (an int, a list of ints, or null) as a tuple."""
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def tokenizer_files(task_config, model, folder: Path, ids: dict) -> list[str]:
    """The tokenizer the run read its text with; its bos/eos/pad tokens those of config.json's ``ids`` where set."""
    tokenizer = load_tokenizer(task_config.tokenizer)
    tokenizer.save(str(folder / "tokenizer.json"))
    vocab = tokenizer.get_vocab()
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for role, names in SPECIAL_TOKENS.items():
        found = next((n for n in names if n in vocab), None)
        if found is not None:
            settings[role] = found
    for role in ("bos_token", "eos_token", "pad_token"):
        given = as_ids(ids.get(f"{role}_id"))  # an int, or a list (Llama 3.1 Instruct's eos ids): its first
        token = tokenizer.id_to_token(given[0]) if given else None
        if token is not None:  # the token config.json's id names (a chat model's end of turn as its eos)
            settings[role] = token
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return ["tokenizer.json", "tokenizer_config.json"]


def image_processor_files(task_config, model, folder: Path, ids: dict) -> list[str]:
    """ViT's image processor with the size, mean and std the run resized and normalised with."""
    from fabric_tram.data.images import processor_settings

    settings = processor_settings(task_config.processor)
    size = task_config.image_size or model_sizes(model)["image_size"]
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
