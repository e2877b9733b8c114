"""The derivation against traffic captured from real agents (tests/fixtures/agents/):
the requests of one prompt, first and after a tool round, name the same prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.prompts import agent_started_at_ms, conversation_from_headers, derive, dialect_for

FIXTURES = Path(__file__).parent / "fixtures" / "agents"
CAPTURES = [("codex-0.169.0-turn1.json", "codex-0.169.0-tool-round.json")]


def load(name: str) -> dict[str, Any]:
    captured: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return captured


def headers_of(captured: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in captured["headers"].items()]


def key_of(captured: dict[str, Any], conversation_id: str | None) -> bytes | None:
    dialect = dialect_for(captured["path"].removeprefix("/v1"))
    assert dialect is not None
    return derive(dialect, orjson.dumps(captured["body"]), conversation_id).prompt_key


@pytest.mark.parametrize(("first", "round_"), CAPTURES)
def test_a_tool_round_names_the_same_prompt(first: str, round_: str) -> None:
    one, two = load(first), load(round_)
    conversation = conversation_from_headers(headers_of(one))
    assert conversation is not None
    assert conversation == conversation_from_headers(headers_of(two))
    for conversation_id in (conversation, None):  # by session header, and by the opening
        key = key_of(one, conversation_id)
        assert key is not None
        assert key == key_of(two, conversation_id)


@pytest.mark.parametrize(("first", "round_"), CAPTURES)
def test_the_agents_own_turn_start_is_the_same_in_both(first: str, round_: str) -> None:
    started = agent_started_at_ms(headers_of(load(first)))
    assert started is not None
    assert started > 10**12
    assert agent_started_at_ms(headers_of(load(round_))) == started


@pytest.mark.parametrize(("first", "round_"), CAPTURES)
def test_a_new_prompt_in_the_same_session_names_a_new_prompt(first: str, round_: str) -> None:
    two = load(round_)
    follow_up = json.loads(json.dumps(two))
    follow_up["body"]["input"].append(
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "and now?"}]}
    )
    conversation = conversation_from_headers(headers_of(two))
    assert key_of(follow_up, conversation) != key_of(two, conversation)
