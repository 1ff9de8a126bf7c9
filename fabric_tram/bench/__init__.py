"""Benchmarks (plain scripts in benchmarks/, also `fabric-tram bench NAME`): they print tables and write JSON."""
