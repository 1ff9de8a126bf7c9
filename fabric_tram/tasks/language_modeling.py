"""Language modelling across text domains: GPT-2 BPE, packing into blocks, token-weighted loss, perplexity per domain.

Data: ``data_dir/<domain>/{train,validation,test}.{txt,jsonl}`` (see ``fabric_tram.data.text``). The model trains
on ``train_domains`` and is evaluated on every domain of ``eval_domains`` (default: all of them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from fabric_tram.data.batching import pad_sequences
from fabric_tram.data.text import DataError, discover_domains, split_file
from fabric_tram.data.token_cache import tokenize_split
from fabric_tram.data.tokenizer import end_of_text_id, load_tokenizer
from fabric_tram.loss import IGNORE_INDEX, LossOutput, chunked_cross_entropy_sum, count_targets, cross_entropy_sum
from fabric_tram.registry import register_task
from fabric_tram.tasks.export_files import tokenizer_files

IGNORE = IGNORE_INDEX
CROSS_ENTROPY = {"plain": cross_entropy_sum, "chunked": chunked_cross_entropy_sum}  # task.cross_entropy


def bundled_data_dir(name: str = "sample") -> Path:
    return Path(str(files("fabric_tram") / "assets" / "data" / name))


@dataclass
class LMConfig:
    # a folder of domains; "sample" or "demo" (bundled); "hf://machelreid/m2d2" (M2D2 archives)
    data_dir: str = "sample"
    train_domains: list = field(default_factory=list)  # empty: every domain found
    eval_domains: list = field(default_factory=list)  # empty: every domain found
    block_size: int = 128  # tokens per training sequence
    packing: bool = True  # True: concatenate documents and cut blocks; False: one padded sequence per document
    tokenizer: str = "gpt2"  # bundled name or a folder (tokenizer.json or vocab.json + merges.txt)
    text_key: str = "text"  # field of .jsonl records holding the text
    doc_format: str = "paragraphs"  # .txt documents: separated by blank lines (paragraphs) or one per line (lines)
    cache_dir: str | None = None  # where tokenised splits are cached (default ~/.cache/fabric_tram/tokens)
    revision: str | None = None  # hub revision for hf:// data
    # plain: one float32 log-softmax, shared with the divergences; chunked: rows a chunk at a time, no float32
    # tensor the size of the logits (memory at a 50k vocabulary; the divergences then read the logits)
    cross_entropy: str = "plain"

    def check(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"task.block_size must be >= 1, got {self.block_size}")
        if self.doc_format not in ("paragraphs", "lines"):
            raise ValueError(f"task.doc_format must be paragraphs or lines, got {self.doc_format!r}")
        if self.cross_entropy not in CROSS_ENTROPY:
            raise ValueError(
                f"task.cross_entropy must be one of {', '.join(CROSS_ENTROPY)} (chunked: no float32 tensor the size "
                f"of the logits), got {self.cross_entropy!r}"
            )


class PackedBlocks:
    """Non-overlapping blocks of ``block_size + 1`` tokens (inputs + shifted targets) over a token stream."""

    def __init__(self, tokens, block_size: int):
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.block_size)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.block_size
        return torch.from_numpy(np.asarray(self.tokens[start : start + self.block_size + 1], dtype=np.int64))


class DocumentSequences:
    """One sequence per document (at least 2 tokens), truncated to ``block_size + 1`` tokens."""

    def __init__(self, tokens, doc_ends: np.ndarray, block_size: int):
        starts = np.concatenate([[0], doc_ends[:-1]]) if len(doc_ends) else np.zeros(0, dtype=np.int64)
        keep = (doc_ends - starts) >= 2
        self.tokens, self.starts, self.ends, self.block_size = tokens, starts[keep], doc_ends[keep], block_size

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = int(self.starts[i])
        end = min(int(self.ends[i]), start + self.block_size + 1)
        return torch.from_numpy(np.asarray(self.tokens[start:end], dtype=np.int64))


class Concatenation:
    """Several sequence collections indexed as one (the training domains)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> torch.Tensor:
        part = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.parts[part][i - int(self.offsets[part])]


@register_task("lm", config=LMConfig, description="causal language modelling over text domains; perplexity per domain")
class LanguageModelingTask:
    hf_head, peft_task_type = "causal-lm", "CAUSAL_LM"  # what model.name=hf and export --adapter need to know
    export_files = staticmethod(tokenizer_files)
    """Causal LM over text domains (token-weighted loss; perplexity per domain on evaluation)."""

    def __init__(self, config: LMConfig):
        self.config = config
        self.root = self._data_root(config)
        self.domains = discover_domains(self.root)
        self.train_domains = self._check_domains(config.train_domains, "train_domains")
        self.eval_domains = self._check_domains(config.eval_domains, "eval_domains")
        self.pad_id = end_of_text_id(config.tokenizer)  # also fails early on a bad tokenizer
        self._cache: dict[tuple[str, str], object] = {}
        self.train_set = Concatenation([self.sequences(d, "train") for d in self.train_domains])

    @staticmethod
    def _data_root(config: LMConfig) -> Path:
        if config.data_dir in ("sample", "demo"):
            return bundled_data_dir(config.data_dir)
        if config.data_dir.startswith("hf://"):
            from fabric_tram.data.m2d2 import fetch_domains

            names = list(dict.fromkeys(list(config.train_domains) + list(config.eval_domains)))
            return fetch_domains(names, config.data_dir[len("hf://") :], config.revision)
        return Path(config.data_dir).expanduser()

    def _check_domains(self, names: list, key: str) -> list[str]:
        missing = [d for d in names if d not in self.domains]
        if missing:
            raise DataError(
                f"task.{key}: domain(s) {missing} not found in {self.root}; available: {', '.join(self.domains)}"
            )
        return list(names) or list(self.domains)

    def sequences(self, domain: str, split: str):
        """The split's sequences (memory-mapped; tokenised once into the cache)."""
        key = (domain, split)
        if key not in self._cache:
            path = split_file(self.root / domain, split)
            c = self.config
            split_tokens = tokenize_split(
                path, c.tokenizer, Path(c.cache_dir) if c.cache_dir else None, c.doc_format, c.text_key
            )
            if c.packing:
                seqs = PackedBlocks(split_tokens.tokens, c.block_size)
            else:
                seqs = DocumentSequences(split_tokens.tokens, split_tokens.doc_ends, c.block_size)
            if len(seqs) == 0:
                n_tokens = split_tokens.n_tokens
                raise DataError(
                    f"{path}: {n_tokens} tokens, too little text for one sequence of "
                    f"block_size={self.config.block_size}"
                    " (+1) tokens; add text or lower task.block_size"
                )
            self._cache[key] = seqs
        return self._cache[key]

    @property
    def vocab_size(self) -> int:
        """The tokenizer's number of ids (checked against the model's embedding table before training)."""
        return load_tokenizer(self.config.tokenizer).get_vocab_size()

    def eval_sets(self, split: str) -> dict:
        return {domain: self.sequences(domain, split) for domain in self.eval_domains}

    def collate(self, examples: list[torch.Tensor], indices: list[int]) -> dict[str, torch.Tensor]:
        """Right-pad a micro-batch; ``labels`` are the inputs shifted by one, padding labelled -100."""
        inputs = pad_sequences([s[:-1] for s in examples], self.pad_id)
        labels = pad_sequences([s[1:] for s in examples], IGNORE)
        return {"input_ids": inputs, "labels": labels, "example_index": torch.tensor(indices, dtype=torch.long)}

    def loss(self, model, batch: dict, **forward_kwargs) -> LossOutput:
        loss = CROSS_ENTROPY[self.config.cross_entropy]
        return loss(model(batch["input_ids"], **forward_kwargs), batch["labels"], IGNORE)

    @staticmethod
    def count_targets(batch: dict) -> torch.Tensor:
        """Targets of a micro-batch (its non-padding labels): the engine needs a step's count before its first
        backward."""
        return count_targets(batch["labels"], IGNORE)

    @staticmethod
    def metrics(loss_sum: float, count: float) -> dict[str, float]:
        loss = loss_sum / max(count, 1.0)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}
