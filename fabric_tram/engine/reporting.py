"""How a launch ends on bad input or a fault: one line ``error: <Type>: <what to do>`` on stderr and exit status 1
for bad input (no traceback; ``FABRIC_TRAM_DEBUG=1`` shows it); a fault keeps its traceback. Under ``fabric run``
the line is also written to torchrun's error file, so the launcher's failure summary, printed last on each node,
ends with it; a process that stopped because another one died says so instead of printing gloo's or NCCL's
message alone."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from fabric_tram.contracts import ContractError
from fabric_tram.engine.launch import PortTaken

# what bad input raises: one line that names the problem and the fix, no traceback (FABRIC_TRAM_DEBUG=1 shows it)
USER_ERRORS = (
    ContractError,  # a plugin's model or task lacks a member the engine needs (a TypeError, not a fault of ours)
    PortTaken,  # fabric-tram run: the main port is taken
    ValueError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    ModuleNotFoundError,
    FloatingPointError,
    ChildProcessError,
)


def error_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return f"error: {type(err).__name__}: {text}"


@contextlib.contextmanager
def reported_errors():
    """Bad input ends every launch form (``fabric-tram``, ``python recipes/X.py``, ``fabric run``) in the same one
    line on stderr and exit status 1. Under ``fabric run`` the line is also recorded for the launcher, whose
    failure summary, printed last, then shows it."""
    from fabric_tram.engine.interrupt import TrainingInterrupted

    try:
        yield
    except TrainingInterrupted as stopped:  # a checkpoint was saved: say how to continue, exit as the signal would
        line = f"stopped: {stopped}"
        record_for_the_launcher(line)
        print(line, file=sys.stderr, flush=True)
        sys.exit(128 + stopped.signum)
    except KeyboardInterrupt:  # Ctrl-C outside the step loop (setup, evaluation): nothing of it was kept
        line = "stopped: interrupted by Ctrl-C before training or after it, while nothing was being saved"
        record_for_the_launcher(line)
        print(line, file=sys.stderr, flush=True)
        sys.exit(130)
    except USER_ERRORS as err:
        if os.environ.get("FABRIC_TRAM_DEBUG"):
            raise
        line = error_line(err)
        record_for_the_launcher(line)
        print(line, file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception as err:  # a fault, not bad input: the traceback is shown, and the launcher's summary names it
        record_for_the_launcher(error_line(err) if not peer_lost(err) else PEER_LOST + f" ({err})")
        raise


# what gloo and NCCL say when another process of the job died: this process then stops too
PEER_LOST_SIGNS = ("Connection closed by peer", "Connection reset by peer", "remote process exited", "Broken pipe")
PEER_LOST = (
    "error: another process of this run failed, so this one stopped (its connection to the others closed): the "
    "root cause is in the failing node's log, whose launcher summary names it"
)


def peer_lost(err: BaseException) -> bool:
    return any(sign in str(err) for sign in PEER_LOST_SIGNS)


def record_for_the_launcher(line: str) -> None:
    """torchrun (behind ``fabric run``) ends a failed launch with a summary of each failed process, read from the
    file its ``TORCHELASTIC_ERROR_FILE`` names: the one line, in place of a traceback, is what it shows last."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
        Path(path).write_text(json.dumps(record))
