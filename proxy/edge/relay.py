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
from proxy.edge.headers import prompt_started_at_ms, retry_after_s
from proxy.edge.queued_bodies import QueuedBodies
from proxy.edge.routing import Route
from proxy.errors import (
    BodyTooLarge,
    HTTPError,
    QueueFull,
    QueueTimeout,
    UpstreamError,
)
from proxy.runtime.provider import Provider
from proxy.runtime.seam import Slot
from proxy.upstream.transport import HOP_BY_HOP, UpstreamResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

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
    upstream is silent (a long time to first token).

    Start it once the body has been read: the next message can then only be the
    disconnect. It waits in a bare `receive()` task with a callback, not a loop of
    its own, because one is open per stream."""

    __slots__ = ("_finished", "_receive", "_task", "_watcher", "gone")

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self._finished = False
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._receive = receive
        self._watcher = self._listen()

    def _listen(self) -> asyncio.Future[Message]:
        watcher = asyncio.ensure_future(self._receive())
        watcher.add_done_callback(self)  # the watch is its own callback: no bound method
        return watcher

    def __call__(self, watcher: asyncio.Future[Message]) -> None:
        """The next message arrived."""
        if self._finished or watcher.cancelled() or watcher.exception() is not None:
            return
        if watcher.result()["type"] != "http.disconnect":
            self._watcher = self._listen()  # not the disconnect yet: keep listening
            return
        self.gone = True
        self._task.cancel()

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
            return b"".join(chunks)  # one chunk: that very object


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
        "sent_at",
        "started",
        "status",
        "upstream_ms",
    )
    _LOGGED = tuple(name for name in __slots__ if name not in ("sent_at", "started"))

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
        self.sent_at = 0.0  # perf_counter() when the request went upstream

    def log_fields(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self._LOGGED}


class Relay:
    """Forwards one proxied request; `app.py` routes here."""

    def __init__(self, max_body_bytes: int, max_queued_body_bytes: int = 1 << 30) -> None:
        self.max_body_bytes = max_body_bytes
        self.queued_bodies = QueuedBodies(max_queued_body_bytes)

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, route: Route[Provider]
    ) -> None:
        provider = route.provider
        ex = Exchange(provider.id, scope["method"], scope["path"])
        watch: DisconnectWatch | None = None
        slot: Slot | None = None
        response: UpstreamResponse | None = None
        try:
            length = _header(scope["headers"], b"content-length")
            declared = int(length) if length is not None and length.isdigit() else None
            body = await read_body(receive, self.max_body_bytes, declared)
            watch = DisconnectWatch(receive)
            if provider.admits(scope["method"], route.path):
                slot, response = await self._admit(scope, route, body, ex)
            else:
                response = await self._open(scope, route, body, ex)
            # A stream can run for minutes, and the body (the whole conversation,
            # often tens of KiB) is not needed again.
            del body
            # The stream is relayed here rather than in a method of its own: every
            # coroutine frame stays alive for as long as the stream is open.
            size = await _start_response(send, response, provider, ex)
            finished = False
            async for chunk in response.chunks():
                ex.bytes += len(chunk)
                # With a Content-Length the last chunk can end the response itself,
                # saving a write; the loop still runs on to the upstream's end of
                # body so its connection goes back to the pool.
                finished = ex.bytes == size
                await send({"type": "http.response.body", "body": chunk, "more_body": not finished})
                del chunk  # not held while waiting for the next one
            if not finished:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ClientGone:
            ex.status = 499
        except HTTPError as err:
            if ex.started:
                log.warning("upstream failed mid-response", provider=provider.id, error=err.message)
                raise UpstreamCut(err.message) from err
            ex.status = err.status
            await send_error(send, err, provider.id)
        except asyncio.CancelledError:
            if watch is None or not watch.gone:
                raise
            # The client left: `finally` releases and closes what was held; end
            # the request quietly.
            ex.status = 499 if not ex.started else ex.status
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
        finally:
            if response is not None:
                await response.aclose()
                ex.upstream_ms = round((time.perf_counter() - ex.sent_at) * 1000)
            if watch is not None:
                watch.close()
            if slot is not None:
                slot.release()
            if _access_enabled(logging.INFO):
                access_log.info("request", **ex.log_fields())

    async def _admit(
        self, scope: Scope, route: Route[Provider], body: bytes, ex: Exchange
    ) -> tuple[Slot, UpstreamResponse]:
        """Wait for a slot, then open the upstream response with it held. A 429
        pauses the provider and, while retries last, puts the request back in the
        queue at its old place."""
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
            outcome = await self.queued_bodies.wait(
                len(body), admission.admit(priority, conversation_id=ex.conversation_id, seq=seq)
            )
            queued_s += loop.time() - waited_from
            if isinstance(outcome, Rejection):
                raise _rejection_error(outcome, provider.id)
            slot: Slot = outcome
            response: UpstreamResponse | None = None
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
                        slot.release()
                        continue  # back in the queue, at the same place
            except BaseException:
                if response is not None:
                    await response.aclose()
                slot.release()
                raise
            provider.observe_queue_wait(queued_s)
            return slot, response

    def _open(
        self, scope: Scope, route: Route[Provider], body: bytes, ex: Exchange
    ) -> Awaitable[UpstreamResponse]:
        """Send the request upstream; awaiting the result gives the response once its
        headers arrive. Not a coroutine: a frame of its own would stay alive until
        the first byte, which for a model can take many seconds."""
        upstream = route.provider.upstream
        ex.sent_at = time.perf_counter()
        return upstream.send(
            scope["method"],
            upstream.url(route.raw_path, scope.get("query_string", b"")),
            upstream.request_headers(scope["headers"]),
            body,
        )


async def _start_response(
    send: Send, response: UpstreamResponse, provider: Provider, ex: Exchange
) -> int:
    """Send the status and headers; the body's length if the upstream declared it,
    else -1. The upstream's header list is emptied once forwarded: an open stream
    should not hold on to it."""
    provider.observe_ttfb(time.perf_counter() - ex.sent_at)
    headers = []
    length = -1
    for name, value in response.raw_headers:
        name = name.lower()
        if name not in HOP_BY_HOP:
            headers.append((name, value))
            if name == b"content-length" and value.isdigit():
                length = int(value)
    response.raw_headers.clear()
    headers.append((b"x-sluice-provider", provider.id_bytes))
    if ex.queue_ms is not None:
        headers.append((b"x-sluice-queue-ms", str(ex.queue_ms).encode()))
    ex.status = response.status
    ex.started = True
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    return length


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
