"""The sim's fault modes, each observed directly against `sluice sim` (issue 7).

Over real sockets, because what matters is what a client sees on the wire: a reset is
a RST before any byte, a cut is a RST after some of the body, a stall is silence.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from proxy.tools.sim import (
    FAULT_KINDS,
    MALFORMED_JSON,
    MALFORMED_SSE,
    Message,
    SimApp,
    SimConfig,
    SimulatedReset,
    expected_content,
)
from proxy.upstream.client import parse_usage
from tests.conftest import sim_client, sim_running
from tests.conftest import sim_stats as stats
from tests.servers import Server
from tests.waiting import wait_until as wait_for

pytestmark = pytest.mark.e2e

BASELINE: dict[str, Any] = {
    "hardCap": None,
    "limit": None,
    "outsideLoad": 0,
    "usageLagMs": 0,
    "retryAfterS": 1,
    "tokens": 6,
    "tokenDelayMs": 2,
    "faults": {},
    "stallS": 5.0,
    "usageFault": "none",
    "seed": None,
}
CHAT: dict[str, Any] = {"model": "sim-1", "messages": [{"role": "user", "content": "hi"}]}
STREAM: dict[str, Any] = {**CHAT, "stream": True}


@pytest.fixture(scope="module")
def sim_server() -> Iterator[Server]:
    with sim_running("--tokens", "6", "--token-delay-ms", "2") as server:
        yield server


@pytest.fixture
def client(sim_server: Server) -> Iterator[httpx.Client]:
    """A client on a sim with no faults configured and zeroed stats."""
    with sim_client(sim_server, BASELINE) as http:
        yield http


def faults(client: httpx.Client) -> dict[str, int]:
    counted: dict[str, int] = stats(client).get("faults", {})
    return counted


def raw_exchange(server: Server, fault: str, *, stream: bool = True) -> tuple[bytes, str]:
    """POST a completion over a bare socket; (bytes received, how the connection ended)."""
    body = json.dumps({**CHAT, "stream": stream}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nX-Sim-Fault: " + fault.encode() + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    received = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            return received, "reset"
    return received, "closed"


# --- completions ---------------------------------------------------------------------------


def test_reset_before_headers_is_a_tcp_reset_with_no_byte(
    client: httpx.Client, sim_server: Server
) -> None:
    received, ended = raw_exchange(sim_server, "reset-before-headers")
    assert (received, ended) == (b"", "reset")
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.post("/v1/chat/completions", json=CHAT, headers={"X-Sim-Fault": "reset"})
    assert faults(client) == {"reset": 2}
    assert stats(client)["maxInFlight"] == 0


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_cut_mid_stream_sends_part_of_the_body_then_resets(
    client: httpx.Client, sim_server: Server, stream: bool
) -> None:
    received, ended = raw_exchange(sim_server, "cut-mid-stream", stream=stream)
    assert ended == "reset"
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    if stream:
        assert b'"content":"tok0 "' in body
        assert b"tok2 " in body  # half of 6 tokens: tok0..tok2
        assert b"tok3 " not in body
        assert b"[DONE]" not in body
    else:
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert 0 < len(body) < length
    wait_for(lambda: stats(client)["inFlight"] == 0)
    s = stats(client)
    assert (s["faults"], s["completed"], s["disconnected"], s["maxInFlight"]) == (
        {"cut": 1},
        0,
        0,
        1,
    )


def test_cut_mid_stream_through_an_http_client(client: httpx.Client) -> None:
    lines: list[str] = []
    headers = {"X-Sim-Fault": "cut-mid-stream"}
    with client.stream("POST", "/v1/chat/completions", json=STREAM, headers=headers) as response:
        assert response.status_code == 200
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            lines.extend(line for line in response.iter_lines() if line)
    assert lines, "some events arrive before the cut"
    assert "data: [DONE]" not in lines


def test_stall_sends_nothing_for_the_given_time_then_answers(client: httpx.Client) -> None:
    started = time.monotonic()
    response = client.post("/v1/chat/completions", json=CHAT, headers={"X-Sim-Fault": "stall:0.4"})
    assert time.monotonic() - started >= 0.4
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == expected_content(6)
    s = stats(client)
    assert (s["faults"], s["completed"], s["maxInFlight"]) == ({"stall": 1}, 1, 1)


def test_a_stall_counts_as_in_flight_and_a_client_giving_up_is_a_disconnect(
    client: httpx.Client,
) -> None:
    client.post("/sim/config", json={"stallS": 30}).raise_for_status()
    with pytest.raises(httpx.ReadTimeout):
        client.post(
            "/v1/chat/completions", json=STREAM, headers={"X-Sim-Fault": "stall"}, timeout=0.3
        )
    wait_for(lambda: stats(client)["disconnected"] == 1)
    s = stats(client)
    assert (s["inFlight"], s["maxInFlight"], s["faults"]) == (0, 1, {"stall": 1})


@pytest.mark.parametrize("status", [500, 502, 503])
def test_status_faults_answer_an_openai_error(client: httpx.Client, status: int) -> None:
    response = client.post(
        "/v1/chat/completions", json=STREAM, headers={"X-Sim-Fault": f"status:{status}"}
    )
    assert response.status_code == status
    assert response.json()["error"]["type"] == "server_error"
    assert faults(client) == {str(status): 1}
    assert stats(client)["maxInFlight"] == 0


def test_rate_limit_fault_is_a_429_with_retry_after_whatever_the_load(
    client: httpx.Client,
) -> None:
    client.post("/sim/config", json={"retryAfterS": 4}).raise_for_status()
    response = client.post("/v1/chat/completions", json=CHAT, headers={"X-Sim-Fault": "rate-limit"})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "4"
    assert response.json()["error"]["type"] == "rate_limit_error"
    s = stats(client)
    assert (s["faults"], s["rateLimited"]) == ({"429": 1}, 0)


def test_malformed_sse_is_sent_exactly_and_breaks_parsers(client: httpx.Client) -> None:
    headers = {"X-Sim-Fault": "malformed-sse"}
    with client.stream("POST", "/v1/chat/completions", json=STREAM, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        body = response.read()
    assert body == b"".join(MALFORMED_SSE)
    assert b"[DONE]" not in body
    whole = client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert whole.status_code == 200
    assert whole.content == MALFORMED_JSON
    with pytest.raises(json.JSONDecodeError):
        json.loads(whole.content)
    s = stats(client)
    assert (s["faults"], s["completed"]) == ({"malformed": 2}, 2)


def test_an_unknown_fault_header_is_a_400_naming_the_valid_values(client: httpx.Client) -> None:
    for bad in ("explode", "stall:-1", "stall:soon", "status:418"):
        response = client.post("/v1/chat/completions", json=CHAT, headers={"X-Sim-Fault": bad})
        assert response.status_code == 400
        assert "X-Sim-Fault" in response.json()["error"]["message"]
    assert "faults" not in stats(client)


def test_the_hard_cap_answers_before_any_fault(client: httpx.Client) -> None:
    client.post("/sim/config", json={"hardCap": 0}).raise_for_status()
    response = client.post("/v1/chat/completions", json=CHAT, headers={"X-Sim-Fault": "status:500"})
    assert response.status_code == 429
    s = stats(client)
    assert s["rateLimited"] == 1
    assert "faults" not in s


# --- random rates --------------------------------------------------------------------------


def expected_draws(seed: int, rates: dict[str, float], n: int) -> list[str | None]:
    """What the sim must pick for `n` requests: one uniform draw each, the kinds laid
    end to end on [0, 1) in `FAULT_KINDS` order."""
    rng = random.Random(seed)
    picks: list[str | None] = []
    for _ in range(n):
        draw, bound, pick = rng.random(), 0.0, None
        for kind in FAULT_KINDS:
            bound += rates.get(kind, 0.0)
            if rates.get(kind) and draw < bound:
                pick = kind
                break
        picks.append(pick)
    return picks


def test_random_rates_are_drawn_from_the_seed_reproducibly(client: httpx.Client) -> None:
    rates = {"500": 0.25, "502": 0.25, "429": 0.2}
    client.post("/sim/config", json={"faults": rates, "seed": 7}).raise_for_status()

    def statuses() -> list[int]:
        return [client.post("/v1/chat/completions", json=CHAT).status_code for _ in range(40)]

    first = statuses()
    expected = [
        {"500": 500, "502": 502, "429": 429, None: 200}[kind]
        for kind in expected_draws(7, rates, 40)
    ]
    assert first == expected
    assert set(first) == {200, 500, 502, 429}
    client.post("/sim/config", json={"seed": 7}).raise_for_status()
    assert statuses() == first
    counted = faults(client)
    assert counted == {
        kind: 2 * expected.count(status)
        for kind, status in (("500", 500), ("502", 502), ("429", 429))
    }
    assert stats(client)["faultsInjected"] == sum(counted.values())


def test_a_fault_header_overrides_the_random_rates(client: httpx.Client) -> None:
    client.post("/sim/config", json={"faults": {"500": 1}}).raise_for_status()
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 500
    forced = client.post("/v1/chat/completions", json=CHAT, headers={"X-Sim-Fault": "none"})
    assert forced.status_code == 200
    other = client.post("/v1/chat/completions", json=CHAT, headers={"X-Sim-Fault": "503"})
    assert other.status_code == 503
    assert faults(client) == {"500": 1, "503": 1}


def test_fault_config_is_validated_and_shown_only_when_set(client: httpx.Client) -> None:
    plain = {key: value for key, value in BASELINE.items() if key not in _FAULT_KEYS}
    assert client.get("/sim/config").json() == plain
    for bad in (
        {"faults": {"explode": 0.1}},
        {"faults": {"cut": 1.5}},
        {"faults": {"cut": -0.1}},
        {"faults": {"cut": True}},
        {"faults": {"cut": "0.1"}},
        {"faults": {"cut": 0.6, "reset": 0.6}},
        {"faults": [0.1]},
        {"stallS": -1},
        {"stallS": "5"},
        {"usageFault": "sometimes"},
        {"usageFault": "slow:-2"},
        {"usageFault": "slow:x"},
        {"seed": 1.5},
        {"tokens": 3, "faults": {"cut": 2}},
    ):
        refused = client.post("/sim/config", json=bad)
        assert refused.status_code == 400, bad
        assert list(bad)[-1] in refused.json()["error"]  # names the bad key
    assert client.post("/sim/config", content=b"[" * 100_000).status_code == 400
    assert client.get("/sim/config").json() == plain  # nothing changed
    changed = {"faults": {"cut": 0.5, "stall": 0.25}, "stallS": 1.5, "usageFault": "slow:0.2"}
    assert client.post("/sim/config", json=changed).json() == {**plain, **changed}
    assert client.post("/sim/config", json={"faults": {}}).json() == {
        **plain,
        "stallS": 1.5,
        "usageFault": "slow:0.2",
    }


_FAULT_KEYS = ("faults", "stallS", "usageFault", "seed")


def test_stats_show_faults_only_once_injected_and_reset_zeroes_them(
    client: httpx.Client,
) -> None:
    assert "faultsInjected" not in stats(client)
    client.post("/v1/chat/completions", json=CHAT, headers={"X-Sim-Fault": "status:502"})
    assert (stats(client)["faultsInjected"], faults(client)) == (1, {"502": 1})
    reset = client.post("/sim/reset").json()
    assert "faultsInjected" not in reset
    assert "faults" not in reset


# --- /v1/usage -----------------------------------------------------------------------------


def usage_bodies(client: httpx.Client, n: int) -> list[httpx.Response]:
    return [client.get("/v1/usage") for _ in range(n)]


def test_usage_flap_alternates_garbage_and_good_answers(client: httpx.Client) -> None:
    client.post("/sim/config", json={"usageFault": "flap"}).raise_for_status()
    answers = usage_bodies(client, 8)
    counts = [parse_usage(answer.content) for answer in answers]
    assert counts == [None, 0, None, 0, None, 0, None, 0]
    assert all(answer.status_code == 200 for answer in answers)
    assert len({answer.content for answer in answers[::2]}) == 4  # different garbage each time
    assert faults(client) == {"usage-garbage": 4}
    assert stats(client)["usagePolls"] == 8


def test_usage_garbage_is_never_a_usable_count(client: httpx.Client) -> None:
    client.post("/sim/config", json={"usageFault": "garbage"}).raise_for_status()
    answers = usage_bodies(client, 10)
    assert len({answer.content for answer in answers}) == 10
    assert [parse_usage(answer.content) for answer in answers] == [None] * 10
    assert faults(client) == {"usage-garbage": 10}


def test_usage_status_fault_is_a_503(client: httpx.Client) -> None:
    client.post("/sim/config", json={"usageFault": "status"}).raise_for_status()
    answer = client.get("/v1/usage")
    assert answer.status_code == 503
    assert faults(client) == {"usage-status": 1}


def test_usage_slow_answers_late_but_right(client: httpx.Client) -> None:
    client.post("/sim/config", json={"usageFault": "slow:0.3"}).raise_for_status()
    started = time.monotonic()
    answer = client.get("/v1/usage")
    assert time.monotonic() - started >= 0.3
    assert parse_usage(answer.content) == 0
    with pytest.raises(httpx.ReadTimeout):
        client.get("/v1/usage", timeout=0.1)
    assert faults(client) == {"usage-slow": 2}


def test_usage_nested_is_valid_json_too_deep_to_parse(client: httpx.Client) -> None:
    client.post("/sim/config", json={"usageFault": "nested"}).raise_for_status()
    body = client.get("/v1/usage").content
    assert body == b"[" * 50_000 + b"]" * 50_000
    with pytest.raises(RecursionError):
        json.loads(body)
    assert faults(client) == {"usage-nested": 1}


# --- flags ---------------------------------------------------------------------------------


def test_fault_flags_configure_a_new_sim() -> None:
    flags = ["--fault-rate", "500=1", "--seed", "3", "--stall-s", "0.5", "--usage-fault", "status"]
    with sim_running(*flags) as server:
        config = httpx.get(server.url + "/sim/config").json()
        assert {key: config[key] for key in _FAULT_KEYS} == {
            "faults": {"500": 1.0},
            "stallS": 0.5,
            "usageFault": "status",
            "seed": 3,
        }
        assert httpx.post(server.url + "/v1/chat/completions", json=CHAT).status_code == 500
        assert httpx.get(server.url + "/v1/usage").status_code == 503


@pytest.mark.parametrize(
    "flags",
    [
        ["--fault-rate", "cut=2"],
        ["--fault-rate", "explode=0.1"],
        ["--fault-rate", "cut"],
        ["--fault-rate", "cut=0.7,reset=0.7"],
        ["--stall-s", "-1"],
        ["--usage-fault", "sometimes"],
    ],
)
def test_bad_fault_flags_exit_2_with_one_line(flags: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "sim", *flags], capture_output=True, timeout=30
    )
    assert done.returncode == 2
    assert b"Traceback" not in done.stderr
    assert flags[0].encode() in done.stderr.splitlines()[-1]


# --- in process: how the reset is made ---------------------------------------------------------


class FakeSocket:
    def __init__(self) -> None:
        self.options: list[tuple[int, int, bytes]] = []

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        self.options.append((level, option, value))


class FakeTransport:
    def __init__(self) -> None:
        self.sock = FakeSocket()
        self.aborted = asyncio.Event()

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None

    def abort(self) -> None:
        self.aborted.set()


class FakeCycle:
    """Stands in for uvicorn's request cycle: `send` is its bound method and it holds
    the transport, which is where the sim finds it."""

    def __init__(self, body: bytes) -> None:
        self.transport = FakeTransport()
        self.sent: list[Message] = []
        self._body: bytes | None = body

    async def receive(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.transport.aborted.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)


def scope(fault: str) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "query_string": b"",
        "headers": [(b"x-sim-fault", fault.encode())],
    }


@pytest.mark.parametrize("fault", ["reset-before-headers", "cut-mid-stream"])
async def test_a_reset_sets_linger_zero_and_aborts_the_transport(fault: str) -> None:
    app = SimApp(SimConfig(tokens=4, token_delay_ms=0))
    cycle = FakeCycle(json.dumps(STREAM).encode())
    await asyncio.wait_for(app(scope(fault), cycle.receive, cycle.send), 5)
    assert cycle.transport.aborted.is_set()
    assert cycle.transport.sock.options == [
        (socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ]
    started = [m for m in cycle.sent if m["type"] == "http.response.start"]
    assert len(started) == (0 if fault.startswith("reset") else 1)
    assert all(m.get("more_body", True) for m in cycle.sent[1:])  # never completed
    assert (app.stats.in_flight, app.stats.completed, app.stats.disconnected) == (0, 0, 0)


async def test_without_a_transport_a_reset_raises() -> None:
    app = SimApp(SimConfig())
    body = json.dumps(CHAT).encode()
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def receive() -> Message:
        return next(messages)

    async def send(message: Message) -> None:
        raise AssertionError("nothing may be sent before a reset")

    with pytest.raises(SimulatedReset):
        await app(scope("reset"), receive, send)
