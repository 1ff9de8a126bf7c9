"""An exclusive lock on a file, held across processes (every rank of every node that sees the folder): what is
prepared once per folder — a token cache, an unpacked dataset — is prepared by the first to take the lock while
the others wait, then read complete. On folders local to each node, each node prepares its own."""

from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
