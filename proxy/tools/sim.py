"""`sluice sim`: a simulated OpenAI-compatible upstream for the demo, the tests and the benchmarks.

It streams deterministic tokens ("tok0 tok1 ..."), enforces a hard concurrency cap with
429 + Retry-After, reports its in-flight count on `/v1/usage` as a provider's accounting
would (late by `usage_lag_ms`), and records the highest true concurrency it has seen.

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
import contextlib
import dataclasses
import itertools
import json
import math
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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SimConfig:
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})

    @property
    def reported_limit(self) -> int | None:
        """The limit `/v1/usage` reports: `limit` if set, else the hard cap."""
        return self.hard_cap if self.limit is None else self.limit

    def to_json(self) -> dict[str, Any]:
        """The live-settable fields, keyed as `POST /sim/config` takes them.

        The fault keys appear only when they differ from their defaults, so the config
        of a sim without faults reads exactly as it did before faults existed.
        """
        body = {key: getattr(self, name) for key, (name, _) in _LIVE_KEYS.items()}
        defaults = _FAULT_DEFAULTS
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
}
_FAULT_DEFAULTS: dict[str, Any] = {
    "faults": {},
    "stallS": SimConfig.stall_s,
    "usageFault": SimConfig.usage_fault,
    "seed": SimConfig.seed,
}


@dataclass(slots=True)
class SimStats:
    """Counters behind `GET /sim/stats`.

    `requests` counts both completion endpoints, refused ones included; `max_in_flight`
    is the true concurrency and excludes the outside load. `rate_limited` counts the
    hard cap's 429s only; injected ones are in `faults["429"]`. A request cut by a
    fault is neither `completed` nor `disconnected`.
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


@dataclass(slots=True)
class _Plan:
    """One accepted completion request: what to produce and how slowly."""

    kind: str  # "chat" or "text"
    request_id: str
    created: int
    model: str
    tokens: int
    delay_s: float
    prompt_tokens: int
    include_usage: bool
    fault: str | None = None  # from X-Sim-Fault: a FAULT_KINDS name, "none", or absent
    stall_s: float | None = None  # from "stall:<s>"; None: the config's stall_s

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.tokens,
            "total_tokens": self.prompt_tokens + self.tokens,
        }


class _Events:
    """The SSE events of one streamed response, pre-encoded around the token text."""

    __slots__ = ("_first", "_head", "_rest", "finish", "usage")

    def __init__(self, plan: _Plan) -> None:
        if plan.kind == "chat":
            obj, choice = "chat.completion.chunk", {"index": 0, "delta": {}}
            self._first = b'"role":"assistant","content":"tok%d "},"finish_reason":null}]}\n\n'
            self._rest = b'"content":"tok%d "},"finish_reason":null}]}\n\n'
            head = b',"choices":[{"index":0,"delta":{'
        else:
            obj, choice = "text_completion", {"text": "", "index": 0, "logprobs": None}
            self._first = self._rest = (
                b'tok%d ","index":0,"logprobs":null,"finish_reason":null}]}\n\n'
            )
            head = b',"choices":[{"text":"'
        envelope = {
            "id": plan.request_id,
            "object": obj,
            "created": plan.created,
            "model": plan.model,
        }
        self._head = b"data: " + _dumps(envelope)[:-1] + head
        self.finish = _event({**envelope, "choices": [{**choice, "finish_reason": "stop"}]})
        self.usage = _event({**envelope, "choices": [], "usage": plan.usage()})

    def token(self, index: int) -> bytes:
        return self._head + ((self._first if index == 0 else self._rest) % index)


def _event(obj: object) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _whole(plan: _Plan) -> dict[str, Any]:
    """The non-streamed response object."""
    content = expected_content(plan.tokens)
    if plan.kind == "chat":
        obj = "chat.completion"
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
        }
    else:
        obj = "text_completion"
        choice = {"text": content, "index": 0, "logprobs": None, "finish_reason": "stop"}
    return {
        "id": plan.request_id,
        "object": obj,
        "created": plan.created,
        "model": plan.model,
        "choices": [choice],
        "usage": plan.usage(),
    }


class _BadRequest(Exception):
    """The request cannot be served; becomes a 400 in the OpenAI error shape."""

    def __init__(self, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _openai_error(message: str, type_: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code}}


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
        self._healthz = _dumps({"status": "ok"})
        self._models = _dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": MODEL_ID,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "sluice-sim",
                    }
                ],
            }
        )
        self._routes: dict[tuple[str, str], Handler] = {
            ("GET", "/healthz"): self._handle_healthz,
            ("POST", "/v1/chat/completions"): self._handle_chat,
            ("POST", "/v1/completions"): self._handle_text,
            ("GET", "/v1/models"): self._handle_models,
            ("GET", "/v1/usage"): self._handle_usage,
            ("GET", "/sim/stats"): self._handle_stats,
            ("POST", "/sim/reset"): self._handle_reset,
            ("GET", "/sim/config"): self._handle_get_config,
            ("POST", "/sim/config"): self._handle_set_config,
        }

    def __repr__(self) -> str:
        return f"<SimApp {self.config} {self.stats}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan(receive, send)
            return
        handler = self._routes.get((scope["method"], scope["path"]))
        if handler is None:
            path: str = scope["path"]
            is_echo = path == "/v1/echo" or path.startswith("/v1/echo/")
            handler = self._handle_echo if is_echo else self._handle_not_found
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

    def reset(self) -> None:
        """Zero the counters; the requests still in flight stay counted."""
        self.stats = SimStats(in_flight=self.stats.in_flight, max_in_flight=self.stats.in_flight)

    # --- small routes ---

    async def _handle_healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_body(send, 200, self._healthz)

    async def _handle_models(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_body(send, 200, self._models)

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

    async def _complete(self, kind: str, scope: Scope, receive: Receive, send: Send) -> None:
        """Admit or refuse a completion request, then produce it while watching the client."""
        self.stats.requests += 1
        body = await _read_body(receive)
        if body is None:
            return
        try:
            plan, stream = self._plan(kind, scope, body)
        except _BadRequest as exc:
            error = _openai_error(exc.message, "invalid_request_error", exc.code)
            await _send_json(send, 400, error)
            return
        if self._over_cap():
            await self._refuse(send)
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
        except ValueError as exc:
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
        for name, value in scope["headers"]:
            if name == b"x-sim-tokens":
                tokens = _header_int("X-Sim-Tokens", value)
            elif name == b"x-sim-token-delay-ms":
                delay_ms = _header_int("X-Sim-Token-Delay-Ms", value)
            elif name == b"x-sim-fault":
                fault = _header_fault(value)
        prefix = "chatcmpl-sim-" if kind == "chat" else "cmpl-sim-"
        plan = _Plan(
            kind=kind,
            request_id=f"{prefix}{next(self._ids)}",
            created=int(time.time()),
            model=model,
            tokens=tokens,
            delay_s=delay_ms / 1000,
            prompt_tokens=_prompt_tokens(request),
            include_usage=include_usage,
        )
        if fault is not None:
            plan.fault, plan.stall_s = fault
        return plan, stream

    def _over_cap(self) -> bool:
        cap = self.config.hard_cap
        return cap is not None and self.stats.in_flight + self.config.outside_load >= cap

    async def _refuse(self, send: Send) -> None:
        self.stats.rate_limited += 1
        config = self.config
        message = f"concurrency limit reached ({config.hard_cap} concurrent requests)"
        error = _openai_error(message, "rate_limit_error", "concurrency_limit")
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
        """Headers at once, then one event per token after each delay, then finish and [DONE]."""
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        events = _Events(plan)
        delay = plan.delay_s
        for index in range(plan.tokens):
            if delay:
                await asyncio.sleep(delay)
            await send(
                {"type": "http.response.body", "body": events.token(index), "more_body": True}
            )
        await send({"type": "http.response.body", "body": events.finish, "more_body": True})
        if plan.include_usage:
            await send({"type": "http.response.body", "body": events.usage, "more_body": True})
        await send({"type": "http.response.body", "body": _DONE, "more_body": False})

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
            await _send_json(send, int(fault), _openai_error(message, "server_error", "sim_fault"))
            return
        if fault == "429":
            message = "simulated rate limit"
            error = _openai_error(message, "rate_limit_error", "rate_limit_exceeded")
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
            events = _Events(plan)
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


def _prompt_tokens(request: dict[str, Any]) -> int:
    """A deterministic stand-in for tokenizing: whitespace-separated words of the prompt."""
    texts: list[object] = []
    messages = request.get("messages")
    if isinstance(messages, list):
        texts.extend(message.get("content") for message in messages if isinstance(message, dict))
    texts.append(request.get("prompt"))
    return sum(len(text.split()) for text in texts if isinstance(text, str))


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
        "--log-level",
        default=defaults.log_level,
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn log level (default: %(default)s)",
    )


def make_server(app: SimApp) -> uvicorn.Server:
    """A uvicorn server for `app` on its configured address, set up for throughput."""
    config = app.config
    return uvicorn.Server(
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
    server = make_server(SimApp(SimConfig.from_args(args)))
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
