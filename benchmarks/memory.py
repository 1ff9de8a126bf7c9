"""Benchmark script: see fabric_tram/bench/memory.py (also `fabric-tram bench memory`)."""

from fabric_tram.bench.memory import main

if __name__ == "__main__":
    main()
