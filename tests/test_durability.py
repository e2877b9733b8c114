"""Persistence end to end (SPEC section 7): `sluice serve` killed with SIGKILL at
random moments restarts with every acknowledged write intact, and the config
file's newer value wins over a stored one.

The rounds are random but reproducible: a failure names its seed; run again with
`SLUICE_TEST_SEED=<seed>`.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest

from proxy.settings import MAX_COOLDOWN_MS, MAX_LIMIT
from tests.conftest import proxy_config, sim_provider
from tests.servers import Server, start

SEED = int(os.environ.get("SLUICE_TEST_SEED", random.randrange(2**32)))
NOTICE = "Concurrency limit auto-reduced to {} after a 429 — restore manually when ready."
WRITERS = ("p0", "p1", "p2", "p3")  # providers that only see admin writes
CONFIG_LIMIT = 4
CONFIG_COOLDOWN_MS = 350  # the [admission] default
REDUCED = "r"  # the provider that sees 429s
REDUCED_RE = re.compile(r"-> (\d+) after a 429")

Key = Literal["limit", "cooldown"]


@dataclass(frozen=True)
class Write:
    """One admin write: PUT or DELETE a limit, or PUT a cooldown."""

    provider: str
    key: Key
    value: int | None  # a limit of None is a DELETE

    def send(self, client: httpx.Client) -> httpx.Response:
        if self.key == "cooldown":
            body = {"cooldownMs": self.value}
            return client.put(f"/concurrency/cooldown/{self.provider}", json=body)
        if self.value is None:
            return client.delete(f"/concurrency/limits/{self.provider}")
        return client.put(f"/concurrency/limits/{self.provider}", json={"limit": self.value})

    def acknowledged(self, response: httpx.Response) -> None:
        assert response.status_code == 200, (self, response.text)
        if self.key == "cooldown":
            expected: dict[str, Any] = {"providerId": self.provider, "cooldownMs": self.value}
        elif self.value is None:
            expected = {"ok": True, "providerId": self.provider}
        else:
            expected = {"providerId": self.provider, "limit": self.value}
        assert response.json() == expected


def random_write(rng: random.Random, provider: str) -> Write:
    roll = rng.random()
    if roll < 0.45:
        return Write(provider, "limit", rng.randint(1, MAX_LIMIT))
    if roll < 0.6:
        return Write(provider, "limit", None)
    return Write(provider, "cooldown", rng.randint(0, MAX_COOLDOWN_MS))


@dataclass
class Allowed:
    """The values a provider may show after a restart: the last acknowledged write,
    plus a write that was in flight at the kill (it may or may not have landed)."""

    limits: set[int | None] = field(default_factory=lambda: {CONFIG_LIMIT})
    cooldowns: set[int] = field(default_factory=lambda: {CONFIG_COOLDOWN_MS})

    def allow(self, write: Write, *, only: bool) -> None:
        if write.key == "limit":
            self.limits = ({write.value} if only else self.limits) | {write.value}
        else:
            assert write.value is not None
            self.cooldowns = ({write.value} if only else self.cooldowns) | {write.value}


class Sluice:
    """`sluice serve` on one config file and database, started and killed again and again."""

    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.port = port
        self.server: Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.server = start(["serve", "--config", str(self.config)], self.port)
        return self.server

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.server is not None:
            code = self.server.stop(sig)
            assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
            self.server = None

    def startup_line(self) -> str:
        assert self.server is not None
        lines = [line for line in self.server.log().splitlines() if "sluice started" in line]
        assert len(lines) == 1, self.server.log()
        return lines[0]


@pytest.fixture
def sluice(sim: Server, tmp_path: Path) -> Iterator[Callable[[str], Sluice]]:
    """`sluice(providers_toml)` writes the config (the database is
    `tmp_path/state/sluice.db`) and gives a restartable proxy; rewriting the config
    keeps the file, the database and the port."""
    made: list[Sluice] = []

    def make(providers: str) -> Sluice:
        config, port = proxy_config(tmp_path, providers)
        if made:  # the same proxy, its config rewritten
            config.write_text(
                config.read_text().replace(f"port = {port}", f"port = {made[0].port}")
            )
            return made[0]
        made.append(Sluice(config, port))
        return made[0]

    yield make
    for proxy in made:
        proxy.stop()


def check_restored(client: httpx.Client, allowed: dict[str, Allowed], context: str) -> None:
    """Every provider shows an allowed value through every route; then those are the
    known values for the next round."""
    statuses = {s["providerId"]: s for s in client.get("/concurrency/status").json()["providers"]}
    listed = {
        e["providerId"]: e["limit"] for e in client.get("/concurrency/limits").json()["limits"]
    }
    for provider, ok in allowed.items():
        status = statuses[provider]
        limit, cooldown = status["limit"], status["cooldownMs"]
        assert limit in ok.limits, (context, provider, limit, ok)
        assert cooldown in ok.cooldowns, (context, provider, cooldown, ok)
        assert status["autoReduced"] is False, (context, status)
        one = client.get(f"/concurrency/limits/{provider}")
        if limit is None:
            assert one.status_code == 404, context
            assert provider not in listed, context
        else:
            assert one.json() == {"providerId": provider, "limit": limit}, context
            assert listed[provider] == limit, context
        assert client.get(f"/concurrency/cooldown/{provider}").json()["cooldownMs"] == cooldown
        allowed[provider] = Allowed({limit}, {cooldown})


# ------------------------------------------------------------------- admin writes


def sequential_writes(
    proxy: Sluice, rng: random.Random, allowed: dict[str, Allowed], delay: bool
) -> str:
    """A few writes one after another; SIGKILL right after the last 200 (or a moment later)."""
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for _ in range(rng.randint(1, 6)):
            write = random_write(rng, rng.choice(WRITERS))
            write.acknowledged(write.send(client))
            allowed[write.provider].allow(write, only=True)
        pause = rng.uniform(0, 0.05) if delay else 0.0
        if pause:
            time.sleep(pause)  # a random kill point, not a wait for anything
        proxy.stop()
    return f"sequential, killed {pause * 1000:.0f} ms after the last 200"


def burst_of_writes(proxy: Sluice, rng: random.Random, allowed: dict[str, Allowed]) -> str:
    """One thread per provider writing as fast as it can; SIGKILL once `target`
    writes in all are acknowledged, with the others in flight."""
    target = rng.randint(1, 30)
    plans = {p: [random_write(rng, p) for _ in range(60)] for p in WRITERS}
    done: dict[str, list[Write]] = {p: [] for p in WRITERS}
    in_doubt: dict[str, Write] = {}
    failures: list[BaseException] = []
    acked = threading.Condition()
    count = 0

    def writer(provider: str) -> None:
        nonlocal count
        try:
            with httpx.Client(base_url=proxy.url, timeout=10) as client:
                for write in plans[provider]:
                    try:
                        response = write.send(client)
                    except httpx.HTTPError:
                        in_doubt[provider] = write  # sent, maybe landed, never answered
                        return
                    write.acknowledged(response)
                    done[provider].append(write)
                    with acked:
                        count += 1
                        acked.notify_all()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in WRITERS]
    for thread in threads:
        thread.start()
    with acked:
        assert acked.wait_for(lambda: count >= target or bool(failures), timeout=30)
        proxy.stop()
    for thread in threads:
        thread.join(timeout=30)
    if failures:
        raise failures[0]
    for provider in WRITERS:
        ok = allowed[provider]
        for key in ("limit", "cooldown"):
            mine = [w for w in done[provider] if w.key == key]
            if mine:
                ok.allow(mine[-1], only=True)
        doubt = in_doubt.get(provider)
        if doubt is not None:
            ok.allow(doubt, only=False)
    return f"burst, killed after {target} acknowledged writes, in doubt: {in_doubt}"


def test_acknowledged_admin_writes_survive_sigkill(
    sim: Server, sluice: Callable[[str], Sluice]
) -> None:
    rng = random.Random(SEED)
    proxy = sluice("".join(sim_provider(sim, p, limit=CONFIG_LIMIT) for p in WRITERS))
    allowed = {p: Allowed() for p in WRITERS}
    proxy.start()
    rounds = ["immediate"] * 5 + ["delayed"] * 4 + ["burst"] * 5
    rng.shuffle(rounds)
    for number, kind in enumerate(rounds):
        if kind == "burst":
            how = burst_of_writes(proxy, rng, allowed)
        else:
            how = sequential_writes(proxy, rng, allowed, delay=kind == "delayed")
        proxy.start()
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            check_restored(client, allowed, f"seed {SEED}, round {number}: {how}")


# --------------------------------------------------------------- 429 reductions


def reductions_since_the_last_manual_limit(client: httpx.Client) -> list[int]:
    """The limits that this round's reductions (newest first) set, as journaled."""
    events = client.get("/concurrency/events", params={"provider": REDUCED}).json()["events"]
    reduced: list[int] = []
    for event in events:
        if event["kind"] == "limit_set":
            break
        if event["kind"] == "limit_reduced":
            match = REDUCED_RE.search(event["detail"])
            assert match, event
            reduced.append(int(match.group(1)))
    return reduced


def concurrent_requests(base_url: str, count: int, tokens: int = 5) -> list[threading.Thread]:
    """`count` chat completions started together (a barrier), each in its own
    thread; failures are ignored (the proxy may be killed under them)."""
    ready = threading.Barrier(count)
    headers = {"x-sim-tokens": str(tokens), "x-sim-token-delay-ms": "20"}
    body = {"model": "sim-1", "messages": [], "stream": False}

    def request(client: httpx.Client) -> None:
        with client, contextlib.suppress(httpx.HTTPError):
            ready.wait(timeout=10)
            client.post(base_url + "/v1/chat/completions", json=body, headers=headers)

    clients = [httpx.Client(timeout=20) for _ in range(count)]
    threads = [threading.Thread(target=request, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    return threads


def test_429_reductions_survive_sigkill(sim_reset: Server, sluice: Callable[[str], Sluice]) -> None:
    rng = random.Random(SEED + 1)
    proxy = sluice(
        sim_provider(sim_reset, REDUCED, limit=CONFIG_LIMIT, cooldown_ms=20)
        + sim_provider(sim_reset, "p0", limit=CONFIG_LIMIT)
    )
    proxy.start()
    try:
        for number in range(6):
            with httpx.Client(base_url=proxy.url, timeout=10) as client:
                manual = rng.randint(3, 6)
                Write(REDUCED, "limit", manual).acknowledged(
                    client.put(f"/concurrency/limits/{REDUCED}", json={"limit": manual})
                )
                cooldown = rng.randint(0, 1000)
                Write("p0", "cooldown", cooldown).acknowledged(
                    client.put("/concurrency/cooldown/p0", json={"cooldownMs": cooldown})
                )
                cap = rng.randint(1, manual - 1)
                httpx.post(
                    sim_reset.url + "/sim/config", json={"hardCap": cap, "retryAfterS": 0}
                ).raise_for_status()
                # More requests than the cap, all at once and long enough to overlap.
                burst = concurrent_requests(proxy.url + f"/{REDUCED}", manual + 2, tokens=25)
                # Acknowledged means in the store: the events route reads the store,
                # and a reduction's event is committed with the reduced limit.
                deadline = time.monotonic() + 10
                while not (reduced := reductions_since_the_last_manual_limit(client)):
                    assert time.monotonic() < deadline, f"seed {SEED}, round {number}: no reduction"
                    time.sleep(0.005)
                observed = reduced[0]
                pause = rng.choice([0.0, rng.uniform(0, 0.05)])
                if pause:
                    time.sleep(pause)  # a random kill point
                proxy.stop()
            for thread in burst:
                thread.join(timeout=30)
                assert not thread.is_alive()
            httpx.post(sim_reset.url + "/sim/config", json={"hardCap": None}).raise_for_status()

            proxy.start()
            context = f"seed {SEED}, round {number}: {manual=} {cap=} {observed=} {pause=}"
            with httpx.Client(base_url=proxy.url, timeout=10) as client:
                status = client.get(f"/concurrency/status/{REDUCED}").json()
                assert 1 <= status["limit"] <= observed, (context, status)
                assert status["autoReduced"] is True, (context, status)
                assert status["autoReducedFrom"] == manual, (context, status)
                assert status["notice"] == NOTICE.format(status["limit"]), context
                assert client.get("/concurrency/cooldown/p0").json()["cooldownMs"] == cooldown
    finally:
        httpx.post(sim_reset.url + "/sim/config", json={"hardCap": None}).raise_for_status()


# ------------------------------------------------------------------ precedence


def test_a_changed_config_value_wins_over_the_stored_one(
    sim: Server, sluice: Callable[[str], Sluice]
) -> None:
    def configure(limit: int, cooldown_ms: int) -> Sluice:
        return sluice(sim_provider(sim, "p", limit=limit, cooldown_ms=cooldown_ms))

    def restart(proxy: Sluice) -> dict[str, Any]:
        proxy.stop(signal.SIGTERM)
        proxy.start()
        status: dict[str, Any] = httpx.get(proxy.url + "/concurrency/status/p").json()
        return status

    proxy = configure(4, 300)
    proxy.start()
    assert "limit=4 (config), cooldown_ms=300 (config)" in proxy.startup_line()
    httpx.put(proxy.url + "/concurrency/limits/p", json={"limit": 7}).raise_for_status()
    httpx.put(proxy.url + "/concurrency/cooldown/p", json={"cooldownMs": 900}).raise_for_status()

    # Unchanged config: the stored values win.
    status = restart(proxy)
    assert (status["limit"], status["cooldownMs"]) == (7, 900)
    assert "limit=7 (store), cooldown_ms=900 (store)" in proxy.startup_line()

    # The operator edits the limit in the file: that newer intent wins.
    configure(5, 300)
    status = restart(proxy)
    assert (status["limit"], status["cooldownMs"]) == (5, 900)
    line = proxy.startup_line()
    assert "limit=5 (config (changed since the stored value)), cooldown_ms=900 (store)" in line

    # ... and keeps winning: the older stored limit does not come back.
    status = restart(proxy)
    assert (status["limit"], status["cooldownMs"]) == (5, 900)

    # A new admin write is newer than the file again.
    httpx.put(proxy.url + "/concurrency/limits/p", json={"limit": 8}).raise_for_status()
    proxy.stop(signal.SIGKILL)
    proxy.start()
    assert "limit=8 (store), cooldown_ms=900 (store)" in proxy.startup_line()

    # The cooldown follows the same rule.
    configure(5, 450)
    status = restart(proxy)
    assert (status["limit"], status["cooldownMs"]) == (8, 450)
    line = proxy.startup_line()
    assert "limit=8 (store), cooldown_ms=450 (config (changed since the stored value))" in line


def test_a_config_value_changed_back_does_not_revive_a_stale_stored_limit(
    sim: Server, sluice: Callable[[str], Sluice]
) -> None:
    def configure(limit: int) -> Sluice:
        return sluice(sim_provider(sim, "p", limit=limit))

    proxy = configure(4)
    proxy.start()
    httpx.put(proxy.url + "/concurrency/limits/p", json={"limit": 7}).raise_for_status()
    proxy.stop(signal.SIGTERM)

    configure(5)  # the operator's newer intent: 5
    proxy.start()
    assert httpx.get(proxy.url + "/concurrency/limits/p").json()["limit"] == 5
    proxy.stop(signal.SIGTERM)

    configure(4)  # and newer still: 4
    proxy.start()
    assert httpx.get(proxy.url + "/concurrency/limits/p").json()["limit"] == 4


# --------------------------------------------------------- reductions vs writes


def rate_limit_once(client: httpx.Client) -> None:
    """One request that the sim (hard cap 0) refuses; `retry_on_429 = 0` hands the 429
    back after the proxy has paused and reduced the limit in memory."""
    body = {"model": "sim-1", "messages": []}
    refused = client.post(f"/{REDUCED}/v1/chat/completions", json=body)
    assert refused.status_code == 429


def flood_the_journal(proxy: Sluice) -> None:
    """Many 429s at once on the `flood` provider: each is journaled by the one
    background writer, in a transaction of its own, so whatever the limiter does
    next is persisted only after a backlog of them (as in a real 429 storm)."""
    for thread in concurrent_requests(proxy.url + "/flood", 60):
        thread.join(timeout=30)


FLOOD: dict[str, object] = {"limit": 1000, "retry_on_429": 0}


@pytest.fixture
def refusing_sim(sim_reset: Server) -> Iterator[Server]:
    """The sim answering every completion with a 429 (`Retry-After: 0`)."""
    config = {"hardCap": 0, "retryAfterS": 0}
    httpx.post(sim_reset.url + "/sim/config", json=config).raise_for_status()
    yield sim_reset
    httpx.post(sim_reset.url + "/sim/config", json={"hardCap": None}).raise_for_status()


def test_a_manual_limit_set_right_after_a_429_survives_a_restart(
    refusing_sim: Server, sluice: Callable[[str], Sluice]
) -> None:
    proxy = sluice(
        sim_provider(refusing_sim, REDUCED, limit=4, retry_on_429=0)
        + sim_provider(refusing_sim, "flood", **FLOOD)
    )
    proxy.start()
    # The admin write races the background writer, so a few attempts; each takes
    # the limit down by one with a 429, then at once sets it by hand.
    for attempt in range(3):
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            flood_the_journal(proxy)
            rate_limit_once(client)
            manual = 10 + attempt
            Write(REDUCED, "limit", manual).acknowledged(
                client.put(f"/concurrency/limits/{REDUCED}", json={"limit": manual})
            )
            before = client.get(f"/concurrency/status/{REDUCED}").json()
            assert (before["limit"], before["autoReduced"]) == (manual, False)
        proxy.stop(signal.SIGTERM)
        proxy.start()
        after = httpx.get(f"{proxy.url}/concurrency/status/{REDUCED}").json()
        assert (after["limit"], after["autoReduced"]) == (manual, False), (attempt, after)
