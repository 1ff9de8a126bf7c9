"""Benchmark script: see fabric_tram/bench/images.py (also `fabric-tram bench images`)."""

from fabric_tram.bench.images import main

if __name__ == "__main__":
    main()
