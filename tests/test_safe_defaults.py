"""Safe defaults (issue 14 item 2, SPEC section 11): sluice does not serve its admin
routes unauthenticated beyond this machine unless the operator says so, and the
container files make the operator choose a token."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from proxy.cli.serve import check_exposure, is_loopback
from proxy.errors import ConfigError
from proxy.settings import ServerSettings
from proxy.tools.process import ROOT
from tests.servers import free_port, running

REFUSAL = (
    "config error: server.admin_token: required when listening on {host}, which is not "
    "loopback (set SLUICE_SERVER__ADMIN_TOKEN, listen on 127.0.0.1, or set "
    "server.allow_open_admin = true)"
)


def write_config(tmp_path: Path, server: str = "") -> Path:
    config = tmp_path / "sluice.toml"
    config.write_text(
        f'[server]\ndatabase = "{tmp_path / "sluice.db"}"\n{server}\n'
        '[[providers]]\nid = "p"\nbase_url = "http://127.0.0.1:9/v1"\n'
    )
    return config


def serve(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m proxy serve *args`, expected to exit at once."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=env,
    )


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any `SLUICE_*` variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SLUICE_")}
    return {**env, **extra}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "sluice.internal"])
def test_a_non_loopback_host_without_a_token_is_refused_with_one_line(
    tmp_path: Path, host: str
) -> None:
    config = write_config(tmp_path)
    done = serve(["--config", str(config), "--host", host, "--port", "0"], clean_env())
    assert done.returncode == 2
    assert done.stderr == REFUSAL.format(host=host) + "\n"
    assert done.stdout == ""


def test_the_host_from_the_file_is_checked(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'host = "0.0.0.0"\nport = 0')
    done = serve(["--config", str(config)], clean_env())
    assert (done.returncode, done.stderr) == (2, REFUSAL.format(host="0.0.0.0") + "\n")


def test_the_host_from_the_environment_is_checked(tmp_path: Path) -> None:
    """The Docker image sets SLUICE_SERVER__HOST=0.0.0.0 and no token: `docker run`
    without one fails at start with the same line."""
    config = write_config(tmp_path, "port = 0")
    done = serve(["--config", str(config)], clean_env(SLUICE_SERVER__HOST="0.0.0.0"))
    assert (done.returncode, done.stderr) == (2, REFUSAL.format(host="0.0.0.0") + "\n")


def test_host_flag_back_to_loopback_is_not_refused(tmp_path: Path) -> None:
    """`--host` is the effective host: it overrides an open host in the file."""
    port = free_port()
    config = write_config(tmp_path, 'host = "0.0.0.0"')
    with running(
        ["serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        port,
        env={"SLUICE_SERVER__ADMIN_TOKEN": ""},
    ) as server:
        assert server.alive()


def test_with_a_token_it_starts_on_every_interface(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, f'host = "0.0.0.0"\nport = {port}')
    with running(
        ["serve", "--config", str(config)], port, env={"SLUICE_SERVER__ADMIN_TOKEN": "s3cret-admin"}
    ) as server:
        assert server.alive()
    assert "admin routes are open" not in server.log()


def test_allow_open_admin_starts_and_warns(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, f'host = "0.0.0.0"\nport = {port}\nallow_open_admin = true')
    with running(["serve", "--config", str(config)], port) as server:
        assert server.alive()
    warnings = [line for line in server.log().splitlines() if "admin routes are open" in line]
    assert len(warnings) == 1, server.log()
    assert "0.0.0.0" in warnings[0]
    assert "warning" in warnings[0].lower()


# --- the loopback rule ------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.0.0.2",
        "127.255.255.254",
        "::1",
        "[::1]",
        "localhost",
        "LOCALHOST",
        "localhost.",
        "::ffff:127.0.0.1",
    ],
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host",
    [
        "0.0.0.0",
        "::",
        "[::]",
        "10.0.0.1",
        "192.168.1.2",
        "128.0.0.1",
        "::2",
        "",
        "example.com",
        "localhost.example.com",
        "127.0.0.1.nip.io",
        "::ffff:10.0.0.1",
    ],
)
def test_not_loopback_hosts(host: str) -> None:
    assert not is_loopback(host)


def test_check_exposure_rules() -> None:
    check_exposure(ServerSettings())  # loopback, no token
    check_exposure(ServerSettings(host="0.0.0.0", admin_token=SecretStr("t")))
    check_exposure(ServerSettings(host="0.0.0.0", allow_open_admin=True))
    with pytest.raises(ConfigError):
        check_exposure(ServerSettings(host="0.0.0.0"))


# --- the container files ----------------------------------------------------------------


def test_compose_requires_an_admin_token() -> None:
    compose = (ROOT / "compose.yaml").read_text()
    (line,) = [ln for ln in compose.splitlines() if "SLUICE_SERVER__ADMIN_TOKEN" in ln]
    assert re.search(r"\$\{ADMIN_TOKEN:\?[^}]+\}", line), line


def test_the_image_listens_everywhere_and_sets_no_token() -> None:
    """`docker run sluice` without a token fails at start with the refusal line."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    env = " ".join(ln for ln in lines if not ln.lstrip().startswith("#"))
    assert "SLUICE_SERVER__HOST=0.0.0.0" in env
    assert "ADMIN_TOKEN" not in env
    assert "ALLOW_OPEN_ADMIN" not in env
