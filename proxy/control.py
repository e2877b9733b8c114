"""Every durable change to a provider's limit or cooldown, and the events journal.

Admin writes are made durable first and applied in memory only after the commit,
so a failed write leaves the running state as it was. Changes the limiter makes on
its own (a 429 reduction) are applied in memory at once and persisted by a
background writer in order, so the request path never waits for the disk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable

import structlog

from proxy.admission import LimiterEvent
from proxy.providers import Provider
from proxy.store import CooldownOverride, Event, LimitOverride, Store

log = structlog.get_logger("sluice")


def now_ms() -> int:
    return int(time.time() * 1000)


class Control:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._jobs: asyncio.Queue[Callable[[], Awaitable[None]] | None] = asyncio.Queue()
        self._writer = asyncio.get_running_loop().create_task(self._write_jobs())

    async def restore(self, providers: Iterable[Provider]) -> dict[str, str]:
        """Apply stored overrides unless the config file changed since they were
        written (the operator's newer intent wins). Returns, per provider, which
        source each value came from, for the startup log line."""
        stored = await self.store.load()
        sources: dict[str, str] = {}
        for provider in providers:
            config = provider.config
            limiter = provider.limiter
            overrides = stored.get(provider.id)
            limit_source = cooldown_source = "config"
            if overrides is not None and overrides.limit is not None:
                o = overrides.limit
                if o.config_basis == config.limit:
                    limit_source = "store"
                    if o.auto_reduced and o.limit is not None:
                        limiter.restore_auto_reduced(o.limit, o.auto_reduced_from)
                    else:
                        limiter.set_limit(o.limit)
                else:
                    limit_source = "config (changed since the stored value)"
            if overrides is not None and overrides.cooldown is not None:
                c = overrides.cooldown
                if c.config_basis == config.cooldown_ms:
                    cooldown_source = "store"
                    limiter.set_cooldown_ms(c.cooldown_ms)
                else:
                    cooldown_source = "config (changed since the stored value)"
            sources[provider.id] = (
                f"limit={limiter.limit} ({limit_source}), "
                f"cooldown_ms={limiter.policy.cooldown_ms} ({cooldown_source})"
            )
        return sources

    # ------------------------------------------------------------- admin writes

    async def set_limit(self, provider: Provider, limit: int | None) -> None:
        """A manual limit (None removes it): durable first, then applied."""
        override = LimitOverride(limit, provider.config.limit, False, None, None)
        kind = "limit_set" if limit is not None else "limit_removed"
        detail = f"limit set to {limit} by the admin API" if limit else "limit removed"
        await self.store.save_limit(
            provider.id, override, Event(now_ms(), provider.id, kind, detail)
        )
        provider.limiter.set_limit(limit)
        log.info(kind, provider=provider.id, limit=limit)

    async def set_cooldown(self, provider: Provider, cooldown_ms: int) -> None:
        override = CooldownOverride(cooldown_ms, provider.config.cooldown_ms)
        event = Event(now_ms(), provider.id, "cooldown_set", f"cooldown set to {cooldown_ms} ms")
        await self.store.save_cooldown(provider.id, override, event)
        provider.limiter.set_cooldown_ms(cooldown_ms)
        log.info("cooldown_set", provider=provider.id, cooldown_ms=cooldown_ms)

    # ------------------------------------------------------- limiter's own changes

    def on_limiter_event(self, provider: Provider, event: LimiterEvent) -> None:
        """Journal the event; after a reduction, persist the new limit. Never blocks."""
        record = Event(now_ms(), provider.id, event.kind, event.detail)
        if event.kind in ("rate_limited", "limit_reduced", "slot_reclaimed"):
            log.warning(event.kind, provider=provider.id, detail=event.detail)
        else:
            log.info(event.kind, provider=provider.id, detail=event.detail)
        if event.kind == "limit_reduced":
            limiter = provider.limiter
            override = LimitOverride(
                limiter.limit,
                provider.config.limit,
                True,
                limiter.auto_reduced_from,
                limiter.notice(),
            )
            self._jobs.put_nowait(lambda: self.store.save_limit(provider.id, override, record))
        else:
            self._jobs.put_nowait(lambda: self.store.add_event(record))

    async def _write_jobs(self) -> None:
        while (job := await self._jobs.get()) is not None:
            try:
                await job()
            except Exception:
                log.exception("store write failed")

    async def close(self) -> None:
        """Finish pending background writes, then close the store."""
        self._jobs.put_nowait(None)
        await self._writer
        await self.store.close()
