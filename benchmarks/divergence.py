"""Benchmark script: see fabric_tram/bench/divergence.py (also `fabric-tram bench divergence`)."""

from fabric_tram.bench.divergence import main

if __name__ == "__main__":
    main()
