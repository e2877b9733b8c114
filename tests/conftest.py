"""Shared fixtures: a `sluice sim` upstream and `sluice serve` proxies in front of it,
each a real subprocess on a free loopback port; and the helpers the end-to-end modules
share to configure and talk to them."""

from __future__ import annotations

import contextlib
import json
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import Server, free_port, running, start
from tests.waiting import wait_until

ProxyFactory = Callable[..., Server]


@contextlib.contextmanager
def sim_running(*flags: str) -> Iterator[Server]:
    """`sluice sim *flags` on a free port, stopped at the end."""
    port = free_port()
    with running(["sim", "--port", str(port), *flags], port) as server:
        yield server


@contextlib.contextmanager
def sim_client(sim: Server, config: dict[str, Any]) -> Iterator[httpx.Client]:
    """A client on `sim` with `config` applied, nothing left in flight by an earlier
    test, and zeroed stats."""
    with httpx.Client(base_url=sim.url, timeout=5.0) as http:
        http.post("/sim/config", json=config).raise_for_status()
        wait_until(lambda: sim_stats(http)["inFlight"] == 0)
        http.post("/sim/reset").raise_for_status()
        yield http


def sim_stats(client: httpx.Client) -> dict[str, Any]:
    """The counters of the sim `client` talks to."""
    stats: dict[str, Any] = client.get("/sim/stats").json()
    return stats


@pytest.fixture(scope="session")
def sim() -> Iterator[Server]:
    """One simulated upstream for the session; tests reset it through `sim_reset`."""
    with sim_running("--tokens", "5", "--token-delay-ms", "5") as server:
        yield server


@pytest.fixture
def sim_reset(sim: Server) -> Server:
    """The session's sim with default behaviour and zeroed counters."""
    defaults = {
        "hardCap": None,
        "limit": None,
        "outsideLoad": 0,
        "usageLagMs": 0,
        "retryAfterS": 1,
        "tokens": 5,
        "tokenDelayMs": 5,
    }
    httpx.post(sim.url + "/sim/config", json=defaults).raise_for_status()
    httpx.post(sim.url + "/sim/reset").raise_for_status()
    return sim


@pytest.fixture
def sim_clean(sim_reset: Server) -> Iterator[Server]:
    """`sim_reset`, and the sim's defaults again afterwards for whoever comes next."""
    yield sim_reset
    httpx.post(sim_reset.url + "/sim/config", json={"hardCap": None}).raise_for_status()


def sim_provider(sim: Server, provider_id: str = "sim", /, **settings: object) -> str:
    """A `[[providers]]` table for `sim`, one `key = value` line per setting (JSON
    spells numbers, booleans and strings as TOML does)."""
    lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())
    return f'\n[[providers]]\nid = "{provider_id}"\nbase_url = "{sim.url}/v1"\n{lines}\n'


def chat(stream: bool = False) -> dict[str, object]:
    """A chat completion request body the sim answers."""
    return {"model": "sim-1", "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def proxy_config(
    tmp_path: Path, providers: str, *, server: str = "", admission: str = ""
) -> tuple[Path, int]:
    port = free_port()
    config = tmp_path / "sluice.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [server]
            port = {port}
            database = "{tmp_path / "state" / "sluice.db"}"
            log_level = "debug"
            {textwrap.dedent(server)}
            [admission]
            {textwrap.dedent(admission)}
            """
        )
        + textwrap.dedent(providers)
    )
    return config, port


def start_proxy(
    directory: Path,
    providers: str,
    *,
    server: str = "",
    admission: str = "",
    env: dict[str, str] | None = None,
) -> Server:
    """`sluice serve` on a `proxy_config` written in `directory`, once it is ready."""
    config, port = proxy_config(directory, providers, server=server, admission=admission)
    return start(["serve", "--config", str(config)], port, env=env)


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[ProxyFactory]:
    """`make_proxy(providers_toml, server=..., admission=..., env=...)` starts a proxy."""
    started: list[Server] = []

    def factory(
        providers: str,
        *,
        server: str = "",
        admission: str = "",
        env: dict[str, str] | None = None,
    ) -> Server:
        proc = start_proxy(tmp_path, providers, server=server, admission=admission, env=env)
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        proc.stop()
