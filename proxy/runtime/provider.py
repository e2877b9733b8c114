"""A configured provider at run time: its config, upstream client and admission, wired.

`Admission` (`proxy.runtime.seam`) is the one seam between the edge and a provider's
admission state: `LocalAdmission` here puts the single-process `Limiter` behind it; in
cluster mode the app hands `Provider` a factory that builds the Redis-backed one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from proxy.admission import Limiter, LimiterCounters, LimiterEvent, LimiterStatus
from proxy.admission.aio import Keepalive, UsagePolls, admit
from proxy.admission.limiter import Permit, Rejection, WaiterInfo
from proxy.runtime.seam import Admission, ClusterView
from proxy.runtime.store import ProviderOverrides
from proxy.settings import ProviderConfig
from proxy.upstream.client import Upstream
from proxy.upstream.transport import Transport


class LocalAdmission:
    """Single-process mode: the pure `Limiter` behind `Admission`, nothing more."""

    shared = False

    def __init__(self, config: ProviderConfig, limiter: Limiter) -> None:
        self.config = config
        self.limiter = limiter

    @property
    def provider_id(self) -> str:
        return self.limiter.provider_id

    @property
    def limit(self) -> int | None:
        return self.limiter.limit

    @property
    def cooldown_ms(self) -> int:
        return self.limiter.policy.cooldown_ms

    @property
    def auto_reduced_from(self) -> int | None:
        return self.limiter.auto_reduced_from

    @property
    def counters(self) -> LimiterCounters:
        return self.limiter.counters

    def notice(self) -> str | None:
        return self.limiter.notice()

    def next_seq(self) -> int:
        return self.limiter.next_seq()

    def admit(
        self,
        prompt_started_at: float,
        *,
        conversation_id: str | None = None,
        seq: int | None = None,
        prompt_source: str | None = None,
        client_id: str | None = None,
        keepalive: Keepalive | None = None,
    ) -> Awaitable[Permit | Rejection]:
        return admit(
            self.limiter,
            prompt_started_at,
            conversation_id=conversation_id,
            seq=seq,
            prompt_source=prompt_source,
            client_id=client_id,
            keepalive=keepalive,
        )

    async def waiters(self, offset: int, limit: int) -> list[WaiterInfo]:
        return self.limiter.waiters(offset, limit)

    async def set_limit(self, limit: int | None) -> None:
        self.limiter.set_limit(limit)

    async def set_cooldown_ms(self, cooldown_ms: int) -> None:
        self.limiter.set_cooldown_ms(cooldown_ms)

    async def restore(self, stored: ProviderOverrides | None) -> str:
        """Apply stored overrides unless the config file changed since they were
        written (the operator's newer intent wins)."""
        config = self.config
        limiter = self.limiter
        limit_source = cooldown_source = "config"
        if stored is not None and stored.limit is not None:
            o = stored.limit
            if o.config_basis == config.policy.limit:
                limit_source = "store"
                if o.auto_reduced and o.limit is not None:
                    limiter.restore_auto_reduced(o.limit, o.auto_reduced_from)
                else:
                    limiter.set_limit(o.limit)
            else:
                limit_source = "config (changed since the stored value)"
        if stored is not None and stored.cooldown is not None:
            c = stored.cooldown
            if c.config_basis == config.policy.cooldown_ms:
                cooldown_source = "store"
                limiter.set_cooldown_ms(c.cooldown_ms)
            else:
                cooldown_source = "config (changed since the stored value)"
        return (
            f"limit={limit_text(limiter.limit)} ({limit_source}), "
            f"cooldown_ms={limiter.policy.cooldown_ms} ({cooldown_source})"
        )

    async def status(self) -> LimiterStatus:
        return self.limiter.status()

    def snapshot(self) -> LimiterStatus:
        return self.limiter.status()

    def cluster(self) -> ClusterView | None:
        return None

    async def close(self) -> None:
        self.limiter.close()


def limit_text(limit: int | None) -> str:
    """A limit as the startup line shows it."""
    return "unlimited" if limit is None else str(limit)


AdmissionFactory = Callable[
    [ProviderConfig, Callable[[], Awaitable[int | None]], Callable[[LimiterEvent], None]],
    Admission,
]
"""Builds a provider's admission from its config, its usage poll and its event sink:
how cluster mode (wired by the app) replaces the single-process `LocalAdmission`."""


class Provider:
    """Owns one upstream client and one admission; `close()` releases both."""

    def __init__(
        self,
        config: ProviderConfig,
        *,
        loop: asyncio.AbstractEventLoop,
        transport: Transport | None = None,
        ca_bundle: str = "",
        on_event: Callable[[Provider, LimiterEvent], None] | None = None,
        admission: AdmissionFactory | None = None,
        observe_queue_wait: Callable[[float], None] | None = None,
        observe_ttfb: Callable[[float], None] | None = None,
    ) -> None:
        self.config = config
        self.id = config.id
        self.id_bytes = config.id.encode()
        self.observe_queue_wait = observe_queue_wait or _ignore
        self.observe_ttfb = observe_ttfb or _ignore
        self.admitted_paths = frozenset(path.rstrip("/") for path in config.policy.admitted_paths)
        self.upstream = Upstream(config, transport=transport, ca_bundle=ca_bundle)
        self._polls = UsagePolls(loop, self.upstream.poll_usage)
        self._on_event = on_event
        self.admission: Admission
        if admission is not None:
            self.admission = admission(config, self.upstream.poll_usage, self._event)
            return
        limiter = Limiter(
            config.id,
            config.policy,
            clock=loop.time,
            scheduler=loop.call_later,
            poll_usage=self._polls,
            on_event=self._event,
        )
        self.admission = LocalAdmission(config, limiter)

    def admits(self, method: str, path: str) -> bool:
        """Whether a request takes a slot: only POST to an admitted path."""
        return method == "POST" and path.rstrip("/") in self.admitted_paths

    def _event(self, event: LimiterEvent) -> None:
        if self._on_event is not None:
            self._on_event(self, event)

    async def close(self) -> None:
        await self.admission.close()
        self._polls.cancel()
        await self.upstream.close()


def _ignore(_: float) -> None:
    pass
