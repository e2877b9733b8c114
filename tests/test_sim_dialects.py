"""The sim speaks the dialects real agents speak: the Responses API and Chat tool calls
through the official `openai` SDK, Anthropic Messages over raw HTTP, scripted tool
calls, embeddings, `/v1/models/{id}` and request recording; all over real sockets."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from proxy.tools.sim import expected_content
from tests.conftest import sim_client, sim_running
from tests.conftest import sim_stats as stats
from tests.servers import Server

pytestmark = pytest.mark.e2e

BASELINE: dict[str, Any] = {
    "hardCap": None,
    "limit": None,
    "outsideLoad": 0,
    "usageLagMs": 0,
    "retryAfterS": 1,
    "tokens": 4,
    "tokenDelayMs": 1,
    "faults": {},
    "toolScript": [],
    "record": 20,
}
TEXT = expected_content(4)
SHELL = {"name": "shell", "arguments": {"command": ["echo", "hi"]}}
READ = {"name": "read_file", "arguments": {"path": "README.md"}}


def script(*steps: dict[str, Any]) -> dict[str, str]:
    """The `X-Sim-Tool-Script` header for `steps`."""
    return {"X-Sim-Tool-Script": json.dumps(list(steps))}


@pytest.fixture(scope="module")
def sim_server() -> Iterator[Server]:
    with sim_running("--tokens", "4", "--token-delay-ms", "1", "--record", "20") as server:
        yield server


@pytest.fixture
def http(sim_server: Server) -> Iterator[httpx.Client]:
    """A raw client on the sim, with the baseline config, zeroed stats and no recording
    left from an earlier test."""
    with sim_client(sim_server, BASELINE) as client:
        yield client


@pytest.fixture
def sdk(http: httpx.Client, sim_server: Server) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=sim_server.url + "/v1", api_key="sk-test", max_retries=0)
    yield client
    client.close()


def sse(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """The (event name, data) pairs of an event stream whose events are all named."""
    events = []
    for block in response.text.split("\n\n"):
        if not block:
            continue
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: "), block
        assert data_line.startswith("data: "), block
        events.append((name_line[7:], json.loads(data_line[6:])))
    return events


# --- Responses -------------------------------------------------------------------------------


def test_responses_json(sdk: openai.OpenAI, http: httpx.Client) -> None:
    response = sdk.responses.create(model="gpt-test", input="hello there", instructions="be brief")
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == "completed"
    assert response.model == "gpt-test"
    assert response.output_text == TEXT
    [item] = response.output
    assert item.type == "message"
    assert item.id.startswith("msg_")
    assert item.role == "assistant"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (4, 4)
    assert response.usage.total_tokens == 8
    assert stats(http)["completed"] == 1


def test_responses_stream_event_sequence(sdk: openai.OpenAI, http: httpx.Client) -> None:
    events = list(sdk.responses.create(model="sim-1", input="hi", stream=True))
    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 4,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    created, completed = events[0], events[-1]
    assert created.type == "response.created"
    assert completed.type == "response.completed"
    assert created.response.id == completed.response.id
    assert created.response.status == "in_progress"
    assert created.response.output == []
    assert completed.response.status == "completed"
    assert completed.response.output_text == TEXT
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    assert "".join(event.delta for event in deltas) == TEXT
    item_id = completed.response.output[0].id
    assert {event.item_id for event in deltas} == {item_id}
    assert stats(http)["completed"] == 1


def test_responses_stream_on_the_wire_names_each_event(http: httpx.Client) -> None:
    body = {"model": "sim-1", "input": "hi", "stream": True}
    response = http.post("/v1/responses", json=body, headers={"X-Sim-Tokens": "2"})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response)
    assert all(name == data["type"] for name, data in events)
    assert "[DONE]" not in response.text  # the Responses API sends none
    assert events[-1][1]["response"]["usage"]["output_tokens"] == 2


def test_responses_tool_call_json_then_text(sdk: openai.OpenAI) -> None:
    first = sdk.responses.create(model="sim-1", input="list files", extra_headers=script(SHELL))
    [call] = first.output
    assert call.type == "function_call"
    assert (call.id or "").startswith("fc_")
    assert call.call_id.startswith("call_")
    assert call.name == "shell"
    assert json.loads(call.arguments) == SHELL["arguments"]
    assert first.output_text == ""

    tool_round = [
        {"role": "user", "content": "list files"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": "{}"},
        {"type": "function_call_output", "call_id": call.call_id, "output": "hi"},
    ]
    second = sdk.responses.create(model="sim-1", input=tool_round, extra_headers=script(SHELL))  # type: ignore[arg-type]
    assert second.output_text == TEXT


def test_responses_tool_call_stream(sdk: openai.OpenAI) -> None:
    with sdk.responses.stream(model="sim-1", input="go", extra_headers=script(SHELL)) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [event.type for event in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) == 4  # the arguments in `tokens` pieces
    assert json.loads("".join(deltas)) == SHELL["arguments"]
    [call] = final.output
    assert call.type == "function_call"
    assert json.loads(call.arguments) == SHELL["arguments"]


# --- scripted tool calls ---------------------------------------------------------------------


def test_the_script_follows_the_tool_results_since_the_last_prompt(http: httpx.Client) -> None:
    def answer(items: list[dict[str, Any]]) -> str:
        body = {"model": "sim-1", "input": items}
        response = http.post("/v1/responses", json=body, headers=script(SHELL, READ)).json()
        item = response["output"][0]
        return str(item["name"] if item["type"] == "function_call" else "text")

    def result(number: int) -> list[dict[str, Any]]:
        call = {"type": "function_call", "call_id": f"c{number}", "name": "x", "arguments": "{}"}
        return [call, {"type": "function_call_output", "call_id": f"c{number}", "output": ""}]

    prompt = [{"role": "user", "content": [{"type": "input_text", "text": "go"}]}]
    assert answer(prompt) == "shell"
    assert answer(prompt + result(1)) == "read_file"
    assert answer(prompt + result(1) + result(2)) == "text"
    # A new prompt turn starts the script again; a developer message does not.
    again = prompt + result(1) + result(2) + prompt
    assert answer(again) == "shell"
    developer = [{"type": "message", "role": "developer", "content": "note"}]
    assert answer(prompt + result(1) + developer) == "read_file"


def test_the_script_from_the_config_and_the_header_that_overrides_it(
    sdk: openai.OpenAI, http: httpx.Client
) -> None:
    config = http.post("/sim/config", json={"toolScript": [READ]}).json()
    assert config["toolScript"] == [READ]
    assert http.get("/sim/config").json()["toolScript"] == [READ]
    assert sdk.responses.create(model="sim-1", input="go").output[0].type == "function_call"
    no_tools = sdk.responses.create(model="sim-1", input="go", extra_headers=script())
    assert no_tools.output_text == TEXT


@pytest.mark.parametrize(
    ("script_value", "message"),
    [
        ({"name": "x"}, "toolScript must be a list"),
        ([{"arguments": {}}], "toolScript[0].name must be a non-empty string"),
        ([{"name": "x", "arguments": "ls"}], "toolScript[0].arguments must be an object"),
        ([{"name": "x", "args": {}}], "toolScript[0]: unknown key 'args'"),
    ],
)
def test_a_bad_script_is_refused_and_names_the_key(
    http: httpx.Client, script_value: object, message: str
) -> None:
    response = http.post("/sim/config", json={"toolScript": script_value})
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert "toolScript" not in http.get("/sim/config").json()


def test_a_bad_script_header_is_a_400(http: httpx.Client) -> None:
    body = {"model": "sim-1", "input": "go"}
    response = http.post("/v1/responses", json=body, headers={"X-Sim-Tool-Script": "[{"})
    assert response.status_code == 400
    assert "X-Sim-Tool-Script" in response.json()["error"]["message"]


# --- Chat Completions tool calls -------------------------------------------------------------


def test_chat_tool_call_json_then_text(sdk: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "list files"}]
    first = sdk.chat.completions.create(
        model="sim-1", messages=messages, extra_headers=script(SHELL)
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "shell"
    assert json.loads(call.function.arguments) == SHELL["arguments"]

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "hi"},
    ]
    second = sdk.chat.completions.create(
        model="sim-1", messages=messages, extra_headers=script(SHELL)
    )
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == TEXT


def test_chat_tool_call_stream(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="sim-1",
        messages=[{"role": "user", "content": "go"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=script(READ),
    )
    chunks = list(stream)
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    first = (deltas[0].tool_calls or [])[0]
    assert (deltas[0].role, first.index, first.type) == ("assistant", 0, "function")
    assert first.function is not None
    assert first.function.name == "read_file"
    arguments = "".join(
        call.function.arguments or ""
        for delta in deltas
        for call in delta.tool_calls or []
        if call.function is not None
    )
    assert json.loads(arguments) == READ["arguments"]
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] == "tool_calls"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


# --- Anthropic Messages ----------------------------------------------------------------------

MESSAGES = {"model": "claude-test", "max_tokens": 100, "system": "be brief"}


def test_messages_json(http: httpx.Client) -> None:
    body = {**MESSAGES, "messages": [{"role": "user", "content": "hello there"}]}
    message = http.post("/v1/messages", json=body).json()
    assert message["id"].startswith("msg_")
    assert (message["type"], message["role"], message["model"]) == (
        "message",
        "assistant",
        "claude-test",
    )
    assert message["content"] == [{"type": "text", "text": TEXT}]
    assert message["stop_reason"] == "end_turn"
    assert message["usage"] == {"input_tokens": 4, "output_tokens": 4}


def test_messages_stream(http: httpx.Client) -> None:
    body = {**MESSAGES, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    response = http.post("/v1/messages", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response)
    assert all(name == data["type"] for name, data in events)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["content"] == []
    assert start["stop_reason"] is None
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert {delta["type"] for delta in deltas} == {"text_delta"}
    assert "".join(delta["text"] for delta in deltas) == TEXT
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    assert events[-2][1]["usage"] == {"output_tokens": 4}


def test_messages_tool_use_then_text(http: httpx.Client) -> None:
    prompt = {"role": "user", "content": [{"type": "text", "text": "list files"}]}
    body = {**MESSAGES, "messages": [prompt]}
    first = http.post("/v1/messages", json=body, headers=script(SHELL)).json()
    assert first["stop_reason"] == "tool_use"
    [block] = first["content"]
    assert block["type"] == "tool_use"
    assert block["id"].startswith("toolu_")
    assert (block["name"], block["input"]) == ("shell", SHELL["arguments"])

    result = {"type": "tool_result", "tool_use_id": block["id"], "content": "hi"}
    body["messages"] = [
        prompt,
        {"role": "assistant", "content": first["content"]},
        {"role": "user", "content": [result]},
    ]
    second = http.post("/v1/messages", json=body, headers=script(SHELL)).json()
    assert second["stop_reason"] == "end_turn"
    assert second["content"] == [{"type": "text", "text": TEXT}]


def test_messages_tool_use_stream(http: httpx.Client) -> None:
    body = {**MESSAGES, "stream": True, "messages": [{"role": "user", "content": "go"}]}
    events = sse(http.post("/v1/messages", json=body, headers=script(READ)))
    block = events[1][1]["content_block"]
    assert (block["type"], block["name"], block["input"]) == ("tool_use", "read_file", {})
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert {delta["type"] for delta in deltas} == {"input_json_delta"}
    assert json.loads("".join(delta["partial_json"] for delta in deltas)) == READ["arguments"]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_messages_errors_are_in_anthropics_shape(http: httpx.Client) -> None:
    body = {**MESSAGES, "messages": [{"role": "user", "content": "hi"}]}
    limited = http.post("/v1/messages", json=body, headers={"X-Sim-Fault": "rate-limit"})
    assert limited.status_code == 429
    assert "retry-after" in limited.headers
    assert limited.json() == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "simulated rate limit"},
    }
    failed = http.post("/v1/messages", json=body, headers={"X-Sim-Fault": "status:500"})
    assert failed.json()["error"]["type"] == "api_error"


# --- the shared knobs ------------------------------------------------------------------------


def test_the_hard_cap_and_the_token_headers_apply_to_every_dialect(
    sdk: openai.OpenAI, http: httpx.Client
) -> None:
    short = sdk.responses.create(model="sim-1", input="hi", extra_headers={"X-Sim-Tokens": "2"})
    assert short.output_text == expected_content(2)
    http.post("/sim/config", json={"hardCap": 0}).raise_for_status()
    with pytest.raises(openai.RateLimitError):
        sdk.responses.create(model="sim-1", input="hi")
    body = {**MESSAGES, "messages": [{"role": "user", "content": "hi"}]}
    refused = http.post("/v1/messages", json=body)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    counters = stats(http)
    assert (counters["requests"], counters["rateLimited"], counters["completed"]) == (3, 2, 1)


def test_a_cut_responses_stream_stops_after_its_opening_and_half_the_tokens(
    http: httpx.Client,
) -> None:
    body = {"model": "sim-1", "input": "hi", "stream": True}
    received: list[bytes] = []
    headers = {"X-Sim-Fault": "cut-mid-stream"}
    with http.stream("POST", "/v1/responses", json=body, headers=headers) as response:
        assert response.status_code == 200
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            received.extend(response.iter_raw())
    raw = b"".join(received)
    assert b"response.created" in raw
    assert raw.count(b"event: response.output_text.delta\n") == 2
    assert b"response.completed" not in raw


# --- embeddings, models, recording, startup --------------------------------------------------


def test_embeddings_are_deterministic_unit_vectors(sdk: openai.OpenAI) -> None:
    # The SDK asks for base64 unless told otherwise and decodes it itself.
    first = sdk.embeddings.create(model="emb-test", input=["alpha", "beta"])
    assert first.model == "emb-test"
    assert [item.index for item in first.data] == [0, 1]
    alpha, beta = (item.embedding for item in first.data)
    assert len(alpha) == 16
    assert math.isclose(math.fsum(x * x for x in alpha), 1.0, rel_tol=1e-5)
    assert alpha != beta
    again = sdk.embeddings.create(model="emb-test", input="alpha", encoding_format="float")
    assert again.data[0].embedding == pytest.approx(alpha, rel=1e-6)
    assert first.usage.prompt_tokens == 2
    short = sdk.embeddings.create(model="emb-test", input="alpha", dimensions=8)
    assert len(short.data[0].embedding) == 8


def test_embeddings_refuse_a_bad_request(http: httpx.Client) -> None:
    response = http.post("/v1/embeddings", json={"model": "e", "input": "x", "dimensions": 0})
    assert response.status_code == 400
    assert "dimensions must be an integer from 1 to 4096" in response.json()["error"]["message"]
    assert http.post("/v1/embeddings", json={"model": "e"}).status_code == 400


def test_models_by_id(sdk: openai.OpenAI) -> None:
    model = sdk.models.retrieve("gpt-anything")
    assert (model.id, model.object, model.owned_by) == ("gpt-anything", "model", "sluice-sim")
    assert [m.id for m in sdk.models.list()] == ["sim-1"]


def test_recorded_requests_keep_bodies_and_hide_credentials(
    sdk: openai.OpenAI, http: httpx.Client
) -> None:
    sdk.responses.create(model="sim-1", input="first")
    http.post("/v1/messages", json={**MESSAGES, "messages": []}, headers={"x-api-key": "secret"})
    http.get("/sim/stats")  # not under /v1: not recorded
    recorded = http.get("/sim/requests").json()["requests"]
    assert [(r["method"], r["path"]) for r in recorded] == [
        ("POST", "/v1/responses"),
        ("POST", "/v1/messages"),
    ]
    assert recorded[0]["body"] == {"model": "sim-1", "input": "first"}
    assert recorded[0]["headers"]["authorization"] == "Bearer <redacted>"
    assert recorded[1]["headers"]["x-api-key"] == "<redacted>"
    assert "sk-test" not in json.dumps(recorded)
    assert "secret" not in json.dumps(recorded)

    http.post("/sim/config", json={"record": 1}).raise_for_status()
    assert [r["path"] for r in http.get("/sim/requests").json()["requests"]] == ["/v1/messages"]
    http.post("/sim/reset").raise_for_status()
    assert http.get("/sim/requests").json() == {"requests": []}
    http.post("/sim/config", json={"record": 0}).raise_for_status()
    sdk.responses.create(model="sim-1", input="unseen")
    assert http.get("/sim/requests").json() == {"requests": []}


def test_startup_prints_where_it_listens(sim_server: Server) -> None:
    lines = [line for line in sim_server.log().splitlines() if "listening on" in line]
    assert lines == [f"sluice sim listening on http://127.0.0.1:{sim_server.port}"]
