"""Monitoring as shipped (issue 16): the Grafana dashboard, the Prometheus config, Grafana's
provisioning and the compose profile `monitoring` that runs them.

Checked against a live sluice: every metric the dashboard queries is one sluice
exports. Where Debian's `prometheus` package is installed (`promtool`, `prometheus`),
the config passes `promtool check config`, and a real Prometheus scrapes a real sluice
with the admin token and evaluates every expression of the dashboard. Docker is not
needed: the compose file is read as YAML (and by `docker compose config` where that
exists).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import chat, sim_provider, sim_running, start_proxy
from tests.servers import Server, free_port
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "sluice.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "sluice.yml"
ADMIN_TOKEN = "deploy-admin-token-40d2"

# PromQL words that are not metric names (functions, aggregations, keywords).
PROMQL_WORDS = frozenset(
    {
        *("sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk"),
        *("quantile", "count_values", "group", "rate", "irate", "increase", "delta"),
        *("idelta", "deriv", "histogram_quantile", "label_values", "clamp_min", "clamp_max"),
        *("abs", "ceil", "floor", "round", "vector", "scalar", "time", "by", "without"),
        *("on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset"),
        "bool",
    }
)


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard() -> dict[str, Any]:
    found: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return found


def expressions() -> list[str]:
    """Every PromQL expression of the dashboard: its panels' and its variables'."""
    found = [
        target["expr"]
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            found.append(variable["definition"])
    return found


def metric_names(expression: str) -> set[str]:
    """The metric names `expression` reads: its words, less label matchers, grouping
    labels, durations, strings, Grafana variables and PromQL's own words."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables
    text = re.sub(r"\blabel_values\(([^,]+),[^)]*\)", r"\1", text)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {word for word in words if word not in PROMQL_WORDS}


def for_prometheus(expression: str) -> str:
    """A dashboard expression as Prometheus takes it: Grafana's variables filled in."""
    return (
        expression.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$provider", ".*")
    )


# --- a live sluice ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """sluice in front of a sim, with a request or two behind it: a limited provider
    with the usage gate (so every gauge has a value) and an unlimited one."""
    with sim_running("--tokens", "5", "--token-delay-ms", "5") as sim:
        proxy = start_proxy(
            tmp_path_factory.mktemp("deploy"),
            sim_provider(sim, "sim", limit=2, usage_gate=True, default=True)
            + sim_provider(sim, "open"),
            server=f'admin_token = "{ADMIN_TOKEN}"',
        )
        try:
            for prefix in ("", "/open"):
                httpx.post(f"{proxy.url}{prefix}/v1/chat/completions", json=chat(), timeout=10)
            yield proxy
        finally:
            proxy.stop()


def exported(proxy: Server) -> set[str]:
    """The sample names a scrape of `proxy` holds or announces (a family without
    samples yet still names its samples by its type)."""
    text = httpx.get(
        proxy.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=5
    ).text
    names: set[str] = set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


# --- the dashboard ----------------------------------------------------------------------------


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    board = dashboard()
    assert board["uid"] == "sluice"
    assert board["title"]
    assert isinstance(board["schemaVersion"], int)
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels:
        assert panel["type"] in {"row", "stat", "timeseries", "heatmap"}, panel["title"]
        position = panel["gridPos"]
        assert position["x"] >= 0, panel["title"]
        assert position["x"] + position["w"] <= 24, panel["title"]
        assert position["h"] > 0
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["expr"].strip()
                assert target["refId"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["provider"]["includeAll"] is True


def test_the_dashboard_covers_what_an_operator_asks_first() -> None:
    read = set().union(*(metric_names(e) for e in expressions()))
    for name in (
        "sluice_in_flight",
        "sluice_queued",
        "sluice_limit",
        "sluice_upstream_429_total",
        "sluice_requests_total",
        "sluice_queue_wait_seconds_bucket",
        "sluice_upstream_ttfb_seconds_bucket",
        "sluice_cooling",
        "sluice_upstream_sessions",
        "sluice_build_info",
    ):
        assert name in read, name


def test_the_metric_name_reader_reads_names() -> None:
    assert metric_names(
        'histogram_quantile(0.95, sum by (le) (rate(sluice_x_bucket{provider=~"$provider",'
        ' le!="+Inf"}[$__rate_interval]))) / on (provider) group_left sluice_limit'
    ) == {"sluice_x_bucket", "sluice_limit"}
    assert metric_names("label_values(sluice_in_flight, provider)") == {"sluice_in_flight"}


@pytest.mark.e2e
def test_every_metric_the_dashboard_reads_is_exported(live: Server) -> None:
    names = exported(live)
    for expression in expressions():
        missing = metric_names(expression) - names
        assert not missing, f"{expression}: sluice exports no {sorted(missing)}"


# --- Prometheus -------------------------------------------------------------------------------


def test_prometheus_scrapes_sluice_with_the_admin_token() -> None:
    config = load(PROMETHEUS)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["sluice"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["sluice:8080"]
    authorization = job["authorization"]
    assert authorization.get("type", "Bearer") == "Bearer"
    assert authorization["credentials_file"].startswith("/")
    assert "credentials" not in authorization, "no token in the config itself"
    assert "bearer_token" not in job


def with_token_file(directory: Path, target: str | None = None) -> Path:
    """The shipped config with its credentials file (and target) moved for a local run."""
    token = directory / "token"
    token.write_text(ADMIN_TOKEN)
    text = PROMETHEUS.read_text()
    original = load(PROMETHEUS)["scrape_configs"][0]["authorization"]["credentials_file"]
    text = text.replace(original, str(token))
    if target is not None:
        text = text.replace('"sluice:8080"', f'"{target}"')
    config = directory / "prometheus.yml"
    config.write_text(text)
    return config


def test_promtool_accepts_the_config(tmp_path: Path) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("no promtool (Debian's prometheus package): config checked as YAML only")
    done = subprocess.run(
        ["promtool", "check", "config", str(with_token_file(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.e2e
def test_a_real_prometheus_scrapes_sluice_and_runs_the_dashboard(
    live: Server, tmp_path: Path
) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("no prometheus binary (Debian's prometheus package)")
    config = with_token_file(tmp_path, target=f"127.0.0.1:{live.port}")
    text = config.read_text().replace("scrape_interval: 5s", "scrape_interval: 1s")
    config.write_text(text)
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(expression: str) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(
            f"{api}/query", params={"query": expression}, timeout=5
        ).json()
        return answer

    def scraped() -> bool:
        try:
            result = query('up{job="sluice"}')["data"]["result"]
        except (httpx.HTTPError, ValueError, KeyError):  # not up, or not ready yet
            return False
        return bool(result) and result[0]["value"][1] == "1"

    try:
        wait_until(scraped, within=30)
        assert query("sluice_build_info")["data"]["result"]
        assert query('sluice_requests_total{outcome="ok"}')["data"]["result"]
        for expression in expressions():
            if expression.startswith("label_values("):
                continue  # Grafana's, not PromQL
            answer = query(for_prometheus(expression))
            assert answer["status"] == "success", (expression, answer)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()


# --- Grafana provisioning ---------------------------------------------------------------------


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    datasources = load(DATASOURCES)["datasources"]
    assert [d["type"] for d in datasources] == ["prometheus"]
    assert datasources[0]["url"] == "http://prometheus:9090"
    assert datasources[0]["isDefault"] is True
    providers = load(DASHBOARD_PROVIDERS)["providers"]
    assert providers[0]["type"] == "file"
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards/sluice"


# --- the compose profile ----------------------------------------------------------------------


def compose() -> dict[str, Any]:
    found: dict[str, Any] = load(ROOT / "compose.yaml")
    return found


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's bind mounts: container path -> host path."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            found[target] = source
    return found


def test_the_monitoring_profile_runs_prometheus_and_grafana() -> None:
    services = compose()["services"]
    monitoring = {name for name, s in services.items() if "monitoring" in s.get("profiles", [])}
    assert monitoring == {"prometheus", "grafana"}
    assert "profiles" not in services["sluice"], "sluice itself runs in every profile"
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["image"].startswith("prom/prometheus")
    assert grafana["image"].startswith("grafana/grafana")
    for service in (prometheus, grafana):
        for target, source in mounts(service).items():
            assert (ROOT / source).exists(), f"{source} (mounted at {target}) is missing"
        for port in service["ports"]:
            assert port.startswith("127.0.0.1:"), "published on loopback only"

    # Prometheus reads the config it is given, and the token file its command writes.
    config_mount = mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    assert (ROOT / config_mount).resolve() == PROMETHEUS
    command = " ".join(prometheus["command"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in command
    token_file = load(PROMETHEUS)["scrape_configs"][0]["authorization"]["credentials_file"]
    assert f"> {token_file}" in command
    assert "$$ADMIN_TOKEN" in command, "the shell reads the token, compose does not inline it"
    assert prometheus["environment"]["ADMIN_TOKEN"] == "${ADMIN_TOKEN:-}"
    assert "SLUICE_SERVER__ADMIN_TOKEN" in services["sluice"]["environment"]

    # Grafana: the provisioning folders and the dashboard where the provider looks.
    grafana_mounts = mounts(grafana)
    provider_path = load(DASHBOARD_PROVIDERS)["providers"][0]["options"]["path"]
    dashboard_at = [t for t, s in grafana_mounts.items() if (ROOT / s).resolve() == DASHBOARD]
    assert len(dashboard_at) == 1
    assert Path(dashboard_at[0]).parent == Path(provider_path)
    assert (ROOT / grafana_mounts["/etc/grafana/provisioning/datasources"]).resolve() == (
        DATASOURCES.parent
    )


def test_docker_compose_accepts_the_profile() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker: compose.yaml checked as YAML only")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    if version.returncode != 0:
        pytest.skip("no docker compose plugin: compose.yaml checked as YAML only")
    done = subprocess.run(
        [docker, "compose", "--profile", "monitoring", "config", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
