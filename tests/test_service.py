"""Running sluice as a service (issue 5): metrics, access logs, redaction, graceful
shutdown, `sluice status`, `sluice demo`."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from proxy.cli import status as status_cli
from proxy.cli.main import build_parser
from proxy.settings import load, resolve_providers
from proxy.tools.sim import expected_content
from tests.conftest import ProxyFactory, chat, sim_provider, start_proxy
from tests.servers import Server
from tests.waiting import wait_until

PROVIDER_KEY = "sk-provider-key-4c9e1d"
CLIENT_KEY = "sk-client-key-77aa02"
ADMIN_TOKEN = "admin-token-5b5b"
NOTICE_3 = "Concurrency limit auto-reduced to 3 after a 429 — restore manually when ready."


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


@pytest.fixture
def keyed_proxy(make_proxy: ProxyFactory, sim_reset: Server) -> Server:
    return make_proxy(
        sim_provider(sim_reset, limit=1, api_key=PROVIDER_KEY),
        server=f'admin_token = "{ADMIN_TOKEN}"\nlog_format = "json"',
        admission="cooldown_ms = 0",
    )


def test_secrets_never_reach_the_logs(keyed_proxy: Server) -> None:
    headers = {"authorization": f"Bearer {CLIENT_KEY}", "x-conversation-id": "conv-9"}
    assert (
        httpx.post(
            keyed_proxy.url + "/v1/chat/completions", json=chat(), headers=headers
        ).status_code
        == 200
    )
    assert httpx.get(keyed_proxy.url + "/v1/echo", headers=headers).status_code == 200
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.get(keyed_proxy.url + "/concurrency/status", headers=admin).status_code == 200
    assert (
        httpx.get(
            keyed_proxy.url + "/concurrency/status", headers={"authorization": "Bearer wrong"}
        ).status_code
        == 401
    )
    keyed_proxy.stop()
    log = keyed_proxy.log()
    assert '"conversation_id": "conv-9"' in log  # the access line was written
    for secret in (PROVIDER_KEY, CLIENT_KEY, ADMIN_TOKEN):
        assert secret not in log


def test_access_log_line_has_every_field(keyed_proxy: Server) -> None:
    httpx.post(
        keyed_proxy.url + "/v1/chat/completions", json=chat(), headers={"x-conversation-id": "c1"}
    )
    keyed_proxy.stop()
    lines = [json.loads(line) for line in keyed_proxy.log().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("logger") == "sluice.access"]
    assert len(access) == 1
    entry = access[0]
    assert entry["provider"] == "sim"
    assert entry["method"] == "POST"
    assert entry["path"] == "/v1/chat/completions"
    assert entry["status"] == 200
    assert entry["queue_ms"] >= 0
    assert entry["upstream_ms"] >= 0
    assert entry["bytes"] > 0
    assert entry["conversation_id"] == "c1"


def test_metrics_move_as_requests_flow_queue_and_finish(keyed_proxy: Server) -> None:
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.get(keyed_proxy.url + "/metrics").status_code == 401

    def scrape() -> str:
        return httpx.get(keyed_proxy.url + "/metrics", headers=admin).text

    before = scrape()
    assert metric(before, 'sluice_limit{provider="sim"}') == 1
    assert metric(before, 'sluice_in_flight{provider="sim"}') == 0
    url = keyed_proxy.url + "/v1/chat/completions"
    slow = {"x-sim-tokens": "40", "x-sim-token-delay-ms": "20"}
    results: list[int] = []

    def call() -> None:
        results.append(httpx.post(url, json=chat(), headers=slow, timeout=30).status_code)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    wait_until(lambda: metric(scrape(), 'sluice_queued{provider="sim"}') == 1)
    during = scrape()
    assert metric(during, 'sluice_in_flight{provider="sim"}') == 1
    for thread in threads:
        thread.join()
    assert results == [200, 200]
    wait_until(lambda: metric(scrape(), 'sluice_in_flight{provider="sim"}') == 0)
    after = scrape()
    assert metric(after, 'sluice_queued{provider="sim"}') == 0
    assert metric(after, 'sluice_admitted_total{provider="sim"}') == 2
    assert metric(after, 'sluice_queue_wait_seconds_count{provider="sim"}') == 2
    assert metric(after, 'sluice_queue_wait_seconds_sum{provider="sim"}') > 0.2
    assert metric(after, 'sluice_upstream_ttfb_seconds_count{provider="sim"}') == 2
    for name in (
        "sluice_paused",
        "sluice_upstream_429_total",
        "sluice_auto_reductions_total",
        "sluice_auto_restores_total",
        "sluice_watchdog_reclaims_total",
        "sluice_usage_polls_total",
    ):
        assert name in after


def test_sigterm_lets_open_streams_finish_and_exits_0(
    sim_reset: Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    proxy = start_proxy(
        tmp_path_factory.mktemp("grace"),
        sim_provider(sim_reset, limit=2),
        server="shutdown_grace_s = 10",
    )
    headers = {"x-sim-tokens": "30", "x-sim-token-delay-ms": "30"}
    received: list[str] = []
    with httpx.stream(
        "POST", proxy.url + "/v1/chat/completions", json=chat(True), headers=headers, timeout=30
    ) as response:
        lines = response.iter_lines()
        received.append(next(lines))
        proxy.proc.send_signal(signal.SIGTERM)
        received.extend(lines)
    content = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in received
        if line.startswith("data: {")
    )
    assert content == expected_content(30)
    assert received[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in received
    assert proxy.proc.wait(15) == 0
    # It stopped accepting: new connections are refused.
    with pytest.raises(httpx.ConnectError):
        httpx.get(proxy.url + "/healthz")


def test_status_command_renders_a_live_proxy(make_proxy: ProxyFactory, sim_reset: Server) -> None:
    proxy = make_proxy(sim_provider(sim_reset, limit=3), server=f'admin_token = "{ADMIN_TOKEN}"')
    out = io.StringIO()
    args = argparse.Namespace(url=proxy.url, token=ADMIN_TOKEN)
    assert status_cli.run(args, out) == 0
    table = out.getvalue().splitlines()
    assert table[0].split() == list(status_cli.COLUMNS)
    assert table[1].split()[:6] == ["sim", "3", "0", "0", "no", "350"]
    # Without the token the proxy says 401 and the command fails with a clear line.
    denied = subprocess.run(
        [sys.executable, "-m", "proxy", "status", "--url", proxy.url],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert denied.returncode == 1
    assert "401" in denied.stderr


def test_status_table_shows_the_notice() -> None:
    text = status_cli.render(
        [
            {
                "providerId": "umans",
                "limit": 3,
                "inFlight": 3,
                "queued": 7,
                "paused": True,
                "cooldownMs": 350,
                "autoReduced": True,
                "autoReducedFrom": 4,
                "notice": NOTICE_3,
            },
            {
                "providerId": "openai",
                "limit": None,
                "inFlight": 1,
                "queued": 0,
                "paused": False,
                "cooldownMs": 350,
                "autoReduced": False,
            },
        ]
    )
    lines = text.splitlines()
    assert lines[1].split() == ["umans", "3", "3", "7", "yes", "350", "yes", "(from", "4)"]
    assert lines[2].split() == ["openai", "none", "1", "0", "no", "350", "no"]
    assert lines[3] == f"umans: {NOTICE_3}"


def test_demo_runs_to_completion_with_a_small_load() -> None:
    from proxy.tools import demo

    out = io.StringIO()
    plan = demo.DemoPlan(agents=3, tasks_per_agent=1, rounds=(1,), tokens=4, token_delay_ms=5)
    assert demo.main(plan, out) == 0
    text = out.getvalue()
    assert "tok0 tok1 tok2 tok3" in text
    # 3 tasks of one tool round: two model calls each, no header sent.
    assert "requests                      6 (6 completed, 0 errors)" in text
    assert "429s seen by clients          0" in text
    assert "prompt sources                derived\n" in text
    highest = int(text.split("highest upstream concurrency")[1].split()[0])
    assert highest <= demo.HARD_CAP
    comparison = text.split("task age against arrival order (the same load)\n", 1)[1]
    for row in ("continuations admitted ahead of newer tasks", "time to finish a task, p50"):
        assert row in comparison


# ------------------------------------------------------------ container files
# No Docker engine runs here: these check what can be checked without one.


def test_compose_sidecar_config_is_a_valid_sluice_config(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = yaml.safe_load(Path("compose.yaml").read_text())
    services = compose["services"]
    assert services["sim"]["profiles"] == ["sim"]
    assert services["agent"]["environment"]["OPENAI_BASE_URL"] == "http://sluice:8080/v1"
    assert "sluice-data:/var/lib/sluice" in services["sluice"]["volumes"]
    for name in [n for n in os.environ if n.startswith("SLUICE_")]:
        monkeypatch.delenv(name)
    for name, value in services["sluice"]["environment"].items():
        # ${VAR:-default} with nothing set in .env: the default applies.
        monkeypatch.setenv(name, re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value)))
    (provider,) = resolve_providers(load(None))
    assert provider.base_url == "http://sim:8081/v1"
    assert provider.policy.limit == 4
    assert provider.api_key is None
    sim_args = services["sim"]["command"]
    parsed = build_parser("sim").parse_args(sim_args)
    assert (parsed.port, parsed.hard_cap) == (8081, 4)


def test_dockerfile_runs_sluice_serve_as_non_root_with_a_healthcheck() -> None:
    text = Path("Dockerfile").read_text()
    assert 'ENTRYPOINT ["sluice"]' in text
    assert 'CMD ["serve"]' in text
    assert "USER 10001" in text
    assert "/healthz" in text.split("HEALTHCHECK", 1)[1]
    assert 'VOLUME ["/var/lib/sluice"]' in text


def test_sluice_version_prints_the_package_version() -> None:
    from importlib.metadata import version

    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    assert done.stdout.strip() == f"sluice {version('llm-sluice')}"
