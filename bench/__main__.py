"""Run every benchmark module `bench/bench_*.py` (or the ones named): `python -m bench [NAME ...]`.

NAME is the part after `bench_`, e.g. `python -m bench sampler`.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from collections.abc import Sequence

import bench
from bench.common import describe_machine


def discover() -> list[str]:
    """Names (without the `bench_` prefix) of the benchmark modules in this package, sorted."""
    return sorted(
        info.name.removeprefix("bench_")
        for info in pkgutil.iter_modules(bench.__path__)
        if info.name.startswith("bench_")
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks in turn; a failing one is reported and the rest still run."""
    available = discover()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {available}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(available))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available}")
    print(f"machine: {describe_machine()}")
    failed = []
    for name in args.names or available:
        print(f"\n=== bench_{name} ===", flush=True)
        start = time.perf_counter()
        try:
            importlib.import_module(f"bench.bench_{name}").main()
        except Exception as error:  # report and go on: one broken bench must not hide the rest
            failed.append(name)
            print(f"bench_{name} failed: {type(error).__name__}: {error}", file=sys.stderr)
        print(f"=== bench_{name}: {time.perf_counter() - start:.1f} s ===", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
