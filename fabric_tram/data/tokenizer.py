"""GPT-2 byte-level BPE through the `tokenizers` package, from the files bundled with fabric_tram or a folder."""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files
from pathlib import Path

GPT2_EOT = 50256  # <|endoftext|>
EOT_TOKEN = "<|endoftext|>"


def bundled_tokenizer_dir(name: str = "gpt2") -> Path:
    return Path(str(files("fabric_tram") / "assets" / "tokenizers" / name))


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str = "gpt2"):
    """``"gpt2"``: the bundled GPT-2 BPE; a folder with ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``."""
    from tokenizers.implementations import ByteLevelBPETokenizer

    from tokenizers import Tokenizer

    # a folder of that name holding tokenizer files first, then the bundled one (a folder that merely shares the
    # bundled tokenizer's name, such as a demo's output folder "demo", is not a tokenizer)
    for folder in (Path(name_or_path).expanduser(), bundled_tokenizer_dir(name_or_path)):
        if (folder / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(folder / "tokenizer.json"))
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return ByteLevelBPETokenizer.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    if is_hub_id(name_or_path):
        return Tokenizer.from_file(hub_file(name_or_path, "tokenizer.json", "tokenizer"))
    raise FileNotFoundError(
        f"tokenizer {name_or_path!r}: no bundled tokenizer of that name and no folder with tokenizer.json or "
        "vocab.json + merges.txt; use task.tokenizer=gpt2, a path to such a folder or a hub id (OWNER/NAME)"
    )


def is_hub_id(name: str) -> bool:
    """``OWNER/NAME`` that is no local path (a folder of that name would have been found first)."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def hub_file(repo_id: str, filename: str, what: str) -> str:
    """One file of a hub checkpoint (``what`` names it in errors), from huggingface_hub's cache or downloaded."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=repo_id, filename=filename)
    except Exception as err:  # offline without a cached copy, no such file in that repo, ...
        raise FileNotFoundError(
            f"{what} {repo_id!r}: could not get its {filename} from the Hugging Face hub or its cache "
            f"({type(err).__name__}: {err}). Pass a local folder holding {filename}, or go online once"
        ) from err


def tokenizer_fingerprint(name_or_path: str = "gpt2") -> str:
    """Identifies a tokenizer's vocabulary (for caches): size plus the ids of a fixed probe string."""
    tok = load_tokenizer(name_or_path)
    return f"{tok.get_vocab_size()}:{tok.encode('fabric_tram probe: Hello world, 1234!').ids}"


def end_of_text_id(name_or_path: str = "gpt2") -> int:
    """The id of <|endoftext|> (documents end with it; padding uses it too, masked out of the loss)."""
    tok = load_tokenizer(name_or_path)
    eot = tok.token_to_id(EOT_TOKEN)
    if eot is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no {EOT_TOKEN} token; add it as a special token")
    return eot
