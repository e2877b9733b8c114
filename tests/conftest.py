"""Shared fixtures: a `sluice sim` upstream and `sluice serve` proxies in front of it,
each a real subprocess on a free loopback port."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import Server, free_port, running, start

ProxyFactory = Callable[..., Server]


@pytest.fixture(scope="session")
def sim() -> Iterator[Server]:
    """One simulated upstream for the session; tests reset it through `sim_reset`."""
    port = free_port()
    with running(
        ["sim", "--port", str(port), "--tokens", "5", "--token-delay-ms", "5"], port
    ) as server:
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
        config, port = proxy_config(tmp_path, providers, server=server, admission=admission)
        proc = start(["serve", "--config", str(config)], port, env=env)
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        proc.stop()
