"""Errors a job's future can raise; the servicer maps each to one gRPC status code."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine reports through a job's future or submit()."""


class QueueFull(EngineError):
    """submit() would put more than `max_rows_queued` rows in the queue (RESOURCE_EXHAUSTED)."""


class EngineClosed(EngineError):
    """The engine is draining or shut down and admits no new job (UNAVAILABLE)."""


class JobCancelled(EngineError):
    """The job was cancelled by its handle or failed at shutdown (CANCELLED)."""


class JobDeadlineExceeded(EngineError):
    """The job's deadline passed before it finished (DEADLINE_EXCEEDED)."""


class BackendFailed(EngineError):
    """A network call that held rows of this job raised; `__cause__` is the original error."""
