"""SIGTERM and Ctrl-C end a run with a checkpoint, not a loss: what a cluster scheduler sends before preemption.

The handler records the signal and says at once what will happen; the step loop checks it between steps, saves
a checkpoint (every rank) and stops with :class:`TrainingInterrupted`, which the CLI and the recipes turn into one
line and exit status 128 + the signal's number. ``trainer.resume=auto`` then continues exactly. A second Ctrl-C
stops at once (the first restores the previous handler), saying which checkpoint a resume would start from.
Several processes agree on stopping where the host already waits for the device, on logged steps
(``trainer.log_every``, every step by default): each rank may be signalled at another step, and all must save
the same one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """The run stopped on a signal after saving a checkpoint; the message says how to continue."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """The first stop signal received (its number), or 0."""

    def __init__(self):
        self.signum = 0

    def agreed(self, fabric) -> int:
        """The signal any rank received (the largest number), the same on every rank; a collective when there
        are several processes, so call it at the same steps on every rank."""
        if fabric.world_size == 1:
            return self.signum
        flag = torch.tensor(float(self.signum), device=fabric.device)
        return int(fabric.all_reduce(flag, reduce_op="max").item())


@contextlib.contextmanager
def stop_on_signals():
    """Record SIGTERM/SIGINT in a :class:`StopRequest` for the duration (only the main thread can install
    handlers: elsewhere nothing is installed and the request stays empty)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def record(signum, frame):
        request.signum = request.signum or signum
        signal.signal(signum, previous[signum])  # a second one acts as it would have without us
        if os.environ.get("RANK", "0") == "0":  # said at once: a long step would otherwise look like no answer
            again = " (Ctrl-C again: stop at once, without it)" if signum == signal.SIGINT else ""
            print(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping{again}",
                  file=sys.stderr, flush=True)  # fmt: skip

    for s in STOP_SIGNALS:
        signal.signal(s, record)
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
