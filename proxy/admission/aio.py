"""The limiter seen from asyncio: `await admit(...)` gives a Permit or a Rejection, and
`UsagePolls` runs the usage polls it asks for."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from proxy.admission.limiter import Limiter, Permit, Rejection, Waiter


async def admit(
    limiter: Limiter,
    prompt_started_at: float,
    *,
    conversation_id: str | None = None,
    seq: int | None = None,
    client_id: str | None = None,
) -> Permit | Rejection:
    """Wait for a slot. If the awaiting task is cancelled (the client left while
    queued) the waiter leaves the queue, and a slot granted in that same instant is
    handed back rather than lost."""
    future: asyncio.Future[Permit | Rejection] = asyncio.get_running_loop().create_future()

    def on_done(outcome: Permit | Rejection) -> None:
        if not future.done():
            future.set_result(outcome)
        elif isinstance(outcome, Permit):
            outcome.release()  # the waiter's task is gone; nobody will release it

    ticket = limiter.acquire(
        prompt_started_at, on_done, conversation_id=conversation_id, seq=seq, client_id=client_id
    )
    if not isinstance(ticket, Waiter):
        return ticket
    try:
        return await future
    except BaseException:
        ticket.cancel()
        raise


class UsagePolls:
    """The limiter asks for a usage poll with a callback (the core does no I/O); this
    runs each poll as a task and always answers, even when the poll failed in a way
    nobody foresaw: a poll that never answered would block the usage gate for good."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, poll: Callable[[], Awaitable[int | None]]
    ) -> None:
        self._loop = loop
        self._poll = poll
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, done: Callable[[int | None], None]) -> None:
        task = self._loop.create_task(self._answer(done))
        self._tasks.add(task)  # keep a reference until it finishes
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, done: Callable[[int | None], None]) -> None:
        try:
            sessions = await self._poll()
        except Exception:
            sessions = None
        done(sessions)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()
