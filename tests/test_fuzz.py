"""Fuzzing the edges of one running proxy with hypothesis (issue 7): admin bodies,
headers and paths. Never a 500, and nothing ever goes anywhere but a configured
`base_url`.

The upstream here is a recording HTTP server rather than the sim, because the
property is about where requests land: it keeps the request target, Host and
Authorization of every request it gets. A second listener, the canary, is a port no
provider points at; it counts every connection attempt, and there must be none.
Paths are sent over raw sockets, because HTTP clients normalise them (dot segments,
percent-encoding) before they reach the wire.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.edge.headers import prompt_started_at_ms
from proxy.errors import BadRequest
from tests.conftest import start_proxy
from tests.servers import Server

pytestmark = pytest.mark.e2e

ADMIN_TOKEN = "fuzz-admin-token-3f9a"
PROVIDER_KEY = "sk-fuzz-provider-key-77c1"
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- the recording upstream and the canary -----------------------------------------------------


@dataclass
class Seen:
    method: str
    target: str
    host: str | None
    authorization: str | None


@dataclass
class Recorder:
    """An upstream that answers everything with 200 and remembers what it got."""

    server: ThreadingHTTPServer
    seen: list[Seen] = field(default_factory=list)

    @property
    def address(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{host!s}:{port}"


def recording_upstream() -> Recorder:
    recorder: Recorder

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the proxy's pool expects

        def handle_one(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            recorder.seen.append(
                Seen(
                    self.command,
                    self.path,
                    self.headers.get("host"),
                    self.headers.get("authorization"),
                )
            )
            body = b'{"id":"fz","object":"chat.completion","choices":[]}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = handle_one

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    recorder = Recorder(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return recorder


@dataclass
class Canary:
    """A port nobody should ever connect to; counts those who do."""

    sock: socket.socket
    connections: int = 0

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    upstream = recording_upstream()
    yield upstream
    upstream.server.shutdown()
    upstream.server.server_close()


@pytest.fixture(scope="module")
def canary() -> Iterator[Canary]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    watcher = Canary(sock)
    threading.Thread(target=watcher.serve, daemon=True).start()
    yield watcher
    sock.close()


@pytest.fixture(scope="module")
def proxy(recorder: Recorder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One proxy with an admin token: provider `fz` (the default, a high limit, no
    cooldown) takes the header and path fuzzing, `adm` the admin fuzzing."""
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    server = start_proxy(
        tmp,
        f"""
        [[providers]]
        id = "fz"
        base_url = "http://{recorder.address}/v1"
        api_key = "{PROVIDER_KEY}"
        limit = 1000
        default = true

        [[providers]]
        id = "adm"
        base_url = "http://{recorder.address}/v1"
        api_key = "{PROVIDER_KEY}"
        limit = 5
        """,
        # Two header values of up to 60 kB each must reach the relay: the head
        # limit (64 KiB by default) has tests of its own in test_edge_limits.
        server=f'admin_token = "{ADMIN_TOKEN}"\nmax_header_bytes = 262144',
        admission="cooldown_ms = 0",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(proxy: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        yield client


def admin(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


_log_mark = 0


@pytest.fixture(autouse=True)
def log_mark(proxy: Server) -> None:
    """Each test checks only the log lines written while it ran."""
    global _log_mark
    _log_mark = len(proxy.log())


def assert_clean(proxy: Server, recorder: Recorder, canary: Canary) -> None:
    """What every test ends with: no traceback, no stray request."""
    assert canary.connections == 0
    upstream_host = recorder.address
    for seen in recorder.seen:
        path = seen.target.split("?", 1)[0]
        assert path == "/v1" or path.startswith("/v1/"), seen
        assert not {".", ".."} & set(unquote(path).split("/")), seen
        assert seen.host == upstream_host, seen
        assert seen.authorization == f"Bearer {PROVIDER_KEY}", seen
    log = proxy.log()[_log_mark:]
    assert "Traceback" not in log
    assert "Exception in ASGI application" not in log


# --- admin bodies ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["limit", "cooldownMs", "LIMIT", "limit ", ""]) | st.text(max_size=8),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)
admin_bodies = st.one_of(
    json_values.map(lambda value: json.dumps(value).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "limit": json_values | st.integers(-5, 20_000),
            "cooldownMs": json_values | st.integers(-5, 4_000_000),
        },
    ).map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=300),
)


@FUZZ
@given(body=admin_bodies, route=st.sampled_from(["limits", "cooldown"]))
@example(body=b'{"limit": 1e400}', route="limits")
@example(body=b'{"limit": NaN}', route="limits")
@example(body=b'{"cooldownMs": -0}', route="cooldown")
@example(body=b'{"limit": 3, "limit": "x"}', route="limits")
@example(body='{"limit": "\ud800"}'.encode("utf-8", "surrogatepass"), route="limits")
@example(body=b"\xef\xbb\xbf{}", route="limits")
def test_admin_bodies_are_200_or_400_never_500(http: httpx.Client, body: bytes, route: str) -> None:
    response = http.put(f"/concurrency/{route}/adm", content=body, headers=admin())
    assert response.status_code in (200, 400), (body, response.text)
    answer = response.json()
    if response.status_code == 400:
        assert isinstance(answer["error"], str)
        assert answer["error"]
    else:
        assert answer["providerId"] == "adm"
    limit = http.get("/concurrency/limits/adm", headers=admin()).json()["limit"]
    assert isinstance(limit, int)
    assert 1 <= limit <= 10_000


def test_deeply_nested_admin_body_is_a_400(http: httpx.Client) -> None:
    response = http.put("/concurrency/limits/adm", content=b"[" * 100_000, headers=admin())
    assert response.status_code == 400


provider_ids = st.one_of(
    st.sampled_from(["adm", "fz", "ADM", "adm ", "%61dm", "adm%00", "..", "nope"]),
    st.text(
        alphabet=st.characters(codec="utf-8", exclude_characters="/?#"), min_size=1, max_size=80
    ),
)


@FUZZ
@given(
    provider_id=provider_ids,
    method=st.sampled_from(["GET", "PUT", "DELETE", "POST", "PATCH"]),
    route=st.sampled_from(["limits", "cooldown", "status"]),
    token=st.one_of(
        st.sampled_from([ADMIN_TOKEN, ADMIN_TOKEN + "x", ADMIN_TOKEN[:-1], ADMIN_TOKEN.upper()]),
        st.text(alphabet="abcdef-0123456789", max_size=40),
    ),
)
def test_admin_paths_and_tokens_never_500(
    http: httpx.Client, provider_id: str, method: str, route: str, token: str
) -> None:
    # Percent-encode what a URL cannot carry; leave '%' so encoded ids get through too.
    path = f"/concurrency/{route}/{quote(provider_id, safe='%')}"
    body = b'{"limit": 5}' if route == "limits" else b'{"cooldownMs": 0}'
    response = http.request(
        method,
        path,
        content=body if method == "PUT" else b"",
        headers={"authorization": f"Bearer {token}".strip()},
    )
    assert response.status_code < 500, response.text
    if token != ADMIN_TOKEN:
        assert response.status_code in (401, 404, 405), response.text


# --- headers --------------------------------------------------------------------------------

VISIBLE = [c for c in range(0x21, 0x100) if c != 0x7F]  # what HTTP allows in a header value


def header_values(max_size: int) -> st.SearchStrategy[bytes]:
    """Bytes an HTTP/1.1 client may send as a header value: visible ASCII and obs-text,
    spaces inside but not at the ends."""
    inner = st.lists(st.sampled_from([*VISIBLE, 0x20, 0x09]), max_size=max_size)
    edge = st.sampled_from(VISIBLE)
    return st.tuples(edge, inner, edge).map(lambda t: bytes([t[0], *t[1], t[2]]))


ODD_TIMES = [
    b"0",
    b"-1",
    b"1e3",
    b"1795830001000",
    b"9" * 16,
    b"9" * 17,
    b"2026-11-28T01:40:02Z",
    b"2026-11-28T01:40:02",
    b"2026-11-28 01:40:02Z",
    b"0001-01-01T00:00:00+23:59",
    b"9999-12-31T23:59:59.999999-23:59",
    b"2026-02-30T00:00:00Z",
    b"2026-11-28t01:40:02z",
    "２０２６".encode(),
    b"\xb2\xb3",
    b"NaN",
    b"Infinity",
]
prompt_times = st.one_of(
    st.sampled_from(ODD_TIMES),
    st.integers(min_value=-(10**20), max_value=10**20).map(lambda n: str(n).encode()),
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat().encode()),
    header_values(40),
)
huge = st.integers(min_value=1_000, max_value=60_000).map(lambda n: b"x" * n)


def expected_status(prompt_started_at: bytes | None) -> int:
    """400 exactly when the header parser refuses the value, as the relay decodes it."""
    if prompt_started_at is None:
        return 200
    try:
        prompt_started_at_ms(prompt_started_at.decode("latin-1"), time.time() * 1000)
    except BadRequest:
        return 400
    return 200


@FUZZ
@given(
    prompt_started_at=st.none() | prompt_times,
    authorization=st.none() | header_values(60) | huge,
    conversation_id=st.none() | header_values(200) | huge,
)
def test_headers_never_500_and_the_client_key_never_reaches_the_upstream(
    http: httpx.Client,
    proxy: Server,
    recorder: Recorder,
    canary: Canary,
    prompt_started_at: bytes | None,
    authorization: bytes | None,
    conversation_id: bytes | None,
) -> None:
    headers = {
        name.encode(): value
        for name, value in (
            ("x-prompt-started-at", prompt_started_at),
            ("authorization", authorization),
            ("x-conversation-id", conversation_id),
        )
        if value is not None
    }
    before = len(recorder.seen)
    response = http.post(
        "/v1/chat/completions", json={"model": "m", "messages": []}, headers=headers
    )
    assert response.status_code == expected_status(prompt_started_at), response.text
    assert len(recorder.seen) == before + (response.status_code == 200)
    assert_clean(proxy, recorder, canary)


# --- paths ----------------------------------------------------------------------------------


def request_line_status(port: int, method: str, target: bytes, host: bytes | None = None) -> int:
    """Send one request with `target` as is; the status of the answer."""
    body = b'{"model": "m"}' if method == "POST" else b""
    request = (
        method.encode()
        + b" "
        + target
        + b" HTTP/1.1\r\nHost: "
        + (host or f"127.0.0.1:{port}".encode())
        + b"\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 "), (target, answer[:200])
    return int(answer[9:12])


def segments(canary_port: int) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(
            [
                "..",
                ".",
                "%2e%2e",
                "%2E%2E",
                ".%2e",
                "%2e",
                "%252e%252e",
                "%2F",
                "%2f..%2f",
                "..%2F..%2F",
                "%5C..",
                "..\\..",
                "%00",
                "%",
                "%zz",
                "@127.0.0.1:" + str(canary_port),
                "127.0.0.1:" + str(canary_port),
                "http:",
                "",
                "~",
                ";",
                "chat",
                "completions",
                "models",
                "%C3%A9",
                "%FF",
            ]
        ),
        st.text(alphabet="abc.%2FfeE~@:;=!$&'()*+,-_", max_size=12),
        st.integers(min_value=100, max_value=6000).map(lambda n: "a" * n),
    )


def targets(canary_port: int) -> st.SearchStrategy[str]:
    prefixes = st.sampled_from(
        [
            "/v1/",
            "/fz/v1/",
            "/adm/v1/",
            "/nope/v1/",
            "/",
            "//",
            "/V1/",
            "/%76%31/",
            "/fz%2Fv1/",
            "/fz/v1%2F",
            "/v1%2F",
            "/./v1/",
            "/../v1/",
            "/%2e%2e/v1/",
            "/NOPE_x/v1/",
            "/" + "p" * 70 + "/v1/",
            f"//127.0.0.1:{canary_port}/v1/",
            f"/v1/http://127.0.0.1:{canary_port}/",
            f"/v1@127.0.0.1:{canary_port}/",
        ]
    )
    tails = st.lists(segments(canary_port), max_size=6).map("/".join)
    queries = st.sampled_from(["", "?a=1", "?url=http://127.0.0.1:1/", "?%zz", "?a=/../.."])
    return st.tuples(prefixes, tails, queries).map("".join)


@FUZZ
@given(data=st.data(), method=st.sampled_from(["GET", "POST", "DELETE"]))
def test_paths_never_500_and_never_leave_the_base_url(
    proxy: Server, recorder: Recorder, canary: Canary, data: st.DataObject, method: str
) -> None:
    target = data.draw(targets(canary.port), label="target")
    assert request_line_status(proxy.port, method, target.encode()) < 500, target
    assert_clean(proxy, recorder, canary)


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{canary}/v1/models",
        "http://127.0.0.1:{canary}/fz/v1/models",
        "127.0.0.1:{canary}",
        "*",
        "/v1/chat/completions/../../../etc/passwd",
        "/v1/%2e%2e/%2e%2e/sim/stats",
        "/fz/v1/..%2f..%2fsim%2fstats",
        "/v1/" + "a" * 60_000,
    ],
    ids=lambda target: target[:40],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_hostile_request_targets(
    proxy: Server, recorder: Recorder, canary: Canary, target: str, method: str
) -> None:
    target = target.replace("{canary}", str(canary.port))
    assert request_line_status(proxy.port, method, target.encode()) < 500, target
    assert_clean(proxy, recorder, canary)


@pytest.mark.parametrize(
    "host",
    [b"127.0.0.1:{canary}", b"evil.example", b"127.0.0.1:{canary}@x", b"[::1]:{canary}"],
)
def test_the_host_header_never_chooses_the_upstream(
    proxy: Server, recorder: Recorder, canary: Canary, host: bytes
) -> None:
    host = host.replace(b"{canary}", str(canary.port).encode())
    before = len(recorder.seen)
    for method, target in (("GET", b"/v1/models"), ("POST", b"/v1/chat/completions")):
        assert request_line_status(proxy.port, method, target, host=host) == 200
    assert len(recorder.seen) == before + 2
    assert_clean(proxy, recorder, canary)
