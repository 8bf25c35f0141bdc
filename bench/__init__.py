"""Benchmarks: every figure is a ratio against a baseline measured in the same run.

A benchmark is a module `bench/bench_NAME.py` with a `main() -> None` that prints its table;
`python -m bench` discovers and runs them all (`python -m bench NAME ...` runs a few). Shared
helpers (timing, machine description, tables) live in `bench.common`.
"""
