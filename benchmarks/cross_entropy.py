"""Benchmark script: see fabric_tram/bench/cross_entropy.py (also `fabric-tram bench cross_entropy`)."""

from fabric_tram.bench.cross_entropy import main

if __name__ == "__main__":
    main()
