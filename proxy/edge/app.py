"""The application: wires config, providers, store, relay and admin routes together.

Proxied paths (`/v1/...`, `/{provider}/v1/...`) go straight from the ASGI entry to
the relay; everything else (admin, health, metrics) is a small Starlette app.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import structlog
from starlette.applications import Starlette

from proxy.edge import admin
from proxy.edge.clients import ClientKeys
from proxy.edge.logs import Redactor
from proxy.edge.metrics import Metrics
from proxy.edge.relay import Receive, Relay, Scope, Send, send_error
from proxy.edge.routing import Router
from proxy.errors import HTTPError
from proxy.runtime.control import Control
from proxy.runtime.prompt_times import LocalPromptTimes, PromptTimes
from proxy.runtime.provider import AdmissionFactory, Provider
from proxy.runtime.store import Store
from proxy.settings import (
    ProviderConfig,
    Settings,
    resolve_clients,
    resolve_providers,
    secrets,
)
from proxy.upstream.transport import Transport

if TYPE_CHECKING:
    from proxy.cluster.hub import ClusterHub

log = structlog.get_logger("sluice")


class Sluice:
    """The ASGI application. Providers and the store exist between lifespan start and end."""

    def __init__(
        self,
        settings: Settings,
        *,
        transport: Callable[[ProviderConfig], Transport] | None = None,
    ) -> None:
        self.settings = settings
        self.configs: list[ProviderConfig] = resolve_providers(settings)
        self.transport = transport
        self.providers: dict[str, Provider] = {}
        self.router: Router[Provider] = Router({}, None)
        self.control: Control | None = None
        self.cluster: ClusterHub | None = None  # cluster mode: the shared Redis
        self.metrics = Metrics(lambda: [p.admission for p in self.providers.values()])
        clients = resolve_clients(settings)
        self.relay = Relay(
            settings.server.max_body_bytes,
            self.metrics.requests,
            ClientKeys(clients) if clients else None,
            settings.server.max_queued_body_bytes,
        )
        self.web = Starlette(
            routes=admin.routes(
                self.providers,
                self._control,
                self.metrics.render,
                settings.server.admin_token.get_secret_value(),
            ),
            lifespan=self._lifespan,
            exception_handlers=admin.EXCEPTION_HANDLERS,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                route = self.router.resolve(scope["path"], scope.get("raw_path"))
            except HTTPError as err:
                await send_error(send, err)
                return
            if route is not None:
                await self.relay(scope, receive, send, route)
                return
        await self.web(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: Starlette) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.close()

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            # A half-started app must not keep the process alive (the store's
            # worker thread would): close whatever was opened, then fail.
            await self.close()
            raise

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        store = await Store.open(self.settings.server.database)
        self.control = Control(store, redact=Redactor(secrets(self.settings)).text)
        shared: AdmissionFactory | None = None
        if self.settings.cluster.redis_url:
            from proxy.cluster.admission import cluster_admission
            from proxy.cluster.hub import ClusterHub

            self.cluster = ClusterHub(self.settings.cluster)
            shared = cluster_admission(self.cluster, loop)
        for config in self.configs:
            self.providers[config.id] = Provider(
                config,
                loop=loop,
                transport=self.transport(config) if self.transport is not None else None,
                ca_bundle=self.settings.server.ca_bundle,
                on_event=self.control.on_limiter_event,
                admission=shared,
                observe_queue_wait=self.metrics.queue_wait.labels(config.id).observe,
                observe_ttfb=self.metrics.upstream_ttfb.labels(config.id).observe,
            )
        default = next((c.id for c in self.configs if c.default), None)
        self.router = Router(self.providers, default)
        sources = await self.control.restore(self.providers.values())
        if self.cluster is not None:
            await self.cluster.start()
        self.relay.prompts = await self._prompt_times(store)
        log.info("sluice started", providers=sources)

    async def _prompt_times(self, store: Store) -> PromptTimes:
        """Where first-seen prompt times live: Redis in cluster mode, else memory
        backed by the store (loaded now)."""
        ttl_ms = self.settings.admission.prompt_memory_s * 1000
        if self.cluster is not None:
            from proxy.cluster.prompt_times import RedisPromptTimes

            return RedisPromptTimes(self.cluster.redis, ttl_ms)
        local = LocalPromptTimes(store, ttl_ms)
        await local.start(time.time() * 1000)
        return local

    async def close(self) -> None:
        for provider in self.providers.values():
            await provider.close()
        if self.relay.prompts is not None:
            await self.relay.prompts.close()  # its last batch, before the store closes
            self.relay.prompts = None
        if self.cluster is not None:
            await self.cluster.close()
        if self.control is not None:
            await self.control.close()

    def provider(self, provider_id: str) -> Provider | None:
        return self.providers.get(provider_id)

    def _control(self) -> Control:
        assert self.control is not None, "admin route served before startup"
        return self.control
