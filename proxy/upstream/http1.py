"""The production upstream client: HTTP/1.1 keep-alive connections on asyncio
protocols, responses parsed by httptools.

Why our own: a proxy holds one upstream connection per open stream, so what a
client keeps per connection is multiplied by every stream in flight. aiohttp kept
about 12 KiB of Python objects per open stream (response, stream reader, protocol,
connector bookkeeping, multidicts, several deques); this client keeps one small
protocol object per connection and one response object per request, and hands body
bytes to the reader through a list and at most one future. It does only what the
relay needs: one request at a time per connection, bodies sent whole, no redirects,
no decompression, no cookies, no proxies; TLS is always verified.

Lower-layer failures become `UpstreamUnavailable` (502) or `UpstreamTimeout` (504)
here, with `raise ... from exc`.

Strict where a proxy must be (RFC 9112; h11 is the model, and
tests/test_http1_fuzz.py holds us to it). httptools (llhttp) parses; the client
adds the rules llhttp leaves to its caller, once per response head, never per body
chunk:

- a status outside 100-599 (llhttp reads any three digits), and a `101` (sluice
  never asks to switch protocols), is a 502 at once, as is a status line that is
  not HTTP's (llhttp also takes `RTSP/` and `ICE/`);
- a head is at most `MAX_HEADERS` fields and `MAX_HEAD_BYTES` bytes, and so is a
  trailer section; trailers are read and dropped, never exposed;
- framing per RFC 9112 section 6.3: a `Transfer-Encoding` whose last coding is
  `chunked` is chunked, one without `chunked` is read until the close, anything else
  (`chunked` not last or twice, an empty or odd coding) is a 502; with both
  `Transfer-Encoding` and `Content-Length` the former wins, the latter is dropped and
  the connection is not reused; llhttp refuses a malformed or repeated
  Content-Length;
- an interim 1xx may carry no body, so one with a Content-Length or
  Transfer-Encoding is a 502 (llhttp would read a body for it);
- headers that the upstream's `Connection` header names are dropped, as is the
  Content-Length of a 204 or 304 (it describes no body here, and uvicorn refuses
  to end a response short of it);
- bytes the upstream sends when no request is outstanding close the connection;
- a request header or target with a CR, LF or NUL is refused before it is sent.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator, Coroutine
from typing import Any, NamedTuple, cast
from urllib.parse import urlsplit

import httptools

from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from proxy.upstream.transport import Headers

HIGH_WATER = 256 * 1024
"""Unread body bytes past which the connection stops reading from the upstream, so a
slow client pushes back on the upstream instead of growing our memory."""

MAX_HEADERS = 100
"""Header fields one response head may carry (the same bound as `server.max_headers`
for requests); an interim 1xx head and the trailer section count on their own. More
is a 502."""

MAX_HEAD_BYTES = 64 * 1024
"""Bytes of header fields one response head may carry (the same bound as
`server.max_header_bytes` for requests), each field counted as written
`name: value` CRLF, so its name and value plus 4; a trailer section is held to the
same. More is a 502. A head still incomplete once twice this has arrived for it
(status line and any interim 1xx heads included) is refused then, without waiting
for an end that may never come: httptools holds a header line whole until it ends."""

_AUTHORITY_END = re.compile(r"[/?#]")
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
"""A token (RFC 9110 section 5.6.2): what a transfer coding must be."""
_FRAMING_NAME_LENGTHS = frozenset(
    map(len, (b"connection", b"content-length", b"transfer-encoding"))
)
"""Lengths of `connection`, `content-length` and `transfer-encoding`: a header of
another length is skipped without lower-casing its name."""
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
"""Methods retried once on a fresh connection when a pooled one turns out closed."""


class Origin(NamedTuple):
    """Where a connection goes; pooled connections are keyed by it."""

    tls: bool
    host: str
    port: int
    host_header: bytes


class _ClosedEarly(UpstreamUnavailable):
    """The connection closed before any byte of the response: on a pooled connection
    this is the upstream having dropped it while idle, and an idempotent request is
    retried once on a fresh one."""


class Http1Response:
    """One response whose status and headers have arrived; `chunks()` reads the body
    as it arrives. `aclose()` closes the connection unless the body was read to its
    end (the connection went back to the pool then). Safe to call more than once.

    While the reader waits, the next piece goes straight into the future it awaits;
    pieces that arrive while nobody waits are kept in `_pending`. An open stream
    costs one future while idle, not a generator or a coroutine. (So a reader
    cancelled just after a piece was handed over loses it; the relay abandons the
    stream when cancelled, so nothing reads on.)"""

    __slots__ = (
        "_complete",
        "_connection",
        "_error",
        "_pending",
        "_waiter",
        "buffered",
        "raw_headers",
        "status",
    )

    def __init__(self, connection: _Connection) -> None:
        self._connection: _Connection | None = connection
        self.status = 0
        self.raw_headers: Headers = []
        self._pending: list[bytes] = []
        self.buffered = 0
        """Body bytes received and not yet handed out by `chunks()`."""
        self._waiter: asyncio.Future[bytes] | None = None
        self._error: UpstreamError | None = None
        self._complete = False

    # -- fed by the connection

    def _headers_arrived(self, status: int) -> None:
        self.status = status
        if (waiter := self._waiter) is not None and not waiter.done():
            waiter.set_result(b"")

    def _feed(self, data: bytes) -> None:
        if (waiter := self._waiter) is not None and not waiter.done():
            waiter.set_result(data)
        else:
            self._pending.append(data)
            self.buffered += len(data)

    def _finish(self, error: UpstreamError | None = None) -> None:
        """The body ended (`error` None) or failed; the connection is done with us.
        The first end counts."""
        if self._complete or self._error is not None:
            return
        if error is None:
            self._complete = True
        else:
            self._error = error
        self._connection = None
        if (waiter := self._waiter) is not None and not waiter.done():
            waiter.set_exception(error or StopAsyncIteration())

    # -- read by the relay

    def chunks(self) -> AsyncIterator[bytes]:
        """The body; pieces that arrived since the last one was taken come joined,
        so one write to the client can carry them all."""
        return self

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    def __anext__(self) -> asyncio.Future[bytes]:
        future = self._waiter = asyncio.get_running_loop().create_future()
        if pending := self._pending:
            future.set_result(b"".join(pending))  # one piece: that very object
            pending.clear()
            self.buffered = 0
            if (connection := self._connection) is not None:
                connection.drained()
        elif self._error is not None:
            future.set_exception(self._error)
        elif self._complete:
            future.set_exception(StopAsyncIteration())
        return future

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        if (connection := self._connection) is not None:
            self._connection = None
            connection.close()


class _Connection(asyncio.Protocol):
    """One upstream connection, serving one request at a time. Its parser calls
    back into it (`on_message_begin` ... `on_message_complete`) from `data_received`,
    through the pool's shared `_ParserEvents`. A callback refuses a response by
    raising an `UpstreamError`: the parser stops there and `data_received` closes the
    connection with it."""

    __slots__ = (
        "_deadline",
        "_fields",
        "_head_bytes",
        "_head_only",
        "_head_size",
        "_informational",
        "_last_data",
        "_must_close",
        "_parser",
        "_paused",
        "_pool",
        "_read_timeout_s",
        "_received",
        "_to_eof",
        "closed",
        "idle_since",
        "origin",
        "response",
        "transport",
    )

    def __init__(self, pool: Http1Transport, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(pool.events)
        # Both Transfer-Encoding and Content-Length: the first wins (RFC 9112
        # section 6.3) rather than failing the response; `_framing` then drops the
        # length and the connection is not reused. And parse on after a message that
        # asks to close: else an interim 1xx on an HTTP/1.0 status line or with
        # `Connection: close` fails the answer after it (h11 reads on), while
        # `on_message_begin` refuses any message after the answer itself.
        self._parser.set_dangerous_leniencies(lenient_chunked_length=True, lenient_keep_alive=True)
        self.response: Http1Response | None = None
        self.closed = False
        self.idle_since = 0.0
        """When it went back to the pool; 0 while it serves a request."""
        self._paused = False
        self._received = False
        self._head_only = False
        self._informational = False
        self._to_eof = False
        self._must_close = False
        self._fields = 0
        """Header fields of the head (or trailer section) being read."""
        self._head_size = 0
        """Their bytes, as `MAX_HEAD_BYTES` counts them."""
        self._head_bytes = 0
        """Bytes received while the final head was incomplete."""
        self._last_data = 0.0
        self._read_timeout_s = 0.0
        self._deadline = 0.0

    def start(
        self, head: bytes, body: bytes, *, head_only: bool, read_timeout_s: float, deadline: float
    ) -> Http1Response:
        """Send one request; its response's status and headers are yet to come."""
        transport = self.transport
        assert transport is not None
        response = self.response = Http1Response(self)
        self._received = False
        self._head_only = head_only
        self._must_close = False
        self._fields = self._head_size = self._head_bytes = 0
        self._read_timeout_s = read_timeout_s
        self._deadline = deadline
        self._last_data = self._pool.loop.time()
        self._pool.watch(self.due())
        if len(body) < 65536:
            transport.write(head + body)
        else:
            transport.writelines((head, body))
        return response

    def drained(self) -> None:
        """The reader took what was buffered: read from the upstream again."""
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def close(self, error: UpstreamError | None = None) -> None:
        """Close the connection; a response still in flight fails with `error`."""
        if (response := self.response) is not None:
            self.response = None
            response._finish(
                error
                or UpstreamUnavailable(f"sluice closed the connection to {self._pool.provider_id}")
            )
        self._pool.forget(self)
        if self.transport is not None:
            # Not close(): over TLS that waits for the peer's close_notify, and a
            # peer that never sends one would hold the socket for half a minute.
            self.transport.abort()

    def _refused(self, what: str) -> UpstreamUnavailable:
        return UpstreamUnavailable(f"upstream {self._pool.provider_id} {what}")

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            self.close()  # bytes nobody asked for: the connection cannot be trusted
            return
        if not self._received:
            # The answer's first byte. llhttp also takes `RTSP/` and `ICE/` status
            # lines, which start otherwise; it skips empty lines before one.
            first = data.lstrip(b"\r\n")[:1]
            if first:
                if first != b"H":
                    self.close(self._refused("sent something other than an HTTP response"))
                    return
                self._received = True
        self._last_data = self._pool.loop.time()
        self._pool.events.connection = self
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            refusal = exc.__context__  # what a callback raised, if one did
            if refusal is not None and not isinstance(refusal, UpstreamError):
                self.close()
                raise refusal from None  # a bug of ours: let asyncio report it
            self.close(refusal or self._refused(f"sent a malformed response ({exc})"))
            return
        if not response.status and self.response is response:
            # The head is still incomplete, so every byte of this read was part of
            # it: a line that never ends is bounded here, not only at its end. Twice
            # the limit, as the status line and interim heads count here too.
            self._head_bytes += len(data)
            if self._head_bytes > 2 * MAX_HEAD_BYTES:
                self.close(self._refused(f"sent a response head over {MAX_HEAD_BYTES} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        response = self.response
        if response is None:
            return
        self.response = None
        provider = self._pool.provider_id
        if response.status and self._to_eof and exc is None:
            response._finish()  # a body with neither length nor chunking ends at EOF
        elif not self._received:
            response._finish(
                _ClosedEarly(f"upstream {provider} closed the connection before answering")
            )
        else:
            response._finish(
                UpstreamUnavailable(f"upstream {provider} closed the connection mid-response")
            )

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self.response is None:
            # In the same read as the previous answer: a pooled connection with
            # bytes nobody asked for cannot be trusted with the next request.
            raise self._refused("sent bytes after its response")

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        if response is None:
            return
        self._fields += 1
        self._head_size += len(name) + len(value) + 4
        if self._fields > MAX_HEADERS:
            raise self._refused(f"sent more than {MAX_HEADERS} header fields")
        if self._head_size > MAX_HEAD_BYTES:
            raise self._refused(f"sent a response head over {MAX_HEAD_BYTES} bytes")
        if not response.status:  # once the head is complete, a trailer: dropped
            # llhttp keeps trailing whitespace, which is not part of a value.
            response.raw_headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:
            return  # the rest of a HEAD answer, closed already
        status = self._parser.get_status_code()
        headers = response.raw_headers
        # The next head, or the trailer section, counts afresh.
        self._fields = self._head_size = 0
        if 100 <= status < 200 and status != 101:
            # An interim answer, e.g. 100 Continue: the real one follows.
            if any(_framing_name(name) for name, _ in headers):
                raise self._refused(f"sent a body length on an interim {status} response")
            self._informational = True
            headers.clear()
            return
        if status == 101:
            raise self._refused("switched protocols (101), which sluice never asks for")
        if not 200 <= status <= 599:
            raise self._refused(f"answered with status {status:03d}, outside 100-599")
        self._to_eof, self._must_close, kept = _framing(
            status, self._head_only, headers, self._pool.provider_id
        )
        if kept is not None:
            response.raw_headers = kept
        response._headers_arrived(status)
        if self._head_only:
            # The parser cannot be told a HEAD answer has no body; end it here and
            # do not reuse the connection.
            response._finish()
            self.close()

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is None:
            return
        response._feed(body)
        if response.buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        response = self.response
        if response is None:
            return
        self.response = None
        response._finish()
        if self._parser.should_keep_alive() and not self._must_close and not self.closed:
            self.drained()  # an idle connection must read, to see the upstream close it
            self._pool.release(self)
        else:
            self.close()

    # -- timeouts

    def due(self) -> float:
        """When the exchange times out unless a byte arrives first."""
        due = self._last_data + self._read_timeout_s
        return min(due, self._deadline) if self._deadline else due

    def check_timeout(self, now: float) -> float | None:
        """Fail the exchange if it is due; else when to check again (None: idle)."""
        if self.response is None:
            return None
        if self._paused:
            self._last_data = now  # the reader is behind, not the upstream silent
        due = self.due()
        if now < due:
            return due
        self.close(UpstreamTimeout(f"upstream {self._pool.provider_id} sent nothing in time"))
        return None


class _ParserEvents:
    """The parser callbacks, shared by every connection of a pool: given a
    connection as its protocol, httptools would keep four bound methods per parser,
    memory every open stream pays for. The callbacks run synchronously inside
    `feed_data`, so they go to the connection being fed."""

    def __init__(self) -> None:
        self.connection: _Connection | None = None
        # Plain functions stored on the instance: looking them up binds nothing.
        self.on_message_begin = lambda: self._fed().on_message_begin()
        self.on_header = lambda name, value: self._fed().on_header(name, value)
        self.on_headers_complete = lambda: self._fed().on_headers_complete()
        self.on_body = lambda body: self._fed().on_body(body)
        self.on_message_complete = lambda: self._fed().on_message_complete()

    def _fed(self) -> _Connection:
        assert self.connection is not None, "parser callback outside feed_data"
        return self.connection


class Http1Transport:
    """Pooled keep-alive connections per origin, unlimited in number (a proxy holds
    one per open stream). A connection idle for `keepalive_s` is closed."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        ca_bundle: str = "",
        provider_id: str = "",
        keepalive_s: float = 30.0,
    ) -> None:
        self.provider_id = provider_id
        self.events = _ParserEvents()
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._ca_bundle = ca_bundle
        self._keepalive_s = keepalive_s
        self._ssl: ssl.SSLContext | None = None
        self._origins: dict[str, Origin] = {}
        self._idle: dict[Origin, list[_Connection]] = {}
        self._connections: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        # One timer for every read timeout: a timer per connection would cost more
        # memory per open stream than the rest of the connection.
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def send(
        self,
        method: str,
        url: str,
        headers: Headers,
        body: bytes,
        *,
        timeout_s: float | None = None,
    ) -> Coroutine[Any, Any, Http1Response]:
        """Send the request; `url` is already percent-encoded and is sent as is.
        `timeout_s` bounds the whole exchange, headers and body. The request's head
        is built here and only it is kept while the response is awaited, not the
        URL and header list it came from."""
        origin, target = self._split(url)
        head = _request_head(method, target, origin.host_header, headers, body)
        return self._exchange(method, origin, head, body, timeout_s)

    async def _exchange(
        self, method: str, origin: Origin, head: bytes, body: bytes, timeout_s: float | None
    ) -> Http1Response:
        loop = self.loop
        deadline = loop.time() + timeout_s if timeout_s is not None else 0.0
        read_timeout_s = self._read_timeout_s if timeout_s is None else timeout_s
        head_only = method == "HEAD"
        connection = self._take_idle(origin)
        # A pooled connection the upstream dropped while idle is replaced once, for
        # a method safe to send twice.
        retry = connection is not None and method in _IDEMPOTENT
        if connection is None:
            connection = await self._connect(origin, deadline)
        while True:
            response = connection.start(
                head, body, head_only=head_only, read_timeout_s=read_timeout_s, deadline=deadline
            )
            try:
                # Waited for here, not in a method of the connection's: the frames
                # below the relay stay alive until the first byte, which for a model
                # can take many seconds.
                while not response.status:
                    if response._error is not None:
                        raise response._error
                    response._waiter = loop.create_future()
                    await response._waiter
            except _ClosedEarly:
                if not retry:
                    raise
                retry = False
                connection = await self._connect(origin, deadline)
                continue
            except BaseException:
                connection.close()
                raise
            return response

    async def close(self) -> None:
        for timer in (self._sweeper, self._watchdog):
            if timer is not None:
                timer.cancel()
        self._sweeper = self._watchdog = None
        for connection in list(self._connections):
            connection.close()

    # -- timeouts

    def watch(self, due: float) -> None:
        """An exchange started that times out at `due` unless bytes arrive."""
        if self._watchdog is None or due < self._watchdog_at:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._watchdog = self.loop.call_at(due, self._check_timeouts)
            self._watchdog_at = due

    def _check_timeouts(self) -> None:
        self._watchdog = None
        now = self.loop.time()
        dues = [c.check_timeout(now) for c in list(self._connections)]
        if upcoming := [due for due in dues if due is not None]:
            self.watch(min(upcoming))

    # -- the pool

    def release(self, connection: _Connection) -> None:
        connection.idle_since = self.loop.time()
        self._idle.setdefault(connection.origin, []).append(connection)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._keepalive_s, self._sweep)

    def forget(self, connection: _Connection) -> None:
        """`connection` is closed or closing: out of the pool for good."""
        self._connections.discard(connection)
        if connection.idle_since:
            connection.idle_since = 0.0
            idle = self._idle.get(connection.origin)
            if idle is not None and connection in idle:
                idle.remove(connection)

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        horizon = self.loop.time() - self._keepalive_s
        while idle:
            connection = idle.pop()  # the most recently used: the least likely closed
            if connection.idle_since <= horizon:
                connection.close()
                continue
            connection.idle_since = 0.0
            transport = connection.transport
            if not connection.closed and transport is not None and not transport.is_closing():
                return connection
        return None

    def _sweep(self) -> None:
        """Close connections idle for `keepalive_s`; run again while any are idle."""
        self._sweeper = None
        horizon = self.loop.time() - self._keepalive_s
        oldest = None
        for idle in self._idle.values():
            for connection in [c for c in idle if c.idle_since <= horizon]:
                connection.close()
            if idle and (oldest is None or idle[0].idle_since < oldest):
                oldest = idle[0].idle_since
        if oldest is not None:
            self._sweeper = self.loop.call_at(oldest + self._keepalive_s, self._sweep)

    async def _connect(self, origin: Origin, deadline: float) -> _Connection:
        loop = self.loop
        timeout_s = self._connect_timeout_s
        if deadline:
            timeout_s = min(timeout_s, deadline - loop.time())
        connection = _Connection(self, origin)
        context = self._ssl_context() if origin.tls else None
        try:
            async with asyncio.timeout(timeout_s):
                await loop.create_connection(
                    lambda: connection, origin.host, origin.port, ssl=context
                )
        except TimeoutError as exc:
            raise UpstreamUnavailable(
                f"upstream {self.provider_id} did not accept a connection in time"
            ) from exc
        except OSError as exc:
            raise UpstreamUnavailable(
                f"upstream {self.provider_id} is unreachable ({type(exc).__name__})"
            ) from exc
        self._connections.add(connection)
        return connection

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=self._ca_bundle or None)
        return self._ssl

    def _split(self, url: str) -> tuple[Origin, bytes]:
        """(origin, request target) of an absolute URL; origins are parsed once."""
        authority_end = _AUTHORITY_END.search(url, url.find("//") + 2)
        end = authority_end.start() if authority_end else len(url)
        prefix, target = url[:end], url[end:]
        if not target.startswith("/"):
            target = "/" + target  # "http://host?q" asks for "/?q"
        origin = self._origins.get(prefix)
        if origin is None:
            origin = self._origins[prefix] = _origin(prefix, self.provider_id)
        return origin, target.encode("latin-1")


def _framing_name(name: bytes) -> bool:
    """Whether `name` is Content-Length or Transfer-Encoding, in any case."""
    return len(name) in _FRAMING_NAME_LENGTHS and name.lower() in (
        b"content-length",
        b"transfer-encoding",
    )


def _framing(
    status: int, head_only: bool, headers: Headers, provider_id: str
) -> tuple[bool, bool, Headers | None]:
    """How a final response's body ends (RFC 9112 section 6.3), as (read until the
    close, do not reuse the connection, the headers to expose when some must go, else
    None). llhttp has framed the body already and checked each Content-Length; this
    refuses what it would frame differently from the RFC or from h11, and works out
    what llhttp does not tell: whether the body ends at the close."""
    codings: list[bytes] | None = None
    has_length = False
    named: set[bytes] = set()
    for name, value in headers:
        if len(name) not in _FRAMING_NAME_LENGTHS:
            continue
        lower = name.lower()
        if lower == b"transfer-encoding":
            codings = codings or []
            codings += [coding.strip().lower() for coding in value.split(b",")]
        elif lower == b"content-length":
            has_length = True
        elif lower == b"connection":
            named.update(option.strip().lower() for option in value.split(b","))
    chunked = False
    if codings is not None:
        # llhttp takes `chunked` only as the last coding; one it cannot read (empty,
        # quoted, with parameters) would make it read until the close where the RFC
        # may mean chunked: refused rather than guessed.
        if not all(_TOKEN.fullmatch(coding) for coding in codings):
            raise UpstreamUnavailable(
                f"upstream {provider_id} sent an unreadable Transfer-Encoding"
            )
        if b"chunked" in codings:
            if codings.index(b"chunked") != len(codings) - 1:
                raise UpstreamUnavailable(
                    f"upstream {provider_id} sent a Transfer-Encoding with chunked not "
                    "once and last"
                )
            chunked = True
    no_body = head_only or status in (204, 304)
    to_eof = not no_body and not chunked and (codings is not None or not has_length)
    must_close = codings is not None and has_length
    if has_length and (codings is not None or status in (204, 304)):
        named.add(b"content-length")  # describes no body that is relayed
    kept = None
    if named:
        # Connection-named headers describe this hop only (RFC 9110 section 7.6.1).
        kept = [(name, value) for name, value in headers if name.lower() not in named]
        if len(kept) == len(headers):
            kept = None
    return to_eof, must_close, kept


def _origin(prefix: str, provider_id: str) -> Origin:
    parts = urlsplit(prefix)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamUnavailable(f"upstream {provider_id} has no usable http(s) URL")
    tls = parts.scheme == "https"
    default = 443 if tls else 80
    port = parts.port or default
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    host_header = host if port == default else f"{host}:{port}"
    return Origin(tls, parts.hostname, port, host_header.encode("idna"))


def _request_head(method: str, target: bytes, host: bytes, headers: Headers, body: bytes) -> bytes:
    lines = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method.encode("ascii"), target, host)]
    lines += [name + b": " + value + b"\r\n" for name, value in headers]
    if body or method in _WITH_BODY:
        lines.append(b"content-length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    head = b"".join(lines)
    breaks = len(lines) + 1  # the first item holds two lines
    if head.count(b"\n") != breaks or head.count(b"\r") != breaks or b"\0" in head:
        # A line break inside a value would let it smuggle headers or a request; a
        # bare CR is one to some servers, and a NUL ends a value to others.
        raise UpstreamUnavailable("a request header or the path contains a CR, LF or NUL")
    return head
