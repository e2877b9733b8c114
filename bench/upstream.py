"""A lean fake OpenAI upstream for the benchmarks, on raw asyncio protocols (uvloop).

No ASGI server and no framework: httptools parses the request and the answers are
pre-encoded bytes, so the upstream costs a few microseconds per request and the
figures measure the proxy in front of it (the report shows its direct rate).

- `GET /healthz` answers 200.
- `POST .../chat/completions` without `"stream": true` answers a small fixed
  chat.completion JSON.
- With `"stream": true` it sends `x-bench-chunks` SSE chunks (default 10), one every
  `x-bench-interval-ms` (default 10; the first at once), then `data: [DONE]`. Each
  chunk carries `bench_sent_ns` (`time.time_ns()` when written) and `bench_sched_ns`
  (when its schedule said to write it), so a client on the same machine computes
  both the relay delay and the lag behind the schedule of every chunk.

Run: `python -m bench.upstream --port 9000`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import signal
import time
from typing import cast

import httptools
import uvloop

CHUNK_FIELDS = b'"bench_sent_ns":'
"""What precedes the send time in a chunk; the load generator's parser keys on it."""

_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "bench-1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14},
    },
    separators=(",", ":"),
).encode()
_JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
    % (len(_COMPLETION), _COMPLETION)
)
_HEALTHZ = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n"
_HEALTHZ += b'{"status":"ok"}'
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_EVENT = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"bench-1",' + CHUNK_FIELDS + b'%d,"bench_sched_ns":%d,'
    b'"choices":[{"index":0,"delta":{"content":"tok%d "},"finish_reason":null}]}\n\n'
)
_DONE = b"data: [DONE]\n\n"
_END = b"%x\r\n%s\r\n0\r\n\r\n" % (len(_DONE), _DONE)


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: keep-alive, one request at a time."""

    __slots__ = (
        "_body",
        "_chunks",
        "_i",
        "_interval_ns",
        "_interval_s",
        "_keep_alive",
        "_loop",
        "_parser",
        "_t0",
        "_timer",
        "_transport",
        "_url",
        "_wall0",
    )

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._chunks = 10
        self._interval_ns = 10_000_000
        self._interval_s = 0.01
        self._keep_alive = True
        self._i = 0
        self._t0 = 0.0
        self._wall0 = 0

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []
        self._chunks = 10
        self._interval_ns = 10_000_000

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name[:8].lower() == b"x-bench-":
            key = name.lower()
            if key == b"x-bench-chunks":
                self._chunks = max(1, int(value))
            elif key == b"x-bench-interval-ms":
                self._interval_ns = int(float(value) * 1_000_000)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        transport = self._transport
        if transport is None:
            return
        self._keep_alive = self._parser.should_keep_alive()
        path = self._url.partition(b"?")[0]
        method = self._parser.get_method()
        if method == b"POST" and path.endswith(b"/chat/completions"):
            body = b"".join(self._body)
            if b'"stream"' in body and json.loads(body).get("stream") is True:
                self._start_stream()
                return
            transport.write(_JSON_RESPONSE)
        elif path == b"/healthz":
            transport.write(_HEALTHZ)
        else:
            transport.write(_NOT_FOUND)
        if not self._keep_alive:
            transport.close()

    # --- streaming ---

    def _start_stream(self) -> None:
        self._i = 0
        self._t0 = self._loop.time()
        self._wall0 = time.time_ns()
        self._interval_s = self._interval_ns / 1e9
        self._tick(_SSE_HEAD)

    def _tick(self, head: bytes = b"") -> None:
        transport = self._transport
        self._timer = None
        if transport is None:
            return
        i = self._i
        event = _EVENT % (time.time_ns(), self._wall0 + i * self._interval_ns, i)
        frame = b"%s%x\r\n%s\r\n" % (head, len(event), event)
        if i + 1 >= self._chunks:
            transport.write(frame + _END)
            if not self._keep_alive:
                transport.close()
            return
        transport.write(frame)
        self._i = i + 1
        # Absolute times: a late tick does not push the rest of the schedule back.
        self._timer = self._loop.call_at(self._t0 + self._i * self._interval_s, self._tick)


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one (1,024 streams need ~2,100 fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    raise_fd_limit()
    uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
