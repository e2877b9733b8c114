"""Codex CLI, a real agent, runs a task with one tool round: against `sluice sim`
directly (what it sends, kept as fixtures), then through sluice (issue 12 item 4).

The sim is scripted to answer the first request of the prompt with an `exec_command`
call (`echo hi`) and the tool round with text, so `codex exec` finishes after two
`POST /v1/responses`. Skipped, with the reason, when Codex cannot be installed (see
`tests/agents.py`). Set `SLUICE_UPDATE_AGENT_FIXTURES=1` to rewrite the fixtures from
a fresh capture instead of comparing the capture with them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import agents
from tests.conftest import sim_provider, sim_running, start_proxy
from tests.servers import Server

pytestmark = pytest.mark.e2e

PROMPT = "say hi"
TOOL = "exec_command"
TOOL_SCRIPT = [{"name": TOOL, "arguments": {"cmd": "echo hi"}}]
FIXTURES = Path(__file__).parent / "fixtures" / "agents"
FIXTURE_PREFIX = f"codex-{agents.CODEX_VERSION}"
UPDATE_FIXTURES = os.environ.get("SLUICE_UPDATE_AGENT_FIXTURES") == "1"
_TRANSPORT_HEADERS = ("host", "content-length")  # differ per run and per hop


@pytest.fixture(scope="module")
def codex() -> Path:
    agent = agents.codex()
    if agent.binary is None:
        pytest.skip(agent.skip_reason)
    return agent.binary


@pytest.fixture(scope="module")
def sim() -> Iterator[Server]:
    """A sim that scripts one tool call and records what it is sent."""
    flags = ["--tokens", "4", "--token-delay-ms", "1", "--record", "50"]
    with sim_running(*flags, "--tool-script", json.dumps(TOOL_SCRIPT)) as server:
        yield server


def fresh(sim: Server) -> None:
    httpx.post(sim.url + "/sim/reset").raise_for_status()


def responses_requests(sim: Server) -> list[dict[str, Any]]:
    """The `POST /v1/responses` the sim has recorded since its last reset."""
    recorded: list[dict[str, Any]] = httpx.get(sim.url + "/sim/requests").json()["requests"]
    return [r for r in recorded if (r["method"], r["path"]) == ("POST", "/v1/responses")]


def turn_metadata(request: dict[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = json.loads(request["headers"]["x-codex-turn-metadata"])
    return metadata


def as_fixture(request: dict[str, Any]) -> dict[str, Any]:
    """A recorded request as saved: credentials are already redacted by the sim."""
    headers = {k: v for k, v in request["headers"].items() if k not in _TRANSPORT_HEADERS}
    return {
        "method": request["method"],
        "path": request["path"],
        "headers": headers,
        "body": request["body"],
    }


def shape(request: dict[str, Any]) -> dict[str, Any]:
    """What must not drift between a capture and its fixture: header names, body keys,
    input item kinds and roles, tool names."""
    body = request["body"]
    return {
        "headers": sorted(request["headers"]),
        "body": sorted(body),
        "input": [(item.get("type"), item.get("role")) for item in body["input"]],
        "tools": [tool.get("name", tool.get("type")) for tool in body["tools"]],
        "turn_metadata": sorted(turn_metadata(request)),
    }


# --- Codex against the sim -------------------------------------------------------------------


def test_codex_runs_one_tool_round_against_the_sim(
    codex: Path, sim: Server, tmp_path: Path
) -> None:
    fresh(sim)
    run = agents.run_codex(codex, sim.url + "/v1", tmp_path, PROMPT)
    assert run.returncode == 0, run.explain()
    requests = responses_requests(sim)
    assert len(requests) == 2, [r["body"].get("input", [])[-2:] for r in requests]
    first, tool_round = requests

    tools = [tool.get("name") for tool in first["body"]["tools"]]
    assert TOOL in tools, f"Codex no longer declares {TOOL}: {tools}"
    prompt_items = [i for i in first["body"]["input"] if i.get("role") == "user"]
    assert prompt_items[-1]["content"] == [{"type": "input_text", "text": PROMPT}]

    call, output = tool_round["body"]["input"][-2:]
    assert (call["type"], call["name"]) == ("function_call", TOOL)
    assert output["type"] == "function_call_output"
    assert output["call_id"] == call["call_id"]
    assert "hi" in output["output"]  # the command ran

    # One session and one turn: the signals sluice reads to keep the task's start time.
    assert first["headers"]["session-id"] == tool_round["headers"]["session-id"]
    started = {turn_metadata(r)["turn_started_at_unix_ms"] for r in requests}
    assert len(started) == 1
    body_metadata = json.loads(first["body"]["client_metadata"]["x-codex-turn-metadata"])
    assert body_metadata["turn_started_at_unix_ms"] in started
    for request in requests:
        assert request["headers"]["authorization"] == "Bearer <redacted>"

    captured = {"turn1": as_fixture(first), "tool-round": as_fixture(tool_round)}
    for name, request in captured.items():
        path = FIXTURES / f"{FIXTURE_PREFIX}-{name}.json"
        if UPDATE_FIXTURES:
            path.write_text(json.dumps(request, indent=1, ensure_ascii=False) + "\n")
        else:
            saved = json.loads(path.read_text())
            assert shape(request) == shape(saved), f"{path.name} no longer matches Codex"


# --- Codex through sluice --------------------------------------------------------------------


@dataclass(frozen=True)
class ThroughSluice:
    run: agents.CodexRun
    upstream: list[dict[str, Any]]  # the responses requests the sim received
    access: list[dict[str, Any]]  # sluice's access log lines for /v1/responses


@pytest.fixture(scope="module")
def through_sluice(
    codex: Path, sim: Server, tmp_path_factory: pytest.TempPathFactory
) -> ThroughSluice:
    """One `codex exec` through `sluice serve` (JSON logs) in front of the sim."""
    directory = tmp_path_factory.mktemp("codex-through-sluice")
    fresh(sim)
    proxy = start_proxy(
        directory,
        sim_provider(sim, "sim", default=True, limit=2),
        server='log_format = "json"',
    )
    try:
        run = agents.run_codex(codex, proxy.url + "/v1", directory, PROMPT)
        upstream = responses_requests(sim)
    finally:
        proxy.stop()
    lines = [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]
    access = [
        line
        for line in lines
        if line.get("logger") == "sluice.access" and line.get("path") == "/v1/responses"
    ]
    return ThroughSluice(run, upstream, access)


def test_codex_finishes_a_tool_round_through_sluice(through_sluice: ThroughSluice) -> None:
    run = through_sluice.run
    assert run.returncode == 0, run.explain()
    assert len(through_sluice.upstream) >= 2
    assert through_sluice.upstream[-1]["body"]["input"][-1]["type"] == "function_call_output"
    access = through_sluice.access
    assert len(access) >= 2, access
    assert {line["status"] for line in access} == {200}
    assert {line["provider"] for line in access} == {"sim"}


def test_codex_requests_of_one_prompt_share_its_start(through_sluice: ThroughSluice) -> None:
    access = through_sluice.access
    assert len(access) >= 2, access
    started = [line.get("prompt_started_at") for line in access]
    assert started[0] is not None
    assert len(set(started)) == 1, started
    assert {line.get("prompt_source") for line in access} <= {"agent", "derived"}
