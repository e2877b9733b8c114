"""The request bodies held by requests waiting in a queue, bounded in total
(`server.max_queued_body_bytes`).

A queued request keeps its whole body (for the upstream, and for a transparent
retry after a 429), and a queue can hold thousands of requests: without a bound,
bodies of a few MiB each would take the process's memory long before `max_queue`
refused anyone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Generator
from typing import Any, Generic, TypeVar

from proxy.errors import QueueFull

T = TypeVar("T")


class QueuedBodies:
    """Counts `held`, the bytes of the bodies of requests now waiting for a slot, in
    every provider's queue of this process."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def wait(self, size: int, admission: Awaitable[T]) -> Awaitable[T]:
        """`await admission` with `size` bytes counted for exactly as long as it waits.

        A request granted at once (the admission returns without suspending) never
        counts. One that would wait, and would bring `held` above `limit`, leaves the
        queue at once and raises `QueueFull` (503, Retry-After). The count is given
        back however the wait ends: a slot, a rejection, the client gone (the task
        cancelled), an error."""
        return _Waiting(self, size, admission)

    def __repr__(self) -> str:
        return f"QueuedBodies(held={self.held}, limit={self.limit})"


class _Waiting(Generic[T]):
    """`await admission`, stepped by hand so the first step shows whether it waits.

    What `await` does for a coroutine, written out: each future the admission yields
    goes to the task, each value or exception the task sends back goes to the
    admission."""

    __slots__ = ("_admission", "_bodies", "_size")

    def __init__(self, bodies: QueuedBodies, size: int, admission: Awaitable[T]) -> None:
        self._bodies = bodies
        self._size = size
        self._admission = admission

    def __await__(self) -> Generator[Any, Any, T]:
        waiting = self._admission.__await__()
        try:
            step = waiting.send(None)
        except StopIteration as granted:
            result: T = granted.value  # a slot (or a rejection) at once: never queued
            return result
        bodies, size = self._bodies, self._size
        if bodies.held + size > bodies.limit:
            # Leave the queue now: the admission's own cleanup runs on GeneratorExit
            # as on a cancellation (both catch BaseException).
            waiting.close()
            raise QueueFull(
                f"the request bodies waiting in the queues would go over "
                f"server.max_queued_body_bytes ({bodies.limit} bytes); retry later",
                retry_after_s=1,
            )
        bodies.held += size
        try:
            while True:
                try:
                    sent = yield step
                except BaseException as exc:  # a cancellation, or the task closing us
                    step = waiting.throw(exc)
                else:
                    step = waiting.send(sent)
        except StopIteration as done:
            outcome: T = done.value
            return outcome
        finally:
            bodies.held -= size


__all__ = ["QueuedBodies"]
