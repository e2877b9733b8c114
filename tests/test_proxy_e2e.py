"""End to end over real sockets: clients -> `sluice serve` -> `sluice sim` (issue 2)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from proxy.tools.sim import expected_content
from tests.conftest import chat, sim_provider, start_proxy
from tests.servers import Server, free_port
from tests.waiting import wait_until

PROVIDER_KEY = "sk-provider-secret-7f3a"


@pytest.fixture(scope="module")
def proxy(sim: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    dead_port = free_port()  # nothing listens here
    providers = (
        sim_provider(sim, "sim", default=True, limit=50)
        + sim_provider(sim, "keyed", api_key=PROVIDER_KEY)
        + f"""
        [[providers]]
        id = "down"
        base_url = "http://127.0.0.1:{dead_port}/v1"
        """
    )
    server = start_proxy(
        tmp_path_factory.mktemp("proxy"), providers, server="max_body_bytes = 4096"
    )
    yield server
    server.stop()


# ----------------------------------------------------------------- the OpenAI SDK


def test_openai_sdk_sync_non_streaming(proxy: Server, sim_reset: Server) -> None:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="client-key")
    completion = client.chat.completions.create(
        model="sim-1", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content == expected_content(5)
    client.close()


def test_openai_sdk_sync_streaming(proxy: Server, sim_reset: Server) -> None:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="client-key")
    stream = client.chat.completions.create(
        model="sim-1", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == expected_content(5)
    client.close()


async def test_openai_sdk_async_streaming_and_not(proxy: Server, sim_reset: Server) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/keyed/v1", api_key="client-key")
    completion = await client.chat.completions.create(
        model="sim-1", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content == expected_content(5)
    stream = await client.chat.completions.create(
        model="sim-1", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == expected_content(5)
    models = await client.models.list()
    assert [m.id for m in models.data] == ["sim-1"]
    await client.close()


# ------------------------------------------------------------------ streaming


def test_sse_chunks_arrive_as_the_upstream_writes_them(proxy: Server, sim_reset: Server) -> None:
    """Five events 100 ms apart must reach the client spread out, not in one lump."""
    arrivals: list[float] = []
    headers = {"x-sim-tokens": "5", "x-sim-token-delay-ms": "100"}
    with httpx.stream(
        "POST", proxy.url + "/v1/chat/completions", json=chat(True), headers=headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 6  # five tokens and the finish chunk
    # The first token left the sim ~400 ms before the last one; a buffering proxy
    # would deliver them within a few ms of each other.
    assert arrivals[4] - arrivals[0] > 0.3


def test_client_disconnect_mid_stream_closes_the_upstream(proxy: Server, sim_reset: Server) -> None:
    headers = {"x-sim-tokens": "200", "x-sim-token-delay-ms": "50"}
    with httpx.stream(
        "POST", proxy.url + "/v1/chat/completions", json=chat(True), headers=headers
    ) as response:
        next(response.iter_lines())  # the stream is running

    def disconnected() -> dict[str, int] | None:
        stats: dict[str, int] = httpx.get(sim_reset.url + "/sim/stats").json()
        return stats if stats["disconnected"] == 1 else None

    stats = wait_until(disconnected, within=5)
    assert stats["inFlight"] == 0
    assert stats["completed"] == 0
    status = httpx.get(proxy.url + "/concurrency/status/sim").json()
    assert status["queued"] == 0


# -------------------------------------------------------------------- routing


def test_default_and_prefixed_routes_reach_the_upstream(proxy: Server, sim_reset: Server) -> None:
    bare = httpx.get(proxy.url + "/v1/models")
    prefixed = httpx.get(proxy.url + "/keyed/v1/models")
    assert bare.status_code == prefixed.status_code == 200
    assert bare.json() == prefixed.json()
    assert bare.headers["x-sluice-provider"] == "sim"
    assert prefixed.headers["x-sluice-provider"] == "keyed"


def test_query_string_and_method_pass_through(proxy: Server, sim_reset: Server) -> None:
    echo = httpx.request(
        "PATCH", proxy.url + "/v1/echo/a%20b?x=1&y=%2F", content=b"raw body"
    ).json()
    assert echo["method"] == "PATCH"
    assert echo["path"].endswith("/echo/a%20b") or echo["path"].endswith("/echo/a b")
    assert echo["query"] == "x=1&y=%2F"
    assert echo["body"] == "raw body"


def test_unknown_provider_is_404(proxy: Server) -> None:
    response = httpx.get(proxy.url + "/nope/v1/models")
    assert response.status_code == 404
    assert "/sim/v1/" in response.json()["error"]["message"]


def test_upstream_down_is_502_with_openai_error(proxy: Server) -> None:
    response = httpx.post(proxy.url + "/down/v1/chat/completions", json=chat())
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "sluice_upstream_error"
    assert error["code"] == "upstream_unavailable"
    assert error["message"]


def test_admitted_response_carries_queue_ms(proxy: Server, sim_reset: Server) -> None:
    response = httpx.post(proxy.url + "/v1/chat/completions", json=chat())
    assert response.status_code == 200
    assert int(response.headers["x-sluice-queue-ms"]) >= 0
    models = httpx.get(proxy.url + "/v1/models")
    assert "x-sluice-queue-ms" not in models.headers


# -------------------------------------------------------------------- headers


def echoed_headers(response: httpx.Response) -> dict[str, str]:
    return {name: value for name, value in response.json()["headers"]}


def test_authorization_replaced_when_provider_has_key(proxy: Server, sim_reset: Server) -> None:
    response = httpx.post(
        proxy.url + "/keyed/v1/echo", headers={"authorization": "Bearer client-key"}
    )
    assert echoed_headers(response)["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert PROVIDER_KEY not in response.text.replace(f"Bearer {PROVIDER_KEY}", "", 1)


def test_authorization_forwarded_when_provider_has_no_key(proxy: Server, sim_reset: Server) -> None:
    response = httpx.post(proxy.url + "/v1/echo", headers={"authorization": "Bearer client-key"})
    assert echoed_headers(response)["authorization"] == "Bearer client-key"


def raw_request(port: int, request: bytes) -> bytes:
    """Send bytes as they are (httpx would rewrite hop-by-hop headers itself)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_hop_by_hop_headers_are_dropped(proxy: Server, sim_reset: Server) -> None:
    answer = raw_request(
        proxy.port,
        b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nConnection: close, x-private\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: x-t\r\nUpgrade: h2c\r\n"
        b"Proxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\n"
        b"X-Private: hidden\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nhi",
    )
    body = answer.split(b"\r\n\r\n", 1)[1]
    headers = {name: value for name, value in json.loads(body)["headers"]}
    for dropped in (
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "x-private",
    ):
        assert dropped not in headers, dropped
    assert headers["x-kept"] == "yes"
    assert headers["host"] != "x"  # Host names the upstream, not the proxy


def test_oversized_body_is_413(proxy: Server) -> None:
    response = httpx.post(proxy.url + "/v1/chat/completions", content=b"x" * 5000)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    chunked = httpx.post(proxy.url + "/v1/chat/completions", content=iter([b"x" * 3000] * 2))
    assert chunked.status_code == 413
