"""Client keys at the edge (`proxy/edge/clients.py`, SPEC section 11): who is calling,
and the request's headers with every credential header gone."""

from __future__ import annotations

import hashlib
import json

import pytest

from proxy.edge.clients import ClientKeys
from proxy.errors import Unauthorized
from proxy.settings import ClientConfig

KEY_A = "sk-client-a-5d1e"
KEY_B = "sk-client-b-90c4"
Headers = list[tuple[bytes, bytes]]


def keys() -> ClientKeys:
    return ClientKeys(
        [
            ClientConfig("team-a", hashlib.sha256(KEY_A.encode()).digest(), {}),
            ClientConfig("team-b", hashlib.sha256(KEY_B.encode()).digest(), {"sim": 1}),
        ]
    )


def identify(headers: Headers) -> tuple[str, Headers]:
    return keys().identify(headers)


@pytest.mark.parametrize(
    ("headers", "client"),
    [
        pytest.param([(b"authorization", f"Bearer {KEY_A}".encode())], "team-a", id="bearer"),
        pytest.param([(b"authorization", f"bearer  {KEY_B} ".encode())], "team-b", id="case"),
        pytest.param([(b"x-api-key", KEY_B.encode())], "team-b", id="x-api-key"),
        pytest.param(
            [(b"authorization", b"Bearer sk-upstream"), (b"x-api-key", KEY_A.encode())],
            "team-a",
            id="either-header",
        ),
    ],
)
def test_a_configured_key_names_its_client(headers: Headers, client: str) -> None:
    assert identify(headers)[0] == client


def test_every_credential_header_is_dropped() -> None:
    headers = [
        (b"host", b"x"),
        (b"authorization", f"Bearer {KEY_A}".encode()),
        (b"x-api-key", b"sk-something-else"),
        (b"api-key", b"sk-azure-style"),
        (b"content-type", b"application/json"),
    ]
    client, kept = identify(headers)
    assert client == "team-a"
    assert kept == [(b"host", b"x"), (b"content-type", b"application/json")]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([], id="none"),
        pytest.param([(b"authorization", b"Basic dXNlcjpwYXNz")], id="basic"),
        pytest.param([(b"authorization", b"Bearer ")], id="empty-bearer"),
        pytest.param([(b"x-api-key", b"")], id="empty-x-api-key"),
        pytest.param([(b"api-key", KEY_A.encode())], id="api-key-is-not-a-client-header"),
    ],
)
def test_no_client_key_is_unauthorized(headers: Headers) -> None:
    with pytest.raises(Unauthorized, match="client key is required"):
        identify(headers)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([(b"authorization", b"Bearer sk-wrong")], id="bearer"),
        pytest.param([(b"x-api-key", b"sk-wrong")], id="x-api-key"),
        pytest.param([(b"authorization", KEY_A.encode())], id="no-scheme"),
        pytest.param([(b"x-api-key", KEY_A.upper().encode())], id="case-matters-in-the-key"),
    ],
)
def test_an_unknown_key_is_unauthorized(headers: Headers) -> None:
    with pytest.raises(Unauthorized):
        identify(headers)


def test_unauthorized_is_a_401_in_the_openai_shape() -> None:
    err = Unauthorized("unknown client key")
    assert err.status == 401
    assert json.loads(err.body()) == {
        "error": {
            "message": "unknown client key",
            "type": "sluice_unauthorized",
            "code": "unauthorized",
        }
    }
    assert (b"www-authenticate", b"Bearer") in err.headers()


def test_the_keys_are_never_shown() -> None:
    shown = repr(keys())
    assert KEY_A not in shown
    assert hashlib.sha256(KEY_A.encode()).hexdigest() not in shown
