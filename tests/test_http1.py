"""`Http1Transport`, the production upstream client, against raw loopback servers that
write exactly the bytes each test needs and record exactly what they receive.

Nothing here sleeps and hopes: servers wait on events the test sets once the client has
seen something, and conditions the test cannot trigger itself are polled with
`eventually`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx
import pytest

from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.upstream.http1 import MAX_HEAD_BYTES, MAX_HEADERS, Http1Response, Http1Transport
from tests.certs import make_certificates
from tests.conftest import ProxyFactory
from tests.servers import free_port
from tests.waiting import eventually

MiB = 1024 * 1024


# --- a raw server ----------------------------------------------------------------------------


@dataclass
class Request:
    """One request as it came off the wire."""

    head: bytes
    body: bytes

    @property
    def lines(self) -> list[bytes]:
        """The request line, then one line per header (the blank line dropped)."""
        return self.head.split(b"\r\n")[:-2]

    @property
    def target(self) -> bytes:
        return self.lines[0].split(b" ")[1]


@dataclass
class Peer:
    """One connection the server accepted."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: list[Request] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # the client closed or reset it

    async def request(self) -> Request | None:
        """The next request, or None once the client closed the connection between
        requests. A connection closed mid-request fails the test (at server stop)."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise AssertionError(f"client closed mid-head: {exc.partial!r}") from exc
            self.closed.set()
            return None
        except ConnectionResetError:
            self.closed.set()
            return None
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        try:
            body = await self.reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise AssertionError(f"client closed mid-body after {len(exc.partial)} B") from exc
        request = Request(head, body)
        self.requests.append(request)
        return request

    def write(self, data: bytes) -> None:
        self.writer.write(data)


Handler = Callable[[Peer], Awaitable[None]]


class RawServer:
    """`asyncio.start_server` on 127.0.0.1 that runs `handler` for each connection and
    keeps every `Peer`, so tests can count connections and see what each received.
    Errors in a handler (other than the client going away) fail the test at stop."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.peers: list[Peer] = []
        self.errors: list[Exception] = []
        self.port = 0
        self._tasks: set[asyncio.Task[object]] = set()
        self._server: asyncio.Server | None = None

    async def start(
        self, port: int = 0, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"
    ) -> None:
        self._server = await asyncio.start_server(self._accept, host, port, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, target: str = "/", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{target}"

    @property
    def connections(self) -> int:
        return len(self.peers)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(reader, writer)
        self.peers.append(peer)
        try:
            await self.handler(peer)
        except ConnectionError:
            peer.closed.set()
        except asyncio.CancelledError:
            pass  # stopped by `stop()`; ending normally keeps asyncio from logging it
        except Exception as exc:
            self.errors.append(exc)
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for peer in self.peers:
            peer.writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        if self.errors:
            raise self.errors[0]


class Serve(Protocol):
    def __call__(
        self,
        handler: Handler,
        *,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
    ) -> Awaitable[RawServer]: ...


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """`await serve(handler)` starts a `RawServer`; all are stopped after the test."""
    servers: list[RawServer] = []

    async def start(
        handler: Handler,
        *,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
    ) -> RawServer:
        server = RawServer(handler)
        await server.start(port, tls, host)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


class MakeTransport(Protocol):
    def __call__(
        self, *, read_timeout_s: float = 2.0, keepalive_s: float = 30.0, ca_bundle: str = ""
    ) -> Http1Transport: ...


@pytest.fixture
async def make_transport() -> AsyncIterator[MakeTransport]:
    """A factory for transports with other timeouts; all are closed after the test."""
    made: list[Http1Transport] = []

    def make(
        *, read_timeout_s: float = 2.0, keepalive_s: float = 30.0, ca_bundle: str = ""
    ) -> Http1Transport:
        transport = Http1Transport(
            connect_timeout_s=2.0,
            read_timeout_s=read_timeout_s,
            ca_bundle=ca_bundle,
            provider_id="test",
            keepalive_s=keepalive_s,
        )
        made.append(transport)
        return transport

    yield make
    for transport in made:
        await transport.close()


@pytest.fixture
async def transport(make_transport: MakeTransport) -> Http1Transport:
    return make_transport()


def ok(body: bytes, headers: bytes = b"") -> bytes:
    """A keep-alive 200 with a Content-Length body."""
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), headers, body)


def answering(*responses: bytes) -> Handler:
    """Answer the server's n-th request with `responses[n]` (the last one again once
    they run out), whichever connection it comes on, until the client closes."""
    served = 0

    async def handle(peer: Peer) -> None:
        nonlocal served
        while await peer.request() is not None:
            peer.write(responses[min(served, len(responses) - 1)])
            served += 1

    return handle


async def wait_for_close(peer: Peer) -> None:
    """Read until the client closes; any further request it sends is recorded."""
    while await peer.request() is not None:
        pass


def silent_after(data: bytes) -> Handler:
    """Write `data` once the request is in, then nothing more until the client closes."""

    async def handle(peer: Peer) -> None:
        await peer.request()
        peer.write(data)
        await wait_for_close(peer)

    return handle


async def let_the_client_read() -> None:
    """Give the event loop a few turns. Bytes written on loopback are in the client's
    socket at once, so this makes the client read them before the server writes more
    (they would often arrive joined otherwise). Only makes a split likelier: no
    assertion depends on it."""
    for _ in range(5):
        await asyncio.sleep(0)


async def collect(chunks: AsyncIterator[bytes], into: list[bytes]) -> None:
    """Append each body piece to `into` until the body ends (or fails)."""
    async for chunk in chunks:
        into.append(chunk)


def header_pairs(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Header lines as (name, value), the names we expect the client to add
    (host, content-length) lowercased since their case is the client's choice."""
    pairs = []
    for line in lines:
        name, sep, value = line.partition(b":")
        assert sep, f"not a header line: {line!r}"
        if name.lower() in (b"host", b"content-length"):
            name = name.lower()
        pairs.append((name, value.strip()))
    return pairs


# --- the request on the wire -----------------------------------------------------------------

GIVEN = [
    (b"authorization", b"Bearer sk-test"),
    (b"x-dup", b"1"),
    (b"Content-Type", b"application/json"),
    (b"x-dup", b"2"),
]


@pytest.mark.parametrize(
    ("method", "body", "length"),
    [
        ("GET", b"", None),
        ("HEAD", b"", None),
        ("DELETE", b"", None),
        ("POST", b"", b"0"),
        ("PUT", b"", b"0"),
        ("PATCH", b"", b"0"),
        ("POST", b'{"a": 1}', b"8"),
        ("DELETE", b"x", b"1"),
    ],
)
async def test_the_request_is_the_line_host_given_headers_and_length_only(
    transport: Http1Transport, serve: Serve, method: str, body: bytes, length: bytes | None
) -> None:
    """No User-Agent, Accept, Accept-Encoding or Connection of the client's own: the
    provider sees what the agent sent, and the target goes out byte for byte."""
    server = await serve(answering(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"))
    target = "/v1/chat/a%20b/%7Euser/%2F?q=%2F&x=a+b&empty=&u=%C3%A9"
    response = await transport.send(method, server.url(target), GIVEN, body)
    assert await response.read() == b""
    await response.aclose()
    (request,) = server.peers[0].requests
    line, *headers = request.lines
    assert line == f"{method} {target} HTTP/1.1".encode()
    expected = [(b"host", f"127.0.0.1:{server.port}".encode()), *GIVEN]
    if length is not None:
        expected.append((b"content-length", length))
    assert header_pairs(headers) == expected
    assert request.body == body


@pytest.mark.parametrize(("url_tail", "target"), [("", b"/"), ("?x=1", b"/?x=1")])
async def test_an_empty_path_is_sent_as_slash(
    transport: Http1Transport, serve: Serve, url_tail: str, target: bytes
) -> None:
    """A base URL without a path must still give an origin-form target."""
    server = await serve(answering(ok(b"")))
    response = await transport.send("GET", server.url(url_tail), [], b"")
    await response.read()
    await response.aclose()
    assert server.peers[0].requests[0].target == target


@pytest.mark.parametrize("authority", ["127.0.0.1", "127.0.0.1:80"])
async def test_the_default_port_is_left_out_of_host(
    transport: Http1Transport, serve: Serve, authority: str
) -> None:
    """`host: api.example.com`, not `api.example.com:80`: some front ends route on it."""
    try:
        server = await serve(answering(ok(b"")), port=80)
    except OSError as exc:
        pytest.skip(f"cannot listen on 127.0.0.1:80 here ({exc})")
    response = await transport.send("GET", f"http://{authority}/x", [], b"")
    await response.read()
    await response.aclose()
    _, host, *_ = server.peers[0].requests[0].lines
    assert header_pairs([host]) == [(b"host", b"127.0.0.1")]


async def test_an_ipv6_literal_is_bracketed_in_host(
    transport: Http1Transport, serve: Serve
) -> None:
    try:
        server = await serve(answering(ok(b"six")), host="::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here ({exc})")
    response = await transport.send("GET", f"http://[::1]:{server.port}/x", [], b"")
    assert await response.read() == b"six"
    await response.aclose()
    _, host, *_ = server.peers[0].requests[0].lines
    assert header_pairs([host]) == [(b"host", f"[::1]:{server.port}".encode())]


async def test_a_large_request_body_arrives_whole(transport: Http1Transport, serve: Serve) -> None:
    """A body far past the socket buffers goes out complete and in order."""
    body = b"".join(i.to_bytes(4, "big") * 1024 for i in range(2048))  # 8 MiB
    server = await serve(answering(ok(b"got it")))
    response = await transport.send("POST", server.url("/upload"), [], body)
    assert await response.read() == b"got it"
    await response.aclose()
    assert server.peers[0].requests[0].body == body


# --- response framing ------------------------------------------------------------------------

CHUNKED = (
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    b"5;name=value;other\r\nhello\r\n"
    b"1B\r\n abcdefghijklmnopqrstuvwxyz\r\n"
    b"0\r\nx-checksum: abc\r\nx-more: 1\r\n\r\n"
)

# id: (method, the whole response, status, body)
FRAMINGS = {
    "content-length": ("GET", ok(b"hello world"), 200, b"hello world"),
    "no reason phrase": ("GET", b"HTTP/1.1 200\r\ncontent-length: 2\r\n\r\nok", 200, b"ok"),
    "chunked with extensions and trailers": (
        "GET",
        CHUNKED,
        200,
        b"hello abcdefghijklmnopqrstuvwxyz",
    ),
    "empty content-length": ("POST", ok(b""), 200, b""),
    "HEAD with content-length": (
        "HEAD",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n",
        200,
        b"",
    ),
    "HEAD with transfer-encoding": (
        "HEAD",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        200,
        b"",
    ),
    "204": ("DELETE", b"HTTP/1.1 204 No Content\r\n\r\n", 204, b""),
    "304 with content-length": (
        "GET",
        b'HTTP/1.1 304 Not Modified\r\ncontent-length: 11\r\netag: "x"\r\n\r\n',
        304,
        b"",
    ),
}


@pytest.mark.parametrize(("method", "wire", "status", "body"), FRAMINGS.values(), ids=FRAMINGS)
async def test_each_framing_yields_exactly_the_body(
    transport: Http1Transport, serve: Serve, method: str, wire: bytes, status: int, body: bytes
) -> None:
    """The server keeps the connection open, so a client that waits for body bytes
    that a HEAD, 204 or 304 never has fails here with a timeout."""
    server = await serve(answering(wire))
    response = await transport.send(method, server.url("/"), [], b"")
    assert response.status == status
    assert await response.read() == body
    await response.aclose()


REUSABLE = {name: framing for name, framing in FRAMINGS.items() if framing[0] != "HEAD"}


@pytest.mark.parametrize(("method", "wire", "status", "body"), REUSABLE.values(), ids=REUSABLE)
async def test_each_framing_leaves_the_connection_reusable(
    transport: Http1Transport, serve: Serve, method: str, wire: bytes, status: int, body: bytes
) -> None:
    """After a fully read body (trailers included) the next request goes out on the
    same connection and parses from a clean state."""
    server = await serve(answering(wire))
    for _ in range(2):
        response = await transport.send(method, server.url("/"), [], b"")
        assert response.status == status
        assert await response.read() == body
        await response.aclose()
    assert server.connections == 1
    assert len(server.peers[0].requests) == 2


async def test_after_a_head_response_the_next_request_works_and_nothing_leaks(
    transport: Http1Transport, serve: Serve
) -> None:
    """A HEAD answer's Content-Length announces no body; whether the client reuses the
    connection or closes it, the next answer must parse, and a connection it will
    not reuse must be closed."""
    server = await serve(
        answering(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n", ok(b"hello"))
    )
    response = await transport.send("HEAD", server.url("/"), [], b"")
    assert await response.read() == b""
    await response.aclose()
    response = await transport.send("GET", server.url("/"), [], b"")
    assert await response.read() == b"hello"
    await response.aclose()
    await eventually(lambda: all(peer.closed.is_set() for peer in server.peers[:-1]), within=1)


@pytest.mark.parametrize(
    "status_and_headers",
    [
        b"HTTP/1.1 200 OK\r\nconnection: close\r\n",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.0 200 OK\r\n",
    ],
    ids=["connection close", "HTTP/1.1 without length", "HTTP/1.0"],
)
async def test_a_body_without_length_ends_at_eof_without_error(
    transport: Http1Transport, serve: Serve, status_and_headers: bytes
) -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()
        peer.write(status_and_headers + b"\r\nfirst ")
        await let_the_client_read()
        peer.write(b"second")
        # returning closes the connection: that is the end of the body

    server = await serve(handle)
    response = await transport.send("GET", server.url("/"), [], b"")
    assert response.status == 200
    assert await response.read() == b"first second"
    await response.aclose()
    response = await transport.send("GET", server.url("/"), [], b"")
    assert await response.read() == b"first second"
    await response.aclose()
    assert server.connections == 2


@pytest.mark.parametrize(
    "status_and_headers",
    [b"HTTP/1.1 200 OK\r\nconnection: close\r\n", b"HTTP/1.0 200 OK\r\n"],
    ids=["connection close", "HTTP/1.0"],
)
async def test_a_response_that_says_close_is_not_pooled(
    transport: Http1Transport, serve: Serve, status_and_headers: bytes
) -> None:
    """The server says it will close but (like a slow one) has not yet: the client must
    neither reuse the connection nor leave it open."""
    server = await serve(answering(status_and_headers + b"content-length: 2\r\n\r\nhi"))
    for _ in range(2):
        response = await transport.send("GET", server.url("/"), [], b"")
        assert await response.read() == b"hi"
        await response.aclose()
    assert server.connections == 2
    assert [len(peer.requests) for peer in server.peers] == [1, 1]
    await eventually(server.peers[0].closed.is_set, within=1)


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 199 Whatever\r\n\r\n",
        b"HTTP/1.0 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nconnection: close\r\n\r\n",
    ],
    ids=["100", "103", "102 then 199", "HTTP/1.0 100", "103 saying close"],
)
@pytest.mark.parametrize("split", [False, True], ids=["joined", "split"])
async def test_an_interim_response_is_skipped_for_the_final_one(
    transport: Http1Transport, serve: Serve, interim: bytes, split: bool
) -> None:
    """A 1xx is not the answer: its status and headers must not leak into the final
    response, and the connection stays usable. What a 1xx says about the connection
    (HTTP/1.0, `connection: close`) is not the final answer's either: llhttp took it
    as the end of the exchange and refused the answer (found by test_http1_fuzz)."""

    async def handle(peer: Peer) -> None:
        while await peer.request() is not None:
            peer.write(interim)
            if split:
                await let_the_client_read()
            peer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\nx-final: yes\r\n\r\nok")

    server = await serve(handle)
    for _ in range(2):
        response = await transport.send("POST", server.url("/"), [], b"{}")
        assert response.status == 201
        assert response.raw_headers == [(b"content-length", b"2"), (b"x-final", b"yes")]
        assert await response.read() == b"ok"
        await response.aclose()
    assert server.connections == 1


# --- response headers ------------------------------------------------------------------------


async def test_many_large_and_repeated_headers_come_back_as_sent(
    transport: Http1Transport, serve: Serve
) -> None:
    """Original case, original order, duplicates kept (two Set-Cookie are two cookies),
    up to exactly `MAX_HEADERS` fields."""
    headers = [
        (b"Content-Length", b"2"),
        (b"Set-Cookie", b"a=1; Path=/"),
        (b"set-cookie", b"b=2"),
        (b"X-Big", b"v" * 16384),
    ]
    headers += [(f"X-Header-{i:03}".encode(), f"value {i}".encode()) for i in range(95)]
    headers.append((b"Set-Cookie", b"c=3"))
    assert len(headers) == MAX_HEADERS
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    server = await serve(answering(head + b"\r\nok"))
    response = await transport.send("GET", server.url("/"), [], b"")
    assert response.raw_headers == headers
    assert await response.read() == b"ok"
    await response.aclose()


async def test_a_head_split_mid_name_and_mid_value_is_reassembled(
    transport: Http1Transport, serve: Serve
) -> None:
    """The parser reports a name or value cut by a read boundary in pieces."""
    pieces = [
        b"HTTP/1.1 2",
        b"00 OK\r\nX-Spl",
        b"it-Name: spl",
        b"it-value\r",
        b"\ncontent-length: 5\r\n\r",
        b"\nhel",
        b"lo",
    ]

    async def handle(peer: Peer) -> None:
        await peer.request()
        for piece in pieces:
            peer.write(piece)
            await let_the_client_read()
        await wait_for_close(peer)

    server = await serve(handle)
    response = await transport.send("GET", server.url("/"), [], b"")
    assert response.status == 200
    assert response.raw_headers == [(b"X-Split-Name", b"split-value"), (b"content-length", b"5")]
    assert await response.read() == b"hello"
    await response.aclose()


# --- streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
async def test_pieces_arrive_as_they_are_written(
    transport: Http1Transport, serve: Serve, chunked: bool
) -> None:
    """The server writes the next piece only once the client has yielded the previous
    one, so a client that waits to fill a buffer deadlocks here (and times out)."""
    pieces = [b"data: one\n\n", b"data: two\n\n", b"data: three\n\n"]
    seen = asyncio.Event()

    async def handle(peer: Peer) -> None:
        await peer.request()
        if chunked:
            peer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        else:
            length = sum(map(len, pieces))
            peer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % length)
        for piece in pieces:
            peer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            await seen.wait()
            seen.clear()
        if chunked:
            peer.write(b"0\r\n\r\n")
        await wait_for_close(peer)

    server = await serve(handle)
    response = await transport.send("POST", server.url("/v1/chat/completions"), [], b"{}")
    received = []
    async for chunk in response.chunks():
        received.append(chunk)
        seen.set()
    await response.aclose()
    assert received == pieces
    assert response.buffered == 0


async def test_a_steady_stream_longer_than_the_read_timeout_is_not_cut(
    make_transport: MakeTransport, serve: Serve
) -> None:
    """read_timeout_s bounds the silence between bytes, not the whole stream: 20 pieces
    50 ms apart take a second, twice the 0.5 s read timeout."""
    transport = make_transport(read_timeout_s=0.5)
    seen = asyncio.Event()

    async def handle(peer: Peer) -> None:
        await peer.request()
        peer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(20):
            await asyncio.sleep(0.05)
            peer.write(b"2\r\n%02d\r\n" % i)
            await seen.wait()
            seen.clear()
        peer.write(b"0\r\n\r\n")
        await wait_for_close(peer)

    server = await serve(handle)
    started = time.monotonic()
    response = await transport.send("GET", server.url("/"), [], b"")
    received = []
    async for chunk in response.chunks():
        received.append(chunk)
        seen.set()
    await response.aclose()
    assert received == [b"%02d" % i for i in range(20)]
    assert time.monotonic() - started >= 1.0


# --- the pool --------------------------------------------------------------------------------


async def test_an_abandoned_body_closes_its_connection(
    make_transport: MakeTransport, serve: Serve
) -> None:
    """A response closed before its end cannot go back to the pool (the rest of its
    body would be read as the next answer), and closing it is how the provider learns
    the agent went away. (A long read timeout, so only `aclose()` can close it.)"""
    transport = make_transport(read_timeout_s=30)

    async def handle(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            if request.target == b"/partial":
                peer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
            else:
                peer.write(ok(b"whole"))

    server = await serve(handle)
    response = await transport.send("GET", server.url("/partial"), [], b"")
    body = response.chunks()
    assert await anext(body) == b"x" * 10
    await response.aclose()
    await response.aclose()  # idempotent
    await eventually(server.peers[0].closed.is_set, within=2)
    response = await transport.send("GET", server.url("/whole"), [], b"")
    assert await response.read() == b"whole"
    await response.aclose()
    assert server.connections == 2
    assert [len(peer.requests) for peer in server.peers] == [1, 1]


async def test_concurrent_requests_each_get_their_own_connection(
    transport: Http1Transport, serve: Serve
) -> None:
    """Twenty streams in flight at once: no pipelining, no queueing behind a limit."""
    release = asyncio.Event()

    async def handle(peer: Peer) -> None:
        await peer.request()
        peer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await release.wait()
        peer.write(b"4\r\nlast\r\n0\r\n\r\n")
        await wait_for_close(peer)

    server = await serve(handle)
    responses = await asyncio.gather(
        *(transport.send("GET", server.url(f"/{i}"), [], b"") for i in range(20))
    )
    streams = [response.chunks() for response in responses]
    for stream in streams:
        assert await anext(stream) == b"first"
    assert server.connections == 20
    assert sorted(peer.requests[0].target for peer in server.peers) == sorted(
        f"/{i}".encode() for i in range(20)
    )
    release.set()
    for stream in streams:
        assert [chunk async for chunk in stream] == [b"last"]
    for response in responses:
        await response.aclose()


@pytest.mark.parametrize(
    "farewell",
    [b"", b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"],
    ids=["silent close", "408 then close"],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_pooled_connection_the_server_closed_is_not_reused(
    transport: Http1Transport, serve: Serve, method: str, farewell: bytes
) -> None:
    """Servers drop idle keep-alive connections, some (nginx) with an unasked-for 408;
    once the client has seen the close, the next request (even a POST, which cannot
    be retried) goes out on a fresh one and gets its own answer."""
    first_closed = asyncio.Event()

    async def handle(peer: Peer) -> None:
        if await peer.request() is not None:
            peer.write(ok(b"hello"))  # keep-alive, as far as the client can tell
            await peer.writer.drain()
            await let_the_client_read()
            peer.write(farewell)
        peer.writer.close()
        with contextlib.suppress(ConnectionError):
            await peer.writer.wait_closed()
        first_closed.set()

    server = await serve(handle)
    response = await transport.send(method, server.url("/"), [], b"")
    assert await response.read() == b"hello"
    await response.aclose()
    await first_closed.wait()
    await let_the_client_read()  # the FIN is in the client's socket: let it see it
    response = await transport.send(method, server.url("/"), [], b"")
    assert response.status == 200
    assert await response.read() == b"hello"
    await response.aclose()
    assert server.connections == 2


async def close_the_second_request_unanswered(peer: Peer) -> None:
    """Answer the first request on each connection; close on the second without a
    byte, as a server does that dropped the idle connection just as the request left."""
    if await peer.request() is not None:
        peer.write(ok(b"hello"))
    await peer.request()


async def test_a_get_on_a_pooled_connection_closed_unanswered_is_retried_once(
    transport: Http1Transport, serve: Serve
) -> None:
    """The race the previous test avoids: the request left before the close arrived.
    An idempotent request is safe to send again on a fresh connection."""
    server = await serve(close_the_second_request_unanswered)
    for _ in range(2):
        response = await transport.send("GET", server.url("/"), [], b"")
        assert await response.read() == b"hello"
        await response.aclose()
    assert [len(peer.requests) for peer in server.peers] == [2, 1]


async def test_a_post_on_a_pooled_connection_closed_unanswered_is_502_not_resent(
    transport: Http1Transport, serve: Serve
) -> None:
    """The server may have acted on a POST it never answered: sending it again could
    run a completion twice, so it fails instead."""
    server = await serve(close_the_second_request_unanswered)
    response = await transport.send("POST", server.url("/"), [], b"{}")
    assert await response.read() == b"hello"
    await response.aclose()
    with pytest.raises(UpstreamUnavailable):
        await transport.send("POST", server.url("/"), [], b"{}")
    assert [len(peer.requests) for peer in server.peers] == [2]


async def test_an_idle_pooled_connection_is_closed_after_keepalive_s(
    make_transport: MakeTransport, serve: Serve
) -> None:
    transport = make_transport(keepalive_s=0.2)
    server = await serve(answering(ok(b"hi")))
    response = await transport.send("GET", server.url("/"), [], b"")
    assert await response.read() == b"hi"
    await response.aclose()
    idle_since = time.monotonic()
    await eventually(server.peers[0].closed.is_set, within=3)
    assert time.monotonic() - idle_since >= 0.15  # idle for keepalive_s, not closed at once


async def test_close_closes_pooled_connections(serve: Serve) -> None:
    transport = Http1Transport(connect_timeout_s=2, read_timeout_s=2, provider_id="test")
    server = await serve(answering(ok(b"hi")))
    try:
        for path in ("/a", "/b"):
            response = await transport.send("GET", server.url(path), [], b"")
            assert await response.read() == b"hi"
            await response.aclose()
    finally:
        await transport.close()
    await eventually(server.peers[0].closed.is_set, within=2)


async def test_cancelling_send_abandons_the_request(
    transport: Http1Transport, serve: Serve
) -> None:
    """An agent that goes away while the provider thinks must not leave the request
    running upstream: the connection is closed, so the provider can stop."""
    server = await serve(wait_for_close)  # takes the request, never answers
    sending = asyncio.create_task(transport.send("POST", server.url("/"), [], b"{}"))
    await eventually(lambda: server.connections == 1 and server.peers[0].requests, within=2)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    await eventually(server.peers[0].closed.is_set, within=1)


async def test_close_fails_a_response_still_streaming(serve: Serve) -> None:
    """Closing the transport (shutdown) while a body streams must end the reader with
    an error, not leave it waiting forever for bytes that can no longer come."""
    transport = Http1Transport(connect_timeout_s=2, read_timeout_s=30, provider_id="test")
    server = await serve(
        silent_after(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
    )
    try:
        response = await transport.send("GET", server.url("/"), [], b"")
        stream = response.chunks()
        assert await anext(stream) == b"first"
    finally:
        await transport.close()
    async with asyncio.timeout(1):  # at once, not at some read timeout
        with pytest.raises(UpstreamUnavailable):
            await anext(stream)
    await response.aclose()
    await eventually(server.peers[0].closed.is_set, within=1)


async def test_close_fails_a_request_waiting_for_its_headers(serve: Serve) -> None:
    transport = Http1Transport(connect_timeout_s=2, read_timeout_s=30, provider_id="test")
    server = await serve(wait_for_close)  # takes the request, never answers
    sending = asyncio.create_task(transport.send("POST", server.url("/"), [], b"{}"))
    try:
        await eventually(lambda: server.connections == 1 and server.peers[0].requests, within=2)
    finally:
        await transport.close()
    async with asyncio.timeout(1):  # at once, not at some read timeout
        with pytest.raises(UpstreamUnavailable):
            await sending


# --- errors ----------------------------------------------------------------------------------


async def test_nothing_listening_is_502(transport: Http1Transport) -> None:
    with pytest.raises(UpstreamUnavailable):
        await transport.send("GET", f"http://127.0.0.1:{free_port()}/", [], b"")


async def close_at_once(peer: Peer) -> None:
    pass  # returning closes the connection


async def close_after_the_request(peer: Peer) -> None:
    await peer.request()


async def reset_after_the_request(peer: Peer) -> None:
    await peer.request()
    sock = peer.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.writer.transport.abort()  # with SO_LINGER 0: an RST, not a FIN


@pytest.mark.parametrize(
    "handler",
    [close_at_once, close_after_the_request, reset_after_the_request],
    ids=["closed on accept", "closed after the request", "reset after the request"],
)
async def test_a_connection_lost_before_the_headers_is_502(
    transport: Http1Transport, serve: Serve, handler: Handler
) -> None:
    server = await serve(handler)
    async with asyncio.timeout(5):
        with pytest.raises(UpstreamUnavailable):
            await transport.send("POST", server.url("/"), [], b"{}")


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n",
    ],
    ids=["bad status code", "not HTTP", "bad content-length"],
)
async def test_a_malformed_head_is_502_at_once(
    transport: Http1Transport, serve: Serve, wire: bytes
) -> None:
    """The server keeps the connection open: only the parse error can end the wait
    (a timeout would be UpstreamTimeout, not UpstreamUnavailable)."""
    server = await serve(silent_after(wire))
    with pytest.raises(UpstreamUnavailable):
        await transport.send("GET", server.url("/"), [], b"")
    await eventually(server.peers[0].closed.is_set, within=1)


# id: (head, the body bytes written before the close, the same de-chunked)
CUT = {
    "content-length": (
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n",
        b"x" * 10,
        b"x" * 10,
    ),
    "chunked between chunks": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        b"5\r\nhello\r\n",
        b"hello",
    ),
    "chunked mid-chunk": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        b"a\r\nhel",
        b"hel",
    ),
}


@pytest.mark.parametrize(("head", "partial", "content"), CUT.values(), ids=CUT)
@pytest.mark.parametrize("how", ["read", "chunks"])
async def test_a_body_cut_short_is_502_from_the_body(
    transport: Http1Transport,
    serve: Serve,
    head: bytes,
    partial: bytes,
    content: bytes,
    how: str,
) -> None:
    """Headers were complete, so send() succeeds; the truncation must not pass for a
    complete body. What did arrive may be yielded before the error."""

    async def handle(peer: Peer) -> None:
        await peer.request()
        peer.write(head + partial)
        await let_the_client_read()  # the headers are handled before the close

    server = await serve(handle)
    response = await transport.send("GET", server.url("/"), [], b"")
    assert response.status == 200
    received: list[bytes] = []
    reading = response.read() if how == "read" else collect(response.chunks(), received)
    with pytest.raises(UpstreamUnavailable):
        await reading
    assert content.startswith(b"".join(received))
    await response.aclose()


async def test_a_malformed_chunk_is_502_from_the_body(
    transport: Http1Transport, serve: Serve
) -> None:
    server = await serve(
        silent_after(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n")
    )
    response = await transport.send("GET", server.url("/"), [], b"")
    with pytest.raises(UpstreamUnavailable):
        await response.read()
    await response.aclose()
    await eventually(server.peers[0].closed.is_set, within=1)


async def test_silence_before_the_headers_is_504_from_send(
    make_transport: MakeTransport, serve: Serve
) -> None:
    transport = make_transport(read_timeout_s=0.3)
    server = await serve(wait_for_close)  # reads the request, never answers
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await transport.send("POST", server.url("/"), [], b"{}")
    assert 0.25 <= time.monotonic() - started < 3
    await eventually(server.peers[0].closed.is_set, within=2)  # and it is not pooled


async def test_silence_mid_body_is_504_from_chunks(
    make_transport: MakeTransport, serve: Serve
) -> None:
    transport = make_transport(read_timeout_s=0.3)
    server = await serve(
        silent_after(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
    )
    response = await transport.send("GET", server.url("/"), [], b"")
    received: list[bytes] = []
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await collect(response.chunks(), received)
    assert 0.25 <= time.monotonic() - started < 3
    assert received == [b"x" * 10]
    await response.aclose()
    await eventually(server.peers[0].closed.is_set, within=2)


def trickling(prefix: bytes) -> Handler:
    """Write `prefix`, then one byte every 0.1 s until the client goes away."""

    async def handle(peer: Peer) -> None:
        await peer.request()
        peer.write(prefix)
        while not (peer.writer.is_closing() or peer.reader.at_eof()):
            await asyncio.sleep(0.1)
            peer.write(b"a")

    return handle


async def test_timeout_s_bounds_a_trickling_head(
    make_transport: MakeTransport, serve: Serve
) -> None:
    """timeout_s is a deadline for the whole exchange: a byte every 0.1 s never trips
    the 5 s read timeout, but must not keep the caller past 0.3 s."""
    transport = make_transport(read_timeout_s=5)
    server = await serve(trickling(b"HTTP/1.1 200 OK\r\nx-slow: "))
    started = time.monotonic()
    async with asyncio.timeout(3):  # a client without the deadline would wait forever
        with pytest.raises(UpstreamTimeout):
            await transport.send("GET", server.url("/usage"), [], b"", timeout_s=0.3)
    assert 0.25 <= time.monotonic() - started < 1.5


async def test_timeout_s_bounds_a_trickling_body(
    make_transport: MakeTransport, serve: Serve
) -> None:
    """The deadline covers reading the body too (`Upstream.poll_usage` relies on it
    to bound a whole poll)."""
    transport = make_transport(read_timeout_s=5)
    server = await serve(trickling(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n"))
    started = time.monotonic()
    response = await transport.send("GET", server.url("/usage"), [], b"", timeout_s=0.3)
    async with asyncio.timeout(3):  # a client without the deadline would wait forever
        with pytest.raises(UpstreamTimeout):
            await response.read()
    assert time.monotonic() - started < 1.5
    await response.aclose()


# --- flow control ----------------------------------------------------------------------------


async def open_big_body(
    transport: Http1Transport, serve: Serve, body: bytes
) -> tuple[Http1Response, AsyncIterator[bytes], bytes, asyncio.WriteTransport]:
    """A server that writes `body` in one go; the response, its stream, the first
    piece read and the server's side of the connection."""

    async def handle(peer: Peer) -> None:
        await peer.request()
        peer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
        peer.write(body)
        await peer.writer.drain()
        await wait_for_close(peer)

    server = await serve(handle)
    response = await transport.send("GET", server.url("/big"), [], b"")
    stream = response.chunks()
    first = await anext(stream)
    return response, stream, first, server.peers[0].writer.transport


async def stalled_on_the_server(server_side: asyncio.WriteTransport, over: int) -> None:
    """Until more than `over` bytes sit unsent on the server's side, unchanged over
    three looks: the client has stopped reading."""
    samples: list[int] = []

    def stalled() -> bool:
        samples.append(server_side.get_write_buffer_size())
        return len(samples) >= 3 and samples[-1] == samples[-2] == samples[-3] > over

    await eventually(stalled, within=5)


async def test_a_reader_that_stops_stops_the_server(
    transport: Http1Transport, serve: Serve
) -> None:
    """A stalled agent must not make the proxy buffer a whole response: the client
    stops reading the socket, so the bytes back up on the server's side."""
    block = bytes(range(256)) * 256  # 64 KiB
    body = b"".join(i.to_bytes(4, "big") + block[4:] for i in range(1024))  # 64 MiB
    assert len(body) == 64 * MiB
    response, stream, first, server_side = await open_big_body(transport, serve, body)
    assert first == body[: len(first)]
    await stalled_on_the_server(server_side, over=16 * MiB)
    assert response.buffered <= MiB
    offset = len(first)
    async for chunk in stream:
        assert chunk == body[offset : offset + len(chunk)], f"wrong bytes at {offset}"
        offset += len(chunk)
    assert offset == len(body)
    assert response.buffered == 0
    await response.aclose()


async def test_a_paused_reader_is_not_taken_for_a_silent_upstream(
    make_transport: MakeTransport, serve: Serve
) -> None:
    """While the client holds the upstream back (reading paused for a slow agent), no
    bytes arrive, but the upstream is not silent: the read timeout must not fire."""
    transport = make_transport(read_timeout_s=0.3)
    body = b"".join(i.to_bytes(4, "big") * 2048 for i in range(4096))  # 32 MiB
    response, stream, first, server_side = await open_big_body(transport, serve, body)
    await stalled_on_the_server(server_side, over=8 * MiB)
    await asyncio.sleep(1.0)  # the agent dawdles: over three read timeouts, reading paused
    received = [first]
    await collect(stream, received)
    assert b"".join(received) == body
    await response.aclose()


# --- strictness: what a well-kept client refuses (issue 14) ----------------------------------


async def refused_at_once(transport: Http1Transport, server: RawServer) -> UpstreamUnavailable:
    """Send a GET that must fail with a 502 well before any read timeout (the transports
    here wait 30 s for bytes), on a connection the client then closes."""
    async with asyncio.timeout(5):
        with pytest.raises(UpstreamUnavailable) as refused:
            await transport.send("GET", server.url("/"), [], b"")
        await eventually(server.peers[0].closed.is_set, within=2)
    return refused.value


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/1.1 000 Zero", b"HTTP/1.1 099 Low", b"HTTP/1.1 600 High", b"HTTP/1.1 999 Odd"],
    ids=["000", "099", "600", "999"],
)
async def test_a_status_outside_100_599_is_502_at_once_and_not_pooled(
    make_transport: MakeTransport, serve: Serve, status_line: bytes
) -> None:
    """llhttp reads any three digits. A `000` used to leave `send()` waiting forever
    (its status read as "no answer yet"); a `600` was relayed. The next request gets a
    fresh connection and its own answer."""
    transport = make_transport(read_timeout_s=30)
    server = await serve(answering(status_line + b"\r\ncontent-length: 2\r\n\r\nno", ok(b"yes")))
    error = await refused_at_once(transport, server)
    assert "outside 100-599" in error.message
    response = await transport.send("GET", server.url("/"), [], b"")
    assert (response.status, await response.read()) == (200, b"yes")
    await response.aclose()
    assert server.connections == 2


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
    ids=["with upgrade headers", "bare"],
)
async def test_switching_protocols_is_502_without_a_traceback(
    make_transport: MakeTransport,
    serve: Serve,
    caplog: pytest.LogCaptureFixture,
    head: bytes,
) -> None:
    """sluice never asks to upgrade (Upgrade is hop-by-hop and dropped), so a 101 is a
    broken upstream. With Upgrade headers httptools raised `HttpParserUpgrade`, which
    escaped `data_received`: asyncio logged a "Fatal error" with a traceback."""
    transport = make_transport(read_timeout_s=30)
    server = await serve(silent_after(head + b"\x00binary websocket frames"))
    error = await refused_at_once(transport, server)
    assert "101" in error.message
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 103 Early Hints\r\ncontent-length: 3\r\n\r\nabc",
        b"HTTP/1.1 104 Unknown\r\ncontent-length: 3\r\n\r\nabc",
        b"HTTP/1.1 199 Unknown\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ],
    ids=["103 with length", "104 with length", "199 chunked"],
)
async def test_an_interim_response_with_a_body_length_is_502(
    make_transport: MakeTransport, serve: Serve, interim: bytes
) -> None:
    """A 1xx ends with its head (RFC 9110 section 15.2). llhttp reads a body for any 1xx
    but 100, 102 and 103 when given a length, and those bytes went to the final
    response's body; which to believe is a guess, so it is refused."""
    transport = make_transport(read_timeout_s=30)
    final = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    server = await serve(silent_after(interim + final))
    error = await refused_at_once(transport, server)
    assert "interim" in error.message


@pytest.mark.parametrize("where", ["head", "trailers"])
async def test_more_than_max_headers_fields_is_502(
    make_transport: MakeTransport, serve: Serve, where: str
) -> None:
    """`MAX_HEADERS` fields pass (see the test above); one more does not, in the head
    (502 from send) or in the trailer section (502 from the body)."""
    transport = make_transport(read_timeout_s=30)
    fields = b"".join(b"x-field-%03d: %d\r\n" % (i, i) for i in range(MAX_HEADERS + 1))
    if where == "head":
        server = await serve(silent_after(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n"))
        error = await refused_at_once(transport, server)
    else:
        chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
        server = await serve(silent_after(chunked + fields + b"\r\n"))
        response = await transport.send("GET", server.url("/"), [], b"")
        async with asyncio.timeout(5):
            with pytest.raises(UpstreamUnavailable) as refused:
                await response.read()
        await response.aclose()
        error = refused.value
    assert f"more than {MAX_HEADERS} header fields" in error.message


def big_head(size: int) -> bytes:
    """A 200 head whose header fields take exactly `size` bytes, most in one field."""
    length = b"content-length: 2\r\n"
    start = b"x-big: "
    value = b"v" * (size - len(length) - len(start) - 2)
    return b"HTTP/1.1 200 OK\r\n" + length + start + value + b"\r\n\r\n"


async def test_a_head_of_max_head_bytes_passes(transport: Http1Transport, serve: Serve) -> None:
    head = big_head(MAX_HEAD_BYTES)
    server = await serve(answering(head + b"ok"))
    response = await transport.send("GET", server.url("/"), [], b"")
    assert len(dict(response.raw_headers)[b"x-big"]) > MAX_HEAD_BYTES - 100
    assert await response.read() == b"ok"
    await response.aclose()


def head_without_end(size: int) -> Handler:
    """A header line of `size` bytes that never ends, in 4 KiB writes, the connection
    kept open: only a bound on what arrives can refuse it."""

    async def handle(peer: Peer) -> None:
        await peer.request()
        peer.write(b"HTTP/1.1 200 OK\r\nx-endless: ")
        for _ in range(size // 4096 + 1):
            peer.write(b"v" * 4096)
            await peer.writer.drain()
            await let_the_client_read()
        await wait_for_close(peer)

    return handle


@pytest.mark.parametrize(
    "handler",
    [
        silent_after(big_head(MAX_HEAD_BYTES + 1) + b"ok"),
        silent_after(
            b"HTTP/1.1 200 OK\r\n"
            + b"".join(b"x-%02d: %s\r\n" % (i, b"v" * 2048) for i in range(40))
            + b"\r\n"
        ),
        head_without_end(2 * MAX_HEAD_BYTES),
    ],
    ids=["one byte over", "many fields", "a line that never ends"],
)
async def test_a_head_over_max_head_bytes_is_502(
    make_transport: MakeTransport, serve: Serve, handler: Handler
) -> None:
    transport = make_transport(read_timeout_s=30)
    server = await serve(handler)
    error = await refused_at_once(transport, server)
    assert f"over {MAX_HEAD_BYTES} bytes" in error.message


async def test_trailers_are_read_and_dropped(transport: Http1Transport, serve: Serve) -> None:
    """Response trailers are not relayed (ASGI would need an extension for them), and
    they must not turn up in the headers the relay reads either."""
    server = await serve(answering(CHUNKED))
    response = await transport.send("GET", server.url("/"), [], b"")
    assert await response.read() == b"hello abcdefghijklmnopqrstuvwxyz"
    assert response.raw_headers == [(b"transfer-encoding", b"chunked")]
    await response.aclose()


async def test_a_trailer_section_over_max_head_bytes_is_502(
    make_transport: MakeTransport, serve: Serve
) -> None:
    transport = make_transport(read_timeout_s=30)
    trailer = b"x-big: " + b"v" * MAX_HEAD_BYTES + b"\r\n\r\n"
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
    server = await serve(silent_after(chunked + trailer))
    response = await transport.send("GET", server.url("/"), [], b"")
    async with asyncio.timeout(5):
        with pytest.raises(UpstreamUnavailable, match=f"over {MAX_HEAD_BYTES} bytes"):
            await response.read()
    await response.aclose()


@pytest.mark.parametrize("coding", [b"gzip", b"gzip, deflate", b"GZIP"])
async def test_a_transfer_coding_without_chunked_is_read_until_the_close(
    transport: Http1Transport, serve: Serve, coding: bytes
) -> None:
    """RFC 9112 section 6.3 item 4: with chunked not the final coding, a response
    ends at the close. The client took any Transfer-Encoding for a framed body and
    called the close a truncation (502). Codings are not undone: bytes pass as they
    came, like Content-Encoding."""

    async def handle(peer: Peer) -> None:
        await peer.request()
        peer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: " + coding + b"\r\n\r\n\x1f\x8b")
        await let_the_client_read()
        peer.write(b"coded bytes")

    server = await serve(handle)
    response = await transport.send("GET", server.url("/"), [], b"")
    assert response.status == 200
    assert await response.read() == b"\x1f\x8bcoded bytes"
    await response.aclose()


async def test_chunked_after_other_codings_is_chunked_and_reusable(
    transport: Http1Transport, serve: Serve
) -> None:
    wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
    server = await serve(answering(wire + b"5\r\nhello\r\n0\r\n\r\n"))
    for _ in range(2):
        response = await transport.send("GET", server.url("/"), [], b"")
        assert await response.read() == b"hello"
        await response.aclose()
    assert server.connections == 1


@pytest.mark.parametrize(
    "length_first", [True, False], ids=["length first", "transfer-encoding first"]
)
async def test_transfer_encoding_beats_content_length_and_the_connection_is_not_reused(
    transport: Http1Transport, serve: Serve, length_first: bool
) -> None:
    """Both framings in one response (RFC 9112 section 6.3 item 3): the chunked body is
    the body, the Content-Length is dropped before relaying (the relay would otherwise
    frame the client's copy by it), and a connection that saw this is not trusted
    with another request. llhttp refused the response outright before."""
    framing = [b"content-length: 3\r\n", b"transfer-encoding: chunked\r\n"]
    if not length_first:
        framing.reverse()
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(framing) + b"x-after: 1\r\n\r\n"
    server = await serve(answering(head + b"9\r\nall of it\r\n0\r\n\r\n"))
    for _ in range(2):
        response = await transport.send("GET", server.url("/"), [], b"")
        assert await response.read() == b"all of it"
        names = [name for name, _ in response.raw_headers]
        assert names == [b"transfer-encoding", b"x-after"]
        await response.aclose()
    assert server.connections == 2
    await eventually(server.peers[0].closed.is_set, within=2)


@pytest.mark.parametrize(
    "value",
    [
        b"chunked, gzip",
        b"chunked, chunked",
        b"chunked,",
        b", chunked",
        b'"chunked"',
        b"chunked;q=1",
        b"gzip;level=9, chunked",
    ],
)
async def test_an_unreadable_transfer_encoding_is_502(
    make_transport: MakeTransport, serve: Serve, value: bytes
) -> None:
    """Where llhttp and the RFC (or h11) could frame the body differently: llhttp
    reads `chunked,` until the close although an empty list element means nothing, and
    reads `chunked, gzip` until the close where no sender may put chunked but last.
    Refused rather than guessed (h11 refuses every coding but a lone chunked)."""
    transport = make_transport(read_timeout_s=30)
    server = await serve(
        silent_after(b"HTTP/1.1 200 OK\r\ntransfer-encoding: " + value + b"\r\n\r\n0\r\n\r\n")
    )
    error = await refused_at_once(transport, server)
    assert "Transfer-Encoding" in error.message


async def test_headers_the_connection_header_names_are_not_exposed(
    transport: Http1Transport, serve: Serve
) -> None:
    """RFC 9110 section 7.6.1: they describe the upstream's hop only. Matched without
    regard to case or list whitespace; the rest keep their order (the relay drops the
    hop-by-hop ones, Connection itself included)."""
    head = (
        b"HTTP/1.1 200 OK\r\nX-Foo: secret\r\nconnection: keep-alive , X-FOO\r\n"
        b"keep-alive: timeout=5\r\nx-kept: 1\r\nConnection: x-bar,,\r\nx-bar: 2\r\n"
        b"content-length: 2\r\n\r\nok"
    )
    server = await serve(answering(head))
    response = await transport.send("GET", server.url("/"), [], b"")
    assert response.raw_headers == [
        (b"connection", b"keep-alive , X-FOO"),
        (b"x-kept", b"1"),
        (b"Connection", b"x-bar,,"),
        (b"content-length", b"2"),
    ]
    assert await response.read() == b"ok"
    await response.aclose()


@pytest.mark.parametrize(
    ("method", "status", "kept"),
    [
        ("GET", b"204 No Content", [(b"etag", b'"v1"')]),
        ("GET", b"304 Not Modified", [(b"etag", b'"v1"')]),
        ("HEAD", b"200 OK", [(b"content-length", b"11"), (b"etag", b'"v1"')]),
    ],
    ids=["204", "304", "HEAD"],
)
async def test_a_bodiless_answer_with_content_length_is_clean(
    transport: Http1Transport,
    serve: Serve,
    method: str,
    status: bytes,
    kept: list[tuple[bytes, bytes]],
) -> None:
    """No body is read, and a 204 or 304 loses its Content-Length: uvicorn checks the
    body the relay hands it against that header and raised "Response content shorter
    than Content-Length" for them (it lets HEAD pass, so HEAD keeps it)."""
    wire = b"HTTP/1.1 " + status + b'\r\ncontent-length: 11\r\netag: "v1"\r\n\r\n'
    server = await serve(answering(wire))
    for _ in range(2 if method == "GET" else 1):
        response = await transport.send(method, server.url("/"), [], b"")
        assert response.raw_headers == kept
        assert await response.read() == b""
        await response.aclose()
    assert server.connections == 1


async def unasked_bytes(peer: Peer, joined: bool) -> None:
    """Answer the first request on each connection with "first" and the start of a
    second answer nobody asked for; should the client send another request on this
    connection, finish that answer with a body the client must never see."""
    await peer.request()
    stray = b"HTTP/1.1 200 OK\r\nx-smuggled: 1\r\n"
    if joined:
        peer.write(ok(b"first") + stray)
    else:
        peer.write(ok(b"first"))
        await peer.writer.drain()
        await let_the_client_read()
        peer.write(stray)
    if await peer.request() is not None:
        peer.write(b"content-length: 5\r\n\r\nWRONG")
        await wait_for_close(peer)


@pytest.mark.parametrize("joined", [True, False], ids=["in the same read", "later"])
async def test_bytes_with_no_request_outstanding_close_the_connection(
    transport: Http1Transport, serve: Serve, joined: bool
) -> None:
    """A connection whose parser has seen bytes nobody asked for would read them as
    the start of the next answer. Arriving on their own, they closed it already;
    in the read that ended the previous answer, they were parsed on and kept."""
    server = await serve(lambda peer: unasked_bytes(peer, joined))
    response = await transport.send("GET", server.url("/"), [], b"")
    assert await response.read() == b"first"
    await response.aclose()
    await eventually(server.peers[0].closed.is_set, within=2)
    response = await transport.send("GET", server.url("/"), [], b"")
    assert await response.read() == b"first"
    assert (b"x-smuggled", b"1") not in response.raw_headers
    await response.aclose()
    assert [len(peer.requests) for peer in server.peers] == [1, 1]


@pytest.mark.parametrize(
    ("headers", "url_tail"),
    [
        ([(b"x-a", b"one\rtwo")], ""),
        ([(b"x-a", b"one\ntwo")], ""),
        ([(b"x-a", b"one\r\nx-b: two")], ""),
        ([(b"x-a", b"one\x00two")], ""),
        ([(b"x-a\r", b"one")], ""),
        ([(b"x-\x00a", b"one")], ""),
        ([], "/a\rb"),
        ([], "/a\x00b"),
    ],
    ids=[
        "CR in a value",
        "LF in a value",
        "CRLF in a value",
        "NUL in a value",
        "CR in a name",
        "NUL in a name",
        "CR in the path",
        "NUL in the path",
    ],
)
async def test_a_cr_lf_or_nul_in_the_request_is_refused_before_sending(
    transport: Http1Transport,
    serve: Serve,
    headers: list[tuple[bytes, bytes]],
    url_tail: str,
) -> None:
    """A bare CR ends a line for some servers and a NUL ends a value for others: either
    could smuggle a header past the proxy, as a LF could."""
    server = await serve(answering(ok(b"")))
    with pytest.raises(UpstreamUnavailable, match="CR, LF or NUL"):
        await transport.send("GET", server.url("/x" + url_tail), headers, b"")
    assert server.connections == 0


THROUGH_THE_PROXY = {
    b"/up/not-modified": b'HTTP/1.1 304 Not Modified\r\ncontent-length: 11\r\netag: "v1"\r\n\r\n',
    b"/up/no-content": b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
    b"/up/head": b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n",
    b"/up/named": (
        b"HTTP/1.1 200 OK\r\nconnection: close, X-Foo\r\nx-foo: secret\r\nx-kept: 1\r\n"
        b"content-length: 2\r\n\r\nok"
    ),
    b"/up/switch": (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    ),
    b"/up/weird": b"HTTP/1.1 600 Weird\r\ncontent-length: 2\r\n\r\nno",
}


@pytest.mark.e2e
async def test_through_the_proxy_bodiless_answers_relay_and_refusals_are_clean_502s(
    serve: Serve, make_proxy: ProxyFactory
) -> None:
    """What the client's strictness is for, end to end through `sluice serve` (uvicorn
    and the relay): a 204 or 304 with a Content-Length made uvicorn raise "Response
    content shorter than Content-Length"; a Connection-named header reached the
    agent; a 101 logged a traceback. Each answer is checked, then the proxy's log."""

    async def handle(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            peer.write(THROUGH_THE_PROXY[request.target])

    server = await serve(handle)
    proxy = make_proxy(f'[[providers]]\nid = "raw"\nbase_url = "{server.url("/up")}"\n')
    # One connection, so every earlier exchange has ended (and logged) once the last
    # answer is in.
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(base_url=proxy.url + "/v1", limits=limits) as client:
        answer = await client.get("/not-modified")
        assert (answer.status_code, answer.headers.get("etag")) == (304, '"v1"')
        answer = await client.get("/no-content")
        assert answer.status_code == 204
        answer = await client.head("/head")
        assert (answer.status_code, answer.headers["content-length"]) == (200, "1234")
        answer = await client.get("/named")
        assert (answer.status_code, answer.text, answer.headers["x-kept"]) == (200, "ok", "1")
        assert "x-foo" not in answer.headers
        for path in ("/switch", "/weird"):
            answer = await client.get(path)
            assert answer.status_code == 502
            assert answer.json()["error"]["type"] == "sluice_upstream_error"
        assert (await client.get(proxy.url + "/healthz")).status_code == 200
    log = proxy.log()
    assert "Traceback" not in log
    assert "Exception in ASGI application" not in log


# --- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(ca, cert, key) of a throwaway CA and a certificate for 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.skip("no `openssl` command to make a throwaway certificate; TLS not tested")
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def server_tls(certificates: tuple[Path, Path, Path]) -> ssl.SSLContext:
    _, cert, key = certificates
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether `kind` is in the chain of causes of `error` (errors are mapped with
    `raise ... from exc`)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, kind):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


async def test_https_with_the_ca_bundle_works_and_pools(
    make_transport: MakeTransport,
    serve: Serve,
    certificates: tuple[Path, Path, Path],
    server_tls: ssl.SSLContext,
) -> None:
    ca, _, _ = certificates
    transport = make_transport(ca_bundle=str(ca))
    server = await serve(answering(ok(b"secret")), tls=server_tls)
    for _ in range(2):
        response = await transport.send("GET", server.url("/", "https"), [], b"")
        assert response.status == 200
        assert await response.read() == b"secret"
        await response.aclose()
    assert server.connections == 1


async def test_https_to_an_unknown_ca_is_502(
    transport: Http1Transport, serve: Serve, server_tls: ssl.SSLContext
) -> None:
    """Verification is on by default: the system store does not know the throwaway CA."""
    server = await serve(answering(ok(b"secret")), tls=server_tls)
    with pytest.raises(UpstreamUnavailable) as refused:
        await transport.send("GET", server.url("/", "https"), [], b"")
    assert caused_by(refused.value, ssl.SSLCertVerificationError), refused.value
    assert server.connections == 0  # no handshake completed


async def test_https_checks_the_host_name(
    make_transport: MakeTransport,
    serve: Serve,
    certificates: tuple[Path, Path, Path],
    server_tls: ssl.SSLContext,
) -> None:
    """A certificate from the trusted CA, but for 127.0.0.1, not for `localhost`."""
    ca, _, _ = certificates
    transport = make_transport(ca_bundle=str(ca))
    server = await serve(answering(ok(b"secret")), tls=server_tls)
    with pytest.raises(UpstreamUnavailable) as refused:
        await transport.send("GET", f"https://localhost:{server.port}/", [], b"")
    assert caused_by(refused.value, ssl.SSLCertVerificationError), refused.value
    assert server.connections == 0


async def test_https_default_port_is_left_out_of_host(
    make_transport: MakeTransport,
    serve: Serve,
    certificates: tuple[Path, Path, Path],
    server_tls: ssl.SSLContext,
) -> None:
    ca, _, _ = certificates
    transport = make_transport(ca_bundle=str(ca))
    try:
        server = await serve(answering(ok(b"")), port=443, tls=server_tls)
    except OSError as exc:
        pytest.skip(f"cannot listen on 127.0.0.1:443 here ({exc})")
    response = await transport.send("GET", "https://127.0.0.1/x", [], b"")
    await response.read()
    await response.aclose()
    _, host, *_ = server.peers[0].requests[0].lines
    assert header_pairs([host]) == [(b"host", b"127.0.0.1")]


class ManualTls:
    """Server-side TLS done by hand over a plain connection, so the server can do what
    `ssl=` servers never do: ignore the client's close_notify and keep the socket
    open, as a busy or careless upstream may."""

    def __init__(self, peer: Peer, context: ssl.SSLContext) -> None:
        self.peer = peer
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def _flush(self) -> None:
        if data := self.outgoing.read():
            self.peer.write(data)

    async def _fill(self) -> None:
        data = await self.peer.reader.read(65536)
        if not data:
            raise ConnectionResetError("the client closed the TCP connection")
        self.incoming.write(data)

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                await self._fill()
            else:
                self._flush()
                return

    async def receive(self) -> bytes:
        """Decrypted bytes; b"" once the client sent close_notify (not answered)."""
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._flush()
                await self._fill()
            except ssl.SSLZeroReturnError:
                return b""

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()


def tls_without_close_notify(
    context: ssl.SSLContext, response: bytes, tcp_closed: asyncio.Event
) -> Handler:
    """Answer every request with `response` over hand-made TLS; once the client says
    close_notify, say nothing back and wait for the TCP connection to end."""

    async def handle(peer: Peer) -> None:
        tls = ManualTls(peer, context)
        try:
            await tls.handshake()
            received = b""
            while data := await tls.receive():
                received += data
                while b"\r\n\r\n" in received:
                    _, received = received.split(b"\r\n\r\n", 1)
                    tls.send(response)
            await peer.reader.read()  # returns at the TCP close
        except ConnectionError:
            pass  # a reset, or a TCP close with no close_notify: closed all the same
        tcp_closed.set()

    return handle


async def test_close_closes_pooled_tls_connections_at_once(
    serve: Serve, certificates: tuple[Path, Path, Path], server_tls: ssl.SSLContext
) -> None:
    """A TLS close waits for the peer's close_notify (asyncio gives it 30 s): an
    upstream that never answers must not keep the socket, which outlives the event
    loop in tests (an unclosed-transport ResourceWarning) and a shutdown in production."""
    ca, _, _ = certificates
    tcp_closed = asyncio.Event()
    server = await serve(tls_without_close_notify(server_tls, ok(b"hi"), tcp_closed))
    transport = Http1Transport(
        connect_timeout_s=2, read_timeout_s=2, ca_bundle=str(ca), provider_id="test"
    )
    try:
        response = await transport.send("GET", server.url("/", "https"), [], b"")
        assert await response.read() == b"hi"
        await response.aclose()
    finally:
        await transport.close()
    await eventually(tcp_closed.is_set, within=1)


async def test_an_abandoned_tls_body_closes_its_socket_at_once(
    make_transport: MakeTransport,
    serve: Serve,
    certificates: tuple[Path, Path, Path],
    server_tls: ssl.SSLContext,
) -> None:
    """As over plain TCP: the agent went away, so the upstream must learn it now, not
    once it answers a close_notify (or after asyncio's 30 s shutdown timeout)."""
    ca, _, _ = certificates
    transport = make_transport(read_timeout_s=30, ca_bundle=str(ca))
    tcp_closed = asyncio.Event()
    partial = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10
    server = await serve(tls_without_close_notify(server_tls, partial, tcp_closed))
    response = await transport.send("GET", server.url("/", "https"), [], b"")
    assert await anext(response.chunks()) == b"x" * 10
    await response.aclose()
    await eventually(tcp_closed.is_set, within=1)
