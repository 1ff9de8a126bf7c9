"""Rebuild the small bundled sample corpus (``sample/<domain>/{train,validation,test}.txt``) from text on a
Debian/Python machine. Run: ``python fabric_tram/assets/data/build_sample.py``. Sources and licences: README.md.

Domains:
- ``licenses``: the licence texts of Debian's ``base-files`` (/usr/share/common-licenses); verbatim copying of
  these texts is permitted by each of them.
- ``python-docs``: docstrings of the Python standard library (PSF License 2.0).
"""

from __future__ import annotations

import importlib
import inspect
import random
import warnings
from pathlib import Path

OUT = Path(__file__).parent / "sample"
LICENSES = ["Apache-2.0", "GPL-3", "LGPL-3", "GFDL-1.3", "MPL-2.0", "Artistic", "BSD", "CC0-1.0"]
PY_MODULES = [
    "json",
    "argparse",
    "collections",
    "pathlib",
    "functools",
    "itertools",
    "subprocess",
    "logging",
    "datetime",
    "decimal",
    "fractions",
    "statistics",
    "random",
    "string",
    "textwrap",
    "difflib",
    "csv",
    "email",
    "http.client",
    "urllib.parse",
    "shutil",
    "tempfile",
    "threading",
    "queue",
    "asyncio",
    "inspect",
    "typing",
    "dataclasses",
    "enum",
    "heapq",
    "bisect",
    "contextlib",
    "unittest",
    "zipfile",
]


def licence_documents() -> list[str]:
    docs = []
    for name in LICENSES:
        path = Path("/usr/share/common-licenses") / name
        if path.is_file():
            docs += [p.strip() for p in path.read_text(errors="ignore").split("\n\n") if len(p.split()) >= 8]
    return docs


def python_documents() -> list[str]:
    docs = []
    warnings.simplefilter("ignore")
    for module_name in PY_MODULES:
        module = importlib.import_module(module_name)
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
            if doc and len(doc.split()) >= 8 and getattr(obj, "__module__", "").startswith(module_name.split(".")[0]):
                docs.append(doc.strip())
    return sorted(set(docs))


def write_domain(name: str, docs: list[str], seed: int = 0) -> None:
    random.Random(seed).shuffle(docs)
    n = len(docs)
    splits = {"validation": docs[: n // 10], "test": docs[n // 10 : n // 5], "train": docs[n // 5 :]}
    (OUT / name).mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        text = "\n\n".join(d.replace("\n\n", "\n") for d in items) + "\n"
        (OUT / name / f"{split}.txt").write_text(text)
    print(name, {k: len(v) for k, v in splits.items()})


if __name__ == "__main__":
    write_domain("licenses", licence_documents())
    write_domain("python-docs", python_documents())
