"""The connection to one provider: where requests go, which headers they carry, and
the `/usage` poll. The bytes travel through an injected `Transport`."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable

from proxy.errors import UpstreamError
from proxy.settings import ProviderConfig
from proxy.upstream.http1 import Http1Transport
from proxy.upstream.transport import HOP_BY_HOP, Transport, UpstreamResponse

USAGE_TIMEOUT_S = 2.0
_DROP_REQUEST = HOP_BY_HOP | {b"host", b"content-length"}
CREDENTIALS = frozenset({b"authorization", b"x-api-key", b"api-key"})
"""Every header a client's credential may travel in. None is forwarded when the
provider has a key of its own, nor, with `[[clients]]`, when it carries the client's
sluice key (the edge strips them then: `proxy.edge.clients`)."""
"""Every header a client may carry its key in (OpenAI, Anthropic and Azure styles)."""


def credential_header(config: ProviderConfig) -> tuple[bytes, bytes] | None:
    """The header that carries the provider's key: `Authorization: Bearer <key>`, or
    the bare key in `x-api-key` / `api-key` (`auth_header`); None without a key."""
    if not config.api_key:
        return None
    if config.auth_header == "authorization":
        return b"authorization", f"Bearer {config.api_key}".encode()
    return config.auth_header.encode(), config.api_key.encode()


class Upstream:
    """One provider. `transport` is injectable (tests pass an httpx-backed one); by
    default our own `Http1Transport`."""

    def __init__(
        self,
        config: ProviderConfig,
        *,
        transport: Transport | None = None,
        ca_bundle: str = "",
    ) -> None:
        self.config = config
        self._credential = credential_header(config)
        self._usage_headers = [self._credential] if self._credential else []
        self._base = config.base_url.rstrip("/")
        # Computed once: with a provider key, no client credential goes upstream,
        # whichever header it came in (a client may send a key the provider reads
        # from another header than the one we set).
        self._drop = _DROP_REQUEST | CREDENTIALS if self._credential else _DROP_REQUEST
        self.transport: Transport = transport or Http1Transport(
            connect_timeout_s=config.connect_timeout_s,
            read_timeout_s=config.read_timeout_s,
            ca_bundle=ca_bundle,
            provider_id=config.id,
        )

    async def close(self) -> None:
        await self.transport.close()

    def url(self, raw_path: bytes, query: bytes) -> str:
        """`{base_url}{raw_path}?{query}`, keeping the client's percent-encoding.
        Scheme, host and port always come from `base_url`: no open proxy."""
        path = raw_path.decode("latin-1")
        if path and not path.startswith("/"):
            path = "/" + path  # never let a path run into the authority ("@evil.com")
        url = self._base + path
        return url + "?" + query.decode("latin-1") if query else url

    def request_headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The client's headers minus hop-by-hop ones (and those its Connection names),
        with every client credential replaced by the provider's key when it has one."""
        drop = self._drop
        for name, value in headers:
            if name == b"connection":
                listed = {token.strip().lower() for token in value.split(b",")}
                drop = drop | listed
        forwarded = [(name, value) for name, value in headers if name not in drop]
        if self._credential is not None:
            forwarded.append(self._credential)
        return forwarded

    def send(
        self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Awaitable[UpstreamResponse]:
        """Send and return the response with its body not yet read (the caller
        streams it and must close it). Raises UpstreamError. Not a coroutine of its
        own: the transport's is awaited directly, one frame less per request."""
        return self.transport.send(method, url, headers, body)

    async def poll_usage(self) -> int | None:
        """`usage.concurrent_sessions` from `GET {base_url}/usage`, or None for
        "no information" (any failure, any unexpected answer)."""
        try:
            response = await self.transport.send(
                "GET", self._base + "/usage", self._usage_headers, b"", timeout_s=USAGE_TIMEOUT_S
            )
        except UpstreamError:
            return None
        try:
            if response.status != 200:
                return None
            return parse_usage(await response.read())
        except UpstreamError:
            return None
        finally:
            await response.aclose()


def parse_usage(body: bytes) -> int | None:
    """`{"usage": {"concurrent_sessions": N}}` -> N truncated to an int; None otherwise."""
    try:
        data = json.loads(body)
        count = data["usage"]["concurrent_sessions"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    if isinstance(count, bool) or not isinstance(count, int | float):
        return None
    if isinstance(count, float) and not math.isfinite(count):
        return None
    return int(count) if count >= 0 else None
