"""`admit()` on a real asyncio loop: immediate grant, cancellation while queued, and
the race where a grant and a cancellation land in the same loop iteration.

The loop's own clock and `call_later` drive the limiter; the tests never sleep,
they only yield (`asyncio.sleep(0)`) so the waiting tasks reach their `await`.
"""

from __future__ import annotations

import asyncio

import pytest

from proxy.admission.aio import admit
from proxy.admission.limiter import Limiter, Permit, Policy, Rejection


def make_limiter(limit: int) -> Limiter:
    loop = asyncio.get_running_loop()
    return Limiter(
        "prov",
        Policy(limit=limit, cooldown_ms=0),
        clock=loop.time,
        scheduler=loop.call_later,
    )


async def settle() -> None:
    """Let every ready task run up to its next await."""
    for _ in range(5):
        await asyncio.sleep(0)


def permit_of(outcome: Permit | Rejection) -> Permit:
    assert isinstance(outcome, Permit), outcome
    return outcome


async def granted(task: asyncio.Task[Permit | Rejection]) -> Permit:
    """The task's permit, which must already be there (a lost slot fails, not hangs)."""
    await settle()
    assert task.done(), "the waiter was not granted"
    return permit_of(task.result())


async def test_admit_returns_a_permit_at_once_under_the_limit() -> None:
    limiter = make_limiter(2)
    permit = permit_of(await admit(limiter, 1.0, conversation_id="c1"))
    assert permit.conversation_id == "c1"
    assert limiter.status().in_flight == 1
    permit.release()
    assert limiter.status().in_flight == 0


async def test_queued_admit_completes_when_a_slot_is_released() -> None:
    limiter = make_limiter(1)
    held = permit_of(await admit(limiter, 1.0))
    task = asyncio.create_task(admit(limiter, 2.0))
    await settle()
    assert not task.done()
    assert limiter.status().queued == 1
    held.release()
    permit = await granted(task)
    assert limiter.status().queued == 0
    permit.release()
    assert limiter.status().in_flight == 0


async def test_cancelled_admit_leaves_the_queue_and_the_slot_goes_to_the_next() -> None:
    limiter = make_limiter(1)
    held = permit_of(await admit(limiter, 1.0))
    leaving = asyncio.create_task(admit(limiter, 2.0))
    staying = asyncio.create_task(admit(limiter, 3.0))
    await settle()
    assert limiter.status().queued == 2
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert limiter.status().queued == 1
    held.release()
    permit = await granted(staying)
    assert limiter.status().queued == 0
    permit.release()
    assert limiter.status().in_flight == 0


async def test_grant_then_cancel_before_the_task_resumes_hands_the_slot_back() -> None:
    limiter = make_limiter(1)
    held = permit_of(await admit(limiter, 1.0))
    raced = asyncio.create_task(admit(limiter, 2.0))
    nxt = asyncio.create_task(admit(limiter, 3.0))
    await settle()
    held.release()  # grants `raced` (its future gets the permit) ...
    raced.cancel()  # ... and its client leaves before the task has resumed
    with pytest.raises(asyncio.CancelledError):
        await raced
    permit = await granted(nxt)  # the slot went on instead of being lost
    status = limiter.status()
    assert (status.in_flight, status.queued) == (1, 0)
    permit.release()
    assert limiter.status().in_flight == 0


async def test_cancel_then_grant_before_the_task_resumes_hands_the_slot_back() -> None:
    limiter = make_limiter(1)
    held = permit_of(await admit(limiter, 1.0))
    raced = asyncio.create_task(admit(limiter, 2.0))
    nxt = asyncio.create_task(admit(limiter, 3.0))
    await settle()
    raced.cancel()  # the waiter is still queued: the task has not run its cleanup
    held.release()  # so the grant lands on a cancelled future
    with pytest.raises(asyncio.CancelledError):
        await raced
    permit = await granted(nxt)
    status = limiter.status()
    assert (status.in_flight, status.queued) == (1, 0)
    permit.release()
    assert limiter.status().in_flight == 0


class Ticks:
    """A keepalive that records the positions it is told, and lets a test wait for
    the n-th tick."""

    interval_s = 0.01

    def __init__(self) -> None:
        self.positions: list[int | None] = []
        self.ticked = asyncio.Event()

    async def tick(self, position: int | None) -> None:
        self.positions.append(position)
        self.ticked.set()

    async def until(self, n: int) -> None:
        while len(self.positions) < n:
            self.ticked.clear()
            await asyncio.wait_for(self.ticked.wait(), 5)


async def test_keepalive_ticks_with_the_place_in_line_until_admitted() -> None:
    limiter = make_limiter(1)
    holder = permit_of(await admit(limiter, 1.0))
    ahead = asyncio.create_task(admit(limiter, 2.0))
    ticks = Ticks()
    task = asyncio.create_task(admit(limiter, 3.0, keepalive=ticks))
    await ticks.until(2)
    holder.release()  # `ahead` goes first; this one is next
    await settle()
    permit_of(ahead.result()).release()
    permit = await granted(task)
    assert ticks.positions[:2] == [2, 2]
    assert set(ticks.positions[2:]) <= {1}
    count = len(ticks.positions)
    await asyncio.sleep(0.05)
    assert len(ticks.positions) == count  # no tick once admitted
    permit.release()


async def test_keepalive_never_ticks_for_a_request_admitted_at_once() -> None:
    limiter = make_limiter(1)
    ticks = Ticks()
    permit = permit_of(await admit(limiter, 1.0, keepalive=ticks))
    await asyncio.sleep(0.05)
    assert ticks.positions == []
    permit.release()


async def test_cancelled_while_ticking_leaves_the_queue() -> None:
    limiter = make_limiter(1)
    holder = permit_of(await admit(limiter, 1.0))
    ticks = Ticks()
    task = asyncio.create_task(admit(limiter, 2.0, keepalive=ticks))
    await ticks.until(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert limiter.status().queued == 0
    holder.release()
    assert limiter.status().in_flight == 0
