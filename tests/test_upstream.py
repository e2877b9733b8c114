"""The provider connection: forwarded headers, the upstream URL (no open proxy), the
httpx-to-sluice error mapping and the `/usage` poll (SPEC sections 3-5)."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import respx
from hypothesis import given
from hypothesis import strategies as st

from proxy.admission import Policy
from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from proxy.settings import ProviderConfig
from proxy.upstream.client import USAGE_TIMEOUT_S, Upstream, parse_usage
from tests import httpx_transport

BASE = "http://upstream.test:8000/api"
KEY = "sk-provider-secret-1234"
CLIENT_AUTH = b"Bearer sk-client-key"

Handler = Callable[[httpx.Request], httpx.Response]
MakeUpstream = Callable[..., Upstream]


def provider(base_url: str = BASE, api_key: str | None = KEY) -> ProviderConfig:
    return ProviderConfig(
        id="sim",
        base_url=base_url,
        api_key=api_key,
        default=True,
        connect_timeout_s=1.0,
        read_timeout_s=5.0,
        policy=Policy(limit=4, cooldown_ms=0, max_queue=10, admitted_paths=("/chat/completions",)),
    )


def recording(seen: list[httpx.Request], status: int, **response: Any) -> Handler:
    """A handler that keeps every request in `seen` and answers `status`."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, **response)

    return handler


async def poll_usage_answered(upstream: Upstream, answer: httpx.Response | Exception) -> int | None:
    """`poll_usage` through the real transport, respx answering its one GET /usage."""
    with respx.mock(assert_all_called=True) as mock:
        route = mock.get(f"{BASE}/usage")
        if isinstance(answer, Exception):
            route.mock(side_effect=answer)
        else:
            route.mock(return_value=answer)
        return await upstream.poll_usage()


@pytest.fixture
async def make_upstream() -> AsyncIterator[MakeUpstream]:
    """Build httpx-backed Upstreams (over a MockTransport, or a real httpx transport
    that respx can intercept) and close every one after the test."""
    made: list[Upstream] = []

    def make(
        handler: Handler | None = None, *, base_url: str = BASE, api_key: str | None = KEY
    ) -> Upstream:
        transport: httpx.AsyncBaseTransport = (
            httpx.MockTransport(handler) if handler is not None else httpx.AsyncHTTPTransport()
        )
        config = provider(base_url, api_key)
        upstream = Upstream(config, transport=httpx_transport.for_provider(config, transport))
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        await upstream.close()


# --- request_headers --------------------------------------------------------------------

HOP_BY_HOP = [
    (b"connection", b"keep-alive"),
    (b"keep-alive", b"timeout=5"),
    (b"te", b"trailers"),
    (b"trailer", b"x-checksum"),
    (b"transfer-encoding", b"chunked"),
    (b"upgrade", b"h2c"),
    (b"proxy-authorization", b"Basic cHJveHk6c2VjcmV0"),
    (b"proxy-connection", b"keep-alive"),
]


async def test_request_headers_drop_hop_by_hop_host_and_content_length(
    make_upstream: MakeUpstream,
) -> None:
    upstream = make_upstream(api_key=None)
    headers = [
        (b"host", b"sluice.local:8080"),
        (b"content-type", b"application/json"),
        *HOP_BY_HOP,
        (b"content-length", b"42"),
        (b"x-prompt-started-at", b"1795858200000"),
        (b"accept-encoding", b"gzip, br"),
        (b"x-conversation-id", b"conv-1"),
        (b"user-agent", b"agent/1.0"),
    ]
    assert upstream.request_headers(headers) == [
        (b"content-type", b"application/json"),
        (b"x-prompt-started-at", b"1795858200000"),
        (b"accept-encoding", b"gzip, br"),
        (b"x-conversation-id", b"conv-1"),
        (b"user-agent", b"agent/1.0"),
    ]


async def test_request_headers_drop_those_named_in_connection(
    make_upstream: MakeUpstream,
) -> None:
    upstream = make_upstream(api_key=None)
    headers = [
        (b"x-before", b"1"),
        (b"connection", b"keep-alive, X-Hop-One ,x-hop-two"),
        (b"x-hop-one", b"a"),
        (b"x-stay", b"b"),
        (b"x-hop-two", b"c"),
    ]
    assert upstream.request_headers(headers) == [(b"x-before", b"1"), (b"x-stay", b"b")]


async def test_request_headers_keep_repeated_headers_in_order(make_upstream: MakeUpstream) -> None:
    upstream = make_upstream(api_key=None)
    headers = [(b"x-a", b"1"), (b"cookie", b"a=1"), (b"x-b", b"2"), (b"cookie", b"b=2")]
    assert upstream.request_headers(headers) == headers


async def test_provider_key_replaces_client_authorization(make_upstream: MakeUpstream) -> None:
    upstream = make_upstream(api_key=KEY)
    forwarded = upstream.request_headers(
        [(b"x-a", b"1"), (b"authorization", CLIENT_AUTH), (b"x-b", b"2")]
    )
    assert [v for n, v in forwarded if n == b"authorization"] == [f"Bearer {KEY}".encode()]
    assert all(CLIENT_AUTH not in value for _, value in forwarded)
    assert [h for h in forwarded if h[0] != b"authorization"] == [(b"x-a", b"1"), (b"x-b", b"2")]


async def test_provider_key_is_added_when_the_client_sends_none(
    make_upstream: MakeUpstream,
) -> None:
    upstream = make_upstream(api_key=KEY)
    assert upstream.request_headers([(b"x-a", b"1")]) == [
        (b"x-a", b"1"),
        (b"authorization", f"Bearer {KEY}".encode()),
    ]


async def test_client_authorization_is_forwarded_without_a_provider_key(
    make_upstream: MakeUpstream,
) -> None:
    upstream = make_upstream(api_key=None)
    headers = [(b"x-a", b"1"), (b"authorization", CLIENT_AUTH), (b"x-b", b"2")]
    assert upstream.request_headers(headers) == headers


# --- url ---------------------------------------------------------------------------------


@pytest.mark.parametrize("base_url", [BASE, BASE + "/"])
async def test_url_keeps_the_base_path(make_upstream: MakeUpstream, base_url: str) -> None:
    url = httpx.URL(make_upstream(base_url=base_url).url(b"/chat/completions", b""))
    assert str(url) == "http://upstream.test:8000/api/chat/completions"
    assert url.raw_path == b"/api/chat/completions"


async def test_url_without_a_base_path(make_upstream: MakeUpstream) -> None:
    url = httpx.URL(make_upstream(base_url="https://upstream.test").url(b"/models", b""))
    assert str(url) == "https://upstream.test/models"


async def test_url_keeps_percent_encoding(make_upstream: MakeUpstream) -> None:
    url = httpx.URL(make_upstream().url(b"/files/a%20b%2Fc%25d", b""))
    assert url.raw_path == b"/api/files/a%20b%2Fc%25d"


async def test_url_forwards_the_query_as_is(make_upstream: MakeUpstream) -> None:
    url = httpx.URL(make_upstream().url(b"/files", b"purpose=fine-tune&after=a%20b&limit=2"))
    assert url.raw_path == b"/api/files?purpose=fine-tune&after=a%20b&limit=2"
    assert url.query == b"purpose=fine-tune&after=a%20b&limit=2"


async def test_url_without_query_has_no_question_mark(make_upstream: MakeUpstream) -> None:
    url = httpx.URL(make_upstream().url(b"/models", b""))
    assert b"?" not in url.raw_path
    assert url.query == b""


HOSTILE_PATHS = [
    b"//evil.com/x",
    b"/%2F%2Fevil.com",
    b"/@evil.com",
    b"/@evil.com:443/x",
    b"/http://evil.com/x",
    b"/..//evil.com",
    b"/\\\\evil.com",
    b"@evil.com",
    b":9999/x",
    b".evil.com",
]


@pytest.mark.parametrize("raw_path", HOSTILE_PATHS)
@pytest.mark.parametrize("base_url", [BASE, "https://upstream.test"])
async def test_url_host_is_always_the_base_url_host(
    make_upstream: MakeUpstream, base_url: str, raw_path: bytes
) -> None:
    base = httpx.URL(base_url)
    url = httpx.URL(make_upstream(base_url=base_url).url(raw_path, b""))
    assert (url.scheme, url.host, url.port) == (base.scheme, base.host, base.port)
    if b"/." not in raw_path:
        assert url.raw_path.startswith(base.raw_path.rstrip(b"/"))


async def test_url_resolves_literal_dot_segments(make_upstream: MakeUpstream) -> None:
    # httpx applies RFC 3986 dot-segment removal, so `url()` alone would let a path
    # climb out of the base path: the Router must refuse '.' and '..' (it does, see
    # test_routing). Encoded dots are left alone.
    upstream = make_upstream()
    assert httpx.URL(upstream.url(b"/../x", b"")).raw_path == b"/x"
    assert httpx.URL(upstream.url(b"/%2e%2e/x", b"")).raw_path == b"/api/%2e%2e/x"


PATH_CHARS = st.sampled_from(
    [chr(c) for c in range(0x21, 0x7F) if chr(c) not in "?#"] + ["%2F", "%40", "%3A"]
)


@given(st.lists(PATH_CHARS, max_size=30).map("".join), st.sampled_from(["", "/api"]))
async def test_url_never_leaves_the_base_host(path: str, base_path: str) -> None:
    never = httpx.MockTransport(lambda request: httpx.Response(500))
    config = provider("http://upstream.test:8000" + base_path)
    upstream = Upstream(config, transport=httpx_transport.for_provider(config, never))
    try:
        url = httpx.URL(upstream.url(("/" + path).encode("ascii"), b""))
    finally:
        await upstream.close()
    assert (url.scheme, url.host, url.port) == ("http", "upstream.test", 8000)


# --- send ------------------------------------------------------------------------------


async def test_send_forwards_method_url_headers_and_body(make_upstream: MakeUpstream) -> None:
    seen: list[httpx.Request] = []
    upstream = make_upstream(recording(seen, 201, headers={"x-up": "1"}, content=b"created"))
    url = upstream.url(b"/files/a%20b", b"x=1")
    headers = upstream.request_headers(
        [(b"authorization", CLIENT_AUTH), (b"connection", b"close"), (b"x-conversation-id", b"c")]
    )
    response = await upstream.send("PUT", url, headers, b'{"a": 1}')
    try:
        assert response.status == 201
        assert await response.read() == b"created"
    finally:
        await response.aclose()
    (request,) = seen
    assert request.method == "PUT"
    assert request.url.raw_path == b"/api/files/a%20b?x=1"
    assert request.url.host == "upstream.test"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["x-conversation-id"] == "c"
    assert "connection" not in request.headers
    assert request.content == b'{"a": 1}'


async def test_send_returns_before_the_body_is_read(make_upstream: MakeUpstream) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chunks())

    upstream = make_upstream(handler)
    response = await upstream.send("POST", upstream.url(b"/chat/completions", b""), [], b"")
    try:
        assert [chunk async for chunk in response.chunks()] == [b"data: 1\n\n", b"data: 2\n\n"]
    finally:
        await response.aclose()


@pytest.mark.parametrize(
    ("exc_type", "error_type", "status", "code"),
    [
        (httpx.ConnectError, UpstreamUnavailable, 502, "upstream_unavailable"),
        (httpx.ConnectTimeout, UpstreamUnavailable, 502, "upstream_unavailable"),
        (httpx.PoolTimeout, UpstreamUnavailable, 502, "upstream_unavailable"),
        (httpx.RemoteProtocolError, UpstreamUnavailable, 502, "upstream_unavailable"),
        (httpx.ReadError, UpstreamUnavailable, 502, "upstream_unavailable"),
        (httpx.ReadTimeout, UpstreamTimeout, 504, "upstream_timeout"),
        (httpx.WriteTimeout, UpstreamTimeout, 504, "upstream_timeout"),
    ],
)
async def test_send_maps_httpx_errors(
    make_upstream: MakeUpstream,
    exc_type: type[httpx.TransportError],
    error_type: type[UpstreamError],
    status: int,
    code: str,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        # A lower-layer message that quotes the key must not leak into ours.
        raise exc_type(f"failed with {request.headers['authorization']}", request=request)

    upstream = make_upstream(handler)
    url = upstream.url(b"/chat/completions", b"")
    with pytest.raises(error_type) as caught:
        await upstream.send("POST", url, upstream.request_headers([]), b"{}")
    err = caught.value
    assert type(err) is error_type
    assert isinstance(err.__cause__, exc_type)
    assert err.status == status
    assert err.type == "sluice_upstream_error"
    body = json.loads(err.body())
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code"}
    assert body["error"]["type"] == "sluice_upstream_error"
    assert body["error"]["code"] == code
    assert "sim" in body["error"]["message"]
    assert KEY not in body["error"]["message"]
    assert KEY not in str(err)
    assert (b"content-type", b"application/json") in err.headers()


# --- poll_usage ----------------------------------------------------------------------------


async def test_poll_usage_reads_concurrent_sessions(make_upstream: MakeUpstream) -> None:
    upstream = make_upstream()
    with respx.mock(assert_all_called=True) as mock:
        route = mock.get(f"{BASE}/usage").respond(200, json={"usage": {"concurrent_sessions": 3}})
        assert await upstream.poll_usage() == 3
    request = route.calls.last.request
    assert request.method == "GET"
    assert str(request.url) == f"{BASE}/usage"
    assert request.headers["authorization"] == f"Bearer {KEY}"


async def test_poll_usage_has_a_short_timeout(make_upstream: MakeUpstream) -> None:
    seen: list[httpx.Request] = []
    handler = recording(seen, 200, json={"usage": {"concurrent_sessions": 0}})
    assert await make_upstream(handler).poll_usage() == 0
    assert seen[0].extensions["timeout"]["read"] == USAGE_TIMEOUT_S


async def test_poll_usage_without_a_key_sends_no_authorization(
    make_upstream: MakeUpstream,
) -> None:
    seen: list[httpx.Request] = []
    handler = recording(seen, 200, json={"usage": {"concurrent_sessions": 1}})
    assert await make_upstream(handler, api_key=None).poll_usage() == 1
    assert "authorization" not in seen[0].headers


async def test_poll_usage_truncates_fractional_counts(make_upstream: MakeUpstream) -> None:
    answer = httpx.Response(200, json={"usage": {"concurrent_sessions": 2.9}})
    assert await poll_usage_answered(make_upstream(), answer) == 2


@pytest.mark.parametrize("status", [201, 204, 301, 302, 401, 404, 429, 500, 503])
async def test_poll_usage_non_200_is_no_information(
    make_upstream: MakeUpstream, status: int
) -> None:
    body = b'{"usage": {"concurrent_sessions": 3}}'
    headers = {"location": f"{BASE}/elsewhere"}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers=headers, content=body)

    assert await make_upstream(handler).poll_usage() is None


BAD_USAGE_BODIES = [
    pytest.param(b"", id="empty"),
    pytest.param(b"not json", id="not-json"),
    pytest.param(b"\xff\xfe", id="not-utf8"),
    pytest.param(b"[]", id="list"),
    pytest.param(b'"usage"', id="string"),
    pytest.param(b"{}", id="no-usage"),
    pytest.param(b'{"usage": null}', id="usage-null"),
    pytest.param(b'{"usage": 3}', id="usage-number"),
    pytest.param(b'{"usage": {}}', id="no-count"),
    pytest.param(b'{"concurrent_sessions": 3}', id="count-at-top"),
    pytest.param(b'{"usage": {"concurrent_sessions": null}}', id="null"),
    pytest.param(b'{"usage": {"concurrent_sessions": true}}', id="bool-true"),
    pytest.param(b'{"usage": {"concurrent_sessions": false}}', id="bool-false"),
    pytest.param(b'{"usage": {"concurrent_sessions": "3"}}', id="string-count"),
    pytest.param(b'{"usage": {"concurrent_sessions": [3]}}', id="list-count"),
    pytest.param(b'{"usage": {"concurrent_sessions": -1}}', id="negative"),
    pytest.param(b'{"usage": {"concurrent_sessions": -0.5}}', id="negative-fraction"),
    pytest.param(b'{"usage": {"concurrent_sessions": NaN}}', id="nan"),
    pytest.param(b'{"usage": {"concurrent_sessions": Infinity}}', id="infinity"),
    pytest.param(b'{"usage": {"concurrent_sessions": 1e400}}', id="overflowing-float"),
]


@pytest.mark.parametrize("body", BAD_USAGE_BODIES)
async def test_poll_usage_unexpected_body_is_no_information(
    make_upstream: MakeUpstream, body: bytes
) -> None:
    answer = httpx.Response(200, content=body)
    assert await poll_usage_answered(make_upstream(), answer) is None


@pytest.mark.parametrize(
    "exc_type",
    [httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadTimeout, httpx.RemoteProtocolError],
)
async def test_poll_usage_network_error_is_no_information(
    make_upstream: MakeUpstream, exc_type: type[httpx.TransportError]
) -> None:
    assert await poll_usage_answered(make_upstream(), exc_type("down")) is None


async def test_poll_usage_huge_integer_count_does_not_raise(make_upstream: MakeUpstream) -> None:
    count = await poll_usage_answered(make_upstream(), httpx.Response(200, content=HUGE_COUNT))
    assert count is None or count >= 0


# --- parse_usage -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        ("0", 0),
        ("3", 3),
        ("0.0", 0),
        ("2.9", 2),
        ("0.99", 0),
        ("-0.0", 0),
        ("1e3", 1000),
        ("10000000000", 10_000_000_000),
    ],
)
def test_parse_usage_counts(count: str, expected: int) -> None:
    body = b'{"usage": {"concurrent_sessions": %s, "other": 1}, "x": 2}' % count.encode()
    result = parse_usage(body)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize("body", BAD_USAGE_BODIES)
def test_parse_usage_unexpected_is_none(body: bytes) -> None:
    assert parse_usage(body) is None


HUGE_COUNT = b'{"usage": {"concurrent_sessions": 1' + b"0" * 400 + b"}}"


def test_parse_usage_huge_integer_count_does_not_raise() -> None:
    count = parse_usage(HUGE_COUNT)
    assert count is None or count >= 0


@given(st.binary())
def test_parse_usage_of_any_bytes_is_none_or_a_count(body: bytes) -> None:
    count = parse_usage(body)
    assert count is None or (type(count) is int and count >= 0)


@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**300), 10**300))
def test_parse_usage_of_any_json_number(number: float) -> None:
    count = parse_usage(json.dumps({"usage": {"concurrent_sessions": number}}).encode())
    valid = number >= 0 and math.isfinite(number)  # False for NaN too
    assert count == (int(number) if valid else None)
