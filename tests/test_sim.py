"""The simulated upstream: over real sockets as `sluice sim`, and in-process on a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from proxy.tools.sim import LaggedCount, Message, SimApp, SimConfig, expected_content
from tests.conftest import sim_client, sim_running
from tests.conftest import sim_stats as stats
from tests.fakes import FakeTime
from tests.servers import Server
from tests.waiting import wait_until as wait_for

BASELINE = {
    "hardCap": None,
    "limit": None,
    "outsideLoad": 0,
    "usageLagMs": 0,
    "retryAfterS": 1,
    "tokens": 4,
    "tokenDelayMs": 1,
}
CHAT = {"model": "sim-1", "messages": [{"role": "user", "content": "say four words"}]}
STREAM = {**CHAT, "stream": True}
SLOW = {"X-Sim-Tokens": "10000", "X-Sim-Token-Delay-Ms": "10"}  # outlives any test


def sse_events(lines: Iterator[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line]


# --- over real sockets -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim_server() -> Iterator[Server]:
    with sim_running("--tokens", "4", "--token-delay-ms", "1") as server:
        yield server


@pytest.fixture
def client(sim_server: Server) -> Iterator[httpx.Client]:
    """A client on a sim with the baseline config and zeroed stats."""
    with sim_client(sim_server, BASELINE) as http:
        yield http


@pytest.mark.e2e
def test_stream_format(client: httpx.Client) -> None:
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())

    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len(chunks) == 4 + 1
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert {chunk["model"] for chunk in chunks} == {"sim-1"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in chunk["choices"][0]["delta"] for chunk in chunks[1:])
    finish = chunks[-1]["choices"][0]
    assert finish == {"index": 0, "delta": {}, "finish_reason": "stop"}
    content = "".join(chunk["choices"][0]["delta"]["content"] for chunk in chunks[:-1])
    assert content == expected_content(4) == "tok0 tok1 tok2 tok3 "
    assert stats(client)["completed"] == 1


@pytest.mark.e2e
def test_stream_usage_chunk_when_asked(client: httpx.Client) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = sse_events(response.iter_lines())
    usage = json.loads(events[-2])
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


@pytest.mark.e2e
def test_whole_response_and_header_overrides(client: httpx.Client) -> None:
    response = client.post("/v1/chat/completions", json=CHAT, headers={"X-Sim-Tokens": "2"})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": expected_content(2)},
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


@pytest.mark.e2e
def test_text_completions(client: httpx.Client) -> None:
    whole = client.post("/v1/completions", json={"model": "m", "prompt": "hi"}).json()
    assert whole["object"] == "text_completion"
    assert whole["choices"][0]["text"] == expected_content(4)
    body = {"prompt": "hi", "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        events = sse_events(response.iter_lines())
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == expected_content(4)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.e2e
def test_models(client: httpx.Client) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [(model["id"], model["owned_by"]) for model in body["data"]] == [("sim-1", "sluice-sim")]


@pytest.mark.e2e
def test_hard_cap_answers_429_with_retry_after(client: httpx.Client) -> None:
    client.post("/sim/config", json={"hardCap": 3, "retryAfterS": 7}).raise_for_status()
    with contextlib.ExitStack() as streams:
        for _ in range(3):
            response = streams.enter_context(
                client.stream("POST", "/v1/chat/completions", json=STREAM, headers=SLOW)
            )
            assert response.status_code == 200

        refused = client.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "7"
        assert refused.json() == {
            "error": {
                "message": refused.json()["error"]["message"],
                "type": "rate_limit_error",
                "code": "concurrency_limit",
            }
        }
        usage = client.get("/v1/usage").json()
        assert usage == {
            "usage": {"concurrent_sessions": 3},
            "limits": {"concurrency": {"limit": 3, "hard_cap": 3}},
        }

    wait_for(lambda: stats(client)["inFlight"] == 0)
    assert stats(client) == {
        "inFlight": 0,
        "maxInFlight": 3,
        "requests": 4,
        "completed": 0,
        "disconnected": 3,
        "rateLimited": 1,
        "usagePolls": 1,
    }


@pytest.mark.e2e
def test_outside_load_counts_against_the_cap(client: httpx.Client) -> None:
    client.post("/sim/config", json={"hardCap": 3, "limit": 5, "outsideLoad": 2}).raise_for_status()
    with client.stream("POST", "/v1/chat/completions", json=STREAM, headers=SLOW) as response:
        assert response.status_code == 200
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 429
        usage = client.get("/v1/usage").json()
        assert usage["usage"]["concurrent_sessions"] == 3
        assert usage["limits"]["concurrency"] == {"limit": 5, "hard_cap": 3}
    wait_for(lambda: stats(client)["inFlight"] == 0)
    assert stats(client)["maxInFlight"] == 1


@pytest.mark.e2e
def test_disconnect_mid_stream_is_counted(client: httpx.Client) -> None:
    body = {**CHAT, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=SLOW) as response:
        lines = response.iter_lines()  # keep a reference: a collected iterator closes the stream
        first = next(lines)
        assert json.loads(first.removeprefix("data: "))["choices"][0]["delta"]["content"] == "tok0 "
        assert stats(client)["inFlight"] == 1
    wait_for(lambda: stats(client)["disconnected"] == 1)
    assert stats(client)["inFlight"] == 0
    assert stats(client)["completed"] == 0


@pytest.mark.e2e
def test_disconnect_while_waiting_for_a_whole_response_is_counted(client: httpx.Client) -> None:
    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/chat/completions", json=CHAT, headers=SLOW, timeout=0.2)
    wait_for(lambda: stats(client)["disconnected"] == 1)
    assert stats(client)["inFlight"] == 0


@pytest.mark.e2e
def test_config_and_reset(client: httpx.Client) -> None:
    assert client.get("/sim/config").json() == BASELINE
    changed = client.post("/sim/config", json={"tokens": 2, "hardCap": 9, "usageLagMs": 50})
    assert changed.json() == {**BASELINE, "tokens": 2, "hardCap": 9, "usageLagMs": 50}
    content = client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]
    assert content["content"] == expected_content(2)

    for bad in ({"tokens": -1}, {"tokens": "3"}, {"tokens": None}, {"nope": 1}, [1]):
        refused = client.post("/sim/config", json=bad)
        assert refused.status_code == 400
        assert isinstance(refused.json()["error"], str)
    assert client.post("/sim/config", content=b"{not json").status_code == 400
    assert client.get("/sim/config").json()["tokens"] == 2  # a bad body changes nothing

    assert stats(client)["completed"] == 1
    assert client.post("/sim/reset").json() == {
        "inFlight": 0,
        "maxInFlight": 0,
        "requests": 0,
        "completed": 0,
        "disconnected": 0,
        "rateLimited": 0,
        "usagePolls": 0,
    }


@pytest.mark.e2e
def test_echo_reports_the_request(client: httpx.Client) -> None:
    response = client.put(
        "/v1/echo/some/path?a=1&b=two",
        content="héllo".encode(),
        headers=[("X-First", "1"), ("Authorization", "Bearer k"), ("x-first", "2")],
    )
    assert response.status_code == 200
    echo = response.json()
    assert (echo["method"], echo["path"], echo["query"]) == (
        "PUT",
        "/v1/echo/some/path",
        "a=1&b=two",
    )
    assert echo["body"] == "héllo"
    headers = [tuple(pair) for pair in echo["headers"]]
    assert [pair for pair in headers if pair[0] in ("x-first", "authorization")] == [
        ("x-first", "1"),
        ("authorization", "Bearer k"),
        ("x-first", "2"),
    ]
    assert client.get("/v1/echo").json()["path"] == "/v1/echo"


@pytest.mark.e2e
def test_unknown_route_and_bad_body(client: httpx.Client) -> None:
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/v1/chat/completions").status_code == 404

    malformed = client.post("/v1/chat/completions", content=b"{oops")
    assert malformed.status_code == 400
    assert malformed.json()["error"]["type"] == "invalid_request_error"
    bad_header = client.post("/v1/chat/completions", json=CHAT, headers={"X-Sim-Tokens": "x"})
    assert bad_header.status_code == 400
    assert "X-Sim-Tokens" in bad_header.json()["error"]["message"]


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_flags_and_clean_exit_on_signal(sig: signal.Signals) -> None:
    caps = ["--hard-cap", "4", "--outside-load", "1"]
    with sim_running(*caps, "--usage-lag-ms", "30", "--retry-after-s", "3") as server:
        config = httpx.get(server.url + "/sim/config").json()
        assert config == {
            **BASELINE,
            "hardCap": 4,
            "outsideLoad": 1,
            "usageLagMs": 30,
            "retryAfterS": 3,
            "tokens": 16,
            "tokenDelayMs": 20,
        }
        usage = httpx.get(server.url + "/v1/usage").json()
        assert usage["limits"]["concurrency"] == {"limit": 4, "hard_cap": 4}
        assert usage["usage"]["concurrent_sessions"] == 1
        assert server.stop(sig) == 0


# --- in-process, on a fake clock --------------------------------------------------------------


def test_lagged_count_reports_the_count_lag_seconds_ago() -> None:
    ft = FakeTime(100.0)
    lagged = LaggedCount(ft.clock, lag_s=1.0)
    lagged.record(1)
    ft.advance(0.5)
    lagged.record(2)
    assert lagged.value() == 0
    ft.advance(0.5)
    assert lagged.value() == 1
    ft.advance(0.49)
    assert lagged.value() == 1
    ft.advance(0.01)
    assert lagged.value() == 2


def test_lagged_count_with_no_lag_is_the_latest_and_remembers_one_value() -> None:
    ft = FakeTime(100.0)
    lagged = LaggedCount(ft.clock)
    for count in (1, 2, 3, 2):
        lagged.record(count)
    assert lagged.value() == 2
    assert len(lagged) == 1


def test_lagged_count_forgets_changes_older_than_the_window() -> None:
    ft = FakeTime(100.0)
    lagged = LaggedCount(ft.clock, lag_s=0.1)
    for count in range(1000):
        ft.advance(0.01)
        lagged.record(count)
    assert len(lagged) <= 12
    assert lagged.value() == 989


class Exchange:
    """One in-process ASGI request: what the app sent, and a switch to disconnect."""

    def __init__(
        self, app: SimApp, method: str, path: str, body: object = None, **headers: str
    ) -> None:
        self.app = app
        self.scope = {
            "type": "http",
            "method": method,
            "path": path,
            "query_string": b"",
            "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
        }
        self.body = b"" if body is None else json.dumps(body).encode()
        self.sent: list[Message] = []
        self.started = asyncio.Event()
        self.gone = asyncio.Event()
        self._body_sent = False

    async def receive(self) -> Message:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        self.started.set()

    async def run(self) -> None:
        await self.app(self.scope, self.receive, self.send)

    @property
    def status(self) -> int:
        status: int = self.sent[0]["status"]
        return status

    def json(self) -> Any:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent[1:]))


async def call(
    app: SimApp, method: str, path: str, body: object = None, **headers: str
) -> Exchange:
    exchange = Exchange(app, method, path, body, **headers)
    await exchange.run()
    return exchange


_SLOW_HEADERS = {"x_sim_tokens": "5", "x_sim_token_delay_ms": "60000"}


async def open_stream(app: SimApp) -> tuple[Exchange, asyncio.Task[None]]:
    """A stream that outlives the test, running once its response has started."""
    exchange = Exchange(app, "POST", "/v1/chat/completions", {"stream": True}, **_SLOW_HEADERS)
    task = asyncio.create_task(exchange.run())
    await exchange.started.wait()
    return exchange, task


async def test_usage_lags_the_true_count_on_the_fake_clock() -> None:
    ft = FakeTime(100.0)
    app = SimApp(SimConfig(usage_lag_ms=1000, outside_load=2), clock=ft.clock)

    async def usage() -> int:
        sessions: int = (await call(app, "GET", "/v1/usage")).json()["usage"]["concurrent_sessions"]
        return sessions

    first, first_task = await open_stream(app)
    assert app.stats.in_flight == 1
    assert await usage() == 2
    ft.advance(1.0)
    assert await usage() == 3
    second, second_task = await open_stream(app)
    assert await usage() == 3
    ft.advance(1.0)
    assert await usage() == 4

    first.gone.set()
    await first_task
    assert app.stats.in_flight == 1
    assert await usage() == 4
    ft.advance(1.0)
    assert await usage() == 3

    second.gone.set()
    await second_task
    assert app.stats.disconnected == 2
    assert app.stats.usage_polls == 6


async def test_raising_the_lag_live_takes_effect() -> None:
    ft = FakeTime(100.0)
    app = SimApp(SimConfig(token_delay_ms=0), clock=ft.clock)
    exchange, task = await open_stream(app)
    assert (await call(app, "POST", "/sim/config", {"usageLagMs": 500})).status == 200
    exchange.gone.set()
    await task
    assert app.usage()["usage"]["concurrent_sessions"] == 1
    ft.advance(0.5)
    assert app.usage()["usage"]["concurrent_sessions"] == 0


async def test_reset_keeps_requests_in_flight() -> None:
    app = SimApp(SimConfig())
    exchange, task = await open_stream(app)
    reset = (await call(app, "POST", "/sim/reset")).json()
    assert (reset["inFlight"], reset["maxInFlight"], reset["requests"]) == (1, 1, 0)
    exchange.gone.set()
    await task
    assert (app.stats.in_flight, app.stats.disconnected) == (0, 1)


async def test_a_failing_send_counts_as_a_disconnect() -> None:
    app = SimApp(SimConfig(tokens=3, token_delay_ms=0))
    exchange = Exchange(app, "POST", "/v1/chat/completions", {"stream": True})

    async def broken_send(message: Message) -> None:
        if message["type"] == "http.response.body":
            raise ConnectionResetError("peer went away")

    await app(exchange.scope, exchange.receive, broken_send)
    assert (app.stats.in_flight, app.stats.completed, app.stats.disconnected) == (0, 0, 1)


async def test_lifespan_is_acknowledged() -> None:
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[Message] = []

    async def receive() -> Message:
        return next(messages)

    async def send(message: Message) -> None:
        sent.append(message)

    await SimApp(SimConfig())({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
