"""Tokenised-split cache (built once, rebuilt for another tokenizer, resumable) and M2D2 from a hub cache offline."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from fabric_tram.data import token_cache
from fabric_tram.data.tokenizer import GPT2_EOT, load_tokenizer


def test_cache_is_built_once_and_matches_direct_tokenisation(corpus, tmp_path):
    source = corpus / "alpha" / "train.txt"
    first = token_cache.tokenize_split(source, cache_root=tmp_path, progress=False)
    (meta_file,) = tmp_path.glob("*.json")
    stamp = meta_file.stat().st_mtime_ns
    again = token_cache.tokenize_split(source, cache_root=tmp_path, progress=False)
    assert meta_file.stat().st_mtime_ns == stamp  # read, not rebuilt
    tok = load_tokenizer("gpt2")
    expected = [
        t for doc in source.read_text().split("\n\n") if doc.strip() for t in tok.encode(doc.strip()).ids + [GPT2_EOT]
    ]
    assert np.asarray(first.tokens).tolist() == expected == np.asarray(again.tokens).tolist()
    assert isinstance(first.tokens, np.memmap)  # memory-mapped, not loaded


def test_cache_of_another_tokenizer_is_rebuilt(corpus, tmp_path):
    source = corpus / "alpha" / "train.txt"
    built = np.asarray(token_cache.tokenize_split(source, cache_root=tmp_path, progress=False).tokens).copy()
    (meta_file,) = tmp_path.glob("*.json")
    meta = json.loads(meta_file.read_text())
    meta["tokenizer"] = "32000:[1, 2, 3]"  # as if written by another tokenizer
    meta_file.write_text(json.dumps(meta))
    (tokens_file,) = tmp_path.glob("*.tokens")
    tokens_file.write_bytes(b"\x00\x01" * 10)  # and holding other ids
    rebuilt = token_cache.tokenize_split(source, cache_root=tmp_path, progress=False)
    assert np.asarray(rebuilt.tokens).tolist() == built.tolist()
    assert json.loads(meta_file.read_text())["tokenizer"] != "32000:[1, 2, 3]"


def test_interrupted_tokenisation_resumes(corpus, tmp_path, monkeypatch):
    source = corpus / "alpha" / "train.txt"
    monkeypatch.setattr(token_cache, "BATCH_DOCS", 7)
    reference = np.asarray(
        token_cache.tokenize_split(source, cache_root=tmp_path / "ref", progress=False).tokens
    ).copy()
    tok = load_tokenizer("gpt2")
    calls = {"n": 0}
    real = type(tok).encode_batch

    def crash_on_third(self, docs, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("stopped (simulated)")
        return real(self, docs, *a, **k)

    monkeypatch.setattr(type(tok), "encode_batch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        token_cache.tokenize_split(source, cache_root=tmp_path / "run", progress=False)
    (meta_file,) = (tmp_path / "run").glob("*.json")
    meta = json.loads(meta_file.read_text())
    assert meta["complete"] is False and meta["docs_done"] == 14  # two batches kept
    calls["n"] = -100  # no more crashes
    resumed = token_cache.tokenize_split(source, cache_root=tmp_path / "run", progress=False)
    assert np.asarray(resumed.tokens).tolist() == reference.tolist()
    assert calls["n"] == -100 + 4  # only the remaining batches (40 documents: 2 done, 4 more) were tokenised


def _archive(domain: str, lines: dict) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for split, text in lines.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{domain}/{split}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_m2d2_domains_load_offline_from_a_hub_cache(tmp_path):
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "datasets--machelreid--m2d2"
    (repo / "snapshots" / rev / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    words = "the proof of the theorem follows from the lemma and the bound on the norm of the operator"
    for domain in ("math_l1", "Art"):
        text = "\n".join(f"{words} {domain} {i}" for i in range(30)) + "\n"
        (repo / "snapshots" / rev / "data" / f"{domain}.tar.gz").write_bytes(
            _archive(domain, {"train": text, "valid": text[:400], "test": text[:400]})
        )
    code = (
        "from fabric_tram.config import load_config; from fabric_tram.registry import TASKS;"
        "c = load_config(None, ['model.name=gpt2', 'task.name=lm', 'optimizer.name=adam',"
        " 'task.data_dir=hf://machelreid/m2d2', 'task.train_domains=[math_l1]', 'task.eval_domains=[math_l1,Art]',"
        " 'task.doc_format=lines', 'task.block_size=16']);"
        "t = TASKS.build('lm', c.task); print(len(t.train_set), sorted(t.eval_sets('validation')))"
    )
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "FABRIC_TRAM_CACHE": str(tmp_path / "ft"),
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    n, domains = out.stdout.strip().split(" ", 1)
    assert int(n) > 10 and domains == "['Art', 'math_l1']"
    assert (tmp_path / "ft" / "m2d2" / "machelreid--m2d2" / "math_l1" / "valid.txt").is_file()
    bad = code.replace("[math_l1]", "[mathematics]")
    out = subprocess.run([sys.executable, "-c", bad], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "M2D2 domain 'mathematics'" in out.stderr and "math_l1" in out.stderr
