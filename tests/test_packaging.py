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


def test_every_dev_tool_is_pinned_by_the_constraints_file():
    """The README's dev install takes ``-c constraints.txt``: each package of the ``dev`` extra is pinned there (==),
    so that a new machine tests with the versions the suite passed with, not with whatever is newest that day."""
    import configparser
    import re

    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    dev = [re.split(r"[<>=!\[ ;]", line.strip())[0] for line in setup["options.extras_require"]["dev"].splitlines()]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    for name in filter(None, dev):
        assert re.fullmatch(r"[0-9][0-9A-Za-z.]*", pins.get(name.lower().replace("_", "-"), "")), name
    assert "torch" not in pins  # its CPU or CUDA build is the user's choice, installed first
