"""Every durable change to a provider's limit or cooldown, and the events journal.

Admin writes are made durable first and applied in memory only after the commit,
so a failed write leaves the running state as it was. Changes the limiter makes on
its own (a 429 reduction, a restore step) are applied in memory at once and persisted by a
background writer in order, so the request path never waits for the disk.

In cluster mode (`Admission.shared`) the durable settings live in Redis: an admin
write is the Redis write, and this replica's store only journals the events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable

import structlog

from proxy.admission import LimiterEvent
from proxy.runtime.provider import Provider
from proxy.runtime.store import CooldownOverride, Event, LimitOverride, Store

log = structlog.get_logger("sluice")


def now_ms() -> int:
    return int(time.time() * 1000)


Job = Callable[[], Awaitable[None]]


class Control:
    """Owns the order of every write: one writer task runs them in the order they were
    asked for, admin writes and the limiter's own alike, so an older reduction can
    never land after (and over) a newer manual limit."""

    def __init__(self, store: Store, redact: Callable[[str], str] = str) -> None:
        self.store = store
        self._redact = redact
        self._jobs: asyncio.Queue[tuple[Job, asyncio.Future[None] | None] | None] = asyncio.Queue()
        self._writer = asyncio.get_running_loop().create_task(self._write_jobs())

    async def restore(self, providers: Iterable[Provider]) -> dict[str, str]:
        """Apply the durable settings to each provider (stored overrides unless the
        config file changed since they were written; in cluster mode, Redis's). Returns,
        per provider, which source each value came from, for the startup log line.

        A stored value that lost to a changed config value is rebased on it, so that
        changing the config back later cannot revive the stale stored value."""
        stored = await self.store.load()
        sources = {}
        for p in providers:
            overrides = stored.get(p.id)
            sources[p.id] = await p.admission.restore(overrides)
            if overrides is None or p.admission.shared:
                continue
            config = p.config
            if overrides.limit is not None and overrides.limit.config_basis != config.policy.limit:
                rebased = LimitOverride(config.policy.limit, config.policy.limit, False, None, None)
                await self.store.save_limit(p.id, rebased)
            cooldown = overrides.cooldown
            if cooldown is not None and cooldown.config_basis != config.policy.cooldown_ms:
                await self.store.save_cooldown(
                    p.id, CooldownOverride(config.policy.cooldown_ms, config.policy.cooldown_ms)
                )
        return sources

    # ------------------------------------------------------------- admin writes

    async def set_limit(self, provider: Provider, limit: int | None) -> None:
        """A manual limit (None removes it): durable first, then applied."""
        override = LimitOverride(limit, provider.config.policy.limit, False, None, None)
        kind = "limit_set" if limit is not None else "limit_removed"
        detail = f"limit set to {limit} by the admin API" if limit else "limit removed"
        event = Event(now_ms(), provider.id, kind, detail)
        await self._admin_write(
            provider,
            event,
            save=lambda: self.store.save_limit(provider.id, override, event),
            apply=lambda: provider.admission.set_limit(limit),
        )
        log.info(kind, provider=provider.id, limit=limit)

    async def set_cooldown(self, provider: Provider, cooldown_ms: int) -> None:
        override = CooldownOverride(cooldown_ms, provider.config.policy.cooldown_ms)
        event = Event(now_ms(), provider.id, "cooldown_set", f"cooldown set to {cooldown_ms} ms")
        await self._admin_write(
            provider,
            event,
            save=lambda: self.store.save_cooldown(provider.id, override, event),
            apply=lambda: provider.admission.set_cooldown_ms(cooldown_ms),
        )
        log.info("cooldown_set", provider=provider.id, cooldown_ms=cooldown_ms)

    async def _admin_write(
        self, provider: Provider, event: Event, *, save: Job, apply: Job
    ) -> None:
        """`save` (which journals `event`) in order with every other write, then
        `apply` the moment it is durable. In cluster mode `apply` is the durable
        write (Redis) and this replica only journals the event."""
        if provider.admission.shared:
            await apply()
            self._later(lambda: self.store.add_event(event))
            return

        async def write() -> None:
            await save()
            await apply()

        await self._in_order(write)

    # ------------------------------------------------------- limiter's own changes

    def on_limiter_event(self, provider: Provider, event: LimiterEvent) -> None:
        """Journal the event; after a reduction or a restore step, persist the new limit
        and auto-reduce state. Never blocks."""
        # A client chooses its conversation id, which lands in event details: keep
        # any configured secret it carries out of the journal.
        record = Event(now_ms(), provider.id, event.kind, self._redact(event.detail))
        if event.kind in ("rate_limited", "limit_reduced", "slot_reclaimed"):
            log.warning(event.kind, provider=provider.id, detail=event.detail)
        else:
            log.info(event.kind, provider=provider.id, detail=event.detail)
        if event.kind in ("limit_reduced", "limit_restored") and not provider.admission.shared:
            admission = provider.admission

            async def persist() -> None:
                # The state as it is when this write runs, not when it was queued: a
                # manual limit applied in between must not be overwritten.
                override = LimitOverride(
                    admission.limit,
                    provider.config.policy.limit,
                    admission.notice() is not None,
                    admission.auto_reduced_from,
                    admission.notice(),
                )
                await self.store.save_limit(provider.id, override, record)

            self._later(persist)
        else:
            self._later(lambda: self.store.add_event(record))

    def _later(self, job: Job) -> None:
        """Queue a write nobody waits for (failures are logged)."""
        self._jobs.put_nowait((job, None))

    async def _in_order(self, job: Job) -> None:
        """Run `job` after every write queued before it; return once it is done,
        raising what it raised."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait((job, done))
        await done

    async def _write_jobs(self) -> None:
        while (item := await self._jobs.get()) is not None:
            job, done = item
            try:
                await job()
            except Exception as exc:
                if done is None:
                    log.exception("store write failed")
                elif not done.done():
                    done.set_exception(exc)
            else:
                if done is not None and not done.done():
                    done.set_result(None)

    async def close(self) -> None:
        """Finish pending background writes, then close the store."""
        self._jobs.put_nowait(None)
        await self._writer
        await self.store.close()
