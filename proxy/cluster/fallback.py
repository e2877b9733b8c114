"""What a replica admits while Redis is unreachable: fail safe, not open.

Each replica enforces `ceil(limit / replicas last seen)` on its own with the pure
single-process `Limiter`, so together they stay near the global limit without
talking to each other. Slots held when Redis went away keep counting: each takes a
local slot (or, past the share, waits for one ahead of every real waiter, so no new
request is admitted until the replica is back under its share).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
from collections.abc import Awaitable, Callable
from typing import Final

from proxy.admission import Limiter, LimiterEvent, Permit, Rejection, Waiter
from proxy.admission.aio import UsagePolls
from proxy.settings import ProviderConfig

NEVER_S: Final = 10.0**9
"""The local queue timeout: the cluster admission enforces each waiter's own deadline."""


def share(limit: int | None, replicas: int) -> int | None:
    """This replica's part of `limit`: ceil(limit / replicas last seen). Never having
    seen Redis, it cannot know how many replicas there are: it assumes the worst."""
    if limit is None:
        return None
    if replicas <= 0:
        return 1
    return math.ceil(limit / replicas)


class LocalShare:
    """A pure `Limiter` with this replica's share of the limit."""

    def __init__(
        self,
        config: ProviderConfig,
        *,
        share: int | None,
        cooldown_ms: int,
        loop: asyncio.AbstractEventLoop,
        poll_usage: Callable[[], Awaitable[int | None]],
        on_event: Callable[[LimiterEvent], None],
    ) -> None:
        self.share = share
        self._polls = UsagePolls(loop, poll_usage)
        self._holds = itertools.count(-1, -1)  # seqs for held slots, never a request's
        self.limiter = Limiter(
            config.id,
            dataclasses.replace(
                config.policy, limit=share, cooldown_ms=cooldown_ms, queue_timeout_s=NEVER_S
            ),
            clock=loop.time,
            scheduler=loop.call_later,
            poll_usage=self._polls,
            on_event=on_event,
        )

    def hold(self, client_id: str | None = None) -> Permit | Waiter | None:
        """Count a slot admitted before Redis went away (toward its client's cap too).
        Past the share it waits at the very front of the line (prompt start -inf): the
        slot is in use either way, and a real waiter gets a slot only once this replica
        is under its share again."""
        ticket = self.limiter.acquire(
            -math.inf, _ignore, seq=next(self._holds), client_id=client_id
        )
        return None if isinstance(ticket, Rejection) else ticket

    def acquire(
        self,
        prompt_started_at: float,
        on_done: Callable[[Permit | Rejection], None],
        *,
        conversation_id: str | None,
        seq: int,
        prompt_source: str | None = None,
        client_id: str | None = None,
    ) -> Permit | Waiter | Rejection:
        return self.limiter.acquire(
            prompt_started_at,
            on_done,
            conversation_id=conversation_id,
            seq=seq,
            prompt_source=prompt_source,
            client_id=client_id,
        )

    def close(self) -> None:
        self.limiter.close()
        self._polls.cancel()


def release_local(ticket: Permit | Waiter | None) -> None:
    """Give back a local slot or a held slot's place in the local line."""
    if isinstance(ticket, Permit):
        ticket.release()
    elif isinstance(ticket, Waiter):
        ticket.cancel()  # hands back the permit if it was granted meanwhile


def _ignore(_: Permit | Rejection) -> None:
    pass
