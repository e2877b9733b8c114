"""The pass-through: forward a client's request to its provider and stream the answer
back as it arrives (SPEC sections 4 and 5).

A pure ASGI handler, not Starlette middleware: `BaseHTTPMiddleware` would hide the
client's disconnect, and the hot path should do no work it does not need.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import structlog

from proxy.admission import Rejection
from proxy.errors import (
    BodyTooLarge,
    HTTPError,
    QueueFull,
    QueueTimeout,
    UpstreamError,
)
from proxy.headers import HOP_BY_HOP, prompt_started_at_ms, retry_after_s
from proxy.providers import Provider, Slot
from proxy.routing import Route
from proxy.transport import UpstreamResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_DROP_RESPONSE = HOP_BY_HOP
log = structlog.get_logger("sluice")
access_log = structlog.get_logger("sluice.access")
_access_enabled = logging.getLogger("sluice.access").isEnabledFor


class UpstreamCut(Exception):
    """The upstream failed after the response had started: the only honest signal
    left is to abort the client's connection, which raising from the ASGI app does."""


class ClientGone(Exception):
    """The client disconnected; nothing more is to be sent."""


class DisconnectWatch:
    """Cancels the request's task when the client disconnects, so a queued waiter
    leaves the queue and an upstream request is closed at once, even while the
    upstream is silent (a long time to first token)."""

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self._finished = False
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self._finished:
                    self.gone = True
                    self._task.cancel()
                return

    def close(self) -> None:
        self._finished = True
        self._watcher.cancel()


async def read_body(receive: Receive, limit: int, declared: int | None) -> bytes:
    """The whole request body (kept for a transparent retry after a 429), refused
    with 413 past `limit` bytes, before reading it when Content-Length says so."""
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"request body of {declared} bytes is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body is over the {limit}-byte limit")
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


class Exchange:
    """What one proxied request did: the fields of its access log line."""

    __slots__ = (
        "bytes",
        "conversation_id",
        "method",
        "path",
        "provider",
        "queue_ms",
        "started",
        "status",
        "upstream_ms",
    )

    def __init__(self, provider: str, method: str, path: str) -> None:
        self.provider = provider
        self.method = method
        self.path = path
        self.status = 0
        self.queue_ms: int | None = None
        self.upstream_ms: int | None = None
        self.bytes = 0
        self.conversation_id: str | None = None
        self.started = False

    def log_fields(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__ if name != "started"}


class Relay:
    """Forwards one proxied request; `app.py` routes here."""

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, route: Route[Provider]
    ) -> None:
        provider = route.provider
        exchange = Exchange(provider.id, scope["method"], scope["path"])
        try:
            await self._exchange(scope, receive, send, route, exchange)
        finally:
            if _access_enabled(logging.INFO):
                access_log.info("request", **exchange.log_fields())

    async def _exchange(
        self, scope: Scope, receive: Receive, send: Send, route: Route[Provider], ex: Exchange
    ) -> None:
        provider = route.provider
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        try:
            length = _header(headers, b"content-length")
            declared = int(length) if length is not None and length.isdigit() else None
            body = await read_body(receive, self.max_body_bytes, declared)
        except ClientGone:
            ex.status = 499
            return
        except HTTPError as err:
            ex.status = err.status
            await send_error(send, err, provider.id)
            return
        watch = DisconnectWatch(receive)
        try:
            if provider.admits(scope["method"], route.path):
                await self._admitted(scope, send, route, body, ex)
            else:
                await self._relay(send, await self._open(scope, route, body, ex), provider, ex)
        except HTTPError as err:
            if ex.started:
                log.warning("upstream failed mid-response", provider=provider.id, error=err.message)
                raise UpstreamCut(err.message) from err
            ex.status = err.status
            await send_error(send, err, provider.id)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            # The client left: every `finally` below has released and closed what
            # it held; end the request quietly.
            ex.status = 499 if not ex.started else ex.status
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
        finally:
            watch.close()

    async def _admitted(
        self, scope: Scope, send: Send, route: Route[Provider], body: bytes, ex: Exchange
    ) -> None:
        provider = route.provider
        admission = provider.admission
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        priority = prompt_started_at_ms(
            _header(headers, b"x-prompt-started-at"), time.time() * 1000
        )
        ex.conversation_id = _header(headers, b"x-conversation-id")
        seq = admission.next_seq()
        loop = asyncio.get_running_loop()
        queued_s = 0.0
        retries_left = provider.config.retry_on_429
        while True:
            waited_from = loop.time()
            outcome = await admission.admit(priority, conversation_id=ex.conversation_id, seq=seq)
            queued_s += loop.time() - waited_from
            if isinstance(outcome, Rejection):
                raise _rejection_error(outcome, provider.id)
            slot: Slot = outcome
            try:
                ex.queue_ms = round(queued_s * 1000)
                response = await self._open(scope, route, body, ex)
                if response.status == 429 and admission.limit is not None:
                    await admission.on_rate_limited(
                        slot, retry_after_s(_str_headers(response.raw_headers), time.time())
                    )
                    if retries_left > 0:
                        retries_left -= 1
                        await response.aclose()
                        continue  # back in the queue, at the same place
                provider.observe_queue_wait(queued_s)
                await self._relay(send, response, provider, ex)
                return
            finally:
                slot.release()

    async def _open(
        self, scope: Scope, route: Route[Provider], body: bytes, ex: Exchange
    ) -> UpstreamResponse:
        provider = route.provider
        upstream = provider.upstream
        sent = time.perf_counter()
        response = await upstream.send(
            scope["method"],
            upstream.url(route.raw_path, scope.get("query_string", b"")),
            upstream.request_headers(scope["headers"]),
            body,
        )
        ttfb = time.perf_counter() - sent
        provider.observe_ttfb(ttfb)
        ex.upstream_ms = round(ttfb * 1000)
        return response

    async def _relay(
        self, send: Send, response: UpstreamResponse, provider: Provider, ex: Exchange
    ) -> None:
        """Stream `response` to the client chunk by chunk as it arrives, then close it."""
        started = time.perf_counter()
        try:
            headers = []
            length = -1
            for name, value in response.raw_headers:
                name = name.lower()
                if name not in _DROP_RESPONSE:
                    headers.append((name, value))
                    if name == b"content-length" and value.isdigit():
                        length = int(value)
            headers.append((b"x-sluice-provider", provider.id_bytes))
            if ex.queue_ms is not None:
                headers.append((b"x-sluice-queue-ms", str(ex.queue_ms).encode()))
            ex.status = response.status
            ex.started = True
            await send(
                {"type": "http.response.start", "status": response.status, "headers": headers}
            )
            finished = False
            async for chunk in response.chunks():
                ex.bytes += len(chunk)
                # With a Content-Length the last chunk can end the response itself,
                # saving a write; the loop still runs on to the upstream's end of
                # body so its connection goes back to the pool.
                finished = ex.bytes == length
                await send({"type": "http.response.body", "body": chunk, "more_body": not finished})
            if not finished:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if ex.upstream_ms is not None:
                ex.upstream_ms += round((time.perf_counter() - started) * 1000)
            await response.aclose()


def _str_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw}


def _rejection_error(rejection: Rejection, provider_id: str) -> HTTPError:
    if rejection.reason == "queue_full":
        return QueueFull(
            f"the queue for provider {provider_id} is full; retry later",
            retry_after_s=rejection.retry_after_s,
        )
    return QueueTimeout(
        f"waited too long in the queue for provider {provider_id}; retry later",
        retry_after_s=rejection.retry_after_s,
    )


async def send_error(send: Send, err: HTTPError, provider_id: str | None = None) -> None:
    """Answer with the error's status and its OpenAI-style JSON body."""
    headers = err.headers()
    if provider_id is not None:
        headers.append((b"x-sluice-provider", provider_id.encode()))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": err.body()})


__all__ = ["ClientGone", "DisconnectWatch", "Relay", "UpstreamCut", "UpstreamError", "send_error"]
