"""`sluice sim`: a simulated OpenAI-compatible upstream for the demo, the tests and the benchmarks.

It streams deterministic tokens ("tok0 tok1 ..."), enforces a hard concurrency cap with
429 + Retry-After, reports its in-flight count on `/v1/usage` as a provider's accounting
would (late by `usage_lag_ms`), and records the highest true concurrency it has seen.

It speaks the dialects real agents speak, each streamed or not (`"stream": true`), all
through one path (`SimApp._complete` and `_Plan`), so the knobs below (tokens, token
delay, hard cap, faults, usage lag) apply to every one alike:

    POST /v1/chat/completions   Chat Completions (`data:` chunks, then `[DONE]`)
    POST /v1/completions        legacy Completions
    POST /v1/responses          the Responses API: `resp_`/`msg_`/`fc_` ids, the event
                                sequence response.created ... response.completed, each
                                with `event:` and `sequence_number`; no `[DONE]`
    POST /v1/messages           Anthropic Messages: message_start ... message_stop with
                                `event:` lines; errors in Anthropic's shape

Tool calls, scripted, so an agent's tool loop runs against the sim. The script is a
list of `{"name": ..., "arguments": {...}}` (`--tool-script`, `toolScript` in
`POST /sim/config`, or per request the `X-Sim-Tool-Script` header, where `[]` turns it
off). The sim counts the tool results after the last prompt turn (user message) of
the request: Chat `tool` messages, Responses `*_call_output` items, Messages
`tool_result` blocks (a user message carrying one is not a prompt turn). While that
count N is below the script's length the answer is script[N] as a tool call in the
dialect's shape: Chat `tool_calls` with `finish_reason: "tool_calls"` (streamed as
`tool_calls` deltas), a Responses `function_call` item with `call_id` and `arguments`
text (streamed as `response.function_call_arguments.delta`), a Messages `tool_use`
block with `stop_reason: "tool_use"` (streamed as `input_json_delta`). The arguments'
JSON text is sent in `tokens` pieces (at most one per character). Then it answers
with text. Legacy Completions never call tools.

Other routes: `POST /v1/embeddings` (deterministic unit vectors from SHA-256 of each
input, 16 long unless `dimensions`, floats or base64), `GET /v1/models` (one model,
`sim-1`) and `GET /v1/models/{id}` (any id: completions accept any model name),
`GET /v1/usage`, `ANY /v1/echo...` (what arrived), `GET /healthz`; for tests
`GET /sim/stats`, `POST /sim/reset` (counters and recorded requests),
`GET|POST /sim/config` (the live keys: hardCap, limit, outsideLoad, usageLagMs,
retryAfterS, tokens, tokenDelayMs, faults, stallS, usageFault, seed, toolScript,
record) and `GET /sim/requests`: with `--record N` (or `record`) the last N requests
to `/v1/*`, oldest first, with their headers (credential values redacted) and bodies,
so a test can see what an agent sends. Per-request headers: `X-Sim-Tokens`,
`X-Sim-Token-Delay-Ms`, `X-Sim-Fault`, `X-Sim-Tool-Script`.

It is raw ASGI rather than Starlette because a benchmark must measure the proxy, not the
sim: one dict lookup routes a request and a streamed token costs one `%`-format and one
`send`.

Faults, for chaos tests and soak runs. A completion request can be made to fail on
purpose, either by its `X-Sim-Fault` header or at random (`--fault-rate`, or `faults`
in `POST /sim/config`; `--seed` makes the draws reproducible):

    reset-before-headers   the TCP connection is reset (RST) before any byte of a response
    cut-mid-stream         half the tokens (or half the JSON body), then a reset
    stall[:<s>]            nothing for `s` seconds (default `stallS`), then the normal answer
    status:500|502|503     that status with an OpenAI-style error body
    rate-limit             429 with Retry-After, whatever the load
    malformed-sse          200 and an event stream that breaks SSE and JSON (`MALFORMED_SSE`)
    none                   no fault for this request, whatever the random rates

The random rates are keyed by the short names `reset`, `cut`, `stall`, `500`, `502`,
`503`, `429`, `malformed` (each also accepted in the header). A request over the hard
cap gets its 429 before any fault is considered. `GET /v1/usage` has its own fault
(`usageFault`): `flap` (garbage and good answers in turn), `garbage` (a rotation of
bodies that are not a usable count), `status` (503), `slow:<s>` (a good answer `s`
seconds late), `nested` (JSON nested 50,000 deep). Every injected fault is counted in
`/sim/stats` (`faultsInjected` and per kind in `faults`).

How a reset is made: uvicorn puts no transport in the ASGI scope, but the `send` it
hands the app is a bound method of its per-request cycle object, which holds the
connection's transport. The sim takes the transport from there, sets SO_LINGER to 0
and aborts it, so the kernel sends a RST: the client sees "connection reset", not a
500 (what raising before `http.response.start` gives) nor a clean FIN. Under an ASGI
server without that attribute the sim raises `SimulatedReset` instead, which closes
the connection the server's own way.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import signal
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]
Clock = Callable[[], float]

MODEL_ID = "sim-1"
"""The one model `/v1/models` lists; any model name is accepted on completions."""

_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"


def token(index: int) -> str:
    """The text of token `index`; a response of n tokens is `expected_content(n)`."""
    return f"tok{index} "


def expected_content(tokens: int) -> str:
    """What a client must receive, in full, from a response of `tokens` tokens."""
    return "".join(token(i) for i in range(tokens))


# --- configuration -------------------------------------------------------------------------


FAULT_KINDS = ("reset", "cut", "stall", "500", "502", "503", "429", "malformed")
"""The completion faults, by the names `--fault-rate`, `faults` and `/sim/stats` use."""

_FAULT_NAMES = {
    **{kind: kind for kind in FAULT_KINDS},
    "reset-before-headers": "reset",
    "cut-mid-stream": "cut",
    "status:500": "500",
    "status:502": "502",
    "status:503": "503",
    "rate-limit": "429",
    "malformed-sse": "malformed",
}
_NO_FAULT = "none"

USAGE_FAULTS = ("none", "flap", "garbage", "status", "slow:<s>", "nested")
"""The `/v1/usage` fault modes (`usageFault`)."""

MALFORMED_SSE = (
    b'data: {"id":"chatcmpl-sim-bad","object":"chat.completion.chunk",'
    b'"choices":[{"index":0,"delta":{"content":"tok0 "},"finish_reason":null}]}\n\n',
    b'data: {"id":"chatcmpl-sim-bad","choices":[{"delta":\n\n',
    b"data: \xff\xfe not utf-8\n\n",
    b"event: nonsense\nretry: soon\nid\n\n",
    b'data: {"choices": []}',
)
"""The body pieces of a `malformed-sse` stream, sent in this order: one good event, a
truncated JSON object, bytes that are not UTF-8, lines that are not `data:`, and a last
event without its blank line. No `[DONE]`."""

MALFORMED_JSON = b'{"id":"chatcmpl-sim-bad","object":"chat.completion","choices":[{"mess'
"""The body of a non-streamed `malformed-sse` answer: truncated JSON, status 200."""

_GARBAGE_USAGE = (
    b"<html><body>502 Bad Gateway</body></html>",
    b'{"usage": {"concurrent_sessions": "three"}}',
    b'{"usage": {"concurrent_sessions": -2}}',
    b'{"usage": null}',
    b"[]",
    b'{"usage": {"concurrent_sessions": 1e999}}',
    b'{"usage": {"concurrent_sessions": NaN}}',
    b'{"usage": {"concurrent_sessions": true}}',
    b"",
    b'{"usage": {"concurrent_sessions": 1',
)
_NESTED_DEPTH = 50_000


@dataclass
class SimConfig:
    """How the sim behaves; the fields after `port` can be changed live by `POST /sim/config`
    (`seed` there re-seeds the fault draws)."""

    host: str = "127.0.0.1"
    port: int = 8081
    tokens: int = 16
    token_delay_ms: int = 20
    hard_cap: int | None = None
    limit: int | None = None
    usage_lag_ms: int = 0
    retry_after_s: int = 1
    outside_load: int = 0
    log_level: str = "warning"
    faults: dict[str, float] = field(default_factory=dict)
    stall_s: float = 5.0
    usage_fault: str = _NO_FAULT
    seed: int | None = None
    tool_script: list[dict[str, Any]] = field(default_factory=list)
    record: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SimConfig:
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})

    @property
    def reported_limit(self) -> int | None:
        """The limit `/v1/usage` reports: `limit` if set, else the hard cap."""
        return self.hard_cap if self.limit is None else self.limit

    def to_json(self) -> dict[str, Any]:
        """The live-settable fields, keyed as `POST /sim/config` takes them.

        The fault, tool-script and recording keys appear only when they differ from their
        defaults, so the config of a sim without them reads exactly as it did before they
        existed.
        """
        body = {key: getattr(self, name) for key, (name, _) in _LIVE_KEYS.items()}
        defaults = _QUIET_DEFAULTS
        return {
            key: value
            for key, value in body.items()
            if key not in defaults or value != defaults[key]
        }

    def updated(self, body: object) -> SimConfig:
        """A copy with `body`'s keys applied; ValueError names the first bad key.

        All keys are checked before any is applied, so a bad body changes nothing.
        """
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        changes: dict[str, Any] = {}
        for key, value in body.items():
            entry = _LIVE_KEYS.get(key)
            if entry is None:
                raise ValueError(f"unknown key {key!r}; valid keys: {', '.join(_LIVE_KEYS)}")
            name, parse = entry
            changes[name] = parse(key, value)
        return dataclasses.replace(self, **changes)


def _count(key: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"{key} must be an integer >= 0, got {json.dumps(value)}")


def _count_or_null(key: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"{key} must be an integer >= 0 or null, got {json.dumps(value)}")


def _seconds(key: str, value: object) -> float:
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    ):
        return float(value)
    raise ValueError(f"{key} must be a number of seconds >= 0, got {json.dumps(value)}")


def tool_script(key: str, value: object) -> list[dict[str, Any]]:
    """`[{"name": "exec_command", "arguments": {"cmd": "echo hi"}}, ...]`: the tool calls to
    answer with, in order; `arguments` (an object) defaults to `{}`."""
    if not isinstance(value, list):
        raise ValueError(f'{key} must be a list like [{{"name": "shell", "arguments": {{}}}}]')
    script = []
    for index, step in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(step, dict):
            raise ValueError(f"{where} must be an object with a name and arguments")
        unknown = set(step) - {"name", "arguments"}
        if unknown:
            raise ValueError(
                f"{where}: unknown key {sorted(unknown)[0]!r}; valid keys: name, arguments"
            )
        name, arguments = step.get("name"), step.get("arguments", {})
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.name must be a non-empty string, got {json.dumps(name)}")
        if not isinstance(arguments, dict):
            raise ValueError(f"{where}.arguments must be an object, got {json.dumps(arguments)}")
        script.append({"name": name, "arguments": arguments})
    return script


def _seed(key: str, value: object) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError(f"{key} must be an integer or null, got {json.dumps(value)}")


def fault_rates(key: str, value: object) -> dict[str, float]:
    """`{"cut": 0.05, ...}`: each kind of `FAULT_KINDS` at most once, each rate in
    [0, 1], the rates summing to at most 1 (one draw picks at most one fault)."""
    if not isinstance(value, dict):
        raise ValueError(f'{key} must be an object like {{"cut": 0.05}}')
    rates: dict[str, float] = {}
    for kind, rate in value.items():
        if kind not in FAULT_KINDS:
            raise ValueError(
                f"{key}: unknown fault {kind!r}; valid faults: {', '.join(FAULT_KINDS)}"
            )
        if (
            isinstance(rate, bool)
            or not isinstance(rate, int | float)
            or not 0 <= rate <= 1  # also refuses NaN
        ):
            raise ValueError(f"{key}.{kind} must be a rate from 0 to 1, got {json.dumps(rate)}")
        if rate:
            rates[kind] = float(rate)
    if sum(rates.values()) > 1 + 1e-9:
        raise ValueError(f"{key}: the rates add up to more than 1")
    return rates


def usage_fault(key: str, value: object) -> str:
    """One of `USAGE_FAULTS`; `slow:<s>` with a number of seconds >= 0."""
    if isinstance(value, str):
        if value in USAGE_FAULTS and value != "slow:<s>":
            return value
        if value.startswith("slow:"):
            try:
                seconds = float(value[5:])
            except ValueError:
                seconds = math.nan
            if math.isfinite(seconds) and seconds >= 0:
                return value
    raise ValueError(f"{key} must be one of {', '.join(USAGE_FAULTS)}, got {json.dumps(value)}")


_LIVE_KEYS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "hardCap": ("hard_cap", _count_or_null),
    "limit": ("limit", _count_or_null),
    "outsideLoad": ("outside_load", _count),
    "usageLagMs": ("usage_lag_ms", _count),
    "retryAfterS": ("retry_after_s", _count),
    "tokens": ("tokens", _count),
    "tokenDelayMs": ("token_delay_ms", _count),
    "faults": ("faults", fault_rates),
    "stallS": ("stall_s", _seconds),
    "usageFault": ("usage_fault", usage_fault),
    "seed": ("seed", _seed),
    "toolScript": ("tool_script", tool_script),
    "record": ("record", _count),
}
_QUIET_DEFAULTS: dict[str, Any] = {
    "faults": {},
    "stallS": SimConfig.stall_s,
    "usageFault": SimConfig.usage_fault,
    "seed": SimConfig.seed,
    "toolScript": [],
    "record": SimConfig.record,
}


@dataclass(slots=True)
class SimStats:
    """Counters behind `GET /sim/stats`.

    `requests` counts the completion endpoints (chat, completions, responses, messages),
    refused ones included; `max_in_flight` is the true concurrency and excludes the
    outside load. `rate_limited` counts the hard cap's 429s only; injected ones are in
    `faults["429"]`. A request cut by a fault is neither `completed` nor `disconnected`.
    """

    in_flight: int = 0
    max_in_flight: int = 0
    requests: int = 0
    completed: int = 0
    disconnected: int = 0
    rate_limited: int = 0
    usage_polls: int = 0
    faults: dict[str, int] = field(default_factory=dict)

    @property
    def faults_injected(self) -> int:
        return sum(self.faults.values())

    def to_json(self) -> dict[str, Any]:
        """The counters; `faultsInjected` and `faults` (per kind) only once a fault has
        been injected, so the stats of a sim without faults read as they always did."""
        body: dict[str, Any] = {
            "inFlight": self.in_flight,
            "maxInFlight": self.max_in_flight,
            "requests": self.requests,
            "completed": self.completed,
            "disconnected": self.disconnected,
            "rateLimited": self.rate_limited,
            "usagePolls": self.usage_polls,
        }
        if self.faults:
            body["faultsInjected"] = self.faults_injected
            body["faults"] = dict(self.faults)
        return body


_CREDENTIAL_HEADERS = frozenset(
    {b"authorization", b"x-api-key", b"api-key", b"proxy-authorization", b"cookie"}
)


class _Recorded:
    """One request to `/v1/*` as `GET /sim/requests` shows it. Credential headers keep
    their scheme word only (`Bearer <redacted>`), so a recording can be saved as it is."""

    __slots__ = ("body", "headers", "method", "path", "query", "time")

    def __init__(self, scope: Scope) -> None:
        self.time = time.time()
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query: str = scope["query_string"].decode("latin-1")
        self.headers: list[tuple[bytes, bytes]] = list(scope["headers"])
        self.body: list[bytes] = []

    def to_json(self) -> dict[str, Any]:
        """`headers` as an object (repeated names joined by ", "), `body` as JSON when it
        parses, else as text (null when empty)."""
        headers: dict[str, str] = {}
        for raw_name, raw_value in self.headers:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            if raw_name.lower() in _CREDENTIAL_HEADERS:
                scheme, _, secret = value.partition(" ")
                value = f"{scheme} <redacted>" if secret else "<redacted>"
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        raw = b"".join(self.body)
        body: object = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", errors="replace")
        return {
            "time": self.time,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": headers,
            "body": body,
        }


class LaggedCount:
    """A count as seen `lag_s` late, the way a provider's usage accounting trails reality.

    Keeps `(time, count)` for every change inside the lag window and drops older ones,
    so memory is bounded by the changes in one window. After `lag_s` is raised, the
    oldest remembered count stands in until the history covers the new window.
    """

    def __init__(self, clock: Clock, lag_s: float = 0.0, initial: int = 0) -> None:
        self.lag_s = lag_s
        self._clock = clock
        self._history: deque[tuple[float, int]] = deque([(clock(), initial)])

    def record(self, count: int) -> None:
        """The true count changed to `count` now."""
        now = self._clock()
        self._history.append((now, count))
        self._prune(now)

    def value(self) -> int:
        """The count as it was `lag_s` ago."""
        self._prune(self._clock())
        return self._history[0][1]

    def __len__(self) -> int:
        """How many changes are remembered."""
        return len(self._history)

    def __repr__(self) -> str:
        latest = self._history[-1][1]
        return f"<LaggedCount lag_s={self.lag_s} reported={self.value()} latest={latest}>"

    def _prune(self, now: float) -> None:
        # Keep the last change at or before the cutoff: it is the value being reported.
        cutoff = now - self.lag_s
        history = self._history
        while len(history) > 1 and history[1][0] <= cutoff:
            history.popleft()


# --- response shapes -----------------------------------------------------------------------


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class _ToolCall:
    """A scripted tool call: the tool's name, its arguments, and the ids that tie the call
    to its result (`call_id`) and, in the Responses API, name its output item (`item_id`)."""

    name: str
    arguments: dict[str, Any]
    call_id: str
    item_id: str = ""

    @property
    def arguments_json(self) -> str:
        """The arguments as the JSON text Chat and Responses carry."""
        return json.dumps(self.arguments, separators=(",", ":"))

    def pieces(self, count: int) -> list[str]:
        """The arguments' JSON text in `count` nearly equal pieces, in order."""
        text = self.arguments_json
        bounds = [len(text) * i // count for i in range(count + 1)]
        return [text[start:end] for start, end in itertools.pairwise(bounds)]


@dataclass(slots=True)
class _Plan:
    """One accepted completion request: what to produce and how slowly.

    A text answer is `tokens` tokens; a tool call is its arguments' JSON text in `tokens`
    pieces (at least one, at most one per character), each after the token delay."""

    kind: str  # "chat", "text", "responses" or "messages"
    request_id: str
    created: int
    model: str
    tokens: int
    delay_s: float
    prompt_tokens: int
    include_usage: bool
    tool_call: _ToolCall | None = None
    item_id: str = ""  # Responses: the id of the message output item
    fault: str | None = None  # from X-Sim-Fault: a FAULT_KINDS name, "none", or absent
    stall_s: float | None = None  # from "stall:<s>"; None: the config's stall_s

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.tokens,
            "total_tokens": self.prompt_tokens + self.tokens,
        }


class _Events:
    """The SSE events of one streamed answer: `opening` right after the headers, then
    `token(i)` for each token after its delay, then `closing` (never empty)."""

    __slots__ = ("closing", "opening")

    def __init__(self, opening: tuple[bytes, ...], closing: tuple[bytes, ...]) -> None:
        self.opening = opening
        self.closing = closing

    def token(self, index: int) -> bytes:
        raise NotImplementedError


class _FormattedEvents(_Events):
    """Token events made by one `%`-format of a pre-encoded template: the hot path of the
    benchmarks, so a streamed token costs one format."""

    __slots__ = ("_first", "_rest", "_sequence_offset")

    def __init__(
        self,
        opening: tuple[bytes, ...],
        closing: tuple[bytes, ...],
        first: bytes,
        rest: bytes,
        sequence_offset: int | None = None,
    ) -> None:
        super().__init__(opening, closing)
        self._first = first
        self._rest = rest
        self._sequence_offset = sequence_offset  # templates with a sequence number first

    def token(self, index: int) -> bytes:
        template = self._first if index == 0 else self._rest
        if self._sequence_offset is None:
            return template % index
        return template % (index + self._sequence_offset, index)


class _ListedEvents(_Events):
    """Token events encoded up front, for tool calls (a handful of argument pieces)."""

    __slots__ = ("_tokens",)

    def __init__(
        self, opening: tuple[bytes, ...], closing: tuple[bytes, ...], tokens: list[bytes]
    ) -> None:
        super().__init__(opening, closing)
        self._tokens = tokens

    def token(self, index: int) -> bytes:
        return self._tokens[index]


def _event(obj: object) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _named_event(obj: dict[str, Any]) -> bytes:
    """An event with an `event:` line naming its `type`, as Responses and Messages send."""
    name: str = obj["type"]
    return b"event: " + name.encode() + b"\n" + _event(obj)


def _events(plan: _Plan) -> _Events:
    """The stream of `plan` in its dialect."""
    if plan.kind == "responses":
        return _responses_events(plan)
    if plan.kind == "messages":
        return _messages_events(plan)
    return _chat_events(plan)


def _whole(plan: _Plan) -> dict[str, Any]:
    """The non-streamed response object of `plan` in its dialect."""
    if plan.kind == "responses":
        return _response_object(plan, "completed", [_output_item(plan, done=True)])
    if plan.kind == "messages":
        return _message_object(plan, [_content_block(plan, done=True)], _stop_reason(plan))
    content = expected_content(plan.tokens)
    choice: dict[str, Any]
    message: dict[str, Any]
    if plan.kind == "text":
        obj = "text_completion"
        choice = {"text": content, "index": 0, "logprobs": None, "finish_reason": "stop"}
    elif plan.tool_call is None:
        obj = "chat.completion"
        message = {"role": "assistant", "content": content}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
    else:
        obj = "chat.completion"
        call = plan.tool_call
        message = {"role": "assistant", "content": None, "tool_calls": [_chat_tool_call(call)]}
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
    return {
        "id": plan.request_id,
        "object": obj,
        "created": plan.created,
        "model": plan.model,
        "choices": [choice],
        "usage": plan.usage(),
    }


# Chat Completions and legacy Completions


def _chat_tool_call(call: _ToolCall, arguments: str | None = None) -> dict[str, Any]:
    return {
        "id": call.call_id,
        "type": "function",
        "function": {
            "name": call.name,
            "arguments": call.arguments_json if arguments is None else arguments,
        },
    }


def _chat_events(plan: _Plan) -> _Events:
    if plan.kind == "chat":
        obj, choice = "chat.completion.chunk", {"index": 0, "delta": {}}
    else:
        obj, choice = "text_completion", {"text": "", "index": 0, "logprobs": None}
    envelope = {"id": plan.request_id, "object": obj, "created": plan.created, "model": plan.model}
    finish_reason = "stop" if plan.tool_call is None else "tool_calls"
    closing = [_event({**envelope, "choices": [{**choice, "finish_reason": finish_reason}]})]
    if plan.include_usage:
        closing.append(_event({**envelope, "choices": [], "usage": plan.usage()}))
    closing.append(_DONE)
    call = plan.tool_call
    if call is not None:
        tokens = []
        for index, piece in enumerate(call.pieces(plan.tokens)):
            delta: dict[str, Any]
            if index == 0:
                delta = {"role": "assistant", "content": None}
                delta["tool_calls"] = [{"index": 0, **_chat_tool_call(call, piece)}]
            else:
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
            chunk = {**choice, "delta": delta, "finish_reason": None}
            tokens.append(_event({**envelope, "choices": [chunk]}))
        return _ListedEvents((), tuple(closing), tokens)
    if plan.kind == "chat":
        first = b'"role":"assistant","content":"tok%d "},"finish_reason":null}]}\n\n'
        rest = b'"content":"tok%d "},"finish_reason":null}]}\n\n'
        head = b',"choices":[{"index":0,"delta":{'
    else:
        first = rest = b'tok%d ","index":0,"logprobs":null,"finish_reason":null}]}\n\n'
        head = b',"choices":[{"text":"'
    head = b"data: " + _dumps(envelope)[:-1] + head
    return _FormattedEvents((), tuple(closing), head + first, head + rest)


# Responses


def _response_object(
    plan: _Plan, status: str, output: list[dict[str, Any]], usage: bool = True
) -> dict[str, Any]:
    """A Responses `response` object with every key the OpenAI SDK's `Response` reads."""
    return {
        "id": plan.request_id,
        "object": "response",
        "created_at": plan.created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": plan.model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": _responses_usage(plan) if usage else None,
        "user": None,
        "metadata": {},
    }


def _responses_usage(plan: _Plan) -> dict[str, Any]:
    return {
        "input_tokens": plan.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": plan.tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": plan.prompt_tokens + plan.tokens,
    }


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _output_item(plan: _Plan, *, done: bool) -> dict[str, Any]:
    """The one output item: a `message` or a `function_call`, empty until `done`."""
    status = "completed" if done else "in_progress"
    call = plan.tool_call
    if call is None:
        content = [_output_text(expected_content(plan.tokens))] if done else []
        return {
            "type": "message",
            "id": plan.item_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }
    return {
        "type": "function_call",
        "id": call.item_id,
        "call_id": call.call_id,
        "name": call.name,
        "arguments": call.arguments_json if done else "",
        "status": status,
    }


def _responses_events(plan: _Plan) -> _Events:
    """created, in_progress, output_item.added, (content_part.added), the deltas, their
    done events, output_item.done, completed; each with its `sequence_number`."""
    call = plan.tool_call
    item = {"output_index": 0, "item_id": plan.item_id if call is None else call.item_id}
    head: list[dict[str, Any]] = [
        {"type": "response.created", "response": _response_object(plan, "in_progress", [], False)},
        {
            "type": "response.in_progress",
            "response": _response_object(plan, "in_progress", [], False),
        },
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": _output_item(plan, done=False),
        },
    ]
    tail: list[dict[str, Any]]
    if call is None:
        text_done = _output_text(expected_content(plan.tokens))
        head.append(
            {
                "type": "response.content_part.added",
                **item,
                "content_index": 0,
                "part": _output_text(""),
            }
        )
        tail = [
            {
                "type": "response.output_text.done",
                **item,
                "content_index": 0,
                "text": text_done["text"],
                "logprobs": [],
            },
            {"type": "response.content_part.done", **item, "content_index": 0, "part": text_done},
        ]
    else:
        tail = [
            {
                "type": "response.function_call_arguments.done",
                **item,
                "name": call.name,
                "arguments": call.arguments_json,
            }
        ]
    done_item = _output_item(plan, done=True)
    tail.append({"type": "response.output_item.done", "output_index": 0, "item": done_item})
    tail.append(
        {"type": "response.completed", "response": _response_object(plan, "completed", [done_item])}
    )
    after = len(head) + plan.tokens
    opening = tuple(
        _named_event({"type": event["type"], "sequence_number": number, **event})
        for number, event in enumerate(head)
    )
    closing = tuple(
        _named_event({"type": event["type"], "sequence_number": after + number, **event})
        for number, event in enumerate(tail)
    )
    if call is not None:
        tokens = [
            _named_event(
                {
                    "type": "response.function_call_arguments.delta",
                    "sequence_number": len(head) + index,
                    **item,
                    "delta": piece,
                }
            )
            for index, piece in enumerate(call.pieces(plan.tokens))
        ]
        return _ListedEvents(opening, closing, tokens)
    template = _named_event(
        {
            "type": "response.output_text.delta",
            "sequence_number": 0,
            **item,
            "content_index": 0,
            "delta": "tok0 ",
            "logprobs": [],
        }
    )
    template = template.replace(b'"sequence_number":0', b'"sequence_number":%d', 1)
    template = template.replace(b'"delta":"tok0 "', b'"delta":"tok%d "', 1)
    return _FormattedEvents(opening, closing, template, template, len(head))


# Anthropic Messages


def _stop_reason(plan: _Plan) -> str:
    return "end_turn" if plan.tool_call is None else "tool_use"


def _message_object(
    plan: _Plan, content: list[dict[str, Any]], stop_reason: str | None
) -> dict[str, Any]:
    return {
        "id": plan.request_id,
        "type": "message",
        "role": "assistant",
        "model": plan.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": plan.prompt_tokens,
            "output_tokens": plan.tokens if stop_reason else 0,
        },
    }


def _content_block(plan: _Plan, *, done: bool) -> dict[str, Any]:
    call = plan.tool_call
    if call is None:
        return {"type": "text", "text": expected_content(plan.tokens) if done else ""}
    return {
        "type": "tool_use",
        "id": call.call_id,
        "name": call.name,
        "input": call.arguments if done else {},
    }


def _messages_events(plan: _Plan) -> _Events:
    """message_start, content_block_start, the deltas, content_block_stop, message_delta
    (the stop reason and output tokens), message_stop."""
    opening = (
        _named_event({"type": "message_start", "message": _message_object(plan, [], None)}),
        _named_event(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": _content_block(plan, done=False),
            }
        ),
    )
    closing = (
        _named_event({"type": "content_block_stop", "index": 0}),
        _named_event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": _stop_reason(plan), "stop_sequence": None},
                "usage": {"output_tokens": plan.tokens},
            }
        ),
        _named_event({"type": "message_stop"}),
    )
    call = plan.tool_call
    if call is not None:
        tokens = [
            _named_event(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": piece},
                }
            )
            for piece in call.pieces(plan.tokens)
        ]
        return _ListedEvents(opening, closing, tokens)
    template = _named_event(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ""}}
    ).replace(b'"text":""', b'"text":"tok%d "', 1)
    return _FormattedEvents(opening, closing, template, template)


class _BadRequest(Exception):
    """The request cannot be served; becomes a 400 in the dialect's error shape."""

    def __init__(self, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _openai_error(message: str, type_: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code}}


def _error(kind: str, message: str, type_: str, code: str) -> dict[str, Any]:
    """An error body in the dialect of `kind`: Anthropic's for Messages (where a server
    error is an `api_error`), OpenAI's otherwise."""
    if kind == "messages":
        anthropic_type = "api_error" if type_ == "server_error" else type_
        return {"type": "error", "error": {"type": anthropic_type, "message": message}}
    return _openai_error(message, type_, code)


# --- the application -----------------------------------------------------------------------


class SimApp:
    """The simulated upstream as an ASGI application.

    Run it with `make_server`, or in-process under any ASGI server. `clock` only drives
    the `/v1/usage` lag, so tests can move time without sleeping.
    """

    def __init__(self, config: SimConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.stats = SimStats()
        self._lagged = LaggedCount(clock, config.usage_lag_ms / 1000)
        self._ids = itertools.count(1)
        self._rng = random.Random(config.seed)
        self._fault_table = _fault_table(config.faults)
        self._usage_answers = itertools.count()
        # Responses and Messages ids carry this, so they are unique across sim restarts as
        # real ones are (sluice remembers the response ids it relays).
        self._instance = os.urandom(4).hex()
        self._recorded: deque[_Recorded] | None = (
            deque(maxlen=config.record) if config.record else None
        )
        self._healthz = _dumps({"status": "ok"})
        self._created = int(time.time())
        self._models = _dumps({"object": "list", "data": [self._model(MODEL_ID)]})
        self._routes: dict[tuple[str, str], Handler] = {
            ("GET", "/healthz"): self._handle_healthz,
            ("POST", "/v1/chat/completions"): self._handle_chat,
            ("POST", "/v1/completions"): self._handle_text,
            ("POST", "/v1/responses"): self._handle_responses,
            ("POST", "/v1/messages"): self._handle_messages,
            ("POST", "/v1/embeddings"): self._handle_embeddings,
            ("GET", "/v1/models"): self._handle_models,
            ("GET", "/v1/usage"): self._handle_usage,
            ("GET", "/sim/stats"): self._handle_stats,
            ("POST", "/sim/reset"): self._handle_reset,
            ("GET", "/sim/config"): self._handle_get_config,
            ("POST", "/sim/config"): self._handle_set_config,
            ("GET", "/sim/requests"): self._handle_requests,
        }

    def __repr__(self) -> str:
        return f"<SimApp {self.config} {self.stats}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan(receive, send)
            return
        path: str = scope["path"]
        handler = self._routes.get((scope["method"], path))
        if handler is None:
            if path == "/v1/echo" or path.startswith("/v1/echo/"):
                handler = self._handle_echo
            elif scope["method"] == "GET" and path.startswith("/v1/models/"):
                handler = self._handle_model
            else:
                handler = self._handle_not_found
        if self._recorded is not None and path.startswith("/v1/"):
            receive = self._record(scope, receive, self._recorded)
        await handler(scope, receive, send)

    def usage(self) -> dict[str, Any]:
        """The `/v1/usage` answer: lagged in-flight count plus the outside load."""
        config = self.config
        return {
            "usage": {"concurrent_sessions": self._lagged.value() + config.outside_load},
            "limits": {
                "concurrency": {"limit": config.reported_limit, "hard_cap": config.hard_cap}
            },
        }

    def reconfigure(self, config: SimConfig, *, reseed: bool = False) -> None:
        """Swap in a new config; requests already accepted keep their own tokens and delay.
        `reseed` restarts the fault draws from `config.seed`."""
        self.config = config
        self._lagged.lag_s = config.usage_lag_ms / 1000
        self._fault_table = _fault_table(config.faults)
        if reseed:
            self._rng.seed(config.seed)
        recording = self._recorded.maxlen if self._recorded is not None else 0
        if config.record != recording:  # keep the newest of what is recorded already
            kept = self._recorded or ()
            self._recorded = deque(kept, maxlen=config.record) if config.record else None

    def reset(self) -> None:
        """Zero the counters and forget the recorded requests; the requests still in
        flight stay counted."""
        self.stats = SimStats(in_flight=self.stats.in_flight, max_in_flight=self.stats.in_flight)
        if self._recorded is not None:
            self._recorded.clear()

    def recorded(self) -> list[dict[str, Any]]:
        """The last `record` requests to `/v1/*`, oldest first (see `GET /sim/requests`)."""
        return [entry.to_json() for entry in self._recorded or ()]

    def _record(self, scope: Scope, receive: Receive, into: deque[_Recorded]) -> Receive:
        """Note the request in `into` and return a `receive` that keeps its body there."""
        entry = _Recorded(scope)
        into.append(entry)

        async def receive_and_keep() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                entry.body.append(message.get("body", b""))
            return message

        return receive_and_keep

    def _model(self, model_id: str) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": self._created,
            "owned_by": "sluice-sim",
        }

    # --- small routes ---

    async def _handle_healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_body(send, 200, self._healthz)

    async def _handle_models(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_body(send, 200, self._models)

    async def _handle_model(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`GET /v1/models/{id}`: every id is served, as completions accept any model."""
        await _send_json(send, 200, self._model(scope["path"].removeprefix("/v1/models/")))

    async def _handle_requests(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, {"requests": self.recorded()})

    async def _handle_embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        try:
            answer = _embeddings(body)
        except _BadRequest as exc:
            error = _openai_error(exc.message, "invalid_request_error", exc.code)
            await _send_json(send, 400, error)
            return
        await _send_json(send, 200, answer)

    async def _handle_usage(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.stats.usage_polls += 1
        if self.config.usage_fault == _NO_FAULT:
            await _send_json(send, 200, self.usage())
        else:
            await self._usage_fault(self.config.usage_fault, send)

    async def _handle_stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, self.stats.to_json())

    async def _handle_reset(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.reset()
        await _send_json(send, 200, self.stats.to_json())

    async def _handle_get_config(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, self.config.to_json())

    async def _handle_set_config(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        try:
            changes = json.loads(body or b"{}")
            config = self.config.updated(changes)
        except (ValueError, RecursionError) as exc:  # json.JSONDecodeError is a ValueError
            await _send_json(send, 400, {"error": str(exc)})
            return
        self.reconfigure(config, reseed="seed" in changes)
        await _send_json(send, 200, config.to_json())

    async def _handle_echo(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        echo = {
            "method": scope["method"],
            "path": scope["path"],
            "query": scope["query_string"].decode("latin-1"),
            "headers": [
                [name.decode("latin-1"), value.decode("latin-1")]
                for name, value in scope["headers"]
            ],
            "body": body.decode("utf-8", errors="replace"),
        }
        await _send_json(send, 200, echo)

    async def _handle_not_found(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"no route for {scope['method']} {scope['path']}"
        await _send_json(send, 404, _openai_error(message, "invalid_request_error", "not_found"))

    # --- completions ---

    async def _handle_chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._complete("chat", scope, receive, send)

    async def _handle_text(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._complete("text", scope, receive, send)

    async def _handle_responses(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._complete("responses", scope, receive, send)

    async def _handle_messages(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._complete("messages", scope, receive, send)

    async def _complete(self, kind: str, scope: Scope, receive: Receive, send: Send) -> None:
        """Admit or refuse a completion request, then produce it while watching the client."""
        self.stats.requests += 1
        body = await _read_body(receive)
        if body is None:
            return
        try:
            plan, stream = self._plan(kind, scope, body)
        except _BadRequest as exc:
            error = _error(kind, exc.message, "invalid_request_error", exc.code)
            await _send_json(send, 400, error)
            return
        if self._over_cap():
            await self._refuse(send, kind)
            return
        fault = plan.fault
        if fault is None and self._fault_table:
            fault = self._draw_fault()
        if fault is not None and fault != _NO_FAULT:
            await self._inject(fault, plan, stream, receive, send)
            return
        produce = self._stream(send, plan) if stream else self._respond_whole(send, plan)
        self._enter()
        finished: bool | None = None  # stays None if we are cancelled (server shutdown)
        try:
            finished = await _unless_disconnected(receive, produce)
        finally:
            # Leave and count in one step, so a stats reader never sees one without the other.
            self._leave()
            if finished is True:
                self.stats.completed += 1
            elif finished is False:
                self.stats.disconnected += 1

    def _plan(self, kind: str, scope: Scope, body: bytes) -> tuple[_Plan, bool]:
        """Parse the request into a `_Plan` and whether to stream it."""
        try:
            request = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise _BadRequest(f"the body is not valid JSON: {exc}", "invalid_json") from exc
        if not isinstance(request, dict):
            raise _BadRequest("the body must be a JSON object", "invalid_json")
        model = request.get("model", MODEL_ID)
        stream = request.get("stream", False)
        if not isinstance(model, str):
            raise _BadRequest("model must be a string")
        if not isinstance(stream, bool):
            raise _BadRequest("stream must be a boolean")
        options = request.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        tokens, delay_ms = self.config.tokens, self.config.token_delay_ms
        fault: tuple[str, float | None] | None = None
        script = self.config.tool_script
        for name, value in scope["headers"]:
            if name == b"x-sim-tokens":
                tokens = _header_int("X-Sim-Tokens", value)
            elif name == b"x-sim-token-delay-ms":
                delay_ms = _header_int("X-Sim-Token-Delay-Ms", value)
            elif name == b"x-sim-fault":
                fault = _header_fault(value)
            elif name == b"x-sim-tool-script":
                script = _header_tool_script(value)
        number = next(self._ids)
        suffix = f"{self._instance}_{number}"
        request_id = {
            "chat": f"chatcmpl-sim-{number}",
            "text": f"cmpl-sim-{number}",
            "responses": f"resp_{suffix}",
            "messages": f"msg_{suffix}",
        }[kind]
        plan = _Plan(
            kind=kind,
            request_id=request_id,
            created=int(time.time()),
            model=model,
            tokens=tokens,
            delay_s=delay_ms / 1000,
            prompt_tokens=_prompt_tokens(request),
            include_usage=include_usage,
            item_id=f"msg_{suffix}" if kind == "responses" else "",
        )
        if kind != "text" and script:
            step = _tool_results_since_prompt(kind, request)
            if step < len(script):
                call_id = f"toolu_{suffix}" if kind == "messages" else f"call_{suffix}"
                arguments = script[step]["arguments"]
                plan.tool_call = _ToolCall(
                    script[step]["name"], arguments, call_id, item_id=f"fc_{suffix}"
                )
                length = len(plan.tool_call.arguments_json)
                plan.tokens = max(1, min(tokens, length))
        if fault is not None:
            plan.fault, plan.stall_s = fault
        return plan, stream

    def _over_cap(self) -> bool:
        cap = self.config.hard_cap
        return cap is not None and self.stats.in_flight + self.config.outside_load >= cap

    async def _refuse(self, send: Send, kind: str) -> None:
        self.stats.rate_limited += 1
        config = self.config
        message = f"concurrency limit reached ({config.hard_cap} concurrent requests)"
        error = _error(kind, message, "rate_limit_error", "concurrency_limit")
        retry_after = (b"retry-after", str(config.retry_after_s).encode())
        await _send_json(send, 429, error, [retry_after])

    def _enter(self) -> None:
        stats = self.stats
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        self._lagged.record(stats.in_flight)

    def _leave(self) -> None:
        self.stats.in_flight -= 1
        self._lagged.record(self.stats.in_flight)

    async def _stream(self, send: Send, plan: _Plan) -> None:
        """Headers and the dialect's opening events at once, then one event per token after
        each delay, then the closing events (Chat: finish, usage if asked, [DONE])."""
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        events = _events(plan)
        for body in events.opening:
            await send({"type": "http.response.body", "body": body, "more_body": True})
        delay = plan.delay_s
        for index in range(plan.tokens):
            if delay:
                await asyncio.sleep(delay)
            await send(
                {"type": "http.response.body", "body": events.token(index), "more_body": True}
            )
        *closing, last = events.closing
        for body in closing:
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": last, "more_body": False})

    async def _respond_whole(self, send: Send, plan: _Plan) -> None:
        """The whole generation time in one wait, then one JSON object."""
        if plan.tokens and plan.delay_s:
            await asyncio.sleep(plan.tokens * plan.delay_s)
        await _send_json(send, 200, _whole(plan))

    # --- faults ---

    def _draw_fault(self) -> str | None:
        draw = self._rng.random()
        for bound, kind in self._fault_table:
            if draw < bound:
                return kind
        return None

    def _count_fault(self, kind: str) -> None:
        faults = self.stats.faults
        faults[kind] = faults.get(kind, 0) + 1

    async def _inject(
        self, fault: str, plan: _Plan, stream: bool, receive: Receive, send: Send
    ) -> None:
        """Answer `plan` with `fault` instead of the normal response."""
        self._count_fault(fault)
        if fault in ("500", "502", "503"):
            message = f"simulated upstream failure ({fault})"
            await _send_json(
                send, int(fault), _error(plan.kind, message, "server_error", "sim_fault")
            )
            return
        if fault == "429":
            message = "simulated rate limit"
            error = _error(plan.kind, message, "rate_limit_error", "rate_limit_exceeded")
            retry_after = (b"retry-after", str(self.config.retry_after_s).encode())
            await _send_json(send, 429, error, [retry_after])
            return
        if fault == "reset":
            _reset_connection(send)
            await _wait_disconnect_briefly(receive)
            return
        # The rest are answers that take time: the request counts as in flight.
        if fault == "stall":
            stall_s = self.config.stall_s if plan.stall_s is None else plan.stall_s
            work = self._stalled(send, plan, stream, stall_s)
        elif fault == "cut":
            work = self._cut(send, plan, stream)
        else:
            work = _send_malformed(send, stream)
        self._enter()
        finished: bool | None = None
        try:
            finished = await _unless_disconnected(receive, work)
        finally:
            self._leave()
            if fault != "cut":  # a cut ends in the disconnect it causes: not the client's
                if finished is True:
                    self.stats.completed += 1
                elif finished is False:
                    self.stats.disconnected += 1

    async def _stalled(self, send: Send, plan: _Plan, stream: bool, stall_s: float) -> None:
        """Not a byte for `stall_s`, then the normal answer."""
        await asyncio.sleep(stall_s)
        await (self._stream(send, plan) if stream else self._respond_whole(send, plan))

    async def _cut(self, send: Send, plan: _Plan, stream: bool) -> None:
        """Half the answer, then a reset; waits for the disconnect that follows."""
        if stream:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            events = _events(plan)
            for body in events.opening:
                await send({"type": "http.response.body", "body": body, "more_body": True})
            for index in range(max(1, plan.tokens // 2)):
                if plan.delay_s:
                    await asyncio.sleep(plan.delay_s)
                body = events.token(index)
                await send({"type": "http.response.body", "body": body, "more_body": True})
        else:
            if plan.tokens and plan.delay_s:
                await asyncio.sleep(plan.tokens * plan.delay_s / 2)
            whole = _dumps(_whole(plan))
            length = (b"content-length", str(len(whole)).encode())
            await send({"type": "http.response.start", "status": 200, "headers": [_JSON, length]})
            half = whole[: len(whole) // 2]
            await send({"type": "http.response.body", "body": half, "more_body": True})
        _reset_connection(send)
        # The watcher in `_unless_disconnected` sees the disconnect and ends us; returning
        # first would make uvicorn log an incomplete response.
        await asyncio.sleep(_DISCONNECT_WAIT_S)

    async def _usage_fault(self, fault: str, send: Send) -> None:
        answer = next(self._usage_answers)
        if fault == "flap" and answer % 2 == 1:
            await _send_json(send, 200, self.usage())
        elif fault in ("flap", "garbage"):
            self._count_fault("usage-garbage")
            garbage = _GARBAGE_USAGE[
                (answer // 2 if fault == "flap" else answer) % len(_GARBAGE_USAGE)
            ]
            await _send_body(send, 200, garbage)
        elif fault == "status":
            self._count_fault("usage-status")
            error = _openai_error("simulated usage failure", "server_error", "sim_fault")
            await _send_json(send, 503, error)
        elif fault == "nested":
            self._count_fault("usage-nested")
            await _send_body(send, 200, b"[" * _NESTED_DEPTH + b"]" * _NESTED_DEPTH)
        else:  # slow:<s>
            self._count_fault("usage-slow")
            await asyncio.sleep(float(fault.removeprefix("slow:")))
            await _send_json(send, 200, self.usage())


# --- ASGI helpers ---------------------------------------------------------------------------


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            if not chunks:
                return chunk
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(receive: Receive, work: Coroutine[Any, Any, None]) -> bool:
    """Run `work` until it ends or the client goes away; True if it ran to the end.

    The body has been read already, so the next `receive()` can only be the disconnect.
    A `send` that raises OSError also means the client is gone (uvicorn's httptools
    protocol drops sends after a disconnect instead, which the watcher covers).
    """
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait((work_task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also on our own cancellation (server shutdown): neither task may outlive us.
        work_task.cancel()
        watcher.cancel()
        await asyncio.gather(work_task, watcher, return_exceptions=True)
    if work_task.cancelled():
        return False
    error = work_task.exception()
    if error is None:
        return True
    if isinstance(error, OSError):
        return False
    raise error


async def _send_body(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    all_headers = [_JSON, (b"content-length", str(len(body)).encode()), *(headers or ())]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_json(
    send: Send, status: int, obj: object, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await _send_body(send, status, _dumps(obj), headers)


class SimulatedReset(ConnectionResetError):
    """Raised in place of a reset when the ASGI server offers no transport to abort."""


_DISCONNECT_WAIT_S = 5.0


def _reset_connection(send: Send) -> None:
    """Reset the client's TCP connection now: SO_LINGER 0, then abort, so the kernel
    sends a RST and drops anything unsent. See the module docstring for where the
    transport comes from."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None or not hasattr(transport, "abort"):
        raise SimulatedReset("simulated connection reset")
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _wait_disconnect_briefly(receive: Receive) -> None:
    """After a reset, wait for the server to notice, so it does not try to answer a
    connection that is gone (bounded, in case it never says)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_wait_disconnect(receive), _DISCONNECT_WAIT_S)


async def _send_malformed(send: Send, stream: bool) -> None:
    if not stream:
        await _send_body(send, 200, MALFORMED_JSON)
        return
    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
    for piece in MALFORMED_SSE:
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _fault_table(rates: dict[str, float]) -> tuple[tuple[float, str], ...]:
    """Cumulative bounds for one uniform draw, in `FAULT_KINDS` order (reproducible)."""
    table = []
    bound = 0.0
    for kind in FAULT_KINDS:
        if rates.get(kind):
            bound += rates[kind]
            table.append((bound, kind))
    return tuple(table)


def _header_fault(value: bytes) -> tuple[str, float | None]:
    """`X-Sim-Fault` as (kind, stall seconds or None); `_BadRequest` names the valid values."""
    text = value.decode("latin-1").strip().lower()
    kind = _FAULT_NAMES.get(text)
    if kind is not None:
        return kind, None
    if text == _NO_FAULT:
        return _NO_FAULT, None
    if text.startswith("stall:"):
        try:
            seconds = float(text[6:])
        except ValueError:
            seconds = math.nan
        if math.isfinite(seconds) and seconds >= 0:
            return "stall", seconds
    valid = "reset-before-headers, cut-mid-stream, stall[:<seconds>], status:500|502|503, "
    raise _BadRequest(
        f"X-Sim-Fault must be one of {valid}rate-limit, malformed-sse, none; got {text!r}"
    )


async def _lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge startup and shutdown, so servers with lifespan on can run the sim."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _header_int(name: str, value: bytes) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise _BadRequest(f"{name} must be an integer >= 0, got {value.decode('latin-1')!r}")
    return number


_TEXT_KEYS = ("messages", "content", "text", "prompt", "input", "instructions", "system", "output")
_TEXT_DEPTH = 8


def _prompt_tokens(request: dict[str, Any]) -> int:
    """A deterministic stand-in for tokenizing: the whitespace-separated words of every
    string under the keys that carry text in the four dialects (`messages`, `content`,
    `text`, `prompt`, `input`, `instructions`, `system`, `output`), a few levels deep."""
    return _words(request, _TEXT_DEPTH)


def _words(value: object, depth: int) -> int:
    if isinstance(value, str):
        return len(value.split())
    if depth == 0:
        return 0
    if isinstance(value, list):
        return sum(_words(item, depth - 1) for item in value)
    if isinstance(value, dict):
        return sum(_words(value.get(key), depth - 1) for key in _TEXT_KEYS)
    return 0


def _tool_results_since_prompt(kind: str, request: dict[str, Any]) -> int:
    """How many tool results the conversation holds after its last prompt turn (a user
    message): Chat `tool` messages, Responses `*_call_output` items, Messages
    `tool_result` blocks (a user message carrying one is not a prompt turn)."""
    items = request.get("input" if kind == "responses" else "messages")
    if not isinstance(items, list):
        return 0
    count = 0
    for item in items:
        if not isinstance(item, dict):
            continue
        role = item.get("role")
        if kind == "chat":
            if role == "user":
                count = 0
            elif role in ("tool", "function"):
                count += 1
        elif kind == "responses":
            kind_of_item = item.get("type", "message")
            if kind_of_item == "message" and role == "user":
                count = 0
            elif isinstance(kind_of_item, str) and kind_of_item.endswith("_call_output"):
                count += 1
        elif role == "user":
            content = item.get("content")
            results = 0
            if isinstance(content, list):
                results = sum(
                    1
                    for block in content
                    if isinstance(block, dict) and block.get("type") == "tool_result"
                )
            count = count + results if results else 0
    return count


def _header_tool_script(value: bytes) -> list[dict[str, Any]]:
    """`X-Sim-Tool-Script`: a JSON list as `toolScript` takes it; `[]` for no tool calls."""
    try:
        return tool_script("X-Sim-Tool-Script", _json_text("X-Sim-Tool-Script", value))
    except ValueError as exc:
        raise _BadRequest(str(exc)) from exc


def _json_text(name: str, text: str | bytes) -> object:
    try:
        return json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{name} must be JSON: {exc}") from None


_EMBEDDING_DIMENSIONS = 16
_MAX_EMBEDDING_DIMENSIONS = 4096


def embedding(text: str, dimensions: int = _EMBEDDING_DIMENSIONS) -> list[float]:
    """The sim's embedding of `text`: a unit vector drawn from SHA-256 of the text, so
    the same text always has the same vector and different texts almost never do."""
    raw = b""
    block = 0
    while len(raw) < 4 * dimensions:
        raw += hashlib.sha256(b"%d:" % block + text.encode()).digest()
        block += 1
    values = [
        value / 2**31 - 1.0 for value in struct.unpack(f"<{dimensions}I", raw[: 4 * dimensions])
    ]
    norm = math.sqrt(sum(value * value for value in values)) or 1.0
    return [value / norm for value in values]


def _embeddings(body: bytes) -> dict[str, Any]:
    """The `POST /v1/embeddings` answer: one `embedding` of each input (a string, a list
    of strings, or token lists, which are embedded as their JSON text), as floats or as
    base64 float32 (`encoding_format`), `dimensions` long (default 16)."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise _BadRequest(f"the body is not valid JSON: {exc}", "invalid_json") from exc
    if not isinstance(request, dict):
        raise _BadRequest("the body must be a JSON object", "invalid_json")
    inputs = request.get("input")
    model = request.get("model", MODEL_ID)
    encoding = request.get("encoding_format", "float")
    dimensions = request.get("dimensions", _EMBEDDING_DIMENSIONS)
    if isinstance(inputs, str) or (
        isinstance(inputs, list) and inputs and all(isinstance(i, int) for i in inputs)
    ):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise _BadRequest("input must be a string or a non-empty list")
    if not isinstance(model, str):
        raise _BadRequest("model must be a string")
    if encoding not in ("float", "base64"):
        raise _BadRequest(f"encoding_format must be float or base64, got {json.dumps(encoding)}")
    if (
        isinstance(dimensions, bool)
        or not isinstance(dimensions, int)
        or not 1 <= dimensions <= _MAX_EMBEDDING_DIMENSIONS
    ):
        raise _BadRequest(
            f"dimensions must be an integer from 1 to {_MAX_EMBEDDING_DIMENSIONS}, "
            f"got {json.dumps(dimensions)}"
        )
    data = []
    words = 0
    for index, item in enumerate(inputs):
        text = item if isinstance(item, str) else json.dumps(item)
        words += len(item) if isinstance(item, list) else len(text.split())
        vector: list[float] | str = embedding(text, dimensions)
        if encoding == "base64":
            vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": words, "total_tokens": words},
    }


# --- command line ---------------------------------------------------------------------------


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _stall_flag(text: str) -> float:
    try:
        return _seconds("--stall-s", float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds >= 0, got {text!r}"
        ) from None


def _usage_fault_flag(text: str) -> str:
    try:
        return usage_fault("--usage-fault", text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fault_rate_flag(text: str) -> dict[str, float]:
    """`reset=0.02,cut=0.02,500=0.01` -> {"reset": 0.02, ...}, checked like `faults`."""
    rates: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, sep, rate = item.partition("=")
        try:
            rates[kind.strip()] = float(rate) if sep else math.nan
        except ValueError:
            rates[kind.strip()] = rate
    try:
        return fault_rates("--fault-rate", rates)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tool_script_flag(text: str) -> list[dict[str, Any]]:
    try:
        return tool_script("--tool-script", _json_text("--tool-script", text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `sluice sim` flags; their names match the `SimConfig` fields."""
    defaults = SimConfig()
    add = parser.add_argument
    add("--host", default=defaults.host, help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=defaults.port, help="port to listen on (default: %(default)s)")
    add(
        "--tokens",
        type=_non_negative,
        default=defaults.tokens,
        help="tokens per response (default: %(default)s)",
    )
    add(
        "--token-delay-ms",
        type=_non_negative,
        default=defaults.token_delay_ms,
        help="delay before each token (default: %(default)s)",
    )
    add(
        "--hard-cap",
        type=_non_negative,
        default=None,
        help="concurrent requests above which to answer 429 (default: no cap)",
    )
    add(
        "--limit",
        type=_non_negative,
        default=None,
        help="concurrency limit /v1/usage reports (default: the hard cap)",
    )
    add(
        "--usage-lag-ms",
        type=_non_negative,
        default=defaults.usage_lag_ms,
        help="how late /v1/usage reports the in-flight count (default: %(default)s)",
    )
    add(
        "--retry-after-s",
        type=_non_negative,
        default=defaults.retry_after_s,
        help="Retry-After on a 429 (default: %(default)s)",
    )
    add(
        "--outside-load",
        type=_non_negative,
        default=defaults.outside_load,
        help="other clients' sessions, counted against the cap and in /v1/usage (default: 0)",
    )
    add(
        "--fault-rate",
        dest="faults",
        type=_fault_rate_flag,
        default={},
        metavar="KIND=RATE,...",
        help=f"random faults per completion request, e.g. cut=0.02,500=0.01; kinds: "
        f"{', '.join(FAULT_KINDS)} (default: none)",
    )
    add(
        "--stall-s",
        type=_stall_flag,
        default=defaults.stall_s,
        help="how long a stall fault sends nothing (default: %(default)s)",
    )
    add(
        "--usage-fault",
        type=_usage_fault_flag,
        default=defaults.usage_fault,
        help=f"how /v1/usage misbehaves: {' | '.join(USAGE_FAULTS)} (default: %(default)s)",
    )
    add("--seed", type=int, default=None, help="seed for the random faults (default: random)")
    add(
        "--tool-script",
        type=_tool_script_flag,
        default=[],
        metavar="JSON",
        help='tool calls to answer with, in order, e.g. \'[{"name": "shell", "arguments": '
        '{"command": ["echo", "hi"]}}]\': a request with N tool results after its last '
        "user turn gets script[N], then text (default: none)",
    )
    add(
        "--record",
        type=_non_negative,
        default=defaults.record,
        metavar="N",
        help="keep the last N requests to /v1/* for GET /sim/requests (default: 0, off)",
    )
    add(
        "--log-level",
        default=defaults.log_level,
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn log level (default: %(default)s)",
    )


class _AnnouncedServer(uvicorn.Server):
    """A uvicorn server that prints one "listening on http://HOST:PORT" line once it
    accepts connections (the real port, also when asked for port 0)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"sluice sim listening on http://{host}:{port}", flush=True)


def make_server(app: SimApp, *, announce: bool = False) -> uvicorn.Server:
    """A uvicorn server for `app` on its configured address, set up for throughput;
    `announce` prints the listening line once it is ready."""
    config = app.config
    return (_AnnouncedServer if announce else uvicorn.Server)(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            loop="uvloop",
            http="httptools",
            lifespan="off",
            access_log=False,
            server_header=False,
            log_level=config.log_level,
        )
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean shutdown."""
    server = make_server(SimApp(SimConfig.from_args(args)), announce=True)
    # uvicorn re-raises the signal that stopped it once it has shut down, into the handler
    # that was installed before it started; with the default handler SIGTERM would end the
    # process with -15. Installing uvicorn's own handler first makes that re-raise a no-op,
    # and a signal that arrives before uvicorn is listening still stops it right after startup.
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return 0
    previous = {
        sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
