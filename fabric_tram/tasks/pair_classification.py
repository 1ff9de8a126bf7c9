"""Sentence-pair (or single-sentence) classification across languages: train in one language (English MultiNLI),
evaluate accuracy in every language (XNLI's 15), the paper's zero-shot cross-lingual transfer (section 4.3, Table 5).

Pairs are encoded as the checkpoint's tokenizer does (its ``tokenizer.json`` post-processor: ``<s> A </s></s> B
</s>`` for XLM-R, ``[CLS] A [SEP] B [SEP]`` with segment ids for BERT), the longer segment truncated first to
``max_length`` tokens. The loss is summed over examples, so accumulation and data parallelism see one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import torch

from fabric_tram.data.pairs import NLI_LABELS, XNLI_LANGUAGES, hub_split, local_languages, local_split
from fabric_tram.data.text import DataError
from fabric_tram.data.tokenizer import load_tokenizer
from fabric_tram.registry import register_task
from fabric_tram.tasks.classification import ClassificationTask
from fabric_tram.tasks.export_files import tokenizer_files


@dataclass
class PairConfig:
    # "nli-sample" (bundled: a few pairs in en, fr, de, es), a folder <language>/{train,validation,test}.jsonl,
    # or "hub" (English MultiNLI for training, XNLI for validation and test in every language)
    data_dir: str = "nli-sample"
    train_language: str = "en"  # the only language the model is trained on; its validation loss selects
    eval_languages: list = field(default_factory=list)  # empty: every language found (hub: XNLI's 15)
    labels: list = field(default_factory=lambda: list(NLI_LABELS))
    text_keys: list = field(default_factory=lambda: ["premise", "hypothesis"])  # one key: single sentences
    label_key: str = "label"
    tokenizer: str = "nli-sample"  # bundled name, a folder with tokenizer.json, or a hub id (the checkpoint's own)
    max_length: int = 128  # tokens per pair after special tokens; the longer segment is truncated first
    revision: str | None = None  # hub revision for data_dir=hub

    def check(self) -> None:
        if self.max_length < 4:
            raise ValueError(f"task.max_length must be >= 4 (room for special tokens), got {self.max_length}")
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"task.labels must name at least 2 distinct labels, got {self.labels}")
        if len(self.text_keys) not in (1, 2):
            raise ValueError(f"task.text_keys names the text fields of a line: 1 or 2 keys, got {self.text_keys}")
        if self.data_dir == "hub" and list(self.text_keys) != ["premise", "hypothesis"]:
            raise ValueError(
                "task.data_dir=hub reads MultiNLI/XNLI pairs: task.text_keys must be [premise, hypothesis]"
            )


class EncodedPairs:
    """A split's pairs tokenised once: ids, segment ids and labels per example."""

    def __init__(self, ids: list[list[int]], types: list[list[int]], labels: list[int]):
        self.ids, self.types, self.labels = ids, types, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[list[int], list[int], int]:
        return self.ids[i], self.types[i], self.labels[i]


def pair_encoder(name: str, max_length: int):
    """The tokenizer, set to encode pairs as its checkpoint does, truncating the longer segment first."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(load_tokenizer(name).to_str())  # a copy: load_tokenizer's is shared
    plain = len(tokenizer.encode("a", add_special_tokens=False).ids) + len(
        tokenizer.encode("b", add_special_tokens=False).ids
    )
    if len(tokenizer.encode("a", "b").ids) == plain:
        raise DataError(
            f"tokenizer {name!r} adds no special tokens to a pair, so it does not know how its model marks one "
            "(<s> A </s></s> B </s>, [CLS] A [SEP] B [SEP]); use the checkpoint's own tokenizer.json"
        )
    tokenizer.enable_truncation(max_length, strategy="longest_first")
    tokenizer.no_padding()
    return tokenizer


@register_task("nli", config=PairConfig, description="sentence-pair classification (NLI); accuracy per language (XNLI)")
class PairClassificationTask(ClassificationTask):
    hf_head, peft_task_type = "sequence-classification", "SEQ_CLS"  # model.name=hf and export --adapter
    export_files = staticmethod(tokenizer_files)

    def __init__(self, config: PairConfig):
        self.config = config
        self.encoder = pair_encoder(config.tokenizer, config.max_length)
        pad = self.encoder.padding["pad_id"] if self.encoder.padding else None
        self.pad_id = pad if pad is not None else self._pad_id()
        self.languages = self._languages()
        missing = [lang for lang in [config.train_language, *config.eval_languages] if lang not in self.languages]
        if missing:
            raise DataError(
                f"language(s) {missing} not in the data ({self.source}); available: {', '.join(self.languages)}"
            )
        self.train_domains = [config.train_language]  # the engine's name for "in-domain": selection reads it
        self.eval_languages = list(config.eval_languages) or self.languages
        self._cache: dict[tuple[str, str], EncodedPairs] = {}
        self.train_set = self.pairs(config.train_language, "train")

    def _pad_id(self) -> int:
        for token in ("<pad>", "[PAD]"):
            if self.encoder.token_to_id(token) is not None:
                return self.encoder.token_to_id(token)
        raise DataError(f"tokenizer {self.config.tokenizer!r} has no <pad> or [PAD] token to pad batches with")

    @property
    def source(self) -> str:
        return "XNLI/MultiNLI on the hub" if self.config.data_dir == "hub" else str(self.root)

    @property
    def root(self) -> Path:
        if self.config.data_dir == "nli-sample":
            return Path(str(files("fabric_tram") / "assets" / "data" / "nli-sample"))
        return Path(self.config.data_dir).expanduser()

    def _languages(self) -> list[str]:
        if self.config.data_dir == "hub":
            return list(XNLI_LANGUAGES)
        return local_languages(self.root)

    @property
    def vocab_size(self) -> int:
        return self.encoder.get_vocab_size()

    @property
    def num_labels(self) -> int:
        return len(self.config.labels)

    @property
    def label_names(self) -> list[str]:
        return list(self.config.labels)

    def pairs(self, language: str, split: str) -> EncodedPairs:
        key = (language, split)
        if key not in self._cache:
            c = self.config
            if c.data_dir == "hub":
                raw = hub_split(language, split, c.labels, c.revision)
            else:
                raw = local_split(self.root, language, split, c.labels, c.text_keys, c.label_key)
            if not raw:
                raise DataError(f"{self.source}: {language} {split} holds no pairs")
            encoded = self.encoder.encode_batch([e.texts if len(e.texts) == 2 else e.texts[0] for e in raw])
            self._cache[key] = EncodedPairs([e.ids for e in encoded], [e.type_ids for e in encoded],
                                            [e.label for e in raw])  # fmt: skip
        return self._cache[key]

    def eval_sets(self, split: str) -> dict:
        return {language: self.pairs(language, split) for language in self.eval_languages}

    def collate(self, examples: list, indices: list[int]) -> dict[str, torch.Tensor]:
        """Right-pad a micro-batch to its longest pair; padding is masked out of attention."""
        longest = max(len(ids) for ids, _, _ in examples)
        ids = torch.full((len(examples), longest), self.pad_id, dtype=torch.long)
        types = torch.zeros((len(examples), longest), dtype=torch.long)
        keep = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, (token_ids, type_ids, _) in enumerate(examples):
            ids[row, : len(token_ids)] = torch.tensor(token_ids)
            types[row, : len(type_ids)] = torch.tensor(type_ids)
            keep[row, : len(token_ids)] = 1
        labels = torch.tensor([label for *_, label in examples], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": keep, "token_type_ids": types, "labels": labels,
                "example_index": torch.tensor(indices, dtype=torch.long)}  # fmt: skip

    def logits(self, model, batch: dict, **forward_kwargs) -> torch.Tensor:
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], **forward_kwargs)
