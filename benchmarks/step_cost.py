"""Benchmark script: see fabric_tram/bench/step_cost.py (also `fabric-tram bench step_cost`)."""

from fabric_tram.bench.step_cost import main

if __name__ == "__main__":
    main()
