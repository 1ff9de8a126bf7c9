"""The engine: Fabric set-up, the step contract, training/evaluation loops, checkpoints, monitoring."""
