"""Batching policies: which queued jobs start now, and when finished jobs are answered.

A policy only decides; the engine does the work. Each is a few numbers and one rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

from server.engine.api import EngineConfig

T = TypeVar("T")


class BatchingPolicy(Protocol):
    """Admission and delivery rules of the engine loop."""

    def admit(self, queued: Iterable[tuple[int, int]], running_rows: int) -> int:
        """How many jobs at the head of the queue to admit now (arrival order is kept).

        Args:
            queued: `(rows, network rows per evaluation)` of each queued job, oldest first.
            running_rows: Rows admitted and not yet finished.
        """
        ...

    def deliver(self, finished: list[T], running_rows: int) -> list[T]:
        """Which finished jobs to answer now; the rest are held and offered again later."""
        ...


class StepPolicy:
    """Step-level continuous batching.

    Rule: admit jobs in arrival order while the rows in flight stay within `max_rows_in_flight`
    (a job larger than that is admitted alone when nothing runs, so it cannot starve); admitted
    rows join the next network call, and a job is answered as soon as its last step is done.

    Args:
        max_rows_in_flight: Cap on admitted rows.
    """

    def __init__(self, max_rows_in_flight: int) -> None:
        self.max_rows_in_flight = max_rows_in_flight

    def admit(self, queued: Iterable[tuple[int, int]], running_rows: int) -> int:
        """Head-of-line admission under the in-flight cap."""
        admitted = 0
        for rows, _width in queued:
            if running_rows > 0 and running_rows + rows > self.max_rows_in_flight:
                break
            running_rows += rows
            admitted += 1
        return admitted

    def deliver(self, finished: list[T], running_rows: int) -> list[T]:
        """Answer every finished job at once."""
        return finished


class RequestPolicy:
    """Request-level batching, as a dynamic batcher in front of a whole-request model does.

    Rule: only when nothing runs, admit jobs in arrival order while their network rows (a guided
    row counts two) fit one call of `max_rows_per_call` (at least one job); answer them all when
    the last of the batch is done. Rows that finish early leave the network calls, which only
    flatters this baseline.

    Args:
        max_rows_per_call: Network rows of one batch.
    """

    def __init__(self, max_rows_per_call: int) -> None:
        self.max_rows_per_call = max_rows_per_call

    def admit(self, queued: Iterable[tuple[int, int]], running_rows: int) -> int:
        """Start a new batch only when the previous one is done."""
        if running_rows > 0:
            return 0
        admitted = network_rows = 0
        for rows, width in queued:
            if admitted > 0 and network_rows + rows * width > self.max_rows_per_call:
                break
            network_rows += rows * width
            admitted += 1
        return admitted

    def deliver(self, finished: list[T], running_rows: int) -> list[T]:
        """Hold results until the whole batch is done."""
        return finished if running_rows == 0 else []


def make_policy(config: EngineConfig) -> BatchingPolicy:
    """The policy named by `config.policy`."""
    if config.policy == "step":
        return StepPolicy(config.max_rows_in_flight)
    if config.policy == "request":
        return RequestPolicy(config.max_rows_per_call)
    raise ValueError(f"policy must be 'step' or 'request', got {config.policy!r}")
