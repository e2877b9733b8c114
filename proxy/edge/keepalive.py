"""Queued-stream keepalive (README, "Waiting"): a streaming request that waits in the
queue longer than `queued_keepalive_s` gets its 200 and SSE comments while it waits,
so that load balancers and clients that cut a silent connection keep it open.

Once the 200 has gone out, a failure can no longer be a status code: it becomes one
error event in the shape the request's API uses for errors inside a stream, and the
stream ends cleanly. Everything here runs in the request's own task (see
`proxy.admission.aio.Keepalive`): the relay and the keepalive never write at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, Protocol

import orjson

from proxy.errors import HTTPError, UpstreamStatus
from proxy.prompts import Dialect
from proxy.upstream.transport import UpstreamResponse

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Exchange(Protocol):
    """The fields of the relay's `Exchange` the keepalive reads and sets."""

    started: bool
    early: bool
    status: int
    prompt_started_at: int | None
    prompt_source: str | None


ERROR_BODY_LIMIT: Final = 65_536
"""Bytes of an upstream error body read for its message after an early start."""

_STREAM: Final = b'"stream"'


def wants_stream(body: bytes) -> bool:
    """Whether a JSON request body asks for a stream (`"stream": true`). Parses only
    a body that mentions the key at all; anything unreadable is not a stream."""
    if _STREAM not in body:
        return False
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and doc.get("stream") is True


class QueuedStream:
    """The keepalive of one queued streaming request: on its first tick it starts the
    response (200, `text/event-stream`), then every tick sends `: queued position=N`.
    A plain object of a few slots; it lives while the request waits."""

    __slots__ = ("_ex", "_provider_id", "_send", "interval_s")

    def __init__(self, send: Send, ex: Exchange, provider_id: bytes, interval_s: float) -> None:
        self._send = send
        self._ex = ex
        self._provider_id = provider_id
        self.interval_s = interval_s

    async def tick(self, position: int | None) -> None:
        ex = self._ex
        if not ex.started:
            ex.started = ex.early = True
            ex.status = 200
            headers = [
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-cache"),
                (b"x-sluice-provider", self._provider_id),
            ]
            if ex.prompt_source is not None:
                headers.append((b"x-sluice-prompt-started-at", str(ex.prompt_started_at).encode()))
                headers.append((b"x-sluice-prompt-source", ex.prompt_source.encode()))
            await self._send({"type": "http.response.start", "status": 200, "headers": headers})
        comment = b": queued position=%d\n\n" % position if position else b": queued\n\n"
        await self._send({"type": "http.response.body", "body": comment, "more_body": True})


def error_event(dialect: Dialect | None, err: HTTPError) -> bytes:
    """The one SSE event that ends an early-started stream with `err`, in the shape
    of the request's API: Chat (and legacy Completions) `data: {"error": {...}}`,
    Responses `event: error` with a `ResponseErrorEvent`, Messages `event: error`
    with Anthropic's error object."""
    if dialect == "responses":
        data: dict[str, object] = {
            "type": "error",
            "code": err.code,
            "message": err.message,
            "param": None,
            "sequence_number": 0,
        }
        return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"
    if dialect == "messages":
        kind = err.type if isinstance(err, UpstreamStatus) and err.native else None
        data = {
            "type": "error",
            "error": {"type": kind or _anthropic_type(err.status), "message": err.message},
        }
        return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"
    error = {"message": err.message, "type": err.type, "param": None, "code": err.code}
    return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


def _anthropic_type(status: int) -> str:
    """Anthropic's error type for a status sluice or an upstream answered with."""
    return _ANTHROPIC_TYPES.get(status, "api_error")


_ANTHROPIC_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


async def upstream_failure(response: UpstreamResponse) -> UpstreamStatus:
    """The error an upstream's non-200 answer becomes after an early start: its own
    message, type and code when its body has them (OpenAI's and Anthropic's error
    shapes), else what its status says. Reads at most `ERROR_BODY_LIMIT` bytes."""
    head = b""
    async for chunk in response.chunks():
        head += chunk
        if len(head) >= ERROR_BODY_LIMIT:
            break
    message = kind = code = None
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        error = doc.get("error", doc)
        if isinstance(error, str):
            message = error
        elif isinstance(error, dict):
            message = _text(error.get("message"))
            kind = _text(error.get("type"))
            code = _text(error.get("code"))
    if message is None:
        text = head[:500].decode("utf-8", "replace").strip()
        message = f"upstream answered {response.status}" + (f": {text}" if text else "")
    return UpstreamStatus(response.status, message, type_=kind, code=code)


def _text(value: object) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None
