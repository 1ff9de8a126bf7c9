"""The suite catches planted bugs (tools/mutation_check.py): every mutation still applies to the current code, and,
in the slow run, each planted bug makes its tests fail on an assertion."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import mutation_check  # noqa: E402


def test_every_mutation_still_applies_to_the_code_once():
    for mutation in mutation_check.MUTATIONS:
        for file, original, _ in mutation.edits:
            assert (ROOT / file).read_text().count(original) == 1, (mutation.name, file, original)
        for test in mutation.tests:
            assert (ROOT / test.split("::")[0]).is_file(), (mutation.name, test)


@pytest.mark.slow
def test_the_suite_catches_every_planted_bug():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "mutation_check.py")], capture_output=True, text=True,
                         timeout=1500)  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert f"{len(mutation_check.MUTATIONS)} of {len(mutation_check.MUTATIONS)} planted bugs caught" in out.stdout
