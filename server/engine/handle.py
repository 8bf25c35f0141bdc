"""The caller's side of a submitted job: a future and a way to cancel it."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

from server.engine.errors import JobCancelled


def resolve(
    future: concurrent.futures.Future[Any],
    result: object = None,
    error: BaseException | None = None,
) -> bool:
    """Set a future's outcome unless it already has one; returns whether this call set it.

    Both the loop and `JobHandle.cancel()` may race to resolve a future; the first wins and the
    other is a no-op, so no caller ever sees `InvalidStateError`.
    """
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        return False
    return True


class JobHandle:
    """A submitted job.

    Attributes:
        job_id: The engine's id of the job (for logs).
        future: Resolves to a SampleResult or LikelihoodResult, or raises an EngineError.
            Cancelling the future itself also frees the job's rows (it then raises
            CancelledError rather than JobCancelled).
    """

    def __init__(
        self,
        job_id: int,
        future: concurrent.futures.Future[Any],
        request_cancel: Callable[[int], None],
    ) -> None:
        self.job_id = job_id
        self.future = future
        self._request_cancel = request_cancel

    def cancel(self) -> None:
        """Cancel the job: the future raises JobCancelled now; its rows leave at the next iteration.

        Cancelling a finished job does nothing.
        """
        if resolve(self.future, error=JobCancelled(f"job {self.job_id} was cancelled")):
            self._request_cancel(self.job_id)
