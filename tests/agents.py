"""Real coding agents for end-to-end tests: installed once into a cache outside the
repository, configured in a throwaway home, pointed at a URL, run non-interactively.

Only Codex CLI for now. `codex()` gives its binary or a reason to skip (no node or npm,
the install failed, the binary does not run); the first call installs
`@openai/codex@CODEX_VERSION` with npm into `$SLUICE_TEST_CACHE` (default
`$XDG_CACHE_HOME/sluice-tests`, else `~/.cache/sluice-tests`), later ones find it there.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CODEX_VERSION = "0.169.0"
INSTALL_TIMEOUT_S = 300.0
API_KEY_ENV = "SLUICE_TEST_AGENT_KEY"
"""The variable the agent reads its key from; the key itself is a dummy."""


def cache_dir() -> Path:
    """Where agents are installed: `$SLUICE_TEST_CACHE`, else under the XDG cache."""
    explicit = os.environ.get("SLUICE_TEST_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sluice-tests"


@dataclass(frozen=True)
class Agent:
    """An installed agent binary, or why there is none (`binary` is None then)."""

    binary: Path | None
    skip_reason: str = ""


@functools.cache
def codex(version: str = CODEX_VERSION) -> Agent:
    """The `codex` binary of `@openai/codex@version`, installed on first use."""
    prefix = cache_dir() / f"codex-{version}"
    binary = prefix / "node_modules" / ".bin" / "codex"
    if not binary.exists():
        reason = _npm_install(f"@openai/codex@{version}", prefix)
        if reason:
            return Agent(None, reason)
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Agent(None, f"codex {version} does not run: {exc}")
    if out.returncode != 0 or version not in out.stdout:
        detail = (out.stdout + out.stderr).strip()[-300:]
        return Agent(None, f"codex {version} does not run (exit {out.returncode}): {detail}")
    return Agent(binary)


def _npm_install(package: str, prefix: Path) -> str:
    """Install `package` under `prefix`; "" on success, else why not. The install goes to
    a temporary folder renamed into place, so an interrupted one leaves nothing behind."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return f"{package} needs node and npm on PATH (node: {node}, npm: {npm})"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{prefix.name}-", dir=prefix.parent))
    try:
        command = [npm, "install", "--prefix", str(staging), "--no-audit", "--no-fund", package]
        try:
            out = subprocess.run(
                command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            return f"npm install {package} took longer than {INSTALL_TIMEOUT_S:g} s"
        if out.returncode != 0:
            detail = (out.stdout + out.stderr).strip()[-500:]
            return f"npm install {package} failed (exit {out.returncode}): {detail}"
        try:
            staging.rename(prefix)
        except OSError:
            if not prefix.exists():  # not a concurrent install that got there first
                raise
        return ""
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- Codex configuration and runs ------------------------------------------------------------


def codex_config(base_url: str, model: str = "sim-1") -> str:
    """A `config.toml` that sends every model request to `base_url` (ending in `/v1`)
    over the Responses API, with no retries and nothing that reaches the internet
    (web search, analytics, feedback, update checks, telemetry export)."""
    return f"""\
model = "{model}"
model_provider = "sluice_test"
web_search = "disabled"
check_for_update_on_startup = false

[analytics]
enabled = false

[feedback]
enabled = false

[history]
persistence = "none"

[otel]
exporter = "none"

[model_providers.sluice_test]
name = "sluice test upstream"
base_url = "{base_url}"
env_key = "{API_KEY_ENV}"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
"""


@dataclass(frozen=True)
class CodexRun:
    """What one `codex exec` did."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def explain(self) -> str:
        return (
            f"codex exited {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )


def run_codex(
    binary: Path, base_url: str, directory: Path, prompt: str, timeout_s: float = 60.0
) -> CodexRun:
    """`codex exec prompt` against `base_url`, non-interactively: its home
    (`CODEX_HOME`) and working folder under `directory`, no git repository needed, no
    approval prompts and no sandbox (the scripted tool calls are harmless commands),
    no session files kept, stdin closed."""
    home, work = directory / "codex-home", directory / "work"
    home.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(codex_config(base_url))
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OPENAI_", "CODEX_", "RUST_LOG"))
    }
    env.update(
        {
            "CODEX_HOME": str(home),
            API_KEY_ENV: "sk-sluice-test-dummy",
            "NO_PROXY": "127.0.0.1,localhost",
            "NO_COLOR": "1",
        }
    )
    command = [
        str(binary),
        "exec",
        "--skip-git-repo-check",
        "--dangerously-bypass-approvals-and-sandbox",
        "--ephemeral",
        "--color",
        "never",
        "--cd",
        str(work),
        prompt,
    ]
    started = time.monotonic()
    out = subprocess.run(
        command,
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return CodexRun(out.returncode, out.stdout, out.stderr, time.monotonic() - started)
