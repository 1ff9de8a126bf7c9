"""Benchmark script: see fabric_tram/bench/gpu_suite.py (also `fabric-tram bench gpu_suite`)."""

from fabric_tram.bench.gpu_suite import main

if __name__ == "__main__":
    main()
