"""The first hour of a new user (issue 17): config and startup errors that say what to
do, the five-minute guide against `sluice sim`, the compose file's profiles, one
error shape for the admin API, `sluice status` and `sluice demo` that explain what
they show, and `make demo` without the dev toolchain."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from starlette.testclient import TestClient

from proxy.cli import status as status_cli
from proxy.edge.app import Sluice
from proxy.errors import ConfigError
from proxy.settings import NOT_CONFIG_VARIABLES, ProviderSettings, Settings, load
from proxy.tools import demo
from tests.conftest import ProxyFactory, chat, sim_running
from tests.servers import free_port, start
from tests.test_settings import clean_environ

ROOT = Path(__file__).resolve().parents[1]
PROVIDER = '[[providers]]\nid = "umans"\nbase_url = "https://api.umans.ai/v1"\n'


def serve(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m proxy serve *args` in `tmp_path` (no ./sluice.toml there), with no
    SLUICE_* variable but those in `env`."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", *args],
        cwd=tmp_path,
        env=clean_environ(env or {}) | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def the_one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a `serve` that refused to start, exit code 2."""
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def config_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "conf.toml"
    path.write_text(text)
    return str(path)


# ------------------------------------------------------- 8. the startup line


def test_the_startup_line_says_unlimited(make_proxy: ProxyFactory) -> None:
    log = make_proxy('[[providers]]\nid = "open"\nbase_url = "http://127.0.0.1:9/v1"\n').log()
    assert "limit=unlimited (config)" in log
    assert "limit=None" not in log


# ------------------------------------------- 1. environment and file errors


def test_the_status_variables_are_not_config_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_URL", "http://127.0.0.1:9999")
    monkeypatch.setenv("SLUICE_ADMIN_TOKEN", "t")
    path = tmp_path / "sluice.toml"
    path.write_text(PROVIDER)
    assert load(path).providers[0].id == "umans"
    assert {"SLUICE_URL", "SLUICE_ADMIN_TOKEN", "SLUICE_CONFIG"} == NOT_CONFIG_VARIABLES


def test_serve_starts_with_the_status_variables_set_and_warns_about_the_token(
    make_proxy: ProxyFactory,
) -> None:
    proxy = make_proxy(
        '[[providers]]\nid = "open"\nbase_url = "http://127.0.0.1:9/v1"\n',
        env={"SLUICE_URL": "http://127.0.0.1:1", "SLUICE_ADMIN_TOKEN": "for-status-only"},
    )
    log = proxy.log()
    assert "SLUICE_ADMIN_TOKEN is read by `sluice status` only" in log
    assert "for-status-only" not in log


@pytest.mark.parametrize(
    ("env", "line"),
    [
        pytest.param(
            {"SLUICE_LOG_LEVEL": "info"},
            "config error: SLUICE_LOG_LEVEL (log_level): unknown key; "
            "did you mean SLUICE_SERVER__LOG_LEVEL?",
            id="key-of-a-section-at-the-top",
        ),
        pytest.param(
            {"SLUICE_ADMISION__COOLDOWN_MS": "1"},
            "config error: SLUICE_ADMISION__COOLDOWN_MS (admision): unknown key; "
            "did you mean SLUICE_ADMISSION__COOLDOWN_MS?",
            id="misspelt-section",
        ),
        pytest.param(
            {"sluice_server__prot": "1"},
            "config error: sluice_server__prot (server.prot): unknown key; "
            "did you mean SLUICE_SERVER__PORT?",
            id="named-as-written",
        ),
        pytest.param(
            {"SLUICE_PROVIDERS__0__LIMT": "3"},
            "config error: SLUICE_PROVIDERS__0__LIMT (providers[0].limt): unknown key; "
            "did you mean SLUICE_PROVIDERS__0__LIMIT?",
            id="misspelt-provider-key",
        ),
        pytest.param(
            {"SLUICE_PROVIDERS__0__CONNECT_TIMEOUT_S": "-1"},
            "config error: SLUICE_PROVIDERS__0__CONNECT_TIMEOUT_S "
            "(providers[0].connect_timeout_s): Input should be greater than 0",
            id="bad-value",
        ),
        pytest.param(
            {"SLUICE_NOTHING_LIKE_IT": "1"},
            "config error: SLUICE_NOTHING_LIKE_IT (nothing_like_it): unknown key",
            id="no-suggestion",
        ),
    ],
)
def test_serve_names_the_variable_with_a_suggestion(
    tmp_path: Path, env: dict[str, str], line: str
) -> None:
    assert the_one_line(serve(tmp_path, "--config", config_file(tmp_path, PROVIDER), env=env)) == (
        line
    )


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param(
            PROVIDER + "limt = 3\n",
            "config error: providers[0].limt: unknown key; did you mean providers[0].limit?",
            id="limt",
        ),
        pytest.param(
            "[admision]\ncooldown_ms = 1\n" + PROVIDER,
            "config error: admision: unknown key; did you mean admission?",
            id="admision",
        ),
        pytest.param(
            'log_level = "info"\n' + PROVIDER,
            "config error: log_level: unknown key; did you mean server.log_level?",
            id="server-key-at-the-top",
        ),
        pytest.param(
            "[server]\ncooldown_ms = 1\n" + PROVIDER,
            "config error: server.cooldown_ms: unknown key; did you mean admission.cooldown_ms?",
            id="admission-key-in-server",
        ),
        pytest.param(
            '[[providers]]\nid = "umans"\nbaseurl = "https://api.umans.ai/v1"\n',
            "config error: providers[0].baseurl: unknown key; did you mean providers[0].base_url?",
            id="unknown-before-missing",
        ),
    ],
)
def test_serve_suggests_the_key_a_misspelt_one_meant(tmp_path: Path, text: str, line: str) -> None:
    assert the_one_line(serve(tmp_path, "--config", config_file(tmp_path, text))) == line


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param(
            {"SLUICE_PROVIDERS": '[{"id": "a", "base_url": "http://x/v1", "limt": 1}]'},
            "config error: SLUICE_PROVIDERS (providers[0].limt): unknown key; "
            "did you mean providers[0].limit?",
            id="inside-a-json-value",
        ),
        pytest.param(
            {"SLUICE_LIMIT": "3"},
            "config error: SLUICE_LIMIT (limit): unknown key; "
            "did you mean SLUICE_PROVIDERS__0__LIMIT?",
            id="provider-key-at-the-top",
        ),
        pytest.param(
            {"SLUICE_PROVIDERS__0__ID": "a"},
            "config error: providers[0].base_url: Field required "
            "(set SLUICE_PROVIDERS__0__BASE_URL)",
            id="entry-made-of-variables",
        ),
        pytest.param(
            {"SLUICE_PROVIDERS__0__ID": "a", "SLUICE_PROVIDERS__0__BASE_URL": "ftp://x/v1"},
            "config error: SLUICE_PROVIDERS__0__BASE_URL (providers[0].base_url): "
            "'ftp://x/v1' is not an http(s) URL",
            id="model-validator",
        ),
        pytest.param(
            {"SLUICE_PROVDERS__0__ID": "a"},
            "config error: SLUICE_PROVDERS__0__ID (provders): unknown key; "
            "did you mean SLUICE_PROVIDERS__0__ID?",
            id="no-file-and-a-misspelt-variable",
        ),
    ],
)
def test_environment_errors_without_a_file(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load(None)
    assert str(caught.value) == message


# ----------------------------------------------------------- 2. startup errors


def test_serve_without_any_config_says_where_it_looked(tmp_path: Path) -> None:
    assert the_one_line(serve(tmp_path)) == (
        f"config error: no config file found (no --config, no $SLUICE_CONFIG, no sluice.toml "
        f"in {tmp_path}): pass --config PATH, set $SLUICE_CONFIG, or create ./sluice.toml "
        "(examples/sim.toml runs against `sluice sim`; config.example.toml documents every key)"
    )


def test_serve_on_a_port_in_use_is_one_line_before_anything_is_logged(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = f'[server]\nport = {port}\ndatabase = "{tmp_path / "s.db"}"\n' + PROVIDER
        line = the_one_line(serve(tmp_path, "--config", config_file(tmp_path, text)))
    assert line == (
        f"sluice serve: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(another process listens there: stop it, or choose a port with --port)"
    )
    assert not (tmp_path / "s.db").exists()  # nothing was built


def test_serve_still_says_where_it_listens(make_proxy: ProxyFactory) -> None:
    # uvicorn logs the address only for a socket it binds itself; sluice binds its own.
    proxy = make_proxy('[[providers]]\nid = "open"\nbase_url = "http://127.0.0.1:9/v1"\n')
    assert f"Uvicorn running on http://127.0.0.1:{proxy.port}" in proxy.log()


# --------------------------------------------------- 3. the five-minute guide


def test_examples_sim_toml_points_at_sluice_sim_on_8081_with_a_small_limit() -> None:
    settings = load(ROOT / "examples" / "sim.toml")
    (provider,) = settings.providers
    assert provider.base_url == "http://127.0.0.1:8081/v1"
    assert provider.limit in (1, 2, 3, 4)
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)


def test_the_readme_guide_names_every_step() -> None:
    readme = (ROOT / "README.md").read_text()
    guide = readme.split("### As a process, in five minutes", 1)[1].split("\n### ", 1)[0]
    for step in (
        ".venv/bin/sluice sim --port 8081",
        ".venv/bin/sluice serve --config examples/sim.toml",
        "curl -N http://127.0.0.1:8080/v1/chat/completions",
        "export OPENAI_API_KEY=",
        "runs in the foreground",
    ):
        assert step in guide, step


def test_the_guide_works_with_examples_sim_toml_and_the_openai_sdk(tmp_path: Path) -> None:
    """The guide's two servers and its SDK call; only the ports differ (free ones)."""
    from openai import OpenAI

    with sim_running() as sim:
        port = free_port()
        env = {
            "SLUICE_PROVIDERS__0__BASE_URL": f"{sim.url}/v1",
            "SLUICE_SERVER__PORT": str(port),
            "SLUICE_SERVER__DATABASE": str(tmp_path / "sim.db"),
        }
        proxy = start(["serve", "--config", "examples/sim.toml"], port, env=env)
        try:
            client = OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0)
            answer = client.chat.completions.create(
                model="sim-1", messages=[{"role": "user", "content": "hi"}]
            )
            assert answer.choices[0].message.content
            assert "limit=2 (config)" in proxy.log()
        finally:
            proxy.stop()


# ---------------------------------------------------------------- 4. compose

COMPOSE = ROOT / "compose.yaml"
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def active(services: dict[str, Any], profiles: set[str]) -> set[str]:
    """The services `docker compose --profile ...` starts: no profiles, or a chosen one."""
    return {
        name
        for name, service in services.items()
        if not service.get("profiles") or profiles & set(service["profiles"])
    }


@pytest.mark.parametrize(
    ("profiles", "expected"),
    [
        pytest.param(set(), {"sluice"}, id="plain-up"),
        pytest.param({"sim"}, {"sluice", "sim", "agent"}, id="sim-profile"),
    ],
)
def test_compose_profiles_start_what_they_say(profiles: set[str], expected: set[str]) -> None:
    services = compose()["services"]
    started = active(services, profiles)
    assert started == expected
    # What compose >= 2.20 checks: a dependency outside the chosen profiles must be
    # optional (`required: false`), else `up` refuses to start.
    for name in started:
        for target, how in services[name].get("depends_on", {}).items():
            assert target in started or how.get("required") is False, (name, target)
            assert how["condition"] == "service_healthy"
            assert "healthcheck" in services[target] or target == "sluice"  # Dockerfile's


def test_compose_sluice_waits_for_a_healthy_sim_and_the_agent_needs_the_sim() -> None:
    services = compose()["services"]
    assert services["sluice"]["depends_on"]["sim"] == {
        "condition": "service_healthy",
        "required": False,
    }
    assert services["agent"]["profiles"] == ["sim"]
    assert "profiles" not in services["sluice"]


def test_compose_defaults_agree_with_the_readme_and_the_config_defaults() -> None:
    environment = compose()["services"]["sluice"]["environment"]
    defaults = {}
    for value in environment.values():
        for name, default in INTERPOLATION.findall(str(value)):
            defaults[name] = default
    assert defaults["PROVIDER_USAGE_GATE"] == "false"
    assert ProviderSettings.model_fields["usage_gate"].default is False
    assert "`usage_gate` defaults to `false`" in (ROOT / "README.md").read_text()
    assert defaults["PROVIDER_BASE_URL"] == "http://sim:8081/v1"
    # Every variable the README's and compose.yaml's .env examples name is one that
    # compose.yaml reads.
    readme = (ROOT / "README.md").read_text()
    example = readme.split("run `docker compose up -d`:", 1)[1].split("```sh", 1)[1]
    named = set(re.findall(r"^(\w+)=", example.split("```", 1)[0], re.M))
    named |= set(re.findall(r"^#   (\w+)=", COMPOSE.read_text(), re.M))
    # And the ones compose requires (`${NAME:?message}`): the admin token.
    required = set(re.findall(r"\$\{(\w+):\?", str(environment)))
    assert required == {"ADMIN_TOKEN"}
    assert named == set(defaults) | required


def test_dotenv_is_ignored_by_git() -> None:
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def compose_v2() -> list[str] | None:
    """A `docker compose` (the plugin) or `docker-compose` new enough for
    `depends_on.required` (2.20), or None."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        probe = subprocess.run(
            [*command, "version", "--short"], capture_output=True, text=True, check=False
        )
        found = re.match(r"v?(\d+)\.(\d+)", probe.stdout.strip())
        if probe.returncode == 0 and found and (int(found[1]), int(found[2])) >= (2, 20):
            return command
    return None


@pytest.mark.parametrize("profiles", [[], ["--profile", "sim"]], ids=["plain-up", "sim-profile"])
def test_docker_compose_config_accepts_both_profiles(tmp_path: Path, profiles: list[str]) -> None:
    command = compose_v2()
    if command is None:
        pytest.skip(
            "no docker compose >= 2.20 (depends_on.required); Debian 12's docker-compose "
            "1.29.2 rejects that key"
        )
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), *profiles, "config", "--format", "json"],
        cwd=tmp_path,  # no .env here: the defaults apply
        capture_output=True,
        text=True,
        check=False,
        env=clean_environ({}),
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) == ({"sluice", "sim", "agent"} if profiles else {"sluice"})


def test_docker_compose_v1_accepts_the_file_but_for_depends_on_required(tmp_path: Path) -> None:
    """Where only Debian 12's docker-compose 1.29 exists: its schema and interpolation
    check of everything but the one key it predates."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose not installed (Debian: apt-get install docker-compose)")
    if compose_v2() == ["docker-compose"]:
        pytest.skip("docker-compose is v2: test_docker_compose_config_accepts_both_profiles")
    text, removed = re.subn(r"\n *required: false *\n", "\n", COMPOSE.read_text())
    assert removed == 1
    (tmp_path / "compose.yaml").write_text(text)
    shutil.copy(ROOT / "Dockerfile", tmp_path)

    def config(environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker-compose", "-f", "compose.yaml", "config"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
            env=clean_environ(environ),
        )

    refused = config({})  # no admin token: compose itself stops
    assert refused.returncode != 0
    assert "set ADMIN_TOKEN in .env" in refused.stderr
    result = config({"ADMIN_TOKEN": "a-long-random-string"})
    assert result.returncode == 0, result.stderr
    sluice = yaml.safe_load(result.stdout)["services"]["sluice"]
    assert sluice["environment"]["SLUICE_PROVIDERS__0__USAGE_GATE"] == "false"
    assert sluice["environment"]["SLUICE_PROVIDERS__0__BASE_URL"] == "http://sim:8081/v1"


# ------------------------------------------------------ 6. admin error shape


@pytest.fixture
def admin_app(tmp_path: Path) -> Any:
    settings = Settings.model_validate(
        {
            "server": {"database": str(tmp_path / "s.db")},
            "providers": [{"id": "a", "base_url": "http://127.0.0.1:9/v1", "limit": 2}],
        }
    )
    with TestClient(Sluice(settings)) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("GET", "/concurrency/nope", 404, "no route /concurrency/nope"),
        ("GET", "/concurrency/limits/a/extra", 404, "no route /concurrency/limits/a/extra"),
        ("GET", "/concurrency/status/zz", 404, "unknown provider 'zz'"),
        (
            "POST",
            "/concurrency/limits/a",
            405,
            "method POST not allowed on /concurrency/limits/a (allowed: DELETE, GET, HEAD, PUT)",
        ),
        (
            "DELETE",
            "/concurrency/status",
            405,
            "method DELETE not allowed on /concurrency/status (allowed: GET, HEAD)",
        ),
    ],
)
def test_every_admin_error_is_json_in_one_shape(
    admin_app: TestClient, method: str, path: str, status: int, error: str
) -> None:
    response = admin_app.request(method, path)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": error}
    if status == 405:
        assert response.headers["allow"] == error.split("(allowed: ")[1].rstrip(")")


def test_status_shows_the_seconds_left_of_a_pause() -> None:
    row = {
        "providerId": "umans",
        "limit": 3,
        "inFlight": 3,
        "queued": 7,
        "paused": True,
        "pausedUntil": 1_000_000 + 11_200,
        "cooldownMs": 350,
        "autoReduced": False,
    }
    lines = status_cli.render([row], now_ms=1_000_000).splitlines()
    assert lines[1].split() == ["umans", "3", "3", "7", "yes", "(12s", "left)", "350", "no"]
    over = status_cli.render([row], now_ms=1_000_000 + 20_000).splitlines()
    assert "yes (0s left)" in over[1]


def test_status_token_falls_back_to_the_proxys_own_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from proxy.cli.main import build_parser

    monkeypatch.delenv("SLUICE_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("SLUICE_SERVER__ADMIN_TOKEN", "server-token")
    assert build_parser().parse_args(["status"]).token == "server-token"
    monkeypatch.setenv("SLUICE_ADMIN_TOKEN", "status-token")
    assert build_parser().parse_args(["status"]).token == "status-token"


def test_status_command_against_a_paused_proxy(make_proxy: ProxyFactory) -> None:
    with sim_running("--hard-cap", "0", "--retry-after-s", "30") as sim:
        proxy = make_proxy(
            f'[[providers]]\nid = "sim"\nbase_url = "{sim.url}/v1"\nlimit = 2\n',
            admission="retry_on_429 = 0",
        )
        assert httpx.post(proxy.url + "/v1/chat/completions", json=chat()).status_code == 429
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "status", "--url", proxy.url],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env=clean_environ({}),
        )
    assert result.returncode == 0, result.stderr
    seconds = int(re.search(r"yes \((\d+)s left\)", result.stdout)[1])  # type: ignore[index]
    assert 25 <= seconds <= 30


# -------------------------------------------------------------- 7. make demo


def test_demo_table_shows_running_and_cooling(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    out = io.StringIO()
    plan = demo.DemoPlan(agents=4, tasks_per_agent=1, rounds=(1,), tokens=4, token_delay_ms=5)
    assert demo.main(plan, out) == 0
    text = out.getvalue()
    assert demo.WATCH_LEGEND in text
    header = " ".join(f"{name:>8}" for name in demo.WATCH_COLUMNS)
    rows = text.split(header + "\n", 1)[1].split("\n\nThe same load again", 1)[0].splitlines()
    for row in (r.split() for r in rows if re.match(r"^ *\d+\.\d ", r)):
        in_flight, running, cooling = (int(cell) for cell in row[1:4])
        assert in_flight == running + cooling, row


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_installs_the_runtime_only_and_test_the_dev_extra() -> None:
    def commands(target: str) -> str:
        result = subprocess.run(
            ["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, check=True
        )
        return result.stdout

    demo_steps = commands("demo")
    assert "pip install --quiet -e .\n" in demo_steps
    assert ".[dev]" not in demo_steps
    assert "touch .venv/.installed\n" in demo_steps
    for target in ("test", "lint"):
        assert "pip install --quiet -e '.[dev]'" in commands(target)
