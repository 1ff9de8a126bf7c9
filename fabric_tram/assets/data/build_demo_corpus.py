"""Rebuild the demo corpus ``demo/<domain>/{train,validation,test}.txt`` from Debian packages (no install needed):

    python fabric_tram/assets/data/build_demo_corpus.py        # needs apt-get and dpkg (Debian 12)

It runs ``apt-get download`` and ``dpkg -x`` into a temporary folder, extracts plain text, shuffles documents
with a fixed seed and writes about 1 MB of training text per domain (documents separated by blank lines).
Sources and licences are listed in README.md beside this file.
"""

from __future__ import annotations

import gzip
import random
import re
import subprocess
import tempfile
import zlib
from pathlib import Path

OUT = Path(__file__).parent / "demo"
PACKAGES = ["sword-text-web", "dict-jargon", "dict-wn", "python3.11-doc"]
TRAIN_BYTES, EVAL_BYTES = 1_000_000, 100_000
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def unpack(packages: list[str], work: Path) -> Path:
    subprocess.run(["apt-get", "download", *packages], cwd=work, check=True, capture_output=True)
    root = work / "root"
    for deb in sorted(work.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def bible_documents(root: Path) -> list[str]:
    """World English Bible from the SWORD zText module: blocks (.bzs/.bzz), verses (.bzv); 8 verses a document."""
    module = next((root / "usr/share/sword/modules/texts/ztext").iterdir())
    verses = []
    for testament in ("ot", "nt"):
        index = (module / f"{testament}.bzs").read_bytes()
        data = (module / f"{testament}.bzz").read_bytes()
        blocks = []
        for i in range(0, len(index), 12):
            offset, size = int.from_bytes(index[i : i + 4], "little"), int.from_bytes(index[i + 4 : i + 8], "little")
            blocks.append(zlib.decompress(data[offset : offset + size]))
        vindex = (module / f"{testament}.bzv").read_bytes()
        for i in range(0, len(vindex), 10):
            block = int.from_bytes(vindex[i : i + 4], "little")
            start, size = (
                int.from_bytes(vindex[i + 4 : i + 8], "little"),
                int.from_bytes(vindex[i + 8 : i + 10], "little"),
            )
            if size and block < len(blocks):
                text = re.sub(r"<[^>]*>", "", blocks[block][start : start + size].decode("utf-8", "ignore"))
                text = re.sub(r"\s+", " ", text).strip()
                if text:
                    verses.append(text)
    return [" ".join(verses[i : i + 8]) for i in range(0, len(verses), 8)]


def _b64(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 64 + B64.index(ch)
    return value


def dictd_documents(root: Path, name: str, min_words: int = 15) -> list[str]:
    """Entries of a dictd database (``name.index`` + ``name.dict.dz``), whitespace-normalised."""
    folder = root / "usr/share/dictd"
    data = gzip.open(folder / f"{name}.dict.dz").read()
    docs = []
    for line in (folder / f"{name}.index").read_text(encoding="utf-8", errors="ignore").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database"):
            continue
        entry = data[_b64(parts[1]) : _b64(parts[1]) + _b64(parts[2])].decode("utf-8", "ignore")
        entry = re.sub(r"\s+", " ", entry).strip()
        if len(entry.split()) >= min_words:
            docs.append(entry)
    return docs


def python_manual_documents(root: Path) -> list[str]:
    """Prose paragraphs of the Python 3.11 manual's reStructuredText sources (code and directives dropped)."""
    sources = root / "usr/share/doc/python3.11/html/_sources"
    docs = []
    for path in sorted(sources.glob("*/*.rst.txt")):
        if path.parent.name not in ("tutorial", "howto", "faq", "library", "reference", "using", "extending"):
            continue
        for para in path.read_text(encoding="utf-8", errors="ignore").split("\n\n"):
            lines = para.splitlines()
            if (
                not lines
                or para.startswith((" ", "\t", "..", ">>>", "=", "-", "*", "+", "|"))
                or ":" == para.strip()[-1:]
            ):
                continue
            text = " ".join(line.strip() for line in lines)
            text = re.sub(r":[a-z:]+:`~?([^`<]*?)(?: <[^>]*>)?`", r"\1", text)
            text = re.sub(r"``([^`]*)``", r"\1", text).replace("`", "")
            text = re.sub(r"\s+", " ", text).strip()
            if len(text.split()) >= 12:
                docs.append(text)
    return docs


def write_domain(name: str, docs: list[str], seed: int = 0) -> None:
    rng = random.Random(seed)
    docs = list(dict.fromkeys(docs))  # drop duplicates, keep order
    rng.shuffle(docs)
    out, budget = (
        {"validation": [], "test": [], "train": []},
        {"validation": EVAL_BYTES, "test": EVAL_BYTES, "train": TRAIN_BYTES},
    )
    for doc in docs:
        for split in ("validation", "test", "train"):
            if budget[split] > 0:
                out[split].append(doc)
                budget[split] -= len(doc.encode()) + 2
                break
    (OUT / name).mkdir(parents=True, exist_ok=True)
    for split, items in out.items():
        (OUT / name / f"{split}.txt").write_text("\n\n".join(items) + "\n", encoding="utf-8")
    print(f"{name}: " + ", ".join(f"{split} {len(items)} documents" for split, items in out.items()))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = unpack(PACKAGES, Path(tmp))
        write_domain("bible", bible_documents(root))
        write_domain("jargon", dictd_documents(root, "jargon"))
        write_domain("wordnet", dictd_documents(root, "wn"))
        write_domain("python-manual", python_manual_documents(root))


if __name__ == "__main__":
    main()
