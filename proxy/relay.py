"""The pass-through: forward a client's request to its provider and stream the answer
back as it arrives (SPEC sections 4 and 5).

A pure ASGI handler, not Starlette middleware: `BaseHTTPMiddleware` would hide the
client's disconnect, and the hot path should do no work it does not need.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx

from proxy.admission import Permit, Rejection
from proxy.admission.aio import admit
from proxy.errors import (
    BodyTooLarge,
    HTTPError,
    QueueFull,
    QueueTimeout,
    UpstreamError,
)
from proxy.headers import HOP_BY_HOP, prompt_started_at_ms, retry_after_s
from proxy.providers import Provider
from proxy.routing import Route
from proxy.upstream import upstream_error

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_DROP_RESPONSE = HOP_BY_HOP


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


class Relay:
    """Forwards one proxied request; `app.py` routes here."""

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, route: Route[Provider]
    ) -> None:
        provider = route.provider
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        headers: list[tuple[bytes, bytes]] = scope["headers"]
        try:
            length = _header(headers, b"content-length")
            declared = int(length) if length is not None and length.isdigit() else None
            body = await read_body(receive, self.max_body_bytes, declared)
        except ClientGone:
            return
        except HTTPError as err:
            await send_error(send, err, provider.id)
            return
        watch = DisconnectWatch(receive)
        try:
            if provider.admits(scope["method"], route.path):
                await self._admitted(scope, tracked_send, route, body)
            else:
                await self._forward(scope, tracked_send, route, body, None)
        except HTTPError as err:
            if started:
                raise UpstreamCut(err.message) from err
            await send_error(send, err, provider.id)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            # The client left: every `finally` below has released and closed what
            # it held; end the request quietly.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
        finally:
            watch.close()

    async def _admitted(
        self, scope: Scope, send: Send, route: Route[Provider], body: bytes
    ) -> None:
        provider = route.provider
        limiter = provider.limiter
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        priority = prompt_started_at_ms(
            _header(headers, b"x-prompt-started-at"), time.time() * 1000
        )
        conversation_id = _header(headers, b"x-conversation-id")
        seq = limiter.next_seq()
        loop = asyncio.get_running_loop()
        queued_s = 0.0
        retries_left = provider.config.retry_on_429
        while True:
            waited_from = loop.time()
            outcome = await admit(limiter, priority, conversation_id=conversation_id, seq=seq)
            queued_s += loop.time() - waited_from
            if isinstance(outcome, Rejection):
                raise _rejection_error(outcome, provider.id)
            permit: Permit = outcome
            try:
                queue_ms = round(queued_s * 1000)
                response = await self._open(scope, route, body)
                if response.status_code == 429 and limiter.limit is not None:
                    limiter.on_rate_limited(
                        permit, retry_after_s(dict(response.headers.items()), time.time())
                    )
                    if retries_left > 0:
                        retries_left -= 1
                        await response.aclose()
                        continue  # back in the queue, at the same place
                await self._relay(send, response, provider.id, queue_ms)
                return
            finally:
                permit.release()

    async def _forward(
        self, scope: Scope, send: Send, route: Route[Provider], body: bytes, queue_ms: int | None
    ) -> None:
        response = await self._open(scope, route, body)
        await self._relay(send, response, route.provider.id, queue_ms)

    async def _open(self, scope: Scope, route: Route[Provider], body: bytes) -> httpx.Response:
        upstream = route.provider.upstream
        return await upstream.send(
            scope["method"],
            upstream.url(route.raw_path, scope.get("query_string", b"")),
            upstream.request_headers(scope["headers"]),
            body,
        )

    async def _relay(
        self, send: Send, response: httpx.Response, provider_id: str, queue_ms: int | None
    ) -> None:
        """Stream `response` to the client chunk by chunk as it arrives, then close it."""
        try:
            headers = [
                (name.lower(), value)
                for name, value in response.headers.raw
                if name.lower() not in _DROP_RESPONSE
            ]
            headers.append((b"x-sluice-provider", provider_id.encode()))
            if queue_ms is not None:
                headers.append((b"x-sluice-queue-ms", str(queue_ms).encode()))
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": headers}
            )
            try:
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError as exc:
                raise upstream_error(exc, provider_id) from exc
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


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
