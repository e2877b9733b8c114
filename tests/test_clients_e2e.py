"""Client keys and per-client shares end to end (SPEC section 11): clients ->
`sluice serve` with `[[clients]]` -> `sluice sim`, over real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from proxy.tools.sim import expected_content
from tests.conftest import chat, sim_provider, start_proxy
from tests.servers import Server
from tests.waiting import wait_until

KEY_A = "sk-sluice-team-a-3f9c1e"  # configured by its digest
KEY_B = "sk-sluice-team-b-77d20a"  # configured through key_env
PROVIDER_KEY = "sk-provider-secret-c41b"
CREDENTIALS = ("authorization", "x-api-key", "api-key")


@pytest.fixture(scope="module")
def proxy(sim: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    providers = (
        sim_provider(sim, "sim", default=True, limit=50)
        + sim_provider(sim, "keyed", api_key=PROVIDER_KEY)
        + sim_provider(sim, "fair", limit=2, cooldown_ms=100)
        + f"""
        [[clients]]
        id = "team-a"
        key_sha256 = "{hashlib.sha256(KEY_A.encode()).hexdigest()}"
        max_in_flight = {{ fair = 1 }}

        [[clients]]
        id = "team-b"
        key_env = "TEAM_B_SLUICE_KEY"
        max_in_flight = {{ fair = 1 }}
        """
    )
    server = start_proxy(
        tmp_path_factory.mktemp("proxy"),
        providers,
        server='log_format = "json"',
        env={"TEAM_B_SLUICE_KEY": KEY_B},
    )
    yield server
    server.stop()


@pytest.fixture
def recording(sim_reset: Server) -> Iterator[httpx.Client]:
    """The sim with its last 50 requests recorded (`GET /sim/requests`)."""
    with httpx.Client(base_url=sim_reset.url, timeout=5.0) as sim:
        sim.post("/sim/config", json={"record": 50}).raise_for_status()
        yield sim
        sim.post("/sim/config", json={"record": 0}).raise_for_status()


def recorded(sim: httpx.Client) -> list[dict[str, Any]]:
    requests: list[dict[str, Any]] = sim.get("/sim/requests").json()["requests"]
    return requests


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def x_api_key(key: str) -> dict[str, str]:
    return {"x-api-key": key}


# ------------------------------------------------------------------------ 401


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-key"),
        pytest.param(bearer("sk-wrong"), id="wrong-bearer"),
        pytest.param(x_api_key("sk-wrong"), id="wrong-x-api-key"),
        pytest.param({"authorization": "Basic dGVhbS1hOng="}, id="basic"),
        pytest.param({"api-key": KEY_A}, id="api-key-header"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/sim/v1/models", "/keyed/v1/echo"])
def test_without_a_configured_key_401_and_nothing_upstream(
    proxy: Server, recording: httpx.Client, headers: dict[str, str], path: str
) -> None:
    response = httpx.post(proxy.url + path, json=chat(), headers=headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "sluice_unauthorized"
    assert error["code"] == "unauthorized"
    assert error["message"]
    assert response.headers["www-authenticate"] == "Bearer"
    assert recorded(recording) == []


# ------------------------------------------------------------------------ 200


@pytest.mark.parametrize("key", [KEY_A, KEY_B], ids=["key_sha256", "key_env"])
@pytest.mark.parametrize("form", [bearer, x_api_key], ids=["bearer", "x-api-key"])
def test_each_configured_key_is_admitted(
    proxy: Server, recording: httpx.Client, key: str, form: Any
) -> None:
    response = httpx.post(proxy.url + "/v1/chat/completions", json=chat(), headers=form(key))
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == expected_content(5)
    [upstream] = recorded(recording)
    assert not set(CREDENTIALS) & set(upstream["headers"]), upstream["headers"]


def test_admin_routes_need_no_client_key(proxy: Server) -> None:
    assert httpx.get(proxy.url + "/healthz").status_code == 200
    assert httpx.get(proxy.url + "/concurrency/status").status_code == 200
    assert httpx.get(proxy.url + "/metrics").status_code == 200


# ------------------------------------------------------- the key stays here


def echoed(response: httpx.Response) -> list[tuple[str, str]]:
    assert response.status_code == 200, response.text
    return [(name, value) for name, value in response.json()["headers"]]


@pytest.mark.parametrize("form", [bearer, x_api_key], ids=["bearer", "x-api-key"])
def test_the_key_never_reaches_a_provider_without_a_key(
    proxy: Server, sim_reset: Server, form: Any
) -> None:
    headers = {**form(KEY_A), "api-key": "sk-also-dropped", "x-custom": "kept"}
    response = httpx.post(proxy.url + "/v1/echo", headers=headers)
    upstream = echoed(response)
    assert not [name for name, _ in upstream if name in CREDENTIALS], upstream
    assert ("x-custom", "kept") in upstream
    assert KEY_A not in response.text


@pytest.mark.parametrize("form", [bearer, x_api_key], ids=["bearer", "x-api-key"])
def test_a_provider_with_a_key_gets_its_own_key_only(
    proxy: Server, sim_reset: Server, form: Any
) -> None:
    response = httpx.post(proxy.url + "/keyed/v1/echo", headers=form(KEY_B))
    upstream = [(n, v) for n, v in echoed(response) if n in CREDENTIALS]
    assert upstream == [("authorization", f"Bearer {PROVIDER_KEY}")]
    assert KEY_B not in response.text


def test_the_openai_sdk_with_a_client_key(proxy: Server, recording: httpx.Client) -> None:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY_A)
    completion = client.chat.completions.create(
        model="sim-1", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content == expected_content(5)
    stream = client.chat.completions.create(
        model="sim-1", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == expected_content(5)
    client.close()
    requests = recorded(recording)
    assert len(requests) == 2
    for upstream in requests:
        assert not set(CREDENTIALS) & set(upstream["headers"]), upstream["headers"]


def test_the_openai_sdk_with_a_wrong_key_gets_401(proxy: Server, recording: httpx.Client) -> None:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-not-a-client", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="sim-1", messages=[{"role": "user", "content": "x"}])
    client.close()
    assert caught.value.status_code == 401
    assert recorded(recording) == []


# ------------------------------------------------------------ visible


def test_status_metrics_and_access_log_name_the_client(proxy: Server, sim_reset: Server) -> None:
    assert httpx.post(proxy.url + "/fair/v1/chat/completions", json=chat(), headers=bearer(KEY_A))
    status = httpx.get(proxy.url + "/concurrency/status/fair").json()
    assert status["clients"] == [
        {"clientId": "team-a", "inFlight": 0, "queued": 0, "maxInFlight": 1},
        {"clientId": "team-b", "inFlight": 0, "queued": 0, "maxInFlight": 1},
    ]
    assert status["limit"] == 2  # the SPEC's keys are all still there
    uncapped = httpx.get(proxy.url + "/concurrency/status/sim").json()["clients"]
    assert [c["maxInFlight"] for c in uncapped] == [None, None]
    metrics = httpx.get(proxy.url + "/metrics").text
    assert 'sluice_client_in_flight{client="team-a",provider="fair"} 0.0' in metrics
    assert 'sluice_client_queued{client="team-b",provider="fair"} 0.0' in metrics

    def access_line() -> dict[str, Any] | None:
        for line in reversed(proxy.log().splitlines()):
            if line.startswith("{"):
                entry: dict[str, Any] = json.loads(line)
                if entry.get("event") == "request" and entry.get("provider") == "fair":
                    return entry
        return None

    entry = wait_until(access_line)
    assert entry["client"] == "team-a"
    assert KEY_A not in proxy.log()


# ------------------------------------------------------------------ shares


async def test_a_flooding_client_does_not_hold_back_another(
    proxy: Server, sim_reset: Server
) -> None:
    """Limit 2, caps of 1: team-a sends ten requests at once, all with an older prompt
    than anything of team-b's. team-b's requests each go within one slot cycle (a
    request's run plus the cooldown), while team-a's wait their turn, one at a time."""
    run_s, cooldown_s = 10 * 0.030, 0.100
    url = proxy.url + "/fair/v1/chat/completions"
    async with httpx.AsyncClient(timeout=60) as http:
        config = {"tokens": 10, "tokenDelayMs": 30}
        (await http.post(sim_reset.url + "/sim/config", json=config)).raise_for_status()

        async def send(key: str, started_at: int | None = None) -> httpx.Response:
            headers = bearer(key)
            if started_at is not None:
                headers["x-prompt-started-at"] = str(started_at)
            response = await http.post(url, json=chat(), headers=headers)
            assert response.status_code == 200, response.text
            return response

        flood = [asyncio.create_task(send(KEY_A, 1_700_000_000_000)) for _ in range(10)]

        async def flooded() -> bool:
            status = (await http.get(proxy.url + "/concurrency/status/fair")).json()
            return bool(status["clients"][0]["queued"] >= 8)

        deadline = asyncio.get_running_loop().time() + 10
        while not await flooded():
            assert asyncio.get_running_loop().time() < deadline, "team-a's flood never queued"
            await asyncio.sleep(0.01)
        b_waits = []
        for _ in range(3):
            response = await send(KEY_B)
            b_waits.append(int(response.headers["x-sluice-queue-ms"]) / 1000)
        a_waits = [int(r.headers["x-sluice-queue-ms"]) / 1000 for r in await asyncio.gather(*flood)]
        stats = (await http.get(sim_reset.url + "/sim/stats")).json()
    assert max(b_waits) <= run_s + cooldown_s + 0.15, b_waits
    # team-a's requests went one at a time: the last waited for most of the others.
    assert max(a_waits) >= 5 * run_s, a_waits
    assert stats["maxInFlight"] <= 2, stats
