"""`sluice sim`: a simulated OpenAI-compatible upstream for the demo, the tests and the benchmarks.

It streams deterministic tokens ("tok0 tok1 ..."), enforces a hard concurrency cap with
429 + Retry-After, reports its in-flight count on `/v1/usage` as a provider's accounting
would (late by `usage_lag_ms`), and records the highest true concurrency it has seen.

It is raw ASGI rather than Starlette because a benchmark must measure the proxy, not the
sim: one dict lookup routes a request and a streamed token costs one `%`-format and one
`send`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import signal
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from dataclasses import dataclass
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


@dataclass
class SimConfig:
    """How the sim behaves; the fields after `port` can be changed live by `POST /sim/config`."""

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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SimConfig:
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})

    @property
    def reported_limit(self) -> int | None:
        """The limit `/v1/usage` reports: `limit` if set, else the hard cap."""
        return self.hard_cap if self.limit is None else self.limit

    def to_json(self) -> dict[str, Any]:
        """The live-settable fields, keyed as `POST /sim/config` takes them."""
        return {key: getattr(self, name) for key, name in _LIVE_KEYS.items()}

    def updated(self, body: object) -> SimConfig:
        """A copy with `body`'s keys applied; ValueError names the first bad key.

        All keys are checked before any is applied, so a bad body changes nothing.
        """
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        changes: dict[str, Any] = {}
        for key, value in body.items():
            name = _LIVE_KEYS.get(key)
            if name is None:
                raise ValueError(f"unknown key {key!r}; valid keys: {', '.join(_LIVE_KEYS)}")
            nullable = key in _NULLABLE_KEYS
            if value is None and nullable:
                changes[name] = None
            elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                changes[name] = value
            else:
                expected = "an integer >= 0" + (" or null" if nullable else "")
                raise ValueError(f"{key} must be {expected}, got {json.dumps(value)}")
        return dataclasses.replace(self, **changes)


_LIVE_KEYS = {
    "hardCap": "hard_cap",
    "limit": "limit",
    "outsideLoad": "outside_load",
    "usageLagMs": "usage_lag_ms",
    "retryAfterS": "retry_after_s",
    "tokens": "tokens",
    "tokenDelayMs": "token_delay_ms",
}
_NULLABLE_KEYS = frozenset({"hardCap", "limit"})


@dataclass(slots=True)
class SimStats:
    """Counters behind `GET /sim/stats`.

    `requests` counts both completion endpoints, refused ones included; `max_in_flight`
    is the true concurrency and excludes the outside load.
    """

    in_flight: int = 0
    max_in_flight: int = 0
    requests: int = 0
    completed: int = 0
    disconnected: int = 0
    rate_limited: int = 0
    usage_polls: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "inFlight": self.in_flight,
            "maxInFlight": self.max_in_flight,
            "requests": self.requests,
            "completed": self.completed,
            "disconnected": self.disconnected,
            "rateLimited": self.rate_limited,
            "usagePolls": self.usage_polls,
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

    def reconfigure(self, config: SimConfig) -> None:
        """Swap in a new config; requests already accepted keep their own tokens and delay."""
        self.config = config
        self._lagged.lag_s = config.usage_lag_ms / 1000

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
        await _send_json(send, 200, self.usage())

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
            config = self.config.updated(json.loads(body or b"{}"))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError too
            await _send_json(send, 400, {"error": str(exc)})
            return
        self.reconfigure(config)
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
        for name, value in scope["headers"]:
            if name == b"x-sim-tokens":
                tokens = _header_int("X-Sim-Tokens", value)
            elif name == b"x-sim-token-delay-ms":
                delay_ms = _header_int("X-Sim-Token-Delay-Ms", value)
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
