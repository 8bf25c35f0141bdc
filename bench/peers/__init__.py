"""Benchmark peers: other serving stacks run against the same model, started from the main venv."""
