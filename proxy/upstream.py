"""The connection to one provider: a pooled httpx client, the request headers it
forwards, the `/usage` poll, and the one place httpx errors become sluice errors."""

from __future__ import annotations

import json
import math
import ssl

import httpx

from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from proxy.headers import HOP_BY_HOP
from proxy.settings import ProviderConfig

USAGE_TIMEOUT_S = 2.0
# httpx's default pool (100 connections, 20 kept alive) would silently queue every
# stream past the 100th; a proxy holds one upstream connection per open stream.
POOL_LIMITS = httpx.Limits(
    max_connections=100_000, max_keepalive_connections=1_000, keepalive_expiry=30
)
_DROP_REQUEST = HOP_BY_HOP | {b"host", b"content-length"}


class Upstream:
    """One provider's httpx client. `transport` is injectable so tests can mock it."""

    def __init__(
        self,
        config: ProviderConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        ca_bundle: str = "",
    ) -> None:
        self.config = config
        self._auth = f"Bearer {config.api_key}".encode() if config.api_key else None
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True
        )
        self.client = httpx.AsyncClient(
            transport=transport,
            verify=verify,
            timeout=httpx.Timeout(
                connect=config.connect_timeout_s,
                read=config.read_timeout_s,
                write=config.read_timeout_s,
                pool=config.connect_timeout_s,
            ),
            limits=POOL_LIMITS,
            follow_redirects=False,
            trust_env=False,
        )
        base = httpx.URL(config.base_url)
        self._base = base
        self._base_path = base.raw_path.rstrip(b"/")

    async def close(self) -> None:
        await self.client.aclose()

    def url(self, raw_path: bytes, query: bytes) -> httpx.URL:
        """`{base_url}{raw_path}?{query}`, keeping the client's percent-encoding.
        Scheme, host and port always come from `base_url`: no open proxy."""
        return self._base.copy_with(
            raw_path=self._base_path + raw_path + (b"?" + query if query else b"")
        )

    def request_headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The client's headers minus hop-by-hop ones (and those its Connection names),
        with Authorization replaced when the provider has a key."""
        drop = _DROP_REQUEST
        for name, value in headers:
            if name == b"connection":
                listed = {token.strip().lower() for token in value.split(b",")}
                drop = drop | listed
        if self._auth is not None:
            drop = drop | {b"authorization"}
        forwarded = [(name, value) for name, value in headers if name not in drop]
        if self._auth is not None:
            forwarded.append((b"authorization", self._auth))
        return forwarded

    async def send(
        self, method: str, url: httpx.URL, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> httpx.Response:
        """Send and return the response with its body not yet read (the caller
        streams it and must close it)."""
        request = httpx.Request(method, url, headers=headers, content=body)
        try:
            return await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise upstream_error(exc, self.config.id) from exc

    async def poll_usage(self) -> int | None:
        """`usage.concurrent_sessions` from `GET {base_url}/usage`, or None for
        "no information" (any failure, any unexpected answer)."""
        headers = {"authorization": self._auth.decode()} if self._auth else {}
        try:
            response = await self.client.get(
                self.config.base_url + "/usage", headers=headers, timeout=USAGE_TIMEOUT_S
            )
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        return parse_usage(response.content)


def parse_usage(body: bytes) -> int | None:
    """`{"usage": {"concurrent_sessions": N}}` -> N truncated to an int; None otherwise."""
    try:
        data = json.loads(body)
        count = data["usage"]["concurrent_sessions"]
    except (ValueError, TypeError, KeyError):
        return None
    if isinstance(count, bool) or not isinstance(count, int | float):
        return None
    if isinstance(count, float) and not math.isfinite(count):
        return None
    return int(count) if count >= 0 else None


def upstream_error(exc: httpx.HTTPError, provider_id: str) -> UpstreamError:
    """Map an httpx failure to 502 (unreachable) or 504 (went silent)."""
    if isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout):
        return UpstreamTimeout(
            f"upstream {provider_id} sent nothing in time ({type(exc).__name__})"
        )
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamUnavailable(f"upstream {provider_id} did not accept a connection in time")
    return UpstreamUnavailable(f"upstream {provider_id} is unreachable ({type(exc).__name__})")
