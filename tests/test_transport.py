"""The production transport (`Http1Transport`) against real loopback servers."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator

import pytest

from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.upstream.http1 import Http1Transport
from tests.servers import Server, free_port


@pytest.fixture
async def transport() -> AsyncIterator[Http1Transport]:
    t = Http1Transport(connect_timeout_s=2, read_timeout_s=0.5, provider_id="sim")
    yield t
    await t.close()


async def test_sends_exactly_the_given_headers(
    transport: Http1Transport, sim_reset: Server
) -> None:
    response = await transport.send(
        "POST", sim_reset.url + "/v1/echo/a%20b?q=%2F", [(b"x-one", b"1"), (b"x-two", b"2")], b"hi"
    )
    echo = json.loads(await response.read())
    await response.aclose()
    names = [name for name, _ in echo["headers"]]
    # Nothing of the client's own: no User-Agent, Accept or Accept-Encoding.
    assert names == ["host", "x-one", "x-two", "content-length"]
    assert echo["path"] == "/v1/echo/a%20b" or echo["path"] == "/v1/echo/a b"
    assert echo["query"] == "q=%2F"
    assert echo["body"] == "hi"


async def test_chunks_arrive_as_they_are_written(
    transport: Http1Transport, sim_reset: Server
) -> None:
    body = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"x-sim-tokens", b"4"),
        (b"x-sim-token-delay-ms", b"100"),
    ]
    response = await transport.send("POST", sim_reset.url + "/v1/chat/completions", headers, body)
    arrivals = []
    async for chunk in response.chunks():
        if b"tok" in chunk:
            arrivals.append(time.monotonic())
    await response.aclose()
    assert len(arrivals) == 4
    assert arrivals[-1] - arrivals[0] > 0.2  # spread out, not buffered


async def test_silence_past_the_read_timeout_is_504(
    transport: Http1Transport, sim_reset: Server
) -> None:
    body = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
    headers = [(b"x-sim-tokens", b"3"), (b"x-sim-token-delay-ms", b"2000")]
    response = await transport.send("POST", sim_reset.url + "/v1/chat/completions", headers, body)
    with pytest.raises(UpstreamTimeout):
        async for _ in response.chunks():
            pass
    await response.aclose()
    non_streaming = json.dumps({"model": "m", "messages": []}).encode()
    with pytest.raises(UpstreamTimeout):
        await transport.send("POST", sim_reset.url + "/v1/chat/completions", headers, non_streaming)


async def test_nothing_listening_is_502(transport: Http1Transport) -> None:
    with pytest.raises(UpstreamUnavailable):
        await transport.send("GET", f"http://127.0.0.1:{free_port()}/v1/models", [], b"")


async def test_content_encoding_passes_through_undecoded(transport: Http1Transport) -> None:
    payload = gzip.compress(b'{"ok": true}')

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
            + f"content-length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        response = await transport.send("GET", f"http://127.0.0.1:{port}/x", [], b"")
        assert (b"Content-Encoding", b"gzip") in response.raw_headers or (
            b"content-encoding",
            b"gzip",
        ) in response.raw_headers
        assert await response.read() == payload
        await response.aclose()
