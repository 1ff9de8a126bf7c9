"""Benchmark script: see fabric_tram/bench/engine_overhead.py (also `fabric-tram bench engine_overhead`)."""

from fabric_tram.bench.engine_overhead import main

if __name__ == "__main__":
    main()
