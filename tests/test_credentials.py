"""Every client credential stays home (issue 14 item 0, SPEC section 4).

With a provider key configured, none of the client's `Authorization`, `x-api-key`
or `api-key` reaches the upstream, and the provider key goes in the provider's
`auth_header`; without one, the client's credentials pass through unchanged. End to
end against the sim's `/v1/echo`, which answers with the headers it received.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.admission import Policy
from proxy.errors import ConfigError
from proxy.settings import ProviderConfig, Settings, load, resolve_providers
from proxy.upstream.client import CREDENTIALS, Upstream, credential_header
from tests import httpx_transport
from tests.conftest import sim_provider, start_proxy
from tests.servers import Server

PROVIDER_KEY = "sk-provider-7c1e"
CLIENT_SECRETS = {
    "authorization": "Bearer sk-client-authorization-51",
    "x-api-key": "sk-client-x-api-key-52",
    "api-key": "sk-client-api-key-53",
}
# Each keyed provider and the one header its key must arrive in.
KEYED = {
    "bearer": ("authorization", f"Bearer {PROVIDER_KEY}"),
    "anthropic": ("x-api-key", PROVIDER_KEY),
    "azure": ("api-key", PROVIDER_KEY),
}
# The client sends none, one, two or all three credential headers.
CLIENT_SETS = [
    combo
    for n in range(len(CLIENT_SECRETS) + 1)
    for combo in itertools.combinations(CLIENT_SECRETS, n)
]


@pytest.fixture(scope="module")
def proxy(sim: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    providers = (
        sim_provider(sim, "open", default=True)
        + sim_provider(sim, "bearer", api_key=PROVIDER_KEY)
        + sim_provider(sim, "anthropic", api_key=PROVIDER_KEY, auth_header="x-api-key")
        + sim_provider(sim, "azure", api_key=PROVIDER_KEY, auth_header="api-key")
    )
    server = start_proxy(tmp_path_factory.mktemp("credentials"), providers)
    yield server
    server.stop()


def echoed(proxy: Server, provider: str, headers: dict[str, str]) -> list[tuple[str, str]]:
    """The header list the upstream received for a request with `headers`."""
    response = httpx.post(f"{proxy.url}/{provider}/v1/echo", headers=headers, content=b"{}")
    assert response.status_code == 200, response.text
    return [(name.lower(), value) for name, value in response.json()["headers"]]


@pytest.mark.parametrize("sent", CLIENT_SETS, ids=lambda s: "+".join(s) or "none")
@pytest.mark.parametrize("provider", list(KEYED))
def test_a_keyed_provider_gets_its_key_in_its_header_and_no_client_credential(
    proxy: Server, sim_reset: Server, provider: str, sent: tuple[str, ...]
) -> None:
    received = echoed(proxy, provider, {name: CLIENT_SECRETS[name] for name in sent})
    credentials = [(name, value) for name, value in received if name.encode() in CREDENTIALS]
    assert credentials == [KEYED[provider]]
    for secret in CLIENT_SECRETS.values():
        assert all(secret not in value for _, value in received), secret


@pytest.mark.parametrize("sent", CLIENT_SETS, ids=lambda s: "+".join(s) or "none")
def test_without_a_provider_key_the_client_credentials_pass_through(
    proxy: Server, sim_reset: Server, sent: tuple[str, ...]
) -> None:
    received = echoed(proxy, "open", {name: CLIENT_SECRETS[name] for name in sent})
    credentials = {name: value for name, value in received if name.encode() in CREDENTIALS}
    assert credentials == {name: CLIENT_SECRETS[name] for name in sent}


def test_credential_header_names_are_matched_whatever_their_case(
    proxy: Server, sim_reset: Server
) -> None:
    """HTTP header names are case-insensitive; uvicorn lowercases them before we look."""
    received = echoed(proxy, "anthropic", {"X-Api-Key": "sk-shouting-1", "API-KEY": "sk-2"})
    assert [(n, v) for n, v in received if n.encode() in CREDENTIALS] == [KEYED["anthropic"]]


# --- configuration and the /usage poll ------------------------------------------------


def config(tmp_path: Path, extra: str) -> Settings:
    path = tmp_path / "sluice.toml"
    path.write_text(
        f'[[providers]]\nid = "p"\nbase_url = "https://p.example/v1"\napi_key = "k"\n{extra}\n'
    )
    return load(path)


def test_auth_header_defaults_to_authorization(tmp_path: Path) -> None:
    (resolved,) = resolve_providers(config(tmp_path, ""))
    assert resolved.auth_header == "authorization"
    assert credential_header(resolved) == (b"authorization", b"Bearer k")


@pytest.mark.parametrize("name", ["x-api-key", "api-key"])
def test_auth_header_carries_the_bare_key(tmp_path: Path, name: str) -> None:
    (resolved,) = resolve_providers(config(tmp_path, f'auth_header = "{name}"'))
    assert resolved.auth_header == name
    assert credential_header(resolved) == (name.encode(), b"k")


@pytest.mark.parametrize("value", ["X-Api-Key", "cookie", "", "bearer"])
def test_an_unknown_auth_header_is_a_config_error_naming_the_key(
    tmp_path: Path, value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config(tmp_path, f'auth_header = "{value}"')
    message = str(caught.value)
    assert message.startswith("config error: providers[0].auth_header: ")
    assert "'authorization', 'x-api-key' or 'api-key'" in message
    assert "\n" not in message


def keyed_config(auth_header: str, api_key: str | None = PROVIDER_KEY) -> ProviderConfig:
    return ProviderConfig(
        id="p",
        base_url="http://upstream.test/v1",
        api_key=api_key,
        default=True,
        connect_timeout_s=1.0,
        read_timeout_s=1.0,
        policy=Policy(limit=1, usage_gate=True, cooldown_ms=0, max_queue=10),
        auth_header=auth_header,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("auth_header", ["authorization", "x-api-key", "api-key"])
async def test_the_usage_poll_sends_the_key_in_the_providers_header(auth_header: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"usage": {"concurrent_sessions": 1}})

    config_ = keyed_config(auth_header)
    transport = httpx_transport.for_provider(config_, httpx.MockTransport(handler))
    upstream = Upstream(config_, transport=transport)
    try:
        assert await upstream.poll_usage() == 1
    finally:
        await upstream.close()
    (request,) = seen
    sent = {name for name in request.headers if name.encode() in CREDENTIALS}
    assert sent == {auth_header}
    expected = f"Bearer {PROVIDER_KEY}" if auth_header == "authorization" else PROVIDER_KEY
    assert request.headers[auth_header] == expected


def test_request_headers_drop_every_client_credential_only_with_a_key() -> None:
    client = [(name.encode(), CLIENT_SECRETS[name].encode()) for name in CLIENT_SECRETS]
    keyed = Upstream(keyed_config("api-key"))  # the transport connects on first use only
    assert keyed.request_headers([*client, (b"accept", b"*/*")]) == [
        (b"accept", b"*/*"),
        (b"api-key", PROVIDER_KEY.encode()),
    ]
    open_ = Upstream(keyed_config("api-key", api_key=None))
    assert open_.request_headers(client) == client
