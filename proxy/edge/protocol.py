"""The client connection: uvicorn's httptools protocol with the edge limits (README,
"Limits on clients": `max_header_bytes`, `max_headers`, `client_header_timeout_s`,
`client_body_timeout_s`, `max_connections`) and no request trailers in the headers.

uvicorn's `HttpToolsProtocol` (0.55, `uvicorn/protocols/http/httptools_impl.py`) has
no limit on a request head: llhttp parses any length, and httptools joins a header's
pieces in Python until the header ends. So the bytes of a head are counted before
the parser sees them, and the parser is never fed more than `max_header_bytes` of
one head (at most twice that for a head pipelined behind a body in the same read,
whose first bytes arrive before the head has begun). The hooks used are the
parser callbacks (`on_message_begin`, `on_header`, `on_headers_complete`, `on_body`,
`on_message_complete`, and `on_chunk_header`, which uvicorn does not use) and
`data_received`, `connection_made`, `connection_lost`, `send_400_response`,
`handle_websocket_upgrade`. The head and body deadlines are kept by one sweeper per
server rather than a timer per connection.

A refused connection is answered (431, 408, 503) when no response of its own is
under way, then half-closed: the FIN follows the answer, and what the client still
sends is read and dropped for up to `LINGER_S`. Closing at once with unread bytes
in the socket would send a reset, which can destroy the answer before the client
reads it.

`max_connections` is per process (each `--workers` process has its own), and counts
connections, not requests: uvicorn's `limit_concurrency` answers 503 to the request
after the head is read, which is no bound on connections that never send one.
"""

from __future__ import annotations

import asyncio
import functools
import http
import math
import time
import weakref
from asyncio import TimerHandle
from dataclasses import dataclass
from typing import Any, Literal, cast

import httptools
import structlog
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.errors import HeadTooLarge, HTTPError, RequestTimeout, TooManyConnections
from proxy.settings import ServerSettings

LINGER_S = 2.0
"""How long a refused connection's remaining input is read and dropped."""
MIN_GAP_S = 0.05
"""Deadlines are swept at most this often: a connection is closed within its timeout
plus that."""
LOG_EVERY_S = 10.0
"""At most one log line per refusal reason this often (a flood must not flood the log)."""

log = structlog.get_logger("sluice")

Reason = Literal["head_too_large", "too_many_headers", "head_timeout", "body_timeout", "full"]


@dataclass(frozen=True)
class EdgeLimits:
    """What one client connection may cost."""

    max_header_bytes: int = 65_536
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 10_000

    @classmethod
    def of(cls, server: ServerSettings) -> EdgeLimits:
        return cls(
            max_header_bytes=server.max_header_bytes,
            max_headers=server.max_headers,
            header_timeout_s=server.client_header_timeout_s,
            body_timeout_s=server.client_body_timeout_s,
            max_connections=server.max_connections,
        )


def edge_protocol(server: ServerSettings) -> type[asyncio.Protocol]:
    """The protocol class to give uvicorn (`http=`). A partial, not a subclass made on
    the fly, so that `--workers` can pickle it into each worker process."""
    return cast(
        "type[asyncio.Protocol]", functools.partial(EdgeProtocol, limits=EdgeLimits.of(server))
    )


@functools.cache
def _answers(limits: EdgeLimits) -> dict[Reason, tuple[int, bytes]]:
    """The complete responses a refused connection gets, built once per limits."""
    errors: dict[Reason, HTTPError] = {
        "head_too_large": HeadTooLarge(
            f"the request head is over the {limits.max_header_bytes}-byte limit"
        ),
        "too_many_headers": HeadTooLarge(
            f"the request has more than {limits.max_headers} header (or trailer) lines"
        ),
        "head_timeout": RequestTimeout(
            f"the request head was not complete within {limits.header_timeout_s:g} s"
        ),
        "body_timeout": RequestTimeout(
            f"no byte of the request body for {limits.body_timeout_s:g} s"
        ),
        "full": TooManyConnections(
            f"sluice has {limits.max_connections} open connections; retry later",
            retry_after_s=1,
        ),
    }
    return {reason: (err.status, _response(err)) for reason, err in errors.items()}


def _response(err: HTTPError) -> bytes:
    body = err.body()
    head = [f"HTTP/1.1 {err.status} {http.HTTPStatus(err.status).phrase}".encode()]
    head += [name + b": " + value for name, value in err.headers()]
    head += [b"content-length: %d" % len(body), b"connection: close", b"", b""]
    return b"\r\n".join(head) + body


class _LimitHit(Exception):
    """Raised from a parser callback to stop the parse; `data_received` answers."""


_last_logged: dict[str, float] = {}
_suppressed: dict[str, int] = {}


def _note(reason: str, status: int) -> None:
    """One warning per reason per `LOG_EVERY_S`, with how many were not logged."""
    now = time.monotonic()
    if now - _last_logged.get(reason, -LOG_EVERY_S) < LOG_EVERY_S:
        _suppressed[reason] = _suppressed.get(reason, 0) + 1
        return
    _last_logged[reason] = now
    log.warning(
        "client refused at the edge",
        reason=reason,
        status=status,
        not_logged_since_last=_suppressed.pop(reason, 0),
    )


class _Sweeper:
    """One timer per server for every connection's head and body deadlines, instead
    of one per connection. A pending uvloop timer costs ~600 bytes of heap: left to
    fire, it would be held by most open streams; cancelled when the head is done, it
    would cost a timer call (~2 µs) per request. Here a connection is in `watched`
    while a head or a body is due, and the one timer is set for the earliest
    deadline seen by the last sweep, at most every `MIN_GAP_S`: a deadline is acted
    on within that of passing."""

    __slots__ = ("_at", "_handle", "_loop", "watched")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.watched: set[EdgeProtocol] = set()
        self._handle: TimerHandle | None = None
        self._at = math.inf

    @classmethod
    def of(cls, server_state: ServerState, loop: asyncio.AbstractEventLoop) -> _Sweeper:
        """The sweeper of the server `server_state` belongs to."""
        sweeper = _SWEEPERS.get(server_state)
        if sweeper is None:
            sweeper = _SWEEPERS[server_state] = cls(loop)
        return sweeper

    def watch(self, protocol: EdgeProtocol, due: float) -> None:
        """Look at `protocol` at `due` or earlier."""
        self.watched.add(protocol)
        if due < self._at:
            self._schedule(due)

    def forget(self, protocol: EdgeProtocol) -> None:
        self.watched.discard(protocol)

    def _schedule(self, due: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._at = max(due, self._loop.time() + MIN_GAP_S)
        self._handle = self._loop.call_at(self._at, self._sweep)

    def _sweep(self) -> None:
        self._handle = None
        self._at = math.inf
        now = self._loop.time()
        earliest = math.inf
        for protocol in list(self.watched):  # a check may refuse, and forget
            due = protocol.check(now)
            if due is None:
                self.watched.discard(protocol)
            elif due < earliest:
                earliest = due
        if self.watched:
            self._schedule(earliest)

    def __repr__(self) -> str:
        return f"_Sweeper(watched={len(self.watched)}, next_at={self._at:g})"


_SWEEPERS: weakref.WeakKeyDictionary[ServerState, _Sweeper] = weakref.WeakKeyDictionary()


class EdgeProtocol(HttpToolsProtocol):
    """One client connection. Between requests uvicorn's keep-alive timeout applies;
    from a head's first byte (or the connection's accept) `header_timeout_s`; while
    a body is read, `body_timeout_s` of silence."""

    # Slots, not the instance dict: uvicorn's protocol already has 28 attributes, and
    # past 30 CPython gives up the dict's key sharing, which costs ~2 KiB per
    # connection (measured) on top of the ~150 bytes these take.
    __slots__ = (
        "_answers",
        "_body_open",
        "_body_read_at",
        "_done",
        "_head",
        "_head_begun",
        "_head_bytes",
        "_head_deadline",
        "_header_lines",
        "_heads",
        "_linger",
        "_refusal",
        "_sweeper",
        "_trailer_bytes",
        "_trailer_lines",
        "_trailer_open",
        "limits",
    )

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: EdgeLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self._answers = _answers(limits)
        self._head = True  # reading a request head, or waiting for the next one
        self._head_begun = False  # a byte of this head has arrived
        self._head_bytes = 0  # bytes of this head fed to the parser
        self._header_lines = 0
        self._heads = 0  # heads completed on this connection
        self._head_deadline: float | None = None  # set while a head is due
        self._body_open = False  # the head is done, the message is not
        self._body_read_at = 0.0  # when a byte of the body last arrived
        self._sweeper = _Sweeper.of(server_state, self.loop)
        self._trailer_open = False  # after a chunk-size line and before its data
        self._trailer_bytes = 0
        self._trailer_lines = 0
        self._refusal: Reason | None = None  # a limit hit inside a parser callback
        self._done = False  # refused or failed: input is dropped from now on
        self._linger: TimerHandle | None = None

    # --- the connection -------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            # Not added to the server's connections: it is not served, only answered.
            self.transport = transport
            self._refuse("full")
            return
        super().connection_made(transport)
        # The first head must be complete within header_timeout_s of the accept: a
        # connection that never sends a byte is a slowloris too.
        self._start_head_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._sweeper.forget(self)
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return  # answered and half-closed: what the client still sends is dropped
        if self._head:
            # The first byte of a request head: it must be complete within the timeout.
            self._head_begun = True
            if self._head_deadline is None:
                self._start_head_clock()
            room = self.limits.max_header_bytes - self._head_bytes
            if len(data) > room:
                heads = self._heads
                if room > 0:
                    self._feed(data[:room])
                if self._done:
                    return
                if self._heads == heads:  # this head did not end within the limit
                    self._refuse("head_too_large")
                    return
                self.data_received(data[room:])
                return
            self._head_bytes += len(data)
            self._feed(data)
        else:
            in_trailers = self._trailer_open
            self._feed(data)
            if in_trailers and self._trailer_open and not self._done:
                # Trailers are headers after the body: the same byte limit applies.
                self._trailer_bytes += len(data)
                if self._trailer_bytes > self.limits.max_header_bytes:
                    self._refuse("head_too_large")
                    return
        if self._body_open and not self._done:
            # A body is being read, and has not all arrived: its silence is timed
            # from now.
            self._body_read_at = self.loop.time()
            self._sweeper.watch(self, self._body_read_at + self.limits.body_timeout_s)

    def _feed(self, data: bytes) -> None:
        """uvicorn's `data_received`, with a limit hit in a callback answered as such."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if self._refusal is not None:
                self._refuse(self._refusal)
            else:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)

    def handle_websocket_upgrade(self) -> None:
        # The transport now belongs to the WebSocket protocol: nothing of ours may
        # time it out or write to it.
        self._done = True
        self._stop_clocks()
        super().handle_websocket_upgrade()

    def send_400_response(self, msg: str) -> None:
        self._done = True
        self._stop_clocks()
        super().send_400_response(msg)

    # --- parser callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # Usually the clock started in `data_received`; not for a head that began in
        # the same read as the end of the previous request.
        self._head_begun = True
        if self._head_deadline is None:
            self._start_head_clock()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head:
            self._header_lines += 1
            if self._header_lines > self.limits.max_headers:
                self._refusal = "too_many_headers"
                raise _LimitHit
            # uvicorn's own on_header, inlined: it runs for every header of every
            # request, and a super() call here cost ~3 % of the proxy's CPU.
            name = name.lower()
            value = value.rstrip(b" \t")  # llhttp keeps trailing whitespace (RFC 9110 5.5)
            if name == b"expect" and value.lower() == b"100-continue":
                self.expect_100_continue = True
            self.headers.append((name, value))
            return
        # A trailer of a chunked body. uvicorn would append it to the request's
        # header list, which the relay forwards after reading the body: a client
        # could add headers past every check made on the head. Dropped.
        self._trailer_lines += 1
        if self._trailer_lines > self.limits.max_headers:
            self._refusal = "too_many_headers"
            raise _LimitHit

    def on_headers_complete(self) -> None:
        self._head = False
        self._head_begun = False
        self._heads += 1
        self._head_bytes = self._header_lines = 0
        self._head_deadline = None
        self._body_open = True
        self._trailer_lines = self._trailer_bytes = 0
        super().on_headers_complete()

    def on_chunk_header(self) -> None:
        # A chunk-size line was read; data follows, or for the last chunk trailers.
        self._trailer_open = True
        self._trailer_bytes = 0

    def on_body(self, body: bytes) -> None:
        self._trailer_open = False
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._body_open = self._trailer_open = False
        self._head = True
        self._head_bytes = 0
        super().on_message_complete()

    # --- deadlines -------------------------------------------------------------------

    def _start_head_clock(self) -> None:
        self._head_deadline = self.loop.time() + self.limits.header_timeout_s
        self._sweeper.watch(self, self._head_deadline)

    def _stop_clocks(self) -> None:
        self._head_deadline = None
        self._body_open = False

    def check(self, now: float) -> float | None:
        """Called by the sweeper: act on a passed deadline. The next deadline, or None
        once nothing is due on this connection."""
        if self._done:
            return None
        deadline = self._head_deadline
        if deadline is not None:
            if now < deadline:
                return deadline
            if self._head_begun:
                self._refuse("head_timeout")
            else:
                # A connection that never sent a byte: nothing to answer.
                self._done = True
                self.transport.close()
            return None
        if not self._body_open:
            return None
        if self.flow.read_paused:
            # We are not reading (the app has not taken what came, or a pipelined
            # request waits): the silence is ours, not the client's.
            self._body_read_at = now
        due = self._body_read_at + self.limits.body_timeout_s
        if now < due:
            return due
        self._refuse("body_timeout")
        return None

    # --- refusing -------------------------------------------------------------------

    def _refuse(self, reason: Reason) -> None:
        """Answer `reason` if nothing else is being answered on this connection, then
        close. Input is dropped from now on."""
        self._done = True
        self._stop_clocks()
        status, answer = self._answers[reason]
        _note(reason, status)
        cycle = self.cycle
        if reason == "full":
            can_answer = True
        elif self._head:
            # The previous request's response must be complete, or ours would land
            # in the middle of it.
            can_answer = (cycle is None or cycle.response_complete) and not self.pipeline
        else:
            can_answer = not self.pipeline and cycle is not None and not cycle.response_started
            if can_answer:
                # The app is waiting for the body: it now sees the client gone, and
                # anything it sends is dropped.
                cycle.disconnected = True
                cycle.message_event.set()
        transport = self.transport
        if not can_answer:
            transport.close()
            return
        transport.write(answer)
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if self.flow is not None:
            self.flow.resume_reading()  # so the client's EOF is seen
        self._linger = self.loop.call_later(LINGER_S, transport.close)


__all__ = ["EdgeLimits", "EdgeProtocol", "edge_protocol"]
