"""Which provider a path goes to and which raw path is forwarded (SPEC section 3)."""

from __future__ import annotations

from urllib.parse import quote, unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.edge.routing import Route, Router
from proxy.errors import BadRequest, NotFound

PROVIDERS = {"main": "MAIN", "sim": "SIM"}


@pytest.fixture
def router() -> Router[str]:
    return Router(PROVIDERS, "main")


@pytest.fixture
def no_default() -> Router[str]:
    return Router(PROVIDERS, None)


def test_v1_goes_to_the_default_provider(router: Router[str]) -> None:
    assert router.resolve("/v1/models", b"/v1/models") == Route("MAIN", b"/models", "/models")


def test_raw_path_defaults_to_the_path(router: Router[str]) -> None:
    assert router.resolve("/v1/models", None) == Route("MAIN", b"/models", "/models")


def test_provider_prefix_goes_to_that_provider(router: Router[str]) -> None:
    route = router.resolve("/sim/v1/chat/completions", b"/sim/v1/chat/completions")
    assert route == Route("SIM", b"/chat/completions", "/chat/completions")


def test_default_provider_is_also_reachable_by_its_prefix(router: Router[str]) -> None:
    route = router.resolve("/main/v1/embeddings", b"/main/v1/embeddings")
    assert route == Route("MAIN", b"/embeddings", "/embeddings")


@pytest.mark.parametrize(
    ("path", "raw", "expected"),
    [
        pytest.param("/v1/files/a b", b"/v1/files/a%20b", b"/files/a%20b", id="default"),
        pytest.param("/sim/v1/files/a b", b"/sim/v1/files/a%20b", b"/files/a%20b", id="prefix"),
        pytest.param("/v1/files/a%b", b"/v1/files/a%25b", b"/files/a%25b", id="percent-sign"),
        pytest.param("/v1/files/a+b", b"/v1/files/a+b", b"/files/a+b", id="plus"),
        pytest.param("/v1/files/é", b"/v1/files/%C3%A9", b"/files/%C3%A9", id="utf8"),
    ],
)
def test_percent_encoding_is_kept_in_raw_path(
    router: Router[str], path: str, raw: bytes, expected: bytes
) -> None:
    route = router.resolve(path, raw)
    assert route is not None
    assert route.raw_path == expected
    assert route.path == path.partition("/v1")[2]


def test_percent_encoded_prefix_falls_back_to_reencoding(router: Router[str]) -> None:
    # The client encoded the "v1" itself; the forwarded path is rebuilt from the
    # decoded rest, so it still names the same resource.
    route = router.resolve("/v1/files/a b", b"/%761/files/a%20b")
    assert route == Route("MAIN", b"/files/a%20b", "/files/a b")


def test_percent_encoded_provider_id(router: Router[str]) -> None:
    route = router.resolve("/sim/v1/models", b"/s%69m/v1/models")
    assert route == Route("SIM", b"/models", "/models")


def assert_not_found_listing_prefixes(router: Router[str], path: str) -> None:
    """A 404 whose message lists every provider's prefix, so the client can fix the URL."""
    with pytest.raises(NotFound) as caught:
        router.resolve(path, path.encode())
    assert caught.value.status == 404
    assert "/main/v1/" in caught.value.message
    assert "/sim/v1/" in caught.value.message


@pytest.mark.parametrize("path", ["/nope/v1/models", "/MAIN/v1/models", "//v1/models"])
def test_unknown_provider_is_not_found_listing_prefixes(router: Router[str], path: str) -> None:
    assert_not_found_listing_prefixes(router, path)


def test_unknown_provider_message_names_it(router: Router[str]) -> None:
    with pytest.raises(NotFound, match="nope"):
        router.resolve("/nope/v1/models", b"/nope/v1/models")


def test_no_default_with_several_providers_is_not_found_listing_prefixes(
    no_default: Router[str],
) -> None:
    assert_not_found_listing_prefixes(no_default, "/v1/models")


def test_no_default_still_routes_prefixes(no_default: Router[str]) -> None:
    route = no_default.resolve("/sim/v1/models", b"/sim/v1/models")
    assert route == Route("SIM", b"/models", "/models")


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "",
        "/healthz",
        "/concurrency/status",
        "/concurrency/sim/limit",
        "/metrics",
        "/sim",
        "/sim/",
        "/simv1/x",
        "/sim/v1x",
        "/sim/v2/models",
        "/v1x",
        "/v2/models",
        "/x/y/v1/models",
    ],
)
def test_non_proxy_paths_are_not_routed(router: Router[str], path: str) -> None:
    assert router.resolve(path, path.encode()) is None


@pytest.mark.parametrize(
    "path",
    [
        "/v1/../x",
        "/v1/..",
        "/v1/a/./b",
        "/v1/.",
        "/v1/a/../../x",
        "/sim/v1/..",
        "/sim/v1/../../main/v1/x",
        "/sim/v1/a/./b",
    ],
)
def test_dot_segments_are_bad_request(router: Router[str], path: str) -> None:
    with pytest.raises(BadRequest) as caught:
        router.resolve(path, path.encode())
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/../x", b"/v1/%2e%2e/x"),
        ("/v1/../x", b"/v1/%2E%2E/x"),
        ("/v1/./x", b"/v1/%2e/x"),
        ("/sim/v1/..", b"/sim/v1/%2e%2e"),
        ("/sim/v1/../x", b"/sim/v1/.%2e/x"),
    ],
)
def test_percent_encoded_dot_segments_are_bad_request(
    router: Router[str], path: str, raw: bytes
) -> None:
    # The server decodes %2e%2e into the `path` it hands us; the check is on that.
    with pytest.raises(BadRequest):
        router.resolve(path, raw)


def test_dots_inside_a_segment_are_fine(router: Router[str]) -> None:
    route = router.resolve("/v1/files/a..b/.env", b"/v1/files/a..b/.env")
    assert route == Route("MAIN", b"/files/a..b/.env", "/files/a..b/.env")


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/chat/completions", b"/v1%2Fchat/completions"),
        ("/sim/v1/chat/completions", b"/sim/v1%2Fchat/completions"),
    ],
)
def test_encoded_slash_never_moves_the_prefix_split(
    router: Router[str], path: str, raw: bytes
) -> None:
    """Only literal slashes structure the path: `v1%2Fchat` is one segment, not `v1`."""
    assert router.resolve(path, raw) is None


def test_encoded_slash_in_the_provider_segment_is_an_unknown_provider(router: Router[str]) -> None:
    with pytest.raises(NotFound, match="sim/v1"):
        router.resolve("/sim/v1/v1/chat/completions", b"/sim%2Fv1/v1/chat/completions")


def test_encoded_slash_in_the_rest_is_forwarded_and_matched_decoded(router: Router[str]) -> None:
    route = router.resolve("/v1/chat/completions", b"/v1/chat%2Fcompletions")
    assert route is not None
    assert route.raw_path == b"/chat%2Fcompletions"
    assert unquote(route.raw_path.decode()) == route.path == "/chat/completions"


# --- properties ------------------------------------------------------------------------

SEGMENTS = st.sampled_from(
    ["", "v1", "v2", "main", "sim", "nope", ".", "..", "a b", "x", "%", "é", "chat"]
)
GRAMMAR_PATHS = st.lists(SEGMENTS | st.text(max_size=5), max_size=6).map(
    lambda parts: "/" + "/".join(parts)
)
ANY_PATHS = GRAMMAR_PATHS | st.text() | st.text().map(lambda text: "/" + text)


def _check(router: Router[str], path: str, raw: bytes | None) -> Route[str] | None:
    try:
        route = router.resolve(path, raw)
    except (NotFound, BadRequest):
        return None
    if route is not None:
        assert route.provider in PROVIDERS.values()
    return route


@settings(max_examples=300)
@given(ANY_PATHS, st.sampled_from(["none", "utf8", "quoted"]), st.booleans())
def test_any_path_routes_or_is_refused_cleanly(path: str, raw_form: str, default: bool) -> None:
    raw = {"none": None, "utf8": path.encode(), "quoted": quote(path).encode()}[raw_form]
    router = Router(PROVIDERS, "main" if default else None)
    _check(router, path, raw)


@st.composite
def encoded_paths(draw: st.DrawFn) -> tuple[str, bytes]:
    """A path and a raw form of it with any character percent-encoded except '/'."""
    path = draw(GRAMMAR_PATHS)
    out = []
    for char in path:
        unreserved = char.isascii() and (char.isalnum() or char in "-._~")
        keep = char == "/" or (unreserved and draw(st.booleans()))
        out.append(char if keep else quote(char, safe=""))
    return path, "".join(out).encode("ascii")


@settings(max_examples=300)
@given(encoded_paths())
def test_raw_path_decodes_to_the_routed_path(case: tuple[str, bytes]) -> None:
    path, raw = case
    route = _check(Router(PROVIDERS, "main"), path, raw)
    if route is not None:
        assert route.raw_path[:1] in (b"", b"/")
        assert unquote(route.raw_path.decode("ascii")) == route.path
