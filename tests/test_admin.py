"""The admin API end to end (SPEC section 6): `sluice serve` subprocesses with and
without `admin_token`, in front of the session's `sluice sim`."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.tools.sim import expected_content
from tests.conftest import chat, sim_provider, start_proxy
from tests.servers import Server, free_port
from tests.waiting import wait_until

ADMIN_TOKEN = "admin-token-" + secrets.token_hex(8)
PROVIDER_KEY = "sk-secret-" + secrets.token_hex(16)
CLIENT_KEY = "sk-client-" + secrets.token_hex(16)
AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}

NOTICE = "Concurrency limit auto-reduced to {} after a 429 — restore manually when ready."
STATUS_REQUIRED = {
    "providerId",
    "limit",
    "inFlight",
    "queued",
    "paused",
    "cooldownMs",
    "autoReduced",
}
STATUS_SPEC_KEYS = STATUS_REQUIRED | {"pausedUntil", "autoReducedFrom", "notice"}
EVENT_KEYS = {"at", "providerId", "kind", "detail"}

# Each test that changes state owns its provider, so the module can share one proxy.
SECURED_PROVIDERS: dict[str, dict[str, object]] = {
    "alpha": {"limit": 4, "cooldown_ms": 100, "default": True},  # read-only: status, bad bodies
    "beta": {},  # no limit
    "gamma": {"limit": 2},  # PUT / DELETE limit, cooldown
    "delta": {"limit": 3, "retry_on_429": 0},  # 429 reduction, then a manual limit
    "epsilon": {"limit": 2},  # events
    "tok": {"limit": 5},  # the right token's writes
    "keyed": {"limit": 2, "usage_gate": True, "retry_on_429": 0, "api_key": PROVIDER_KEY},
}


@dataclass
class Proxy:
    """A running `sluice serve` and the SQLite file it writes."""

    server: Server
    database: Path

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def secured(sim: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """A proxy with an admin token and one provider per test that writes."""
    directory = tmp_path_factory.mktemp("secured")
    providers = "".join(sim_provider(sim, pid, **kv) for pid, kv in SECURED_PROVIDERS.items())
    down = f"""
        [[providers]]
        id = "keyed-down"
        base_url = "http://127.0.0.1:{free_port()}/v1"
        api_key = "{PROVIDER_KEY}"
        """
    server = start_proxy(directory, providers + down, server=f'admin_token = "{ADMIN_TOKEN}"')
    yield Proxy(server, directory / "state" / "sluice.db")
    server.stop()


@pytest.fixture(scope="module")
def open_proxy(sim: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """A proxy without an admin token."""
    directory = tmp_path_factory.mktemp("open")
    server = start_proxy(directory, sim_provider(sim, "solo", limit=3))
    yield Proxy(server, directory / "state" / "sluice.db")
    server.stop()


@pytest.fixture
def admin(secured: Proxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=secured.url, headers=AUTH, timeout=10) as client:
        yield client


def error_of(response: httpx.Response, status: int) -> str:
    """The `{"error": "..."}` message of a refused admin call."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str)
    assert body["error"]
    return body["error"]


def check_status(status: dict[str, Any]) -> None:
    """A Status object: every key of SPEC section 6 with its type, the optional
    ones exactly when they apply (keys outside the SPEC are allowed)."""
    expected = set(STATUS_REQUIRED)
    if status["paused"]:
        expected.add("pausedUntil")
    if status["autoReduced"]:
        expected |= {"autoReducedFrom", "notice"}
    assert set(status) & STATUS_SPEC_KEYS == expected, status
    assert isinstance(status["providerId"], str)
    assert status["limit"] is None or type(status["limit"]) is int
    for key in ("inFlight", "queued", "cooldownMs"):
        assert type(status[key]) is int, (key, status)
        assert status[key] >= 0
    assert type(status["paused"]) is bool
    assert type(status["autoReduced"]) is bool
    if "pausedUntil" in status:
        assert type(status["pausedUntil"]) is int


def events_of(client: httpx.Client, **params: str | int) -> list[dict[str, Any]]:
    response = client.get("/concurrency/events", params=params)
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    for event in events:
        assert set(event) == EVENT_KEYS, event
        assert type(event["at"]) is int
        assert isinstance(event["detail"], str)
    return events


def wait_for_events(client: httpx.Client, provider: str, kinds: set[str]) -> list[dict[str, Any]]:
    """The provider's events once all `kinds` are journaled: the limiter's own events
    are written by a background writer, a moment after the request that caused them."""

    def journaled() -> list[dict[str, Any]] | None:
        events = events_of(client, provider=provider)
        return events if kinds <= {e["kind"] for e in events} else None

    return wait_until(journaled)


# --------------------------------------------------------------------- status


def test_status_lists_every_provider_with_the_spec_keys(admin: httpx.Client) -> None:
    response = admin.get("/concurrency/status")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    providers = response.json()["providers"]
    assert sorted(p["providerId"] for p in providers) == sorted([*SECURED_PROVIDERS, "keyed-down"])
    for status in providers:
        check_status(status)


def test_status_of_one_provider(admin: httpx.Client) -> None:
    alpha = admin.get("/concurrency/status/alpha").json()
    check_status(alpha)
    assert set(alpha) & STATUS_SPEC_KEYS == STATUS_REQUIRED  # not paused, not reduced
    assert alpha["providerId"] == "alpha"
    assert alpha["limit"] == 4
    assert alpha["cooldownMs"] == 100
    assert (alpha["inFlight"], alpha["queued"]) == (0, 0)
    assert (alpha["paused"], alpha["autoReduced"]) == (False, False)

    beta = admin.get("/concurrency/status/beta").json()
    check_status(beta)
    assert beta["limit"] is None
    assert beta["cooldownMs"] == 350  # the [admission] default


# --------------------------------------------------------------------- limits


def test_limits_list_and_one(admin: httpx.Client) -> None:
    limits = admin.get("/concurrency/limits").json()["limits"]
    for entry in limits:
        assert set(entry) == {"providerId", "limit"}
    by_id = {entry["providerId"]: entry["limit"] for entry in limits}
    assert by_id["alpha"] == 4
    assert "beta" not in by_id  # no limit configured
    assert "keyed-down" not in by_id

    assert admin.get("/concurrency/limits/alpha").json() == {"providerId": "alpha", "limit": 4}
    assert "beta" in error_of(admin.get("/concurrency/limits/beta"), 404)


def test_put_limit_is_applied_listed_and_journaled(admin: httpx.Client) -> None:
    for value in (7, 1, 10000, 3):
        response = admin.put("/concurrency/limits/gamma", json={"limit": value})
        assert response.status_code == 200, response.text
        assert response.json() == {"providerId": "gamma", "limit": value}
        assert admin.get("/concurrency/limits/gamma").json() == {
            "providerId": "gamma",
            "limit": value,
        }
        assert admin.get("/concurrency/status/gamma").json()["limit"] == value
        listed = admin.get("/concurrency/limits").json()["limits"]
        assert {"providerId": "gamma", "limit": value} in listed
        # Answered only once durable: the event is written in the same transaction.
        newest = events_of(admin, provider="gamma", limit=1)
        assert [e["kind"] for e in newest] == ["limit_set"]
        assert str(value) in newest[0]["detail"]


def test_delete_limit_makes_the_provider_unlimited(admin: httpx.Client) -> None:
    admin.put("/concurrency/limits/gamma", json={"limit": 2}).raise_for_status()
    response = admin.delete("/concurrency/limits/gamma")
    assert response.status_code == 200, response.text
    assert response.json() == {"ok": True, "providerId": "gamma"}

    status = admin.get("/concurrency/status/gamma").json()
    check_status(status)
    assert status["limit"] is None
    listed = admin.get("/concurrency/limits").json()["limits"]
    assert "gamma" not in [entry["providerId"] for entry in listed]
    assert "gamma" in error_of(admin.get("/concurrency/limits/gamma"), 404)
    assert [e["kind"] for e in events_of(admin, provider="gamma", limit=1)] == ["limit_removed"]

    # Unlimited means admitted at once, however many.
    requests = [admin.post("/gamma/v1/chat/completions", json=chat()) for _ in range(3)]
    assert [r.status_code for r in requests] == [200, 200, 200]

    admin.put("/concurrency/limits/gamma", json={"limit": 2}).raise_for_status()
    assert admin.get("/concurrency/status/gamma").json()["limit"] == 2


def test_manual_limit_clears_the_auto_reduce_state(admin: httpx.Client, sim_clean: Server) -> None:
    httpx.post(sim_clean.url + "/sim/config", json={"hardCap": 0}).raise_for_status()
    refused = admin.post("/delta/v1/chat/completions", json=chat())
    assert refused.status_code == 429  # retry_on_429 = 0: the client sees it

    reduced = admin.get("/concurrency/status/delta").json()
    check_status(reduced)
    assert reduced["limit"] == 2
    assert reduced["autoReduced"] is True
    assert reduced["autoReducedFrom"] == 3
    assert reduced["notice"] == NOTICE.format(2)
    wait_for_events(admin, "delta", {"rate_limited", "paused", "limit_reduced"})

    response = admin.put("/concurrency/limits/delta", json={"limit": 3})
    assert response.status_code == 200
    restored = admin.get("/concurrency/status/delta").json()
    check_status(restored)
    assert restored["limit"] == 3
    assert restored["autoReduced"] is False
    assert "autoReducedFrom" not in restored
    assert "notice" not in restored
    assert events_of(admin, provider="delta", limit=1)[0]["kind"] == "limit_set"


# ------------------------------------------------------------------- cooldown


def test_get_and_put_cooldown(admin: httpx.Client) -> None:
    assert admin.get("/concurrency/cooldown/alpha").json() == {
        "providerId": "alpha",
        "cooldownMs": 100,
    }
    for value in (0, 3_600_000, 1234):
        response = admin.put("/concurrency/cooldown/gamma", json={"cooldownMs": value})
        assert response.status_code == 200, response.text
        assert response.json() == {"providerId": "gamma", "cooldownMs": value}
        assert admin.get("/concurrency/cooldown/gamma").json() == {
            "providerId": "gamma",
            "cooldownMs": value,
        }
        assert admin.get("/concurrency/status/gamma").json()["cooldownMs"] == value
        newest = events_of(admin, provider="gamma", limit=1)
        assert [e["kind"] for e in newest] == ["cooldown_set"]
        assert str(value) in newest[0]["detail"]


# --------------------------------------------------------------------- events


def test_events_filtered_by_provider_and_limit_newest_first(admin: httpx.Client) -> None:
    admin.put("/concurrency/cooldown/gamma", json={"cooldownMs": 300}).raise_for_status()
    before = int(time.time() * 1000)
    admin.put("/concurrency/limits/epsilon", json={"limit": 5}).raise_for_status()
    admin.put("/concurrency/cooldown/epsilon", json={"cooldownMs": 250}).raise_for_status()
    admin.delete("/concurrency/limits/epsilon").raise_for_status()
    admin.put("/concurrency/limits/epsilon", json={"limit": 6}).raise_for_status()
    after = int(time.time() * 1000)

    events = events_of(admin, provider="epsilon")
    assert [e["kind"] for e in events] == [
        "limit_set",
        "limit_removed",
        "cooldown_set",
        "limit_set",
    ]
    assert {e["providerId"] for e in events} == {"epsilon"}
    assert "6" in events[0]["detail"]
    assert "5" in events[3]["detail"]
    assert [e["at"] for e in events] == sorted((e["at"] for e in events), reverse=True)
    assert all(before - 1 <= e["at"] <= after + 1 for e in events)

    assert events_of(admin, provider="epsilon", limit=2) == events[:2]
    assert events_of(admin, provider="epsilon", limit=1) == events[:1]
    assert events_of(admin, provider="beta") == []  # nothing ever happened to beta

    everything = events_of(admin, limit=1000)
    assert everything[0] == events[0]  # the newest of all is our last write
    assert len(everything) > len(events)
    configured = {*SECURED_PROVIDERS, "keyed-down"}
    assert {e["providerId"] for e in everything} <= configured
    assert len(events_of(admin, limit=1)) == 1


@pytest.mark.parametrize("limit", ["0", "abc", "1001", "-1", "2.5", ""])
def test_events_bad_limit_is_400(admin: httpx.Client, limit: str) -> None:
    message = error_of(admin.get("/concurrency/events", params={"limit": limit}), 400)
    assert "limit" in message


def test_events_limit_of_a_digit_int_refuses_is_400(admin: httpx.Client) -> None:
    response = admin.get("/concurrency/events", params={"limit": "²"})
    assert "limit" in error_of(response, 400)


# ---------------------------------------------------------------- bad bodies


BAD_LIMIT_BODIES = [
    pytest.param(b'{"limit": true}', id="bool"),
    pytest.param(b'{"limit": 2.0}', id="float"),
    pytest.param(b'{"limit": "3"}', id="string"),
    pytest.param(b'{"limit": 0}', id="zero"),
    pytest.param(b'{"limit": 10001}', id="too-big"),
    pytest.param(b'{"limit": -2}', id="negative"),
    pytest.param(b'{"limit": null}', id="null-value"),
    pytest.param(b"{}", id="empty-object"),
    pytest.param(b"[]", id="array"),
    pytest.param(b"null", id="null"),
    pytest.param(b'{"limit": 3, "extra": 1}', id="extra-field"),
]


@pytest.mark.parametrize("body", BAD_LIMIT_BODIES)
def test_put_limit_bad_body_is_400_naming_the_field(admin: httpx.Client, body: bytes) -> None:
    response = admin.put(
        "/concurrency/limits/alpha", content=body, headers={"content-type": "application/json"}
    )
    message = error_of(response, 400)
    assert "limit" in message
    if b"extra" in body:
        assert "extra" in message
    assert admin.get("/concurrency/limits/alpha").json()["limit"] == 4  # unchanged


def test_put_limit_not_json_is_400(admin: httpx.Client) -> None:
    for body in (b"limit=3", b"", b'{"limit": 3'):
        response = admin.put("/concurrency/limits/alpha", content=body)
        assert "json" in error_of(response, 400).lower()
    assert admin.get("/concurrency/limits/alpha").json()["limit"] == 4


BAD_COOLDOWN_BODIES = [
    pytest.param(b'{"cooldownMs": -1}', id="negative"),
    pytest.param(b'{"cooldownMs": 3600001}', id="too-big"),
    pytest.param(b'{"cooldownMs": true}', id="bool"),
    pytest.param(b'{"cooldownMs": 1.5}', id="float"),
    pytest.param(b'{"cooldownMs": "5"}', id="string"),
    pytest.param(b'{"cooldown_ms": 5}', id="snake-case"),
    pytest.param(b"{}", id="empty-object"),
    pytest.param(b"[5]", id="array"),
]


@pytest.mark.parametrize("body", BAD_COOLDOWN_BODIES)
def test_put_cooldown_bad_body_is_400_naming_the_field(admin: httpx.Client, body: bytes) -> None:
    response = admin.put("/concurrency/cooldown/alpha", content=body)
    assert "cooldownMs" in error_of(response, 400)
    assert admin.get("/concurrency/cooldown/alpha").json()["cooldownMs"] == 100  # unchanged


def test_bad_bodies_write_no_events(admin: httpx.Client) -> None:
    before = events_of(admin, provider="alpha")
    admin.put("/concurrency/limits/alpha", json={"limit": 0})
    admin.put("/concurrency/cooldown/alpha", json={"cooldownMs": -1})
    assert events_of(admin, provider="alpha") == before


# ------------------------------------------------------------ unknown provider


PER_PROVIDER_ROUTES = [
    ("GET", "/concurrency/status/{}", None),
    ("GET", "/concurrency/limits/{}", None),
    ("PUT", "/concurrency/limits/{}", {"limit": 3}),
    ("DELETE", "/concurrency/limits/{}", None),
    ("GET", "/concurrency/cooldown/{}", None),
    ("PUT", "/concurrency/cooldown/{}", {"cooldownMs": 5}),
]


@pytest.mark.parametrize(("method", "path", "body"), PER_PROVIDER_ROUTES)
def test_unknown_provider_is_404(
    admin: httpx.Client, method: str, path: str, body: dict[str, int] | None
) -> None:
    response = admin.request(method, path.format("nope"), json=body)
    assert "nope" in error_of(response, 404)


def test_events_of_an_unknown_provider_is_404(admin: httpx.Client) -> None:
    response = admin.get("/concurrency/events", params={"provider": "nope"})
    assert "nope" in error_of(response, 404)


# ----------------------------------------------------------------- the token


# In an order the right token can run through: reads, writes, the DELETE last.
TOKEN_ROUTES = [
    ("GET", "/concurrency/status", None),
    ("GET", "/concurrency/status/tok", None),
    ("GET", "/concurrency/limits", None),
    ("GET", "/concurrency/limits/tok", None),
    ("GET", "/concurrency/cooldown/tok", None),
    ("GET", "/concurrency/events?provider=tok&limit=5", None),
    ("GET", "/concurrency/events", None),
    ("PUT", "/concurrency/limits/tok", {"limit": 6}),
    ("PUT", "/concurrency/cooldown/tok", {"cooldownMs": 200}),
    ("DELETE", "/concurrency/limits/tok", None),
]

WRONG_AUTHORIZATION: list[dict[str, str]] = [
    {},
    {"authorization": "Bearer wrong-token"},
    {"authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
    {"authorization": f"Bearer {ADMIN_TOKEN}x"},
    {"authorization": "Bearer"},
    {"authorization": ADMIN_TOKEN},
    {"authorization": f"Basic {ADMIN_TOKEN}"},
    {"authorization": "Basic " + base64.b64encode(f"admin:{ADMIN_TOKEN}".encode()).decode()},
    {"x-admin-token": ADMIN_TOKEN},
]


def test_every_admin_route_needs_the_token(secured: Proxy) -> None:
    with httpx.Client(base_url=secured.url, timeout=10) as client:
        for method, path, body in TOKEN_ROUTES:
            for headers in WRONG_AUTHORIZATION:
                response = client.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.json().keys() == {"error"}
            # Unauthenticated callers cannot even learn which providers exist.
            unknown = client.request(method, path.replace("tok", "nope"), json=body)
            assert unknown.status_code == 401

        # Nothing the refused calls asked for happened.
        status = client.get("/concurrency/status/tok", headers=AUTH).json()
        assert (status["limit"], status["cooldownMs"]) == (5, 350)

        for method, path, body in TOKEN_ROUTES:
            response = client.request(method, path, json=body, headers=AUTH)
            assert 200 <= response.status_code < 300, (method, path, response.text)
        status = client.get("/concurrency/status/tok", headers=AUTH).json()
        assert (status["limit"], status["cooldownMs"]) == (None, 200)

        # The scheme is case-insensitive (RFC 9110 section 11.1).
        lower = client.get(
            "/concurrency/limits", headers={"authorization": f"bearer {ADMIN_TOKEN}"}
        )
        assert lower.status_code == 200


def test_healthz_needs_no_token(secured: Proxy) -> None:
    for headers in ({}, {"authorization": "Bearer wrong"}, AUTH):
        response = httpx.get(secured.url + "/healthz", headers=headers)
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}


def test_without_admin_token_the_routes_are_open(open_proxy: Proxy) -> None:
    with httpx.Client(base_url=open_proxy.url, timeout=10) as client:
        for headers in ({}, {"authorization": "Bearer anything"}):
            for path in (
                "/concurrency/status",
                "/concurrency/status/solo",
                "/concurrency/limits",
                "/concurrency/limits/solo",
                "/concurrency/cooldown/solo",
                "/concurrency/events",
            ):
                response = client.get(path, headers=headers)
                assert response.status_code == 200, (path, response.text)
        put = client.put("/concurrency/limits/solo", json={"limit": 9})
        assert put.json() == {"providerId": "solo", "limit": 9}
        cooldown = client.put("/concurrency/cooldown/solo", json={"cooldownMs": 7})
        assert cooldown.json() == {"providerId": "solo", "cooldownMs": 7}
        assert client.delete("/concurrency/limits/solo").json() == {
            "ok": True,
            "providerId": "solo",
        }
        assert client.get("/healthz").json() == {"status": "ok"}


# --------------------------------------------------------------- the secrets


async def test_secrets_never_leave_the_process(secured: Proxy, sim_clean: Server) -> None:
    """The provider key goes to the upstream only: no response, no log line (at
    debug level), no byte of the SQLite files. The admin token and client keys
    are not logged or stored either."""
    responses: list[httpx.Response] = []
    client_auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    async with httpx.AsyncClient(base_url=secured.url, timeout=20) as client:

        async def stream_one() -> httpx.Response:
            headers = {**client_auth, "x-sim-tokens": "5", "x-sim-token-delay-ms": "20"}
            async with client.stream(
                "POST", "/keyed/v1/chat/completions", json=chat(True), headers=headers
            ) as response:
                await response.aread()
            text = "".join(
                json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                for line in response.text.splitlines()
                if line.startswith("data: {")
            )
            assert text == expected_content(5)
            return response

        # Four streams on a limit of 2: two queue, and the usage gate polls /usage
        # with the provider key.
        responses += await asyncio.gather(*(stream_one() for _ in range(4)))
        for method, path in (
            ("POST", "/keyed/v1/chat/completions"),
            ("GET", "/keyed/v1/models"),
            ("GET", "/keyed/v1/usage"),
            ("GET", "/keyed/v1/no-such-route"),
            ("POST", "/keyed-down/v1/chat/completions"),
            ("GET", "/keyed-down/v1/models"),
            ("POST", "/beta/v1/chat/completions"),  # the client key goes upstream here
        ):
            body = chat() if method == "POST" else None
            responses.append(await client.request(method, path, json=body, headers=client_auth))
        assert [r.status_code for r in responses[4:]] == [200, 200, 200, 404, 502, 502, 200]

        # A 429 from the upstream: journaled and logged as a warning.
        sim_config = await client.post(sim_clean.url + "/sim/config", json={"hardCap": 0})
        sim_config.raise_for_status()
        refused = await client.post("/keyed/v1/chat/completions", json=chat(), headers=client_auth)
        assert refused.status_code == 429
        responses.append(refused)

        for method, path, admin_body in [
            ("GET", "/concurrency/status", None),
            ("GET", "/concurrency/limits", None),
            ("GET", "/concurrency/status/keyed", None),
            ("GET", "/concurrency/limits/keyed", None),
            ("GET", "/concurrency/cooldown/keyed", None),
            ("PUT", "/concurrency/cooldown/keyed", {"cooldownMs": 120}),
            ("PUT", "/concurrency/limits/keyed", {"limit": 2}),
        ]:
            response = await client.request(method, path, json=admin_body, headers=AUTH)
            assert response.status_code == 200, (path, response.text)
            responses.append(response)
        with httpx.Client(base_url=secured.url, headers=AUTH) as sync_client:
            kinds = {"rate_limited", "paused", "limit_reduced", "limit_set", "cooldown_set"}
            wait_for_events(sync_client, "keyed", kinds)
        for query in ("provider=keyed", "limit=1000"):
            responses.append(await client.get(f"/concurrency/events?{query}", headers=AUTH))
        responses.append(await client.get("/healthz"))

    for response in responses:
        assert PROVIDER_KEY not in response.text, response.request.url
        for name, value in response.headers.items():
            assert PROVIDER_KEY not in value, (response.request.url, name)

    # Logging is synchronous to the proxy's stderr; every line above is written.
    log = secured.server.log()
    assert "sluice started" in log
    assert "rate_limited" in log  # the log did see the traffic
    for secret in (PROVIDER_KEY, ADMIN_TOKEN, CLIENT_KEY):
        assert secret not in log
        for suffix in ("", "-wal", "-shm", "-journal"):
            stored = secured.database.with_name(secured.database.name + suffix)
            if stored.exists():
                assert secret.encode() not in stored.read_bytes(), stored
    assert secured.database.exists()
