"""The limiter seen from asyncio: `await admit(...)` gives a Permit or a Rejection."""

from __future__ import annotations

import asyncio

from proxy.admission.limiter import Limiter, Permit, Rejection, Waiter


async def admit(
    limiter: Limiter,
    prompt_started_at: float,
    *,
    conversation_id: str | None = None,
    seq: int | None = None,
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

    ticket = limiter.acquire(prompt_started_at, on_done, conversation_id=conversation_id, seq=seq)
    if not isinstance(ticket, Waiter):
        return ticket
    try:
        return await future
    except BaseException:
        ticket.cancel()
        raise
