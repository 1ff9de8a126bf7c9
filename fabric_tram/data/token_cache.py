"""Tokenise a text split once, to a memory-mapped file: large domains (M2D2 Math: 1.1B tokens) never sit in RAM.

``<cache>/<name>.tokens`` holds every document's tokens followed by <|endoftext|> (uint16 when the vocabulary
fits, else int32); ``<name>.docs`` the end offset of each document (int64); ``<name>.json`` what they were built
from (source file, its size and mtime, the tokenizer's fingerprint) and, while building, how far it got, so an
interrupted build resumes where it stopped. A cache built from another source or tokenizer is rebuilt.
Concurrent ranks take a file lock: one builds, the others wait and read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fabric_tram.data.file_lock import file_lock
from fabric_tram.data.text import read_documents
from fabric_tram.data.tokenizer import end_of_text_id, load_tokenizer, tokenizer_fingerprint

BATCH_DOCS = 512


def default_cache_root() -> Path:
    return Path(os.environ.get("FABRIC_TRAM_CACHE", Path.home() / ".cache" / "fabric_tram")) / "tokens"


def cache_stem(source: Path, tokenizer: str, doc_format: str) -> str:
    key = f"{source.resolve()}|{tokenizer}|{doc_format}"
    return f"{source.parent.name}-{source.stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


class TokenizedSplit:
    """A tokenised split: ``tokens`` (memmap) and ``doc_ends`` (document end offsets)."""

    def __init__(self, tokens: np.ndarray, doc_ends: np.ndarray):
        self.tokens, self.doc_ends = tokens, doc_ends

    @property
    def n_tokens(self) -> int:
        return int(self.doc_ends[-1]) if len(self.doc_ends) else 0


def tokenize_split(
    source: Path,
    tokenizer: str = "gpt2",
    cache_root: Path | None = None,
    doc_format: str = "paragraphs",
    text_key: str = "text",
    progress: bool = True,
) -> TokenizedSplit:
    root = Path(cache_root) if cache_root else default_cache_root()
    stem = cache_stem(source, tokenizer, doc_format)
    paths = {k: root / f"{stem}.{k}" for k in ("tokens", "docs", "json")}
    stat = source.stat()
    wanted = {
        "source": str(source.resolve()),
        "size": stat.st_size,
        "mtime": stat.st_mtime_ns,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "doc_format": doc_format,
        "text_key": text_key,
    }
    with file_lock(root / f"{stem}.lock"):
        meta = json.loads(paths["json"].read_text()) if paths["json"].is_file() else None
        if meta is not None and any(meta.get(k) != v for k, v in wanted.items()):
            meta = None  # another source, tokenizer or format: rebuild from scratch
        if meta is None or not meta.get("complete"):
            _build(source, tokenizer, doc_format, text_key, paths, wanted, meta, progress)
    vocab = load_tokenizer(tokenizer).get_vocab_size()
    dtype = np.uint16 if vocab <= 65535 else np.int32
    ends = np.fromfile(paths["docs"], dtype=np.int64)
    tokens = np.memmap(paths["tokens"], dtype=dtype, mode="r") if ends.size and ends[-1] else np.zeros(0, dtype=dtype)
    return TokenizedSplit(tokens, ends)


def _build(source, tokenizer_name, doc_format, text_key, paths, wanted, meta, progress) -> None:
    tokenizer = load_tokenizer(tokenizer_name)
    eot = end_of_text_id(tokenizer_name)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65535 else np.int32
    done_docs = meta["docs_done"] if meta else 0
    n_tokens = meta["tokens_done"] if meta else 0
    mode = "ab" if meta else "wb"
    if meta:  # resume: drop anything written after the last recorded batch
        with open(paths["tokens"], "ab") as fh:
            fh.truncate(n_tokens * np.dtype(dtype).itemsize)
        with open(paths["docs"], "ab") as fh:
            fh.truncate(done_docs * 8)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=wanted["size"],
            unit="B",
            unit_scale=True,
            desc=f"tokenising {source.parent.name}/{source.name}",
            initial=meta.get("bytes_done", 0) if meta else 0,
            disable=None,
        )
    with open(paths["tokens"], mode) as tok_fh, open(paths["docs"], mode) as doc_fh:
        for batch, bytes_done in _document_batches(source, doc_format, text_key, skip=done_docs):
            encoded = tokenizer.encode_batch(batch)
            ids = [e.ids + [eot] for e in encoded]
            flat = np.fromiter((t for doc in ids for t in doc), dtype=dtype)
            ends = n_tokens + np.cumsum([len(d) for d in ids], dtype=np.int64)
            tok_fh.write(flat.tobytes())
            doc_fh.write(ends.tobytes())
            tok_fh.flush()
            doc_fh.flush()
            n_tokens, done_docs = int(ends[-1]), done_docs + len(batch)
            paths["json"].write_text(
                json.dumps(
                    {
                        **wanted,
                        "complete": False,
                        "docs_done": done_docs,
                        "tokens_done": n_tokens,
                        "bytes_done": bytes_done,
                    }
                )
            )
            if bar is not None:
                bar.n = bytes_done
                bar.refresh()
    if bar is not None:
        bar.close()
    paths["json"].write_text(json.dumps({**wanted, "complete": True, "docs_done": done_docs, "tokens_done": n_tokens}))


def _document_batches(source: Path, doc_format: str, text_key: str, skip: int) -> Iterator[tuple[list[str], int]]:
    """Batches of documents after the first ``skip``, with the approximate bytes of the source consumed."""
    batch, seen, consumed = [], 0, 0
    for doc in read_documents(source, text_key, doc_format):
        consumed += len(doc.encode("utf-8")) + 1
        seen += 1
        if seen <= skip:
            continue
        batch.append(doc)
        if len(batch) == BATCH_DOCS:
            yield batch, consumed
            batch = []
    if batch:
        yield batch, consumed
