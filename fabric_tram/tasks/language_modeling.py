"""Language modelling across text domains: GPT-2 BPE, packing into blocks, token-weighted loss, perplexity per domain.

Data: ``data_dir/<domain>/{train,validation,test}.{txt,jsonl}`` (see ``fabric_tram.data.text``). The model trains
on ``train_domains`` and is evaluated on every domain of ``eval_domains`` (default: all of them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import torch

from fabric_tram.data.batching import pad_sequences
from fabric_tram.data.text import DataError, discover_domains, read_documents, split_file
from fabric_tram.data.tokenizer import GPT2_EOT, load_tokenizer
from fabric_tram.registry import register_task
from fabric_tram.tasks.base import LossOutput, cross_entropy_sum

IGNORE = -100


def bundled_data_dir(name: str = "sample") -> Path:
    return Path(str(files("fabric_tram") / "assets" / "data" / name))


@dataclass
class LMConfig:
    data_dir: str = "sample"  # a folder of domains, or "sample" for the small corpus bundled with fabric_tram
    train_domains: list = field(default_factory=list)  # empty: every domain found
    eval_domains: list = field(default_factory=list)  # empty: every domain found
    block_size: int = 128  # tokens per training sequence
    packing: bool = True  # True: concatenate documents and cut blocks; False: one padded sequence per document
    tokenizer: str = "gpt2"  # bundled name or a folder (tokenizer.json or vocab.json + merges.txt)
    text_key: str = "text"  # field of .jsonl records holding the text


def tokenize_documents(documents, tokenizer, batch: int = 256) -> list[list[int]]:
    out, docs = [], list(documents)
    for i in range(0, len(docs), batch):
        out += [enc.ids + [GPT2_EOT] for enc in tokenizer.encode_batch(docs[i:i + batch])]
    return out


def pack_blocks(token_docs: list[list[int]], block_size: int) -> list[torch.Tensor]:
    """Concatenate documents and cut non-overlapping blocks of ``block_size + 1`` tokens (inputs + shifted targets)."""
    flat = torch.tensor([t for doc in token_docs for t in doc], dtype=torch.long)
    n = (len(flat) - 1) // block_size
    return [flat[i * block_size: i * block_size + block_size + 1] for i in range(n)]


def document_sequences(token_docs: list[list[int]], block_size: int) -> list[torch.Tensor]:
    """One sequence per document, truncated to ``block_size + 1`` tokens; documents of one token are dropped."""
    return [torch.tensor(doc[: block_size + 1], dtype=torch.long) for doc in token_docs if len(doc) >= 2]


@register_task("lm", config=LMConfig, description="causal language modelling over text domains; perplexity per domain")
class LanguageModelingTask:
    """Causal LM over text domains (token-weighted loss; perplexity per domain on evaluation)."""

    def __init__(self, config: LMConfig):
        self.config = config
        self.root = bundled_data_dir(config.data_dir) if config.data_dir == "sample" else Path(config.data_dir).expanduser()
        self.domains = discover_domains(self.root)
        self.train_domains = self._check_domains(config.train_domains, "train_domains")
        self.eval_domains = self._check_domains(config.eval_domains, "eval_domains")
        self.tokenizer = load_tokenizer(config.tokenizer)
        self._cache: dict[tuple[str, str], list[torch.Tensor]] = {}
        self.train_set = [seq for d in self.train_domains for seq in self.sequences(d, "train")]

    def _check_domains(self, names: list, key: str) -> list[str]:
        missing = [d for d in names if d not in self.domains]
        if missing:
            raise DataError(f"task.{key}: domain(s) {missing} not found in {self.root}; available: {', '.join(self.domains)}")
        return list(names) or list(self.domains)

    def sequences(self, domain: str, split: str) -> list[torch.Tensor]:
        key = (domain, split)
        if key not in self._cache:
            path = split_file(self.root / domain, split)
            docs = tokenize_documents(read_documents(path, self.config.text_key), self.tokenizer)
            make = pack_blocks if self.config.packing else document_sequences
            seqs = make(docs, self.config.block_size)
            if not seqs:
                n_tokens = sum(len(d) for d in docs)
                raise DataError(
                    f"{path}: {n_tokens} tokens, too little text for one sequence of block_size={self.config.block_size}"
                    " (+1) tokens; add text or lower task.block_size"
                )
            self._cache[key] = seqs
        return self._cache[key]

    def eval_sets(self, split: str) -> dict[str, list[torch.Tensor]]:
        return {domain: self.sequences(domain, split) for domain in self.eval_domains}

    def collate(self, examples: list[torch.Tensor], indices: list[int]) -> dict[str, torch.Tensor]:
        """Right-pad a micro-batch; ``labels`` are the inputs shifted by one, padding labelled -100."""
        inputs = pad_sequences([s[:-1] for s in examples], GPT2_EOT)
        labels = pad_sequences([s[1:] for s in examples], IGNORE)
        return {"input_ids": inputs, "labels": labels, "example_index": torch.tensor(indices, dtype=torch.long)}

    def loss(self, model, batch: dict, **forward_kwargs) -> LossOutput:
        return cross_entropy_sum(model(batch["input_ids"], **forward_kwargs), batch["labels"], IGNORE)

    @staticmethod
    def metrics(loss_sum: float, count: float) -> dict[str, float]:
        loss = loss_sum / max(count, 1.0)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}
