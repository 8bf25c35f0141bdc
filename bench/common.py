"""Helpers shared by the benchmarks: best-of timing, the machine line and ratio tables."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Measurement:
    """Best wall time of one benchmarked variant.

    Attributes:
        name: Variant label.
        seconds: Best (minimum) wall time over the repetitions.
        items: Work items per run (e.g. samples), for the throughput column.
        cpu_seconds: Best process CPU time over the repetitions, if measured: on a loaded
            machine it varies far less than wall time (waiting for a core is not counted).
    """

    name: str
    seconds: float
    items: int
    cpu_seconds: float | None = None

    @property
    def rate(self) -> float:
        """Items per second of wall time."""
        return self.items / self.seconds


def best_of(fn: Callable[[], object], reps: int = 3, warmup: int = 1) -> float:
    """Minimum wall time of `fn` over `reps` runs after `warmup` untimed runs.

    The minimum is the least noisy estimate on a shared machine: interference only adds time.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def best_of_interleaved(
    fns: Sequence[Callable[[], object]], reps: int = 3, warmup: int = 1
) -> list[float]:
    """Minimum wall time of each of `fns`, run in turn (A B A B ...) `reps` times.

    Interleaving spreads any drift in the machine's load over every candidate alike, so their
    ratios stay fair where back-to-back blocks of runs would not.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    for _ in range(warmup):
        for fn in fns:
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for index, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def describe_machine() -> str:
    """One line: CPU architecture, logical cores, torch version and intra-op threads."""
    processor = platform.processor() or platform.machine()
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    return (
        f"{processor}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, {cuda}, Python {platform.python_version()}"
    )


def print_table(
    title: str, measurements: Sequence[Measurement], baseline: str, unit: str = "samples/s"
) -> None:
    """Print throughput and the ratio against the `baseline` variant of the same run."""
    base = next(m for m in measurements if m.name == baseline)
    print(f"\n{title}")
    width = max(len(m.name) for m in measurements) + 2
    for m in measurements:
        ratio = m.rate / base.rate
        line = f"  {m.name:<{width}} {m.rate:12,.0f} {unit}  {m.seconds:8.3f} s  x{ratio:5.2f}"
        if m.cpu_seconds is not None and base.cpu_seconds is not None:
            line += f"   cpu {m.cpu_seconds:8.3f} s  x{base.cpu_seconds / m.cpu_seconds:5.2f}"
        print(line)
    print(f"  (ratios against '{baseline}', best of the repetitions, same run; x > 1 is faster)")
