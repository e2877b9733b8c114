"""The pass-through: forward a client's request to its provider and stream the answer
back as it arrives (docs/design.md, "A request's path").

A pure ASGI handler, not Starlette middleware: `BaseHTTPMiddleware` would hide the
client's disconnect, and the hot path should do no work it does not need.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

import structlog

from proxy.admission import Policy, Rejection
from proxy.admission.reduce import ANSWER_HEAD_BYTES, Answer
from proxy.edge import logs
from proxy.edge.clients import ClientKeys
from proxy.edge.headers import MIN_EPOCH_MS, prompt_started_at_ms, retry_after_s
from proxy.edge.keepalive import QueuedStream, error_event, upstream_failure, wants_stream
from proxy.edge.metrics import Requests
from proxy.edge.queued_bodies import QueuedBodies
from proxy.edge.routing import Route
from proxy.errors import (
    BodyTooLarge,
    HTTPError,
    QueueFull,
    QueueTimeout,
    UpstreamError,
)
from proxy.prompts import (
    agent_started_at_ms,
    conversation_from_headers,
    derive,
    dialect_for,
    response_key,
)
from proxy.runtime.prompt_times import PromptTimes
from proxy.runtime.provider import Provider
from proxy.runtime.seam import Slot
from proxy.upstream.readahead import ReadAhead
from proxy.upstream.transport import HOP_BY_HOP, UpstreamResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ANSWER_READ_S: Final = 1.0
"""How long a 429's body is read ahead for `reduce_on_429 = "match"` before it is
judged on what arrived: the pause starts only once it is judged."""

log = structlog.get_logger("sluice")


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
        "client",
        "conversation_id",
        "early",
        "failure",
        "method",
        "path",
        "prompt_source",
        "prompt_started_at",
        "provider",
        "queue_ms",
        "sent_at",
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
        self.client: str | None = None  # the calling client's id, with [[clients]] set
        self.conversation_id: str | None = None
        self.prompt_started_at: int | None = None  # epoch ms, on admitted requests
        self.prompt_source: str | None = None  # header, agent, derived or arrival
        self.started = False
        self.early = False  # the 200 went out while queued (keepalive); no upstream headers
        self.sent_at = 0.0  # perf_counter() when the request went upstream
        self.failure: str | None = None  # the code of the HTTPError that ended it, if any


class Relay:
    """Forwards one proxied request; `app.py` routes here."""

    def __init__(
        self,
        max_body_bytes: int,
        requests: Requests | None = None,
        clients: ClientKeys | None = None,
        max_queued_body_bytes: int = 1 << 30,
    ) -> None:
        self.max_body_bytes = max_body_bytes
        self.clients = clients  # None: no [[clients]], no client key asked for
        self.prompts: PromptTimes | None = None  # set at start (app.py)
        self.requests = requests if requests is not None else Requests()
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
            if self.clients is not None:
                # Before anything else: an unknown caller costs nothing upstream. The
                # credential headers leave the request here, so the client key can
                # never be forwarded, whatever the provider's own key.
                ex.client, scope["headers"] = self.clients.identify(scope["headers"])
            length = _header(scope["headers"], b"content-length")
            declared = int(length) if length is not None and length.isdigit() else None
            body = await read_body(receive, self.max_body_bytes, declared)
            watch = DisconnectWatch(receive)
            if provider.admits(scope["method"], route.path):
                slot, response = await self._admit(scope, route, body, ex, send)
            else:
                response = await self._open(scope, route, body, ex)
            # A stream can run for minutes, and the body (the whole conversation,
            # often tens of KiB) is not needed again.
            del body
            # The stream is relayed here rather than in a method of its own: every
            # coroutine frame stays alive for as long as the stream is open.
            if ex.early:
                size = _continue_early(response, provider, ex)
            else:
                size = await _start_response(send, response, provider, ex)
            catch = self._response_id_catcher(route, ex)
            finished = False
            async for chunk in response.chunks():
                if catch is not None and catch(chunk):
                    catch = None
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
            ex.failure = err.code
            if ex.early and ex.bytes == 0:
                # Started while queued, nothing of the upstream's sent yet: the
                # failure becomes the stream's last event.
                ex.status = err.status
                event = error_event(dialect_for(route.path), err)
                await send({"type": "http.response.body", "body": event, "more_body": False})
            elif ex.started:
                log.warning("upstream failed mid-response", provider=provider.id, error=err.message)
                raise UpstreamCut(err.message) from err
            else:
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
            # The operator's view: the request's outcome in the metrics, its access line.
            gone = watch is not None and watch.gone
            limiter_saw_429 = slot is not None and provider.admission.limit is not None
            self.requests.finished(ex, gone, limiter_saw_429)
            if logs.access is not None:
                logs.access.write(ex)

    async def _admit(
        self, scope: Scope, route: Route[Provider], body: bytes, ex: Exchange, send: Send
    ) -> tuple[Slot, UpstreamResponse]:
        """Wait for a slot, then open the upstream response with it held. A 429
        pauses the provider and, while retries last, puts the request back in the
        queue at its old place. A stream waiting longer than `queued_keepalive_s`
        gets its 200 and keepalive comments meanwhile (`ex.early`)."""
        provider = route.provider
        admission = provider.admission
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        ex.conversation_id = conversation_from_headers(headers)
        priority = self._prompt_start(route, headers, ex)
        if priority is None:
            priority = await self._derived(route, body, ex)
        seq = admission.next_seq()
        loop = asyncio.get_running_loop()
        queued_s = 0.0
        policy = provider.config.policy
        retries_left = policy.retry_on_429
        keepalive = None
        # `stream` is parsed only where keepalive is on: no work on the hot path.
        if policy.queued_keepalive_s > 0 and admission.limit is not None and wants_stream(body):
            keepalive = QueuedStream(send, ex, provider.id_bytes, policy.queued_keepalive_s)
        while True:
            waited_from = loop.time()
            waiting = admission.admit(
                priority,
                conversation_id=ex.conversation_id,
                seq=seq,
                client_id=ex.client,
                prompt_source=ex.prompt_source,
                keepalive=keepalive,
            )
            if admission.limit is not None:  # without a limit nobody ever waits
                waiting = self.queued_bodies.wait(len(body), waiting)
            outcome = await waiting
            queued_s += loop.time() - waited_from
            if isinstance(outcome, Rejection):
                raise _rejection_error(outcome, provider.id)
            slot: Slot = outcome
            response: UpstreamResponse | None = None
            try:
                ex.queue_ms = round(queued_s * 1000)
                response = await self._open(scope, route, body, ex)
                if response.status == 429 and admission.limit is not None:
                    answer, response = await _answer_429(response, provider.config.policy)
                    await slot.rate_limited(
                        retry_after_s(_str_headers(response.raw_headers), time.time()), answer
                    )
                    if retries_left > 0:
                        retries_left -= 1
                        await response.aclose()
                        slot.release()
                        continue  # back in the queue, at the same place
                if ex.early and response.status != 200:
                    raise await upstream_failure(response)
            except BaseException:
                if response is not None:
                    await response.aclose()
                slot.release()
                raise
            provider.observe_queue_wait(queued_s)
            return slot, response

    def _prompt_start(
        self, route: Route[Provider], headers: list[tuple[bytes, bytes]], ex: Exchange
    ) -> float | None:
        """When the client's current prompt started (docs/design.md, "Task age"): the
        header; else, where the provider has a limit and derivation is on, the agent's
        own turn start; else the arrival, unless the body may name a prompt sluice has
        seen: None then, and `_derived` answers (only that path awaits anything)."""
        now_ms = time.time() * 1000
        header = _header(headers, b"x-prompt-started-at")
        started, source = now_ms, "arrival"
        if header is not None:
            started, source = prompt_started_at_ms(header, now_ms), "header"
        elif (
            route.provider.config.policy.derive_prompt_start
            and route.provider.admission.limit is not None
        ):
            agent = agent_started_at_ms(headers)
            if agent is not None and agent >= MIN_EPOCH_MS:
                started, source = min(agent, now_ms), "agent"
            elif self.prompts is not None and dialect_for(route.path) is not None:
                return None
        ex.prompt_started_at = round(started)
        ex.prompt_source = source
        return started

    async def _derived(self, route: Route[Provider], body: bytes, ex: Exchange) -> float:
        """The first-seen time of the prompt `body` names (source `derived`), or the
        arrival when it names none."""
        assert self.prompts is not None
        now_ms = time.time() * 1000
        dialect = dialect_for(route.path)
        assert dialect is not None
        derivation = derive(dialect, body, ex.conversation_id)
        found: float | None = None
        if derivation.prompt_key is not None:
            found = await self.prompts.first_seen(derivation.prompt_key, now_ms)
        elif derivation.previous_response_id is not None:
            found = await self.prompts.known(response_key(derivation.previous_response_id), now_ms)
        started, source = (now_ms, "arrival") if found is None else (min(found, now_ms), "derived")
        ex.prompt_started_at = round(started)
        ex.prompt_source = source
        return started

    def _response_id_catcher(
        self, route: Route[Provider], ex: Exchange
    ) -> Callable[[bytes], bool] | None:
        """For a Responses answer with a known prompt time: a callable fed the body's
        first chunks that records the response's id with that time (so a request that
        continues it by `previous_response_id` inherits the time)."""
        prompts = self.prompts
        started = ex.prompt_started_at
        if prompts is None or started is None or ex.status != 200:
            return None
        if dialect_for(route.path) != "responses":
            return None
        return ResponseIdCatcher(
            lambda rid: prompts.remember(response_key(rid), started, time.time() * 1000)
        )

    def _open(
        self, scope: Scope, route: Route[Provider], body: bytes, ex: Exchange
    ) -> Awaitable[UpstreamResponse]:
        """Send the request upstream; awaiting the result gives the response once its
        headers arrive. Not a coroutine: a frame of its own would stay alive until
        the first byte, which for a model can take many seconds."""
        upstream = route.provider.upstream
        ex.sent_at = time.perf_counter()
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if ex.early:
            # The client's response has no Content-Encoding header any more: ask
            # for a body its headers already describe.
            headers = [(name, value) for name, value in headers if name != b"accept-encoding"]
        return upstream.send(
            scope["method"],
            upstream.url(route.raw_path, scope.get("query_string", b"")),
            upstream.request_headers(headers),
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
    if ex.prompt_source is not None:
        headers.append((b"x-sluice-prompt-started-at", str(ex.prompt_started_at).encode()))
        headers.append((b"x-sluice-prompt-source", ex.prompt_source.encode()))
    ex.status = response.status
    ex.started = True
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    return length


def _continue_early(response: UpstreamResponse, provider: Provider, ex: Exchange) -> int:
    """A stream whose 200 went out while it was queued: the upstream's own headers
    can no longer be sent (they are dropped), its body is relayed unchanged. Returns
    -1: the client's response has no length."""
    provider.observe_ttfb(time.perf_counter() - ex.sent_at)
    response.raw_headers.clear()
    return -1


class ResponseIdCatcher:
    """Finds a Responses answer's `id` in the first bytes of its body: the JSON
    object's first `"id"` (`{"id": "resp_...", ...}`), or in a stream the one in the
    first event (`response.created`). Gives up after `LIMIT` bytes."""

    LIMIT = 16_384
    _ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,256})"')

    __slots__ = ("_found", "_head")

    def __init__(self, found: Callable[[str], None]) -> None:
        self._head = b""
        self._found = found

    def __call__(self, chunk: bytes) -> bool:
        """Feed a chunk; True once done (found, or past the limit)."""
        self._head += chunk[: self.LIMIT - len(self._head)]
        match = self._ID.search(self._head)
        if match is not None:
            self._found(match.group(1).decode("latin-1"))
            return True
        return len(self._head) >= self.LIMIT


async def _answer_429(
    response: UpstreamResponse, policy: Policy
) -> tuple[Answer | None, UpstreamResponse]:
    """What `reduce_on_429` needs of a 429: nothing under "always" and "never"; under
    "match" its headers and its body's first bytes, read ahead (the response handed
    back replays them, so a 429 relayed to the client arrives whole)."""
    if policy.reduce_on_429 != "match":
        return None, response
    ahead = ReadAhead(response)
    head = await ahead.read_head(ANSWER_HEAD_BYTES, ANSWER_READ_S)
    return Answer.from_raw(response.raw_headers, head), ahead


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
