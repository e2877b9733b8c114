"""The first hour of a new user (issue 17): config and startup errors that say what to
do, the five-minute guide against `sluice sim`, the compose file's profiles, one
error shape for the admin API, `sluice status` and `sluice demo` that explain what
they show, and `make demo` without the dev toolchain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ProxyFactory
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
