"""``python -m fabric_tram.cli``: the ``fabric-tram`` command (the sweep starts its runs this way)."""

from fabric_tram.cli import main

main()
