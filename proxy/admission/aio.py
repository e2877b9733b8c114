"""The limiter seen from asyncio: `await admit(...)` gives a Permit or a Rejection, and
`UsagePolls` runs the usage polls it asks for."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from proxy.admission.limiter import Limiter, Permit, Rejection, Waiter


class Keepalive(Protocol):
    """What a waiting request does every `interval_s` while it is queued: the edge
    sends a queued stream its `: queued position=N` comments. `tick` runs in the
    waiting request's own task, so one task writes the response: no second writer,
    no task of its own per waiter."""

    @property
    def interval_s(self) -> float: ...

    async def tick(self, position: int | None) -> None:
        """`position`: 1-based place in admission order; None if not known now."""
        ...


class Alarm:
    """Wakes a task waiting for `future` after `delay_s`, or when `future` is done,
    whichever comes first: `await alarm.wake`, then `alarm.cancel()`. Not a coroutine
    and not a task: it keeps no frame alive besides the waiting task's own, and costs
    one `call_later` timer."""

    __slots__ = ("_future", "_timer", "wake")

    def __init__(self, future: asyncio.Future[Any], delay_s: float) -> None:
        loop = future.get_loop()
        self.wake: asyncio.Future[None] = loop.create_future()
        self._future = future
        self._timer = loop.call_later(delay_s, self._ring)
        future.add_done_callback(self._ring)

    def _ring(self, *_: object) -> None:
        if not self.wake.done():
            self.wake.set_result(None)

    def cancel(self) -> None:
        self._timer.cancel()
        self._future.remove_done_callback(self._ring)


async def admit(
    limiter: Limiter,
    prompt_started_at: float,
    *,
    conversation_id: str | None = None,
    seq: int | None = None,
    prompt_source: str | None = None,
    client_id: str | None = None,
    keepalive: Keepalive | None = None,
) -> Permit | Rejection:
    """Wait for a slot. If the awaiting task is cancelled (the client left while
    queued) the waiter leaves the queue, and a slot granted in that same instant is
    handed back rather than lost. With `keepalive`, the wait wakes every
    `keepalive.interval_s` to run `keepalive.tick(position)`."""
    future: asyncio.Future[Permit | Rejection] = asyncio.get_running_loop().create_future()

    def on_done(outcome: Permit | Rejection) -> None:
        if not future.done():
            future.set_result(outcome)
        elif isinstance(outcome, Permit):
            outcome.release()  # the waiter's task is gone; nobody will release it

    ticket = limiter.acquire(
        prompt_started_at,
        on_done,
        conversation_id=conversation_id,
        seq=seq,
        prompt_source=prompt_source,
        client_id=client_id,
    )
    if not isinstance(ticket, Waiter):
        return ticket
    try:
        while keepalive is not None and not future.done():
            alarm = Alarm(future, keepalive.interval_s)
            try:
                await alarm.wake
            finally:
                alarm.cancel()
            if not future.done():
                await keepalive.tick(limiter.position(ticket))
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
