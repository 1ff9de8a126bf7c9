"""Labelled sentence pairs (NLI: premise, hypothesis, entailment/neutral/contradiction) or single sentences, per
language.

Two sources, one shape (``list[Example]`` per language and split):
- a folder ``DATA/<language>/{train,validation,test}.jsonl``, one JSON object per line with the text fields
  (``premise`` and ``hypothesis`` by default; one field for single-sentence classification) and ``label`` (an
  index into the label names, or the name itself);
- the hub through ``datasets`` (parquet, no loading scripts): English MultiNLI ``nyu-mll/multi_nli`` for training
  (its ``validation_matched`` as English validation when XNLI lacks it) and XNLI ``facebook/xnli`` (one config per
  language: validation and test) for the 15 languages.

Every label is checked against the label names when read: a label outside the set stops the run before training,
naming the file and line (or the dataset and row).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fabric_tram.data.text import DataError, jsonl_records, split_file

MULTINLI = "nyu-mll/multi_nli"
XNLI = "facebook/xnli"
XNLI_LANGUAGES = ("en", "ar", "bg", "de", "el", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")
NLI_LABELS = ("entailment", "neutral", "contradiction")  # MultiNLI's and XNLI's label order on the hub


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]  # (premise, hypothesis), or (sentence,)
    label: int


def label_index(value, labels: tuple[str, ...] | list[str], where: str) -> int:
    """An int in range or one of the label names; anything else is a DataError naming ``where``."""
    if isinstance(value, str) and value in labels:
        return list(labels).index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return value
    raise DataError(
        f"{where}: label {value!r} is outside the label set {list(labels)} (indices 0-{len(labels) - 1} or the "
        "names); fix the data or set task.labels"
    )


def read_examples(path: Path, labels, text_keys=("premise", "hypothesis"), label_key: str = "label") -> list[Example]:
    examples, keys = [], [*text_keys, label_key]
    for lineno, record in jsonl_records(path):
        missing = [k for k in keys if k not in record] if isinstance(record, dict) else keys
        if missing:
            raise DataError(f"{path}:{lineno}: no field(s) {missing}; each line needs {keys} (task.text_keys)")
        texts = tuple(str(record[k]) for k in text_keys)
        examples.append(Example(texts, label_index(record[label_key], labels, f"{path}:{lineno}")))
    return examples


def local_languages(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist; set task.data_dir to a folder of languages")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.jsonl")))
    if not found:
        raise DataError(f"data folder {str(root)!r} holds no language: expected <language>/{{train,test}}.jsonl")
    return found


def local_split(root: Path, language: str, split: str, labels, text_keys, label_key: str) -> list[Example]:
    path = split_file(root / language, split)
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: labelled sentences are read from .jsonl files ({', '.join(text_keys)}, label)")
    return read_examples(path, labels, text_keys, label_key)


def hub_split(language: str, split: str, labels, revision: str | None = None) -> list[Example]:
    """English training pairs from MultiNLI, everything else from XNLI's config for ``language``. Hub rows labelled
    -1 (MultiNLI's pairs without a gold label) are left out, as every NLI setup does."""
    from datasets import load_dataset

    if split == "train":
        if language != "en":
            raise DataError(f"hub training data is English MultiNLI; task.train_language={language!r} has none")
        rows, name = load_dataset(MULTINLI, split="train", revision=revision), f"{MULTINLI} train"
    else:
        if language not in XNLI_LANGUAGES:
            raise DataError(f"XNLI has no language {language!r}; it has {', '.join(XNLI_LANGUAGES)}")
        rows, name = load_dataset(XNLI, language, split=split, revision=revision), f"{XNLI}/{language} {split}"
    pairs = []
    for i, row in enumerate(rows):
        if row["label"] == -1:
            continue
        label = label_index(row["label"], labels, f"{name} row {i}")
        pairs.append(Example((row["premise"], row["hypothesis"]), label))
    return pairs
