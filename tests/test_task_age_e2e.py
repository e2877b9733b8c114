"""Task age without a header, end to end (SPEC 10): a real `sluice serve` in front of
`sluice sim`, clients that send no `X-Prompt-Started-At`.

The scene of every ordering test: limit 1, a holder keeps the slot, then a brand-new
task arrives and queues, then a tool round of an older task arrives and queues. With
derivation the tool round goes first; without, arrival order."""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ProxyFactory, sim_provider
from tests.redis_server import redis_server
from tests.servers import Server
from tests.waiting import eventually

PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses", "messages": "/v1/messages"}
# Holds the only slot for 1.5 s: time enough, even on a loaded machine, for two more
# requests to arrive and queue behind it (the test waits until they have).
HOLD = {"x-prompt-started-at": "1795830000000", "x-sim-tokens": "30", "x-sim-token-delay-ms": "50"}


def first_turn(dialect: str, task: str) -> dict[str, Any]:
    """A new task's first request: a system prompt and the person's prompt."""
    if dialect == "chat":
        return {
            "model": "sim-1",
            "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": task}],
        }
    if dialect == "responses":
        return {"model": "sim-1", "instructions": "S", "input": [{"role": "user", "content": task}]}
    return {
        "model": "sim-1",
        "max_tokens": 64,
        "system": "S",
        "messages": [{"role": "user", "content": task}],
    }


def tool_round(dialect: str, body: dict[str, Any]) -> dict[str, Any]:
    """The same task after one tool call: its history plus the call and its result."""
    body = copy.deepcopy(body)
    if dialect == "chat":
        body["messages"] += [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "sh", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ]
    elif dialect == "responses":
        body["input"] += [
            {"type": "function_call", "call_id": "c1", "name": "sh", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        ]
    else:
        body["messages"] += [
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "sh", "input": {}}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}],
            },
        ]
    return body


async def send(
    client: httpx.AsyncClient,
    proxy: Server,
    dialect: str,
    body: dict[str, Any],
    *,
    stream: bool = False,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST `body` (streamed or not), read it whole, and return the response."""
    body = {**body, "stream": stream}
    async with client.stream("POST", proxy.url + PATHS[dialect], json=body, headers=headers) as r:
        await r.aread()
    assert r.status_code == 200, r.text
    return r


def prompt_time(response: httpx.Response) -> tuple[int, str]:
    return (
        int(response.headers["x-sluice-prompt-started-at"]),
        response.headers["x-sluice-prompt-source"],
    )


async def status(client: httpx.AsyncClient, proxy: Server) -> dict[str, Any]:
    found: dict[str, Any] = (await client.get(proxy.url + "/concurrency/status/sim")).json()
    return found


async def queued(client: httpx.AsyncClient, proxy: Server, n: int) -> bool:
    return bool((await status(client, proxy))["queued"] == n)


async def order_after_a_newer_task(
    proxy: Server, dialect: str, stream: bool
) -> tuple[list[str], dict[str, tuple[int, str]]]:
    """Task A's first request, then (slot held) task B's first request, then A's tool
    round. Returns the order in which B and A's round finished, and every prompt time."""
    order: list[str] = []
    times: dict[str, tuple[int, str]] = {}
    a_first = first_turn(dialect, "task A")
    async with httpx.AsyncClient(timeout=30) as client:
        times["a1"] = prompt_time(await send(client, proxy, dialect, a_first, stream=stream))

        async def request(name: str, body: dict[str, Any], **kw: Any) -> None:
            response = await send(client, proxy, dialect, body, stream=stream, **kw)
            times[name] = prompt_time(response)
            order.append(name)

        holder = asyncio.create_task(request("holder", first_turn("chat", "hold"), headers=HOLD))
        await eventually(lambda: _running(client, proxy))
        newer = asyncio.create_task(request("b1", first_turn(dialect, "task B")))
        await eventually(functools.partial(queued, client, proxy, 1))
        older = asyncio.create_task(request("a2", tool_round(dialect, a_first)))
        await eventually(functools.partial(queued, client, proxy, 2))
        await asyncio.gather(holder, newer, older)
    return [name for name in order if name != "holder"], times


async def _running(client: httpx.AsyncClient, proxy: Server) -> bool:
    return bool((await status(client, proxy))["inFlight"] >= 1)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("dialect", ["chat", "responses", "messages"])
async def test_a_tool_round_goes_before_a_newer_task(
    make_proxy: ProxyFactory, sim_reset: Server, dialect: str, stream: bool
) -> None:
    proxy = make_proxy(sim_provider(sim_reset, limit=1), admission="cooldown_ms = 0")
    order, times = await order_after_a_newer_task(proxy, dialect, stream)
    assert order == ["a2", "b1"]
    assert times["a1"][1] == times["a2"][1] == times["b1"][1] == "derived"
    assert times["a2"][0] == times["a1"][0]  # the tool round kept its prompt's time
    assert times["b1"][0] > times["a1"][0]
    assert times["holder"] == (int(HOLD["x-prompt-started-at"]), "header")


@pytest.mark.parametrize(
    ("admission", "provider"),
    [("derive_prompt_start = false", {}), ("", {"derive_prompt_start": False})],
    ids=["admission", "provider"],
)
async def test_the_switch_turns_derivation_off(
    make_proxy: ProxyFactory, sim_reset: Server, admission: str, provider: dict[str, Any]
) -> None:
    proxy = make_proxy(
        sim_provider(sim_reset, limit=1, **provider), admission="cooldown_ms = 0\n" + admission
    )
    order, times = await order_after_a_newer_task(proxy, "chat", stream=False)
    assert order == ["b1", "a2"]  # arrival order
    assert {source for _, source in times.values()} == {"arrival", "header"}


async def test_an_agents_turn_start_is_used_as_the_header(
    make_proxy: ProxyFactory, sim_reset: Server
) -> None:
    proxy = make_proxy(sim_provider(sim_reset, limit=2))
    metadata = json.dumps({"turn_id": "t", "turn_started_at_unix_ms": 1795830000123})
    async with httpx.AsyncClient(timeout=30) as client:
        response = await send(
            client,
            proxy,
            "responses",
            first_turn("responses", "task"),
            headers={"x-codex-turn-metadata": metadata, "session-id": "s-1"},
        )
    assert prompt_time(response) == (1795830000123, "agent")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_previous_response_id_inherits_the_time_of_the_response(
    make_proxy: ProxyFactory, sim_reset: Server, stream: bool
) -> None:
    proxy = make_proxy(sim_provider(sim_reset, limit=2))
    async with httpx.AsyncClient(timeout=30) as client:
        first = await send(
            client, proxy, "responses", first_turn("responses", "task P"), stream=stream
        )
        if stream:
            created = next(
                json.loads(line[len("data: ") :])
                for line in first.text.splitlines()
                if line.startswith("data: ")
            )
            response_id = created["response"]["id"]
        else:
            response_id = first.json()["id"]
        await asyncio.sleep(0.005)  # the continuation's arrival is visibly later
        later = await send(
            client,
            proxy,
            "responses",
            {
                "model": "sim-1",
                "previous_response_id": response_id,
                "input": [{"type": "function_call_output", "call_id": "c1", "output": "ok"}],
            },
            stream=stream,
        )
        unknown = await send(
            client,
            proxy,
            "responses",
            {
                "model": "sim-1",
                "previous_response_id": "resp_never_seen",
                "input": [{"type": "function_call_output", "call_id": "c1", "output": "ok"}],
            },
        )
    assert prompt_time(later) == (prompt_time(first)[0], "derived")
    assert prompt_time(unknown)[1] == "arrival"


async def test_a_restart_keeps_derived_times(make_proxy: ProxyFactory, sim_reset: Server) -> None:
    body = first_turn("chat", "task R")
    async with httpx.AsyncClient(timeout=30) as client:
        before = make_proxy(sim_provider(sim_reset, limit=2))
        first = prompt_time(await send(client, before, "chat", body))
        before.stop(signal.SIGTERM)  # a clean shutdown writes the last batch
        after = make_proxy(sim_provider(sim_reset, limit=2))
        again = prompt_time(await send(client, after, "chat", tool_round("chat", body)))
    assert again == first


async def test_two_replicas_on_one_redis_derive_the_same_time(
    make_proxy: ProxyFactory, sim_reset: Server, tmp_path: Path
) -> None:
    body = first_turn("messages", "task C")
    with redis_server() as redis:
        cluster = f'[cluster]\nredis_url = "redis://127.0.0.1:{redis.port}/0"\n'
        one = make_proxy(sim_provider(sim_reset, limit=2) + cluster)
        two = make_proxy(sim_provider(sim_reset, limit=2) + cluster)
        async with httpx.AsyncClient(timeout=30) as client:
            first = prompt_time(await send(client, one, "messages", body))
            await asyncio.sleep(0.005)  # a later arrival would show as a later time
            second = prompt_time(await send(client, two, "messages", tool_round("messages", body)))
    assert second == first
    assert first[1] == "derived"


async def test_an_epoch_seconds_header_is_a_400_that_says_so(
    make_proxy: ProxyFactory, sim_reset: Server
) -> None:
    proxy = make_proxy(sim_provider(sim_reset, limit=2))
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            proxy.url + "/v1/chat/completions",
            json=first_turn("chat", "x"),
            headers={"x-prompt-started-at": "1795830000"},
        )
    assert response.status_code == 400
    assert "looks like epoch seconds" in response.json()["error"]["message"]


async def test_an_unreadable_body_is_forwarded_with_the_arrival_time(
    make_proxy: ProxyFactory, sim_reset: Server
) -> None:
    proxy = make_proxy(sim_provider(sim_reset, limit=2))
    deep = b"[" * 100_000 + b"]" * 100_000
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            proxy.url + "/v1/echo/chat/completions",
            content=deep,
            headers={"content-type": "application/json"},
        )
        admitted = await client.post(proxy.url + "/v1/chat/completions", content=deep)
    assert response.status_code == 200  # not an admitted path: passed through untouched
    assert admitted.status_code == 400  # the sim's own answer to a body it cannot read
    assert admitted.headers["x-sluice-prompt-source"] == "arrival"
