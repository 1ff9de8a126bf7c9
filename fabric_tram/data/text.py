"""Text corpora laid out one folder per domain: ``DATA/<domain>/<split>.txt`` or ``.jsonl``.

``.txt``: documents separated by blank lines (``doc_format="paragraphs"``) or one per line (``"lines"``, as
M2D2). ``.jsonl``: one JSON object per line with a text field. ``valid`` is accepted for ``validation``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

SPLIT_SUFFIXES = (".jsonl", ".txt")
SPLIT_ALIASES = {"validation": ("validation", "valid"), "train": ("train",), "test": ("test",)}
DOC_FORMATS = ("paragraphs", "lines")


class DataError(ValueError):
    """Bad or missing data; the message names the file (and line) and the fix."""


def discover_domains(data_dir: str | Path) -> list[str]:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data folder {str(root)!r} does not exist; set task.data_dir to a folder with one sub-folder per domain"
        )
    domains = sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and any(split_file(p, s, must_exist=False) for s in ("train", "validation", "test"))
    )
    if not domains:
        raise DataError(
            f"data folder {str(root)!r} holds no domain: "
            "expected <domain>/train.txt (or .jsonl), validation, test files"
        )
    return domains


def split_file(domain_dir: Path, split: str, must_exist: bool = True) -> Path | None:
    for name in SPLIT_ALIASES.get(split, (split,)):
        for suffix in SPLIT_SUFFIXES:
            path = domain_dir / f"{name}{suffix}"
            if path.is_file():
                return path
    if must_exist:
        raise DataError(
            f"domain {domain_dir.name!r} has no {split} split: expected {domain_dir / (split + '.txt')} or .jsonl"
        )
    return None


def not_utf8(path: Path, err: UnicodeDecodeError) -> DataError:
    """The error for a file that is not UTF-8, naming its line and byte (re-read from the file: a decoding
    error raised while streaming counts from the start of the buffer, not of the file)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        start = err.start
    except UnicodeDecodeError as whole:
        start = whole.start
    line = data.count(b"\n", 0, start) + 1
    return DataError(
        f"{path}:{line}: byte {start} (0x{data[start]:02x}) is not UTF-8 ({err.reason}); re-encode the file as "
        "UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove those bytes"
    )


def utf8_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file; any other encoding is a DataError naming the file, line and byte."""
    try:
        with path.open(encoding="utf-8") as fh:
            yield from fh
    except UnicodeDecodeError as err:
        raise not_utf8(path, err) from None


def jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) of each non-blank line; a corrupt line is a DataError naming file and line."""
    for lineno, line in enumerate(utf8_lines(path), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: corrupt JSON line ({err.msg}); fix or remove that line") from None


def read_documents(path: Path, text_key: str = "text", doc_format: str = "paragraphs") -> Iterator[str]:
    if doc_format not in DOC_FORMATS:
        raise DataError(f"task.doc_format={doc_format!r} is not one of {', '.join(DOC_FORMATS)}")
    if path.suffix == ".jsonl":
        for lineno, record in jsonl_records(path):
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string field {text_key!r} (task.text_key)")
            yield record[text_key]
    elif doc_format == "lines":
        for line in utf8_lines(path):
            if line.strip():
                yield line.rstrip("\n")
    else:
        document: list[str] = []
        for line in utf8_lines(path):
            if line.strip():
                document.append(line.rstrip("\n"))
            elif document:
                yield "\n".join(document)
                document = []
        if document:
            yield "\n".join(document)
