"""Benchmark script: see fabric_tram/bench/profile_step.py."""

from fabric_tram.bench.profile_step import main

if __name__ == "__main__":
    main()
