"""The seam between the edge and a provider's admission: `Admission`, the `Slot` it
hands out, and the views status and metrics read.

`proxy.runtime.provider.LocalAdmission` puts the single-process `Limiter` behind it;
in cluster mode `proxy.cluster.admission.ClusterAdmission` keeps the state in Redis.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Literal, Protocol

from proxy.admission import LimiterCounters, LimiterStatus
from proxy.admission.aio import Keepalive
from proxy.admission.limiter import Rejection, WaiterInfo
from proxy.admission.reduce import Answer
from proxy.runtime.store import ProviderOverrides


class Slot(Protocol):
    """A held slot: release it exactly once in a `finally`; releasing again is harmless.
    A 429 is reported on the slot itself (as Netflix's limiter listeners do), so the
    admission that handed it out gets it back without a cast."""

    def release(self) -> None: ...

    async def rate_limited(self, retry_after_s: float | None, answer: Answer | None = None) -> None:
        """The upstream answered 429 to this slot's request: pause, maybe reduce (as
        `reduce_on_429` judges `answer`), release."""
        ...


@dataclass(frozen=True)
class InstanceLoad:
    """One replica's share of the cluster-wide figures."""

    instance_id: str
    in_flight: int
    queued: int


@dataclass(frozen=True)
class ClusterView:
    """How this replica takes part in cluster mode, for status and metrics."""

    mode: Literal["redis", "fallback"]
    instance_id: str
    replicas: int  # replicas last seen alive (0: never reached Redis)
    local_limit: int | None  # the share this replica enforces alone, in fallback mode
    instances: tuple[InstanceLoad, ...]


class Admission(Protocol):
    """A provider's admission as the edge sees it, in one process or in a cluster.

    `shared` says where the durable settings live: False, the SQLite store (the
    caller persists before applying); True, Redis (`set_limit` is the durable write
    and the store only journals events)."""

    @property
    def provider_id(self) -> str: ...
    @property
    def shared(self) -> bool: ...
    @property
    def limit(self) -> int | None: ...
    @property
    def cooldown_ms(self) -> int: ...
    @property
    def auto_reduced_from(self) -> int | None: ...
    @property
    def counters(self) -> LimiterCounters: ...
    def notice(self) -> str | None: ...
    def next_seq(self) -> int: ...

    def admit(
        self,
        prompt_started_at: float,
        *,
        conversation_id: str | None = None,
        seq: int | None = None,
        prompt_source: str | None = None,
        client_id: str | None = None,
        keepalive: Keepalive | None = None,
    ) -> Awaitable[Slot | Rejection]:
        """Wait for a slot (or a rejection). Cancelling the wait leaves the queue, and a
        slot granted in that same instant is handed back. `prompt_source` and
        `client_id` label the waiter in the queue listing; `keepalive.tick` runs every
        `keepalive.interval_s` while the request waits."""
        ...

    async def waiters(self, offset: int, limit: int) -> list[WaiterInfo]:
        """The queued requests in admission order, from place `offset + 1` on, at
        most `limit` (cluster-wide in cluster mode)."""
        ...

    async def set_limit(self, limit: int | None) -> None: ...
    async def set_cooldown_ms(self, cooldown_ms: int) -> None: ...

    async def restore(self, stored: ProviderOverrides | None) -> str:
        """Apply the durable settings at start; returns where each value came from."""
        ...

    async def status(self) -> LimiterStatus:
        """Fresh figures (cluster-wide in cluster mode)."""
        ...

    def snapshot(self) -> LimiterStatus:
        """Figures without waiting (for metrics): in cluster mode, the last ones read."""
        ...

    def cluster(self) -> ClusterView | None:
        """None in single-process mode."""
        ...

    async def close(self) -> None: ...
