"""Benchmark script: see fabric_tram/bench/radius_every.py (also `fabric-tram bench radius_every`)."""

from fabric_tram.bench.radius_every import main

if __name__ == "__main__":
    main()
