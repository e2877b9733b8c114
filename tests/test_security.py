"""Security review as tests (issue 7): the admin token guards every route but
`/healthz`, the comparison is constant-time, the default bind is loopback, secrets
stay out of logs, answers and the database, and TLS is verified by default.
"""

from __future__ import annotations

import hmac
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Route

import proxy.edge.admin
from proxy.edge.app import Sluice
from proxy.errors import UpstreamError
from proxy.settings import Settings, resolve_providers
from proxy.upstream.client import Upstream
from tests.certs import make_certificates
from tests.conftest import ProxyFactory
from tests.servers import Server, free_port

pytestmark = pytest.mark.e2e

ADMIN_TOKEN = "adm-secret-token-5be1c0de"
ENV_KEY = "sk-secret-from-env-9a8b7c6d"
INLINE_KEY = "sk-secret-inline-1f2e3d4c"
CLIENT_KEY = "sk-client-secret-0a1b2c3d"
SECRETS = (ADMIN_TOKEN, ENV_KEY, INLINE_KEY, CLIENT_KEY)


def secured_providers(sim: Server) -> str:
    return f"""
        [[providers]]
        id = "sec"
        base_url = "{sim.url}/v1"
        api_key_env = "SEC_TEST_PROVIDER_KEY"
        limit = 4
        default = true

        [[providers]]
        id = "inline"
        base_url = "{sim.url}/v1"
        api_key = "{INLINE_KEY}"
        limit = 2
        """


@pytest.fixture
def secured(make_proxy: ProxyFactory, sim_reset: Server) -> Server:
    return make_proxy(
        secured_providers(sim_reset),
        server=f'admin_token = "{ADMIN_TOKEN}"',
        admission="retry_on_429 = 0\npause_s = 0",
        env={"SEC_TEST_PROVIDER_KEY": ENV_KEY},
    )


def app_routes() -> list[Route]:
    """Every route of the application object, as built from a config with a token."""
    settings = Settings.model_validate(
        {
            "server": {"admin_token": ADMIN_TOKEN, "database": "unused.db"},
            "providers": [{"id": "sec", "base_url": "http://127.0.0.1:1/v1"}],
        }
    )
    routes = Sluice(settings).web.routes
    for route in routes:
        # A Mount or a WebSocket route would need its own check: fail loudly, so a new
        # kind of route cannot slip past this test either.
        assert type(route) is Route, f"route {route!r} is not a plain Route; extend this test"
    return [route for route in routes if isinstance(route, Route)]


def concrete(route: Route, provider_id: str) -> str:
    path = route.path
    for name in route.param_convertors:
        path = path.replace("{" + name + "}", provider_id)
    return path


def requests_for(route: Route) -> list[tuple[str, str]]:
    methods = sorted(route.methods or {"GET"})
    paths = {concrete(route, "sec"), concrete(route, "no-such-provider")}
    return [(method, path) for method in methods for path in sorted(paths)]


# --- the token guards every route ------------------------------------------------------------


def test_every_route_but_healthz_and_the_page_needs_the_admin_token(secured: Server) -> None:
    routes = app_routes()
    assert {route.path for route in routes} >= {"/healthz", "/metrics", "/concurrency/status"}
    wrong = [
        {},
        {"authorization": "Bearer"},
        {"authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
        {"authorization": f"Basic {ADMIN_TOKEN}"},
        {"authorization": ADMIN_TOKEN},
        {"x-admin-token": ADMIN_TOKEN},
    ]
    checked = 0
    with httpx.Client(base_url=secured.url, timeout=10) as client:
        for route in routes:
            for method, path in requests_for(route):
                if route.path == "/healthz":
                    assert client.request(method, path).status_code == 200
                    continue
                if route.path.startswith("/concurrency/ui"):
                    # The operator's page: static files without data (SPEC 13).
                    assert client.request(method, path).status_code in (200, 404)
                    continue
                for headers in wrong:
                    refused = client.request(
                        method, path, headers=headers, params={"token": ADMIN_TOKEN}
                    )
                    assert refused.status_code == 401, (method, path, headers)
                    if method != "HEAD":
                        assert ADMIN_TOKEN not in refused.text
                    checked += 1
                body = b'{"limit": 3}' if "limits" in path else b'{"cooldownMs": 10}'
                allowed = client.request(
                    method,
                    path,
                    content=body if method == "PUT" else b"",
                    headers={"authorization": f"bearer  {ADMIN_TOKEN}"},
                )
                assert allowed.status_code not in (401, 403), (method, path)
                assert allowed.status_code < 500, (method, path, allowed.text)
    assert checked >= 8 * 10


def test_the_proxy_routes_need_no_admin_token(secured: Server) -> None:
    # The data plane authenticates with the provider, not with sluice's admin token.
    response = httpx.get(secured.url + "/v1/models")
    assert response.status_code == 200


# --- constant-time comparison ----------------------------------------------------------------


async def test_the_token_is_compared_with_hmac_compare_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, through the app's own lifespan: every guarded request's credential
    goes through `hmac.compare_digest` and nothing else decides."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    assert vars(proxy.edge.admin)["hmac"] is hmac  # admin.py calls hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", spy)
    settings = Settings.model_validate(
        {
            "server": {"admin_token": ADMIN_TOKEN, "database": str(tmp_path / "s.db")},
            "providers": [{"id": "sec", "base_url": "http://127.0.0.1:1/v1", "limit": 2}],
        }
    )
    app = Sluice(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.web.router.lifespan_context(app.web),
        httpx.AsyncClient(transport=transport, base_url="http://sluice") as client,
    ):
        for credential, expected in (
            (ADMIN_TOKEN, 200),
            ("x", 401),
            (ADMIN_TOKEN[:-1] + "X", 401),
            (ADMIN_TOKEN * 2, 401),
        ):
            calls.clear()
            for path in ("/concurrency/status", "/metrics", "/concurrency/limits/sec"):
                response = await client.get(path, headers={"authorization": f"Bearer {credential}"})
                assert response.status_code == expected, (path, credential)
            assert calls == [(credential.encode(), ADMIN_TOKEN.encode())] * 3


# --- default bind ----------------------------------------------------------------------------


def test_the_default_host_is_loopback() -> None:
    settings = Settings.model_validate({"providers": [{"id": "a", "base_url": "http://x/v1"}]})
    assert settings.server.host == "127.0.0.1"


def listening_addresses(pid: int) -> list[str]:
    """The local addresses of the TCP sockets `pid` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                host_hex, port_hex = local.split(":")
                packed = bytes.fromhex(host_hex)
                # /proc prints each 32-bit word in host byte order (little-endian here).
                words = [packed[i : i + 4][::-1] for i in range(0, len(packed), 4)]
                host = socket.inet_ntop(family, b"".join(words))
                found.append(f"{host}:{int(port_hex, 16)}")
    return found


@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="needs Linux /proc")
def test_a_server_without_a_host_listens_on_loopback_only(
    make_proxy: ProxyFactory, sim_reset: Server
) -> None:
    server = make_proxy(secured_providers(sim_reset), env={"SEC_TEST_PROVIDER_KEY": ENV_KEY})
    assert listening_addresses(server.proc.pid) == [f"127.0.0.1:{server.port}"]


# --- no secret anywhere ----------------------------------------------------------------------


def test_no_secret_in_logs_answers_or_the_database(secured: Server, sim_reset: Server) -> None:
    answers: list[bytes] = []
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    client_auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    chat = {"model": "sim-1", "messages": [{"role": "user", "content": "hi"}]}

    def keep(response: httpx.Response) -> httpx.Response:
        head = f"{response.status_code}\n" + "\n".join(
            f"{name}: {value}" for name, value in response.headers.multi_items()
        )
        answers.append(head.encode() + b"\n\n" + response.content)
        return response

    with httpx.Client(base_url=secured.url, timeout=10) as client:
        # The key really is in use: the upstream's echo shows it arrived there. (That
        # answer is the upstream's own body, so it is not kept with sluice's answers.)
        echo = client.post("/v1/echo", headers=client_auth).json()
        assert ["authorization", f"Bearer {ENV_KEY}"] in echo["headers"]
        echo = client.post("/inline/v1/echo", headers=client_auth).json()
        assert ["authorization", f"Bearer {INLINE_KEY}"] in echo["headers"]

        for provider in ("sec", "inline"):
            keep(client.put(f"/concurrency/limits/{provider}", json={"limit": 3}, headers=admin))
            keep(
                client.put(
                    f"/concurrency/cooldown/{provider}", json={"cooldownMs": 5}, headers=admin
                )
            )
            keep(client.delete(f"/concurrency/limits/{provider}", headers=admin))
            keep(client.put(f"/concurrency/limits/{provider}", json={"limit": 4}, headers=admin))
        # Traffic: plain, refused by the upstream with 429 (an auto-reduction, persisted),
        # reset by the upstream (a 502 from sluice), and a bad header (a 400 from sluice).
        keep(client.post("/v1/chat/completions", json=chat, headers=client_auth))
        limited = keep(
            client.post(
                "/v1/chat/completions",
                json=chat,
                headers={**client_auth, "x-sim-fault": "rate-limit", "x-conversation-id": "c1"},
            )
        )
        assert limited.status_code == 429
        keep(
            client.post(
                "/v1/chat/completions",
                json=chat,
                headers={**client_auth, "x-sim-fault": "reset-before-headers"},
            )
        )
        keep(
            client.post(
                "/v1/chat/completions",
                json=chat,
                headers={**client_auth, "x-prompt-started-at": CLIENT_KEY},
            )
        )
        keep(client.get("/v1/models", headers=client_auth))
        keep(client.get("/concurrency/status", headers={"authorization": f"Bearer {CLIENT_KEY}"}))
        status = keep(client.get("/concurrency/status/sec", headers=admin)).json()
        assert status["autoReduced"] is True
        for path in (
            "/concurrency/status",
            "/concurrency/limits",
            "/concurrency/events",
            "/metrics",
        ):
            keep(client.get(path, headers=admin))

    database = _database_path(secured)
    stored_while_running = _database_bytes(database)
    assert stored_while_running, "the database files exist"
    assert secured.stop() == 0
    stored_after_stop = _database_bytes(database)
    log = secured.log()
    assert "auto-reduced" in log.lower() or "limit_reduced" in log  # the run did log things

    for secret in SECRETS:
        encoded = secret.encode()
        assert secret not in log, f"{secret} is in the log"
        for answer in answers:
            assert encoded not in answer, f"{secret} is in an answer:\n{answer[:300]!r}"
        assert encoded not in stored_while_running, f"{secret} is in the database"
        assert encoded not in stored_after_stop, f"{secret} is in the database"


def test_a_secret_inside_a_conversation_id_is_redacted_everywhere(secured: Server) -> None:
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    careless = f"conv-{INLINE_KEY}-{ADMIN_TOKEN}"
    with httpx.Client(base_url=secured.url, timeout=10) as client:
        limited = client.post(
            "/v1/chat/completions",
            json={"model": "sim-1", "messages": []},
            headers={"x-sim-fault": "rate-limit", "x-conversation-id": careless},
        )
        assert limited.status_code == 429
        events = client.get("/concurrency/events", headers=admin).text
    assert secured.stop() == 0
    stored = _database_bytes(_database_path(secured))
    assert "conv-" in secured.log()  # the id is logged, with the secrets blanked out
    for secret in (INLINE_KEY, ADMIN_TOKEN):
        assert secret not in secured.log()
        assert secret not in events
        assert secret.encode() not in stored


def _database_path(server: Server) -> Path:
    """The `database` of the config the server was started with (its last argument)."""
    args = server.proc.args
    assert isinstance(args, list)
    config = Path(str(args[args.index("--config") + 1]))
    for line in config.read_text().splitlines():
        if line.strip().startswith("database"):
            return Path(line.split("=", 1)[1].strip().strip('"'))
    raise AssertionError("no database in the config")


def _database_bytes(database: Path) -> bytes:
    """The database and its WAL and shared-memory files, as they are on disk now."""
    parts = [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
    return b"".join(part.read_bytes() for part in parts if part.exists())


# --- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An HTTPS upstream with a certificate from a throwaway CA: (base_url, ca file)."""
    if shutil.which("openssl") is None:
        pytest.skip("no `openssl` command to make a throwaway certificate; live TLS not tested")
    ca, cert, key = make_certificates(tmp_path_factory.mktemp("tls"))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = b'{"object": "list", "data": []}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    yield f"https://127.0.0.1:{port}/v1", ca
    server.shutdown()
    server.server_close()


async def test_tls_is_verified_by_default_and_the_ca_bundle_is_used(
    tls_upstream: tuple[str, Path],
) -> None:
    base_url, ca = tls_upstream
    config = resolve_providers(
        Settings.model_validate({"providers": [{"id": "tls", "base_url": base_url}]})
    )[0]
    default = Upstream(config)
    try:
        with pytest.raises(UpstreamError):
            await default.send("GET", default.url(b"/models", b""), [], b"")
    finally:
        await default.close()
    trusting = Upstream(config, ca_bundle=str(ca))
    try:
        response = await trusting.send("GET", trusting.url(b"/models", b""), [], b"")
        try:
            assert response.status == 200
        finally:
            await response.aclose()
    finally:
        await trusting.close()


def tls_proxy(make_proxy: ProxyFactory, base_url: str, server: str = "") -> Server:
    return make_proxy(
        f"""
        [[providers]]
        id = "tls"
        base_url = "{base_url}"
        """,
        server=server,
    )


def test_a_proxy_refuses_an_unknown_ca_and_trusts_server_ca_bundle(
    make_proxy: ProxyFactory, tls_upstream: tuple[str, Path]
) -> None:
    base_url, ca = tls_upstream
    untrusting = tls_proxy(make_proxy, base_url)
    refused = httpx.get(untrusting.url + "/v1/models", timeout=10)
    assert refused.status_code == 502
    assert refused.json()["error"]["type"] == "sluice_upstream_error"
    untrusting.stop()
    trusting = tls_proxy(make_proxy, base_url, server=f'ca_bundle = "{ca}"')
    assert httpx.get(trusting.url + "/v1/models", timeout=10).status_code == 200


@pytest.mark.parametrize("content", [None, "not a certificate\n"], ids=["missing", "garbage"])
def test_a_bad_ca_bundle_is_one_config_error_line(tmp_path: Path, content: str | None) -> None:
    bundle = tmp_path / "ca.pem"
    if content is not None:
        bundle.write_text(content)
    config = tmp_path / "sluice.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [server]
            port = {free_port()}
            database = "{tmp_path / "s.db"}"
            ca_bundle = "{bundle}"
            [[providers]]
            id = "tls"
            base_url = "https://127.0.0.1:1/v1"
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
        capture_output=True,
        timeout=30,
    )
    output = (done.stdout + done.stderr).decode()
    assert done.returncode != 0
    assert "Traceback" not in output
    assert len(output.strip().splitlines()) == 1
    assert "ca_bundle" in output
