"""The edge limits (issue 14 item 3, SPEC section 11): request heads, header lines,
slow heads and bodies, open connections, trailers, and the bytes held by queued
bodies. Raw sockets against a real `sluice serve` in front of the sim, with bounded
waits; plus the byte accounting of the protocol and of the queued bodies in process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import selectors
import socket
import threading
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from proxy.admission.aio import admit
from proxy.admission.limiter import Limiter, Permit, Policy, Rejection
from proxy.edge.protocol import EdgeLimits, EdgeProtocol
from proxy.edge.queued_bodies import QueuedBodies
from proxy.errors import QueueFull
from tests.conftest import chat, proxy_config, sim_provider, start_proxy
from tests.redis_server import redis_server
from tests.servers import Server, running
from tests.waiting import eventually, wait_until

T = TypeVar("T")
HEAD_LIMIT = 4096
MAX_HEADERS = 20
TIMEOUT_S = 1.0  # both client_header_timeout_s and client_body_timeout_s
SLACK_S = 2.0  # what a loaded CI machine may add to a timeout
EDGE = f"""
max_header_bytes = {HEAD_LIMIT}
max_headers = {MAX_HEADERS}
client_header_timeout_s = {TIMEOUT_S}
client_body_timeout_s = {TIMEOUT_S}
"""


@pytest.fixture(scope="module")
def edge(sim: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A proxy with small head limits and one-second client timeouts."""
    server = start_proxy(
        tmp_path_factory.mktemp("edge"), sim_provider(sim, "sim", default=True), server=EDGE
    )
    yield server
    server.stop()


# --- raw HTTP -----------------------------------------------------------------------


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (the socket's timeout bounds it)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def read_one_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(headers_of(head + b"\r\n\r\n")["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    return head + b"\r\n\r\n" + body


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:100]
    return int(response[9:12])


def headers_of(response: bytes) -> dict[str, str]:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head)}


def json_of(response: bytes) -> Any:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


def exchange(port: int, request: bytes) -> bytes:
    with connect(port) as sock:
        sock.sendall(request)
        return read_to_eof(sock)


def head_of_size(size: int, *, lines: int = 0, path: bytes = b"/healthz") -> bytes:
    """A GET head of exactly `size` bytes (request line to the blank line), with
    `lines` extra header lines besides Host and the padding."""
    start = b"GET " + path + b" HTTP/1.1\r\nhost: edge\r\nconnection: close\r\n"
    start += b"".join(b"x-line-%d: 1\r\n" % i for i in range(lines))
    pad = size - len(start) - len(b"x-pad: \r\n\r\n")
    assert pad >= 0
    return start + b"x-pad: " + b"a" * pad + b"\r\n\r\n"


def sim_requests(sim: Server) -> int:
    count: int = httpx.get(sim.url + "/sim/stats").json()["requests"]
    return count


# --- max_header_bytes, max_headers --------------------------------------------------


def test_a_head_of_exactly_max_header_bytes_is_served(edge: Server) -> None:
    assert status_of(exchange(edge.port, head_of_size(HEAD_LIMIT))) == 200


def test_one_byte_more_is_431_and_the_connection_closed(edge: Server) -> None:
    response = exchange(edge.port, head_of_size(HEAD_LIMIT + 1))
    assert status_of(response) == 431
    assert headers_of(response)["connection"] == "close"
    error = json_of(response)["error"]
    assert error["code"] == "request_header_fields_too_large"
    assert str(HEAD_LIMIT) in error["message"]


def test_a_head_that_never_ends_is_answered_431_while_still_arriving(edge: Server) -> None:
    """The client is still sending its head (8 MiB of one header) when the 431 comes:
    sluice stopped reading it at the limit and drops the rest."""
    with connect(edge.port) as sock:
        sent = threading.Event()

        def flood() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: edge\r\nx-flood: ")
                for _ in range(128):
                    sock.sendall(b"b" * 65536)
            sent.set()

        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        response = read_to_eof(sock)
        thread.join(10)
    assert status_of(response) == 431


def test_max_headers_lines_are_served_and_one_more_is_431(edge: Server) -> None:
    # Host, Connection and x-pad are three of the lines.
    fits = head_of_size(1024, lines=MAX_HEADERS - 3)
    assert status_of(exchange(edge.port, fits)) == 200
    response = exchange(edge.port, head_of_size(1024, lines=MAX_HEADERS - 2))
    assert status_of(response) == 431
    assert str(MAX_HEADERS) in json_of(response)["error"]["message"]


def test_a_refused_head_is_never_forwarded(edge: Server, sim_reset: Server) -> None:
    before = sim_requests(sim_reset)
    head = head_of_size(HEAD_LIMIT + 100, path=b"/v1/models")
    assert status_of(exchange(edge.port, head)) == 431
    assert sim_requests(sim_reset) == before


# --- client_header_timeout_s --------------------------------------------------------


def test_a_head_not_complete_in_time_is_408_and_closed(edge: Server) -> None:
    """Bytes keep coming, but the head is not done a timeout after its first byte."""
    with connect(edge.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        started = time.monotonic()
        sock.settimeout(0.2)
        response = b""
        for i in range(int((TIMEOUT_S + SLACK_S) / 0.2)):
            with contextlib.suppress(OSError):
                sock.sendall(b"x-slow-%d: 1\r\n" % i)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            response += chunk
            if not chunk:
                break
        took = time.monotonic() - started
    assert status_of(response) == 408
    assert json_of(response)["error"]["code"] == "request_timeout"
    assert TIMEOUT_S - 0.1 <= took <= TIMEOUT_S + SLACK_S


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    edge: Server,
) -> None:
    with connect(edge.port, timeout=TIMEOUT_S + SLACK_S) as sock:
        started = time.monotonic()
        assert read_to_eof(sock) == b""  # nothing to answer, only closed
        assert time.monotonic() - started <= TIMEOUT_S + SLACK_S


def test_each_keep_alive_request_has_its_own_head_time(edge: Server) -> None:
    """The clock starts at each head's first byte, not at the connection's accept."""
    with connect(edge.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: edge\r\n\r\n")
        assert status_of(read_one_response(sock)) == 200
        time.sleep(TIMEOUT_S * 0.7)  # idle between requests: keep-alive time, not head time
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(TIMEOUT_S * 0.5)  # > TIMEOUT_S since the accept, < since this head began
        sock.sendall(b"host: edge\r\n\r\n")
        assert status_of(read_one_response(sock)) == 200


def test_slowloris_connections_are_closed_within_the_timeout_while_serving_goes_on(
    edge: Server, sim_reset: Server
) -> None:
    """200 connections that trickle a head and never finish it are all answered 408
    and closed within the timeout, and meanwhile ordinary requests are served."""
    count = 200
    socks = [connect(edge.port) for _ in range(count)]
    selector = selectors.DefaultSelector()
    received: dict[socket.socket, bytes] = {}
    try:
        for sock in socks:
            sock.setblocking(False)
            sock.send(b"POST /v1/chat/completions HTTP/1.1\r\n")
            selector.register(sock, selectors.EVENT_READ, data=sock)
            received[sock] = b""
        started = time.monotonic()
        open_ = set(socks)
        latencies = []
        with httpx.Client(base_url=edge.url, timeout=10) as client:
            while open_ and time.monotonic() - started < TIMEOUT_S + SLACK_S:
                asked = time.monotonic()
                served = client.post("/v1/chat/completions", json=chat())
                latencies.append(time.monotonic() - asked)
                assert served.status_code == 200
                for sock in list(open_):
                    with contextlib.suppress(OSError):
                        sock.send(b"x")  # still sending, never finishing
                for key, _ in selector.select(timeout=0.05):
                    sock = key.data
                    try:
                        chunk = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        chunk = b""
                    if chunk:
                        received[sock] += chunk
                    else:
                        open_.discard(sock)
                        selector.unregister(sock)
        took = time.monotonic() - started
    finally:
        selector.close()
        for sock in socks:
            sock.close()
    assert not open_, f"{len(open_)} of {count} still open after {took:.1f} s"
    assert all(status_of(data) == 408 for data in received.values())
    assert len(latencies) >= 3
    assert max(latencies) < 1.0, latencies


# --- client_body_timeout_s ----------------------------------------------------------


def test_a_silent_body_is_408_closed_and_never_forwarded(edge: Server, sim_reset: Server) -> None:
    before = sim_requests(sim_reset)
    with connect(edge.port, timeout=TIMEOUT_S + SLACK_S + 1) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: edge\r\n"
            b'content-type: application/json\r\ncontent-length: 1000\r\n\r\n{"model":'
        )
        started = time.monotonic()
        response = read_to_eof(sock)
        took = time.monotonic() - started
    assert status_of(response) == 408
    assert json_of(response)["error"]["code"] == "request_timeout"
    assert TIMEOUT_S - 0.1 <= took <= TIMEOUT_S + SLACK_S
    assert sim_requests(sim_reset) == before


def test_a_silent_chunked_body_is_408(edge: Server) -> None:
    with connect(edge.port, timeout=TIMEOUT_S + SLACK_S + 1) as sock:
        sock.sendall(
            b"POST /v1/echo HTTP/1.1\r\nhost: edge\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n"
        )
        assert status_of(read_to_eof(sock)) == 408


def test_a_slow_but_steady_body_is_not_cut(edge: Server, sim_reset: Server) -> None:
    """The limit is on silence, not on the body's total time."""
    body = b"0123456"
    with connect(edge.port) as sock:
        sock.sendall(
            b"POST /v1/echo HTTP/1.1\r\nhost: edge\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body)
        )
        for byte in body:
            time.sleep(TIMEOUT_S * 0.4)  # 7 x 0.4 s: well past the timeout in total
            sock.sendall(bytes([byte]))
        response = read_to_eof(sock)
    assert status_of(response) == 200
    assert json_of(response)["body"] == body.decode()


# --- trailers -----------------------------------------------------------------------


def chunked_echo(trailers: bytes, *, close: bool = True) -> bytes:
    connection = b"connection: close\r\n" if close else b""
    return (
        b"POST /v1/echo HTTP/1.1\r\nhost: edge\r\ntransfer-encoding: chunked\r\n"
        + connection
        + b"\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n"
        + trailers
        + b"\r\n"
    )


def test_request_trailers_never_reach_the_upstream(edge: Server, sim_reset: Server) -> None:
    trailers = b"x-trailer-secret: 42\r\nauthorization: Bearer from-a-trailer\r\nhost: evil\r\n"
    response = exchange(edge.port, chunked_echo(trailers))
    assert status_of(response) == 200
    echo = json_of(response)
    assert echo["body"] == "hello world"
    names = [name.lower() for name, _ in echo["headers"]]
    assert "x-trailer-secret" not in names
    assert "authorization" not in names
    assert names.count("host") == 1
    assert all(
        "evil" not in value and "from-a-trailer" not in value for _, value in echo["headers"]
    )


def test_trailers_do_not_leak_into_the_next_request_on_the_connection(
    edge: Server, sim_reset: Server
) -> None:
    with connect(edge.port) as sock:
        sock.sendall(chunked_echo(b"x-trailer-secret: 1\r\n", close=False))
        first = read_one_response(sock)
        sock.sendall(b"POST /v1/echo HTTP/1.1\r\nhost: edge\r\ncontent-length: 2\r\n\r\nhi")
        second = read_one_response(sock)
    for response in (first, second):
        assert status_of(response) == 200
        assert "x-trailer-secret" not in {n.lower() for n, _ in json_of(response)["headers"]}


def test_more_trailer_lines_than_max_headers_is_431(edge: Server, sim_reset: Server) -> None:
    trailers = b"".join(b"x-t-%d: 1\r\n" % i for i in range(MAX_HEADERS + 1))
    assert status_of(exchange(edge.port, chunked_echo(trailers))) == 431


def test_a_trailer_flood_is_431(edge: Server, sim_reset: Server) -> None:
    with connect(edge.port) as sock:

        def flood() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(
                    b"POST /v1/echo HTTP/1.1\r\nhost: edge\r\ntransfer-encoding: chunked\r\n\r\n"
                    b"2\r\nhi\r\n0\r\nx-flood: "
                )
                for _ in range(64):
                    sock.sendall(b"t" * 65536)

        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        response = read_to_eof(sock)
        thread.join(10)
    assert status_of(response) == 431


# --- max_connections ----------------------------------------------------------------

CAP = 5


@pytest.fixture(scope="module")
def capped(sim: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_proxy(
        tmp_path_factory.mktemp("capped"),
        sim_provider(sim, "sim", default=True),
        server=f"max_connections = {CAP}\nclient_header_timeout_s = 30",
    )
    yield server
    server.stop()


def test_a_connection_beyond_max_connections_gets_503_and_is_closed(capped: Server) -> None:
    held = [connect(capped.port) for _ in range(CAP)]
    try:
        # The server has accepted all of them once one of them is served.
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nhost: edge\r\n\r\n")
        assert status_of(read_one_response(held[0])) == 200
        with connect(capped.port) as extra:
            response = read_to_eof(extra)
        assert status_of(response) == 503
        assert headers_of(response)["retry-after"] == "1"
        assert json_of(response)["error"]["type"] == "sluice_overloaded"
        # Those within the cap are still served.
        held[-1].sendall(b"GET /healthz HTTP/1.1\r\nhost: edge\r\n\r\n")
        assert status_of(read_one_response(held[-1])) == 200
    finally:
        for sock in held:
            sock.close()

    def served_again() -> bool:
        with connect(capped.port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: edge\r\nconnection: close\r\n\r\n")
            return status_of(read_to_eof(sock)) == 200

    wait_until(served_again)  # closed connections no longer count


def test_workers_apply_the_edge_limits_too(sim: Server, tmp_path: Path) -> None:
    """`--workers` hands each worker process the same protocol (pickled)."""
    with redis_server() as redis:
        config, port = proxy_config(
            tmp_path,
            sim_provider(sim, "sim", default=True, limit=2),
            server=EDGE,
        )
        config.write_text(config.read_text() + f'\n[cluster]\nredis_url = "{redis.url}"\n')
        with running(["serve", "--config", str(config), "--workers", "2"], port) as server:
            assert status_of(exchange(server.port, head_of_size(HEAD_LIMIT))) == 200
            assert status_of(exchange(server.port, head_of_size(HEAD_LIMIT + 1))) == 431
            trailers = exchange(server.port, chunked_echo(b"x-trailer-secret: 1\r\n"))
            assert "x-trailer-secret" not in trailers.decode()


# --- max_queued_body_bytes ----------------------------------------------------------

QUEUE_BOUND = 100_000
LONG = {"x-sim-tokens": "2000", "x-sim-token-delay-ms": "10"}  # holds its slot ~20 s


def body_of(size: int) -> bytes:
    """A chat request body of exactly `size` bytes."""
    empty = json.dumps({"model": "sim-1", "messages": [{"role": "user", "content": ""}]})
    pad = size - len(empty)
    return json.dumps(
        {"model": "sim-1", "messages": [{"role": "user", "content": "q" * pad}]}
    ).encode()


@pytest.fixture(scope="module")
def queueing(sim: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    providers = sim_provider(sim, "sim", default=True, limit=1) + sim_provider(
        sim, "short", limit=1, queue_timeout_s=0.5
    )
    server = start_proxy(
        tmp_path_factory.mktemp("queueing"),
        providers,
        server=f"max_queued_body_bytes = {QUEUE_BOUND}",
        admission="cooldown_ms = 0",
    )
    yield server
    server.stop()


async def queued(client: httpx.AsyncClient, proxy: Server, provider: str = "sim") -> int:
    status = (await client.get(f"{proxy.url}/concurrency/status/{provider}")).json()
    count: int = status["queued"]
    return count


@contextlib.asynccontextmanager
async def slot_held(client: httpx.AsyncClient, url: str) -> Any:
    """A long stream holds the provider's one slot for the block."""
    started = asyncio.Event()

    async def hold() -> None:
        async with client.stream("POST", url, json=chat(True), headers=LONG) as response:
            assert response.status_code == 200
            started.set()
            async for _ in response.aiter_bytes():
                pass

    task = asyncio.create_task(hold())
    await asyncio.wait_for(started.wait(), 10)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_queued_bodies_are_bounded_and_every_path_gives_its_bytes_back(
    queueing: Server, sim_reset: Server
) -> None:
    url = queueing.url + "/v1/chat/completions"

    def post(client: httpx.AsyncClient, size: int, target: str = url) -> Any:
        return asyncio.create_task(
            client.post(target, content=body_of(size), headers={"content-type": "application/json"})
        )

    async with httpx.AsyncClient(timeout=30) as watcher:
        holder = httpx.AsyncClient(timeout=30)
        leaving = httpx.AsyncClient(timeout=30)
        async with slot_held(holder, url):
            a = post(leaving, 60_000)
            await eventually(lambda: _is(queued(watcher, queueing), 1))
            # 60,000 + 60,000 would be over the bound: refused at once.
            refused = await watcher.post(
                url, content=body_of(60_000), headers={"content-type": "application/json"}
            )
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "sluice_queue_full"
            assert "max_queued_body_bytes" in refused.json()["error"]["message"]
            assert await queued(watcher, queueing) == 1
            c = post(watcher, 30_000)  # 90,000: fits
            await eventually(lambda: _is(queued(watcher, queueing), 2))
            # The client of the 60,000-byte request leaves: its bytes are given back.
            a.cancel()
            await leaving.aclose()
            await eventually(lambda: _is(queued(watcher, queueing), 1))
            d = post(watcher, 60_000)  # 30,000 + 60,000 fits only if A's bytes came back
            await eventually(lambda: _is(queued(watcher, queueing), 2))
        await holder.aclose()
        assert (await c).status_code == 200
        assert (await d).status_code == 200

        # A rejection by queue timeout gives its bytes back too (on another provider:
        # the bound is the whole process's).
        short = queueing.url + "/short/v1/chat/completions"
        holder = httpx.AsyncClient(timeout=30)
        async with slot_held(holder, short):
            timed_out = await post(watcher, 60_000, short)
            assert timed_out.status_code == 503
            assert timed_out.json()["error"]["type"] == "sluice_queue_timeout"
        await holder.aclose()

        # Nothing is held now: a body of exactly the bound may queue.
        holder = httpx.AsyncClient(timeout=30)
        async with slot_held(holder, url):
            whole = post(watcher, QUEUE_BOUND)
            await eventually(lambda: _is(queued(watcher, queueing), 1))
        await holder.aclose()
        assert (await whole).status_code == 200

        # A request granted a slot at once never counts, whatever its size.
        at_once = await watcher.post(
            url, content=body_of(3 * QUEUE_BOUND), headers={"content-type": "application/json"}
        )
        assert at_once.status_code == 200


async def _is(count: Any, expected: int) -> bool:
    return bool(await count == expected)


# --- in process: the queued-bodies count ---------------------------------------------


def limiter(limit: int) -> Limiter:
    loop = asyncio.get_running_loop()
    return Limiter(
        "p", Policy(limit=limit, cooldown_ms=0), clock=loop.time, scheduler=loop.call_later
    )


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def waited(bodies: QueuedBodies, size: int, admission: Awaitable[T]) -> T:
    """`bodies.wait` in a coroutine of its own, for `create_task`."""
    return await bodies.wait(size, admission)


async def test_a_request_granted_at_once_is_never_counted() -> None:
    bodies = QueuedBodies(10)
    lim = limiter(1)
    permit = await bodies.wait(1_000, admit(lim, 1.0))  # over the bound, but not queued
    assert isinstance(permit, Permit)
    assert bodies.held == 0
    permit.release()


async def test_a_waiting_request_is_counted_until_its_slot_comes() -> None:
    bodies = QueuedBodies(100)
    lim = limiter(1)
    first = await admit(lim, 1.0)
    assert isinstance(first, Permit)
    task = asyncio.create_task(waited(bodies, 60, admit(lim, 2.0)))
    await settle()
    assert bodies.held == 60
    first.release()
    second = await task
    assert isinstance(second, Permit)
    assert bodies.held == 0
    second.release()


async def test_over_the_bound_is_queue_full_and_leaves_the_queue() -> None:
    bodies = QueuedBodies(100)
    lim = limiter(1)
    first = await admit(lim, 1.0)
    assert isinstance(first, Permit)
    waiting = asyncio.create_task(waited(bodies, 60, admit(lim, 2.0)))
    await settle()
    with pytest.raises(QueueFull) as refused:
        await bodies.wait(41, admit(lim, 3.0))
    assert refused.value.retry_after_s == 1
    assert bodies.held == 60
    assert lim.status().queued == 1  # the refused one is not left in the queue
    fits = asyncio.create_task(waited(bodies, 40, admit(lim, 4.0)))  # exactly the bound
    await settle()
    assert bodies.held == 100
    first.release()
    granted = await waiting
    assert isinstance(granted, Permit)
    granted.release()
    last = await fits
    assert isinstance(last, Permit)
    last.release()
    assert bodies.held == 0


async def test_a_cancelled_waiter_gives_its_bytes_back_and_leaves_the_queue() -> None:
    bodies = QueuedBodies(100)
    lim = limiter(1)
    first = await admit(lim, 1.0)
    assert isinstance(first, Permit)
    task = asyncio.create_task(waited(bodies, 70, admit(lim, 2.0)))
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert bodies.held == 0
    assert lim.status().queued == 0
    first.release()
    assert lim.status().in_flight == 0  # no slot was lost to the cancelled waiter


async def test_a_rejected_waiter_gives_its_bytes_back() -> None:
    bodies = QueuedBodies(100)
    loop = asyncio.get_running_loop()
    lim = Limiter(
        "p",
        Policy(limit=1, cooldown_ms=0, queue_timeout_s=0.05),
        clock=loop.time,
        scheduler=loop.call_later,
    )
    first = await admit(lim, 1.0)
    assert isinstance(first, Permit)
    outcome = await bodies.wait(70, admit(lim, 2.0))
    assert isinstance(outcome, Rejection)
    assert outcome.reason == "queue_timeout"
    assert bodies.held == 0
    first.release()


async def test_an_error_in_the_wait_gives_the_bytes_back() -> None:
    bodies = QueuedBodies(100)
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def failing() -> int:
        return await future

    task = asyncio.create_task(waited(bodies, 50, failing()))
    await settle()
    assert bodies.held == 50
    future.set_exception(RuntimeError("store down"))
    with pytest.raises(RuntimeError):
        await task
    assert bodies.held == 0


# --- in process: what the parser is fed ---------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False
        self.eof = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8080)}.get(name, default)


class CountingParser:
    """Stands in for httptools' parser (a C type) to count what it is fed."""

    def __init__(self, parser: Any) -> None:
        self.parser = parser
        self.fed = 0

    def feed_data(self, data: bytes) -> None:
        self.fed += len(data)
        self.parser.feed_data(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.parser, name)


async def _unused_app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("no request should reach the app")


async def _websocket_app(scope: Any, receive: Any, send: Any) -> None:
    """Accepts a WebSocket and keeps it open."""
    await receive()
    await send({"type": "websocket.accept"})
    await receive()


def edge_protocol(
    limits: EdgeLimits, app: Any = _unused_app
) -> tuple[EdgeProtocol, FakeTransport, CountingParser]:
    config = Config(app=app, lifespan="off", log_config=None)
    protocol = EdgeProtocol(config, ServerState(), {}, limits=limits)
    parser = CountingParser(protocol.parser)
    protocol.parser = parser  # type: ignore[assignment]
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport, parser


@pytest.mark.parametrize("chunk", [1, 1000, 8192, 1 << 20])
async def test_the_parser_is_never_fed_more_than_max_header_bytes_of_a_head(chunk: int) -> None:
    limit = 4096
    protocol, transport, parser = edge_protocol(EdgeLimits(max_header_bytes=limit))
    head = b"GET / HTTP/1.1\r\nx-flood: " + b"f" * (1 << 20)
    for i in range(0, len(head), chunk):
        protocol.data_received(head[i : i + chunk])
    assert parser.fed <= limit
    assert transport.written.startswith(b"HTTP/1.1 431 ")
    assert transport.eof  # half-closed: the answer, then FIN
    assert not transport.closed  # still reading (and dropping) for the linger
    protocol.connection_lost(None)


async def test_a_refused_connection_drops_what_the_client_still_sends() -> None:
    protocol, transport, parser = edge_protocol(EdgeLimits(max_headers=2))
    # httptools reports a header when the next one begins.
    protocol.data_received(b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\nd")
    assert transport.written.startswith(b"HTTP/1.1 431 ")
    fed = parser.fed
    protocol.data_received(b"d: 4\r\n" * 1000)
    assert parser.fed == fed
    protocol.connection_lost(None)


async def test_a_websocket_upgrade_leaves_the_connection_to_the_websocket_protocol() -> None:
    """After the hand-over no timer of ours may answer on the transport."""
    limits = EdgeLimits(header_timeout_s=0.05, body_timeout_s=0.05)
    protocol, transport, _ = edge_protocol(limits, _websocket_app)
    protocol.data_received(
        b"GET /ws HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n"
        b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
    )
    await asyncio.sleep(0.2)
    assert transport.written.startswith(b"HTTP/1.1 101 ")  # the WebSocket protocol's answer
    assert b"408" not in transport.written
    assert not transport.eof
    assert not transport.closed
    transport.protocol.connection_lost(None)


async def _ok_app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]}
    )
    await send({"type": "http.response.body", "body": b""})


async def test_a_connection_is_watched_only_while_a_head_or_a_body_is_due() -> None:
    """One sweeper per server checks the deadlines; a served connection leaves it, so
    an open keep-alive connection or stream holds no timer of its own."""
    limits = EdgeLimits(header_timeout_s=0.2, body_timeout_s=0.6)
    protocol, transport, _ = edge_protocol(limits, _ok_app)
    sweeper = protocol._sweeper
    assert sweeper.watched == {protocol}  # accepted: its first head is due
    protocol.data_received(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\n\r\nab")
    await asyncio.sleep(0.25)  # past the head's deadline: the sweep saw the body due
    assert sweeper.watched == {protocol}
    assert not transport.closed
    protocol.data_received(b"cd")
    await eventually(lambda: not sweeper.watched, within=2.0)  # the next sweep forgets it
    assert transport.written.startswith(b"HTTP/1.1 200 ")
    await asyncio.sleep(0.7)  # past both timeouts: nothing was due, nothing happens
    assert not transport.eof
    assert not transport.closed
    protocol.data_received(b"GET / HTTP/1.1\r\n")  # the next head: due again
    assert sweeper.watched == {protocol}
    protocol.connection_lost(None)
    assert sweeper.watched == set()
