"""Run-time assets (GPT-2 BPE files, the sample corpus) are package data: a wheel install finds them too."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_tokenizer_and_sample_corpus(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("fabric_tram-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "fabric_tram/assets/tokenizers/gpt2/vocab.json",
        "fabric_tram/assets/tokenizers/gpt2/merges.txt",
        "fabric_tram/assets/data/sample/licenses/train.txt",
        "fabric_tram/assets/data/sample/python-docs/validation.txt",
    ):
        assert needed in names
    metadata = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License: Apache-2.0" in text or "Apache-2.0" in text
    assert "Requires-Dist: torch>=2.4" in text  # a range: an installed torch is kept


def test_the_code_is_formatted_and_lint_clean():
    """ruff, configured in pyproject.toml (a dev dependency): `ruff check .` and `ruff format --check .`."""
    for args in (["check", "."], ["format", "--check", "."]):
        out = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]
