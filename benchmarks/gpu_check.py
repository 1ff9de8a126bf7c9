"""Benchmark script: see fabric_tram/bench/gpu_check.py (also `fabric-tram bench gpu_check`)."""

from fabric_tram.bench.gpu_check import main

if __name__ == "__main__":
    main()
