"""Two CPU processes (`fabric run --devices 2`, one retry when a rank is killed at exit) or two "nodes" on this
machine, for the equivalence and fault tests."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(args: list[str], fresh: tuple[Path, ...] = (), cwd=None, timeout=600, check=True):
    """``fabric run --devices 2 --accelerator cpu ARGS``; asserts success (unless ``check`` is false) and returns
    the finished process.

    A launch killed by a signal is retried once, after removing the ``fresh`` folders, and reported with the
    output lines that may name the cause (the whole output is kept beside them). The SIGABRT seen about once in
    thirty launches is a rank aborting at exit, after all its work ("terminate called without an active
    exception": gloo threads meeting interpreter finalization, pytorch/pytorch#190489).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        cmd = [sys.executable, "-m", "lightning.fabric.cli", "--devices", "2", "--accelerator", "cpu"]
        proc = subprocess.run(
            [*cmd, "--main-port", str(free_port()), *args], env=env, cwd=cwd, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        killed = "SIGABRT" in proc.stderr or "SIGSEGV" in proc.stderr
        if proc.returncode == 0 or not killed or attempt == 1:
            break
        output = proc.stdout + proc.stderr
        pattern = r"abort|malloc|terminate|what\(\)|corrupt|gloo|Connection"
        clues = [line for line in output.splitlines() if re.search(pattern, line, re.IGNORECASE)]
        kept = Path(fresh[0] if fresh else ".").resolve().parent / "killed-launch-output.txt"
        kept.write_text(output)
        warnings.warn(
            "2-process launch killed by a signal, retrying once; lines that may name the cause:\n"
            + "\n".join(clues[:30]) + f"\n(whole output in {kept})",
            stacklevel=2,
        )  # fmt: skip
        for folder in fresh:
            shutil.rmtree(folder, ignore_errors=True)
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def launch_two_nodes(args: list[str], node_dirs: list[Path], node_env: list[dict], timeout=600) -> list:
    """Two "nodes" on this machine: ``fabric run --accelerator cpu --devices 1 --num-nodes 2 --node-rank R
    --main-address 127.0.0.1 --main-port P ARGS``, one process per node, started together, each in its own
    working folder with its own environment (``node_env[R]``: node-local caches). Returns the two finished
    processes (returncode, stdout, stderr), node 0 first."""
    port = free_port()
    procs = []
    for rank, (folder, env) in enumerate(zip(node_dirs, node_env, strict=True)):
        Path(folder).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "lightning.fabric.cli", "--accelerator", "cpu", "--devices", "1",
               "--num-nodes", "2", "--node-rank", str(rank), "--main-address", "127.0.0.1", "--main-port", str(port),
               *args]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=folder, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    finished = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        finished.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return finished
