"""The layering is a checked rule (docs/design.md, "Layers"): the serving process never
loads the simulator or the demo, and the import contracts catch a planted cycle."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import ProxyFactory, sim_provider
from tests.servers import Server

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def imported_modules(log: str) -> set[str]:
    """Module names from `-X importtime` lines: `import time: self | cumulative | name`."""
    return {m.group(1).strip() for m in re.finditer(r"^import time:.*\|\s*(\S+)\s*$", log, re.M)}


def test_sluice_serve_never_loads_the_tools(make_proxy: ProxyFactory, sim: Server) -> None:
    proxy = make_proxy(sim_provider(sim), env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert httpx.get(proxy.url + "/concurrency/status").status_code == 200
    modules = imported_modules(proxy.log())
    assert "proxy.edge.relay" in modules  # the import log is complete enough to judge
    assert not {m for m in modules if m.startswith("proxy.tools")}


def lint_imports(package_root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=package_root,
        env={"PYTHONPATH": str(package_root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_contracts_hold_and_catch_a_planted_cycle(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "proxy", tmp_path / "proxy", ignore=shutil.ignore_patterns("*.pyc"))
    kept = lint_imports(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr

    # The core reaching up into the edge breaks two contracts at once.
    queue = tmp_path / "proxy" / "admission" / "queue.py"
    queue.write_text(queue.read_text() + "\nimport proxy.edge.relay  # noqa\n")
    # And a cycle inside one package: routing -> app -> routing.
    routing = tmp_path / "proxy" / "edge" / "routing.py"
    routing.write_text(routing.read_text() + "\nimport proxy.edge.app  # noqa\n")
    broken = lint_imports(tmp_path)
    assert broken.returncode != 0
    assert "proxy.admission.queue -> proxy.edge.relay" in broken.stdout
    assert "No import cycles between modules of one package BROKEN" in broken.stdout
