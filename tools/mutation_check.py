"""Plant known bugs, one at a time, in a temporary copy of the repository and expect the tests to catch each.

    python tools/mutation_check.py            # every mutation; exit 1 if any survives
    python tools/mutation_check.py --list     # what would be planted
    python tools/mutation_check.py --only mesa-ema-decay,no-clipping

Each mutation is an exact edit (the original text must occur exactly once, so a refactor that moves the code
makes the check fail loudly instead of passing vacuously) and the tests that must then fail. The copy is
imported first (PYTHONPATH), so the installed package is never touched. A new rule or a refactor that weakens
the suite shows up here as a surviving mutation.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutations import MUTATIONS, Mutation  # noqa: E402  (the list of planted bugs)

ROOT = Path(__file__).resolve().parents[1]


def copy_repository(target: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")  # fmt: skip
    for name in filter(None, files):
        source = ROOT / name
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():  # e.g. the bundled tokenizers: a link kept as a link
            os.symlink(os.readlink(source), target / name)
        elif source.is_file():
            shutil.copy2(source, target / name)


def plant(copy: Path, mutation: Mutation) -> None:
    for file, original, planted in mutation.edits:
        path = copy / file
        text = path.read_text()
        if text.count(original) != 1:
            raise SystemExit(
                f"mutation {mutation.name!r}: {file} holds the original text {text.count(original)} "
                f"times (expected once); update tools/mutation_check.py to the moved code:\n{original}"
            )
        path.write_text(text.replace(original, planted))


# a test failure with one of these means the edit broke the code (a stale or mistyped mutation), not that the
# tests caught a bug: it proves nothing and stops the check
BROKEN_MUTANT = (
    r"^E\s+(NameError|SyntaxError|IndentationError|ImportError|ModuleNotFoundError|AttributeError|TypeError)"
)


def warm_imports() -> None:
    """Import once, in this process, what every test process imports before it reaches fabric_tram (torch,
    Lightning, transformers, pytest: ~9 s): each mutant's tests then run in a fork of this process."""
    import lightning.fabric  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401


def run_tests(copy: Path, tests: tuple[str, ...], env: dict) -> tuple[int, str]:
    """pytest on ``tests`` of the mutant ``copy``: in a fork of this (warm) process where the OS has fork, else in
    a fresh interpreter. fabric_tram itself is never imported here, so the fork imports the mutant's."""
    args = ["-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist", *tests]
    if not hasattr(os, "fork"):
        out = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=copy, env=env, capture_output=True,
                             text=True, timeout=900)  # fmt: skip
        return out.returncode, out.stdout + out.stderr
    log = copy / "mutant.log"
    pid = os.fork()
    if pid == 0:  # the child: the mutant's tree first on the path, output to the log, pytest in-process
        code = 3
        try:
            os.chdir(copy)
            os.environ.clear()
            os.environ.update(env)
            sys.path.insert(0, str(copy))
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            import pytest

            code = int(pytest.main(args))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), log.read_text() if log.is_file() else ""


def run(mutation: Mutation) -> tuple[bool, float, str]:
    """True if the planted bug is caught: the named tests fail (on an assertion, or on the error the bug causes)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-") as tmp:
        copy = Path(tmp)
        copy_repository(copy)
        plant(copy, mutation)
        env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        returncode, output = run_tests(copy, mutation.tests, env)
        tail = "\n".join(output.strip().splitlines()[-3:])
        if returncode not in (0, 1):  # 1: tests failed; anything else (collection error, crash) is no verdict
            raise SystemExit(f"mutation {mutation.name!r}: pytest exited {returncode}:\n{output[-5000:]}")
        if returncode == 1 and re.search(BROKEN_MUTANT, output, re.MULTILINE):
            raise SystemExit(f"mutation {mutation.name!r} broke the code itself:\n{output[-3000:]}")
        return returncode == 1, time.perf_counter() - t0, tail


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--only", default="", help="comma-separated mutation names")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only.split(",")]
    if args.only and len(chosen) != len(args.only.split(",")):
        raise SystemExit(f"unknown mutation in {args.only!r}; known: {', '.join(m.name for m in MUTATIONS)}")
    if args.list:
        for m in chosen:
            print(f"{m.name:<34} {m.why}  [{', '.join(m.tests)}]")
        return 0
    warm_imports()
    survivors = []
    for m in chosen:
        caught, seconds, tail = run(m)
        print(f"{'caught  ' if caught else 'SURVIVED'} {m.name:<34} {seconds:5.1f} s  {m.why}", flush=True)
        if not caught:
            survivors.append(m.name)
            print("   " + tail.replace("\n", "\n   "))
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} planted bugs caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
