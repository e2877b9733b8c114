"""A configured provider at run time: its config, upstream client and limiter, wired."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from proxy.admission import Limiter, LimiterEvent, Policy
from proxy.settings import ProviderConfig
from proxy.upstream import Upstream


class Provider:
    """Owns one upstream client and one limiter; `close()` releases both."""

    def __init__(
        self,
        config: ProviderConfig,
        *,
        loop: asyncio.AbstractEventLoop,
        transport: httpx.AsyncBaseTransport | None = None,
        ca_bundle: str = "",
        on_event: Callable[[Provider, LimiterEvent], None] | None = None,
    ) -> None:
        self.config = config
        self.id = config.id
        self.id_bytes = config.id.encode()
        # Replaced by histogram observers when metrics are wired (app.py).
        self.observe_queue_wait: Callable[[float], None] = _ignore
        self.observe_ttfb: Callable[[float], None] = _ignore
        self.admitted_paths = frozenset(path.rstrip("/") for path in config.admitted_paths)
        self.upstream = Upstream(config, transport=transport, ca_bundle=ca_bundle)
        self._loop = loop
        self._polls: set[asyncio.Task[None]] = set()
        self._on_event = on_event
        self.limiter = Limiter(
            config.id,
            Policy(
                limit=config.limit,
                cooldown_ms=config.cooldown_ms,
                slot_timeout_s=config.slot_timeout_s,
                watchdog_interval_s=config.watchdog_interval_s,
                pause_s=config.pause_s,
                usage_poll_interval_ms=config.usage_poll_interval_ms,
                queue_timeout_s=config.queue_timeout_s,
                max_queue=config.max_queue,
                usage_gate=config.usage_gate,
            ),
            clock=loop.time,
            scheduler=loop.call_later,
            poll_usage=self._poll_usage,
            on_event=self._event,
        )

    def admits(self, method: str, path: str) -> bool:
        """Whether a request takes a slot: only POST to an admitted path."""
        return method == "POST" and path.rstrip("/") in self.admitted_paths

    def _event(self, event: LimiterEvent) -> None:
        if self._on_event is not None:
            self._on_event(self, event)

    def _poll_usage(self, done: Callable[[int | None], None]) -> None:
        async def poll() -> None:
            done(await self.upstream.poll_usage())

        task = self._loop.create_task(poll())
        self._polls.add(task)  # keep a reference until it finishes
        task.add_done_callback(self._polls.discard)

    async def close(self) -> None:
        self.limiter.close()
        for task in list(self._polls):
            task.cancel()
        await self.upstream.close()


def _ignore(_: float) -> None:
    pass
