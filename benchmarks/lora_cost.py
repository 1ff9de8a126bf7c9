"""Benchmark script: see fabric_tram/bench/lora_cost.py (also `fabric-tram bench lora_cost`)."""

from fabric_tram.bench.lora_cost import main

if __name__ == "__main__":
    main()
