"""Waiting end to end (SPEC section 12, issue 15): the queued-stream keepalive and the
error event that ends an early-started stream, an honest Retry-After, and the queue
listing; `sluice serve` in front of `sluice sim` over real sockets.

A holder request keeps the only slot until the test lets it go (it closes the
holder's connection); the tests wait on what they can observe (status, bytes
received), never on a sleep."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from tests.conftest import ProxyFactory, chat, sim_provider
from tests.servers import Server, free_port
from tests.waiting import eventually

TOKEN = "admin-t0ken"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
SERVER = f'admin_token = "{TOKEN}"'


async def status(client: httpx.AsyncClient, proxy: Server, provider: str = "sim") -> Any:
    return (await client.get(f"{proxy.url}/concurrency/status/{provider}", headers=ADMIN)).json()


async def until_running(client: httpx.AsyncClient, proxy: Server, provider: str = "sim") -> None:
    await eventually(lambda: _count(client, proxy, provider, "inFlight", 1))


async def until_queued(
    client: httpx.AsyncClient, proxy: Server, n: int, provider: str = "sim"
) -> None:
    await eventually(lambda: _count(client, proxy, provider, "queued", n))


async def _count(client: httpx.AsyncClient, proxy: Server, provider: str, key: str, n: int) -> bool:
    return bool((await status(client, proxy, provider))[key] == n)


@contextlib.asynccontextmanager
async def holder(
    client: httpx.AsyncClient, url: str, proxy: Server, provider: str = "sim"
) -> AsyncIterator[asyncio.Event]:
    """A long stream holding the provider's only slot; set the event it yields to let
    go (its connection is closed, which releases the slot)."""
    release = asyncio.Event()

    async def hold() -> None:
        headers = {"x-sim-tokens": "2000", "x-sim-token-delay-ms": "20"}
        async with client.stream("POST", url, json=chat(True), headers=headers) as response:
            assert response.status_code == 200
            await release.wait()

    task = asyncio.create_task(hold())
    await until_running(client, proxy, provider)
    try:
        yield release
    finally:
        release.set()
        await task


def without_ids(body: bytes) -> bytes:
    """A Chat stream with the per-request id and creation time the sim stamps blanked."""
    body = re.sub(rb"chatcmpl-sim-\d+", b"chatcmpl-sim-N", body)
    return re.sub(rb'"created":\s*\d+', b'"created":0', body)


async def read_queued_stream(
    response: httpx.Response, comments_before_release: int, release: asyncio.Event
) -> bytes:
    """The whole body of an early-started stream; `release` is set once that many
    keepalive comments have arrived."""
    body = b""
    async for chunk in response.aiter_raw():
        body += chunk
        if body.count(b": queued position=") >= comments_before_release:
            release.set()
    return body


# ------------------------------------------------------------------------ keepalive


async def test_queued_stream_gets_comments_then_the_upstream_events_byte_for_byte(
    make_proxy: ProxyFactory, sim_reset: Server
) -> None:
    proxy = make_proxy(
        sim_provider(sim_reset, limit=1, queued_keepalive_s=1),
        admission="cooldown_ms = 0",
        server=SERVER,
    )
    url = proxy.url + "/v1/chat/completions"
    body = chat(True)
    headers = {"x-sim-tokens": "5", "x-conversation-id": "k"}
    async with httpx.AsyncClient(timeout=30) as client:
        async with (
            holder(client, url, proxy) as release,
            client.stream("POST", url, json=body, headers=headers) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-sluice-provider"] == "sim"
            assert response.headers["x-sluice-prompt-source"] == "derived"
            # Three seconds in the queue: comments at 1 s and 2 s, then the slot.
            proxied = await read_queued_stream(response, 2, release)
        direct_url = sim_reset.url + "/v1/chat/completions"
        direct = (await client.post(direct_url, json=body, headers=headers)).content

    comments, _, events = proxied.partition(b"data: ")
    assert comments.startswith(b": queued position=1\n\n")
    assert set(comments.split(b"\n\n")) == {b": queued position=1", b""}
    assert comments.count(b": queued position=1\n\n") >= 2
    assert without_ids(b"data: " + events) == without_ids(direct)
    assert direct.endswith(b"data: [DONE]\n\n")


async def test_position_counts_the_waiters_ahead(
    make_proxy: ProxyFactory, sim_reset: Server
) -> None:
    proxy = make_proxy(
        sim_provider(sim_reset, limit=1, queued_keepalive_s=0.2),
        admission="cooldown_ms = 0",
        server=SERVER,
    )
    url = proxy.url + "/v1/chat/completions"
    async with (
        httpx.AsyncClient(timeout=30) as client,
        holder(client, url, proxy) as release,
    ):
        first = asyncio.create_task(
            client.post(url, json=chat(False), headers={"x-prompt-started-at": "1795830000000"})
        )
        await until_queued(client, proxy, 1)
        headers = {"x-prompt-started-at": "1795830005000"}
        async with client.stream("POST", url, json=chat(True), headers=headers) as response:
            body = b""
            async for chunk in response.aiter_raw():
                body += chunk
                if b": queued position=2\n\n" in body:
                    break
        release.set()
        assert (await first).status_code == 200


async def test_a_non_streaming_request_gets_no_early_bytes(
    make_proxy: ProxyFactory, sim_reset: Server
) -> None:
    proxy = make_proxy(
        sim_provider(sim_reset, limit=1, queued_keepalive_s=0.5),
        admission="cooldown_ms = 0",
        server=SERVER,
    )
    url = proxy.url + "/v1/chat/completions"
    async with httpx.AsyncClient(timeout=30) as client:
        async with holder(client, url, proxy) as release:
            plain = asyncio.create_task(client.post(url, json=chat(False)))
            await until_queued(client, proxy, 1)
            # A stream queued behind it shows how long the plain request has waited.
            async with client.stream("POST", url, json=chat(True)) as stream:
                body = b""
                async for chunk in stream.aiter_raw():
                    body += chunk
                    if body.count(b": queued") >= 3:
                        break
            assert not plain.done()  # not even its status line in 1.5 s of waiting
            release.set()
            answer = await plain
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("application/json")
        assert int(answer.headers["x-sluice-queue-ms"]) >= 1000
        assert answer.json()["object"] == "chat.completion"


# ------------------------------------------------------ failures after the early 200


async def _failed_stream(
    client: httpx.AsyncClient,
    proxy: Server,
    path: str,
    body: dict[str, Any],
    fault: str,
) -> bytes:
    """A stream queued behind a holder until it started early, then admitted to meet
    `fault` upstream: the whole body it got."""
    url = proxy.url + "/v1/chat/completions"
    async with (
        holder(client, url, proxy) as release,
        client.stream(
            "POST", proxy.url + "/v1" + path, json=body, headers={"x-sim-fault": fault}
        ) as response,
    ):
        assert response.status_code == 200
        return await read_queued_stream(response, 1, release)


def _messages_body() -> dict[str, Any]:
    return {
        "model": "sim-1",
        "max_tokens": 16,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }


def _responses_body() -> dict[str, Any]:
    return {"model": "sim-1", "input": "hi", "stream": True}


def _event(body: bytes) -> tuple[str | None, dict[str, Any]]:
    """The one event after the keepalive comments: its `event:` name and its data."""
    events = [block for block in body.split(b"\n\n") if block and not block.startswith(b":")]
    assert len(events) == 1, body
    name = None
    data = None
    for line in events[0].split(b"\n"):
        field, _, value = line.partition(b": ")
        if field == b"event":
            name = value.decode()
        elif field == b"data":
            data = json.loads(value)
    assert isinstance(data, dict), body
    return name, data


async def test_each_failure_after_the_early_200_ends_with_the_dialects_error_event(
    make_proxy: ProxyFactory, sim_reset: Server
) -> None:
    proxy = make_proxy(
        sim_provider(sim_reset, limit=1, queued_keepalive_s=0.3, read_timeout_s=1),
        admission="cooldown_ms = 0",
        server=SERVER,
    )
    async with httpx.AsyncClient(timeout=30) as client:
        # An upstream error status: its own message, in each dialect's shape.
        body = await _failed_stream(client, proxy, "/chat/completions", chat(True), "status:500")
        name, data = _event(body)
        assert name is None
        assert set(data) == {"error"}
        assert data["error"]["message"]
        assert data["error"]["param"] is None
        chat_message = data["error"]["message"]

        body = await _failed_stream(client, proxy, "/responses", _responses_body(), "status:503")
        name, data = _event(body)
        assert name == "error"
        assert set(data) == {"type", "code", "message", "param", "sequence_number"}
        assert (data["type"], data["param"], data["sequence_number"]) == ("error", None, 0)
        assert data["message"]

        body = await _failed_stream(client, proxy, "/messages", _messages_body(), "status:500")
        name, data = _event(body)
        assert name == "error"
        assert data["type"] == "error"
        assert set(data["error"]) == {"type", "message"}
        assert data["error"]["type"] == "api_error"
        assert data["error"]["message"]

        direct = await client.post(
            sim_reset.url + "/v1/chat/completions",
            json=chat(True),
            headers={"x-sim-fault": "status:500"},
        )
        assert direct.json()["error"]["message"] == chat_message  # the upstream's own words

        # Upstream unreachable (reset before its headers) and silent past read_timeout_s.
        body = await _failed_stream(
            client, proxy, "/chat/completions", chat(True), "reset-before-headers"
        )
        _, data = _event(body)
        assert (data["error"]["type"], data["error"]["code"]) == (
            "sluice_upstream_error",
            "upstream_unavailable",
        )
        body = await _failed_stream(client, proxy, "/chat/completions", chat(True), "stall:3")
        _, data = _event(body)
        assert data["error"]["code"] == "upstream_timeout"
        await eventually(lambda: _idle(client, proxy))


async def _idle(client: httpx.AsyncClient, proxy: Server) -> bool:
    s = await status(client, proxy)
    return bool(s["inFlight"] == 0 and s["queued"] == 0)


async def test_queue_timeout_after_the_early_200_is_an_error_event_the_sdk_raises(
    make_proxy: ProxyFactory, sim_reset: Server
) -> None:
    proxy = make_proxy(
        sim_provider(sim_reset, limit=1, queued_keepalive_s=0.3, queue_timeout_s=1.5),
        admission="cooldown_ms = 0",
        server=SERVER,
    )
    url = proxy.url + "/v1/chat/completions"
    sdk = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    async with httpx.AsyncClient(timeout=30) as client, holder(client, url, proxy):
        async with client.stream("POST", url, json=chat(True)) as response:
            assert response.status_code == 200
            body = await response.aread()
        _, data = _event(body)
        assert (data["error"]["type"], data["error"]["code"]) == (
            "sluice_queue_timeout",
            "queue_timeout",
        )

        # The official SDK: the Chat stream raises (it does not hang)...
        stream = await sdk.chat.completions.create(
            model="sim-1", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError, match="waited too long in the queue"):
            async for _ in stream:
                pass
        # ...and a Responses stream yields the `error` event, then ends.
        events = await sdk.responses.create(model="sim-1", input="hi", stream=True)
        seen = [event async for event in events]
        assert [event.type for event in seen] == ["error"]
        assert getattr(seen[0], "code", None) == "queue_timeout"
    await sdk.close()


class SlowUpstream:
    """An upstream this test steers: `hold` streams until `release`; `slow429`
    answers 429 only once `answer` is set (so that the queue can fill meanwhile);
    anything else is a small JSON answer."""

    def __init__(self) -> None:
        self.port = free_port()
        self.release = asyncio.Event()
        self.answer = asyncio.Event()
        self.slow_arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        self.release.set()
        self.answer.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        mode = request.headers.get("x-test", "")
        if mode == "hold":
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b": holding\n\n")
            await self.release.wait()
            return response
        if mode == "slow429":
            self.slow_arrived.set()
            await self.answer.wait()
            error = {"error": {"message": "busy", "type": "rate_limit", "code": "busy"}}
            return web.json_response(error, status=429, headers={"retry-after": "1"})
        return web.json_response({"object": "chat.completion", "choices": []})


async def test_queue_full_on_a_429_requeue_after_the_early_200_is_an_error_event(
    make_proxy: ProxyFactory,
) -> None:
    upstream = SlowUpstream()
    await upstream.start()
    proxy = make_proxy(
        f"""
        [[providers]]
        id = "slow"
        base_url = "http://127.0.0.1:{upstream.port}/v1"
        limit = 1
        max_queue = 1
        queued_keepalive_s = 0.3
        retry_on_429 = 1
        """,
        admission="cooldown_ms = 0",
        server=SERVER,
    )
    url = proxy.url + "/v1/chat/completions"
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            hold = asyncio.create_task(
                client.post(url, json=chat(True), headers={"x-test": "hold"})
            )
            await until_running(client, proxy, "slow")
            headers = {"x-test": "slow429"}
            async with client.stream("POST", url, json=chat(True), headers=headers) as response:
                body = b""
                chunks = response.aiter_raw()
                async for chunk in chunks:
                    body += chunk
                    if b": queued" in body:
                        break
                upstream.release.set()  # the holder ends: the stream takes the slot...
                await upstream.slow_arrived.wait()
                # ...and while its upstream thinks, a newcomer fills the queue: the
                # 429 sends the stream back to a full queue.
                later = asyncio.create_task(client.post(url, json=chat(False)))
                await until_queued(client, proxy, 1, "slow")
                upstream.answer.set()
                async for chunk in chunks:
                    body += chunk
            _, data = _event(body)
            assert (data["error"]["type"], data["error"]["code"]) == (
                "sluice_queue_full",
                "queue_full",
            )
            assert (await later).status_code == 200
            assert (await hold).status_code == 200
    finally:
        await upstream.close()


# -------------------------------------------------------------------- Retry-After


async def test_retry_after_grows_with_the_queue_ahead(
    make_proxy: ProxyFactory, sim_reset: Server
) -> None:
    proxy = make_proxy(
        sim_provider(sim_reset, "short", limit=1, max_queue=1)
        + sim_provider(sim_reset, "long", limit=1, max_queue=20),
        admission="cooldown_ms = 0",
        server=SERVER,
    )
    refused: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=30) as client:
        for provider, max_queue in (("short", 1), ("long", 20)):
            url = f"{proxy.url}/{provider}/v1/chat/completions"
            for _ in range(10):  # the same measured admission rate for both
                assert (await client.post(url, json=chat(False))).status_code == 200
            async with holder(client, url, proxy, provider):
                flood = [
                    asyncio.create_task(client.post(url, json=chat(False)))
                    for _ in range(max_queue)
                ]
                await until_queued(client, proxy, max_queue, provider)
                full = await client.post(url, json=chat(False))
                assert full.status_code == 503
                assert full.json()["error"]["type"] == "sluice_queue_full"
                refused[provider] = int(full.headers["retry-after"])
            assert [(await task).status_code for task in flood] == [200] * max_queue
    assert 1 <= refused["short"] < refused["long"], refused


# -------------------------------------------------------------------- queue listing


async def test_queue_listing_is_in_the_order_admissions_follow(
    make_proxy: ProxyFactory, sim_reset: Server
) -> None:
    proxy = make_proxy(sim_provider(sim_reset, limit=1), admission="cooldown_ms = 0", server=SERVER)
    url = proxy.url + "/v1/chat/completions"
    queue_url = proxy.url + "/concurrency/queue/sim"
    admitted: list[str] = []
    prompts = {"c": 1795830003000, "a": 1795830001000, "d": 1795830004000, "b": 1795830002000}
    async with httpx.AsyncClient(timeout=30) as client:

        async def waiter(name: str) -> None:
            headers = {"x-prompt-started-at": str(prompts[name]), "x-conversation-id": name}
            answer = await client.post(url, json=chat(False), headers=headers)
            assert answer.status_code == 200
            admitted.append(name)

        async with holder(client, url, proxy):
            tasks = []
            for name in prompts:  # arrival order c, a, d, b
                tasks.append(asyncio.create_task(waiter(name)))
                await until_queued(client, proxy, len(tasks))
            listing = (await client.get(queue_url, headers=ADMIN)).json()
            page = (await client.get(queue_url + "?limit=2&offset=1", headers=ADMIN)).json()
            assert (await client.get(queue_url)).status_code == 401
            for bad in ("limit=0", "limit=1001", "limit=x", "offset=-1", "offset=1.5"):
                answer = await client.get(f"{queue_url}?{bad}", headers=ADMIN)
                assert answer.status_code == 400, bad
                assert "error" in answer.json()
            missing = await client.get(proxy.url + "/concurrency/queue/nope", headers=ADMIN)
            assert missing.status_code == 404
        await asyncio.gather(*tasks)

    assert listing["provider"] == "sim"
    waiters = listing["waiters"]
    assert [w["conversationId"] for w in waiters] == admitted == ["a", "b", "c", "d"]
    assert [w["position"] for w in waiters] == [1, 2, 3, 4]
    assert [w["promptStartedAt"] for w in waiters] == sorted(prompts.values())
    assert {w["promptSource"] for w in waiters} == {"header"}
    assert {w["clientId"] for w in waiters} == {None}
    assert all(w["waitedMs"] >= 0 for w in waiters)
    assert waiters[0]["waitedMs"] >= waiters[1]["waitedMs"]  # "a" arrived before "b"
    assert [w["conversationId"] for w in page["waiters"]] == ["b", "c"]
    assert [w["position"] for w in page["waiters"]] == [2, 3]
