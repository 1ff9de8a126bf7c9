"""``fabric-tram run``: ``fabric run`` (Lightning's launcher, torchrun behind it) with its main port checked first.

Two runs started on one machine with ``fabric run`` both take its default port 29400, and the second ends in a
60-line ``DistNetworkError: ... EADDRINUSE`` traceback from torchrun's rendezvous. Here a port left to its
default that is taken is replaced by a free one on a single node (said in one line); a port given on the command
line, or any port of a several-node run (every node must use the same one), is refused in one line with a free
port to use instead. Everything else is ``fabric run``'s, unchanged.
"""

from __future__ import annotations

import socket

DEFAULT_MAIN_PORT = 29400  # lightning.fabric.cli's default --main-port


class PortTaken(OSError):
    """The main port a launch must use is taken on this machine."""


def port_is_free(port: int) -> bool:
    """Whether a server may listen on ``port`` here now (torchrun's store binds every local address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def a_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def option_value(args: list[str], names: tuple[str, ...]) -> str | None:
    """The value of the last ``--name VALUE`` or ``--name=VALUE`` among ``args`` before the script, or None."""
    value = None
    for i, arg in enumerate(args):
        if arg.endswith(".py") and not arg.startswith("-"):
            break  # the script: what follows is its own arguments
        for name in names:
            if arg == name and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    return value


def main_port(args: list[str], is_free=port_is_free, free_port=a_free_port) -> tuple[list[str], str | None]:
    """``args`` with a usable ``--main-port`` (unchanged when the port is free, or on a node other than the main
    one, which connects rather than listens), and a note to print when the port was changed; raises PortTaken
    when a port that must be kept is taken."""
    given = option_value(args, ("--main-port", "--main_port"))
    nodes = int(option_value(args, ("--num-nodes", "--num_nodes")) or 1)
    node_rank = int(option_value(args, ("--node-rank", "--node_rank")) or 0)
    port = int(given) if given is not None else DEFAULT_MAIN_PORT
    if node_rank != 0 or is_free(port):
        return args, None
    other = free_port()
    if given is None and nodes == 1:
        note = f"fabric-tram run: port {port} is taken (another run on this machine?); using --main-port {other}"
        return ["--main-port", str(other), *args], note
    raise PortTaken(
        f"--main-port {port} is taken on this machine (another run, or another program, listens there): give a "
        f"free one, e.g. --main-port {other}" + (", the same on every node" if nodes > 1 else "")
    )


def run(args: list[str]) -> None:
    """Check the port, then hand ``args`` to Lightning's ``fabric run``."""
    from lightning.fabric.cli import _main

    args, note = main_port(list(args))
    if note:
        print(note, flush=True)
    _main.main(["run", *args], prog_name="fabric-tram")
