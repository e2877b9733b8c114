"""How bytes reach a provider: the network behind a small interface.

The policy (which headers, which URL, what a 429 means) lives in `client.py` and
the edge's relay; a transport only sends a request and hands back a response whose
body is read chunk by chunk as it arrives. Production uses our own HTTP/1.1 client
(`http1.py`; docs/design.md explains why); tests inject an httpx-backed transport
(`tests/httpx_transport.py`) around httpx's `MockTransport` or respx.

A transport maps its lower-layer errors to `UpstreamUnavailable` (502) or
`UpstreamTimeout` (504) once, with `raise ... from exc`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Protocol

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-connection",
    }
)
"""Headers that describe one connection, not the message (RFC 9110 section 7.6.1)."""


class UpstreamResponse(Protocol):
    """A response whose headers have arrived and whose body has not been read."""

    status: int
    raw_headers: Headers

    def chunks(self) -> AsyncIterator[bytes]:
        """The body, each piece as soon as it arrives (raises UpstreamError)."""
        ...

    async def read(self) -> bytes: ...

    async def aclose(self) -> None:
        """Return the connection to the pool if the body was read, else drop it.
        Safe to call more than once."""
        ...


class Transport(Protocol):
    def send(
        self,
        method: str,
        url: str,
        headers: Headers,
        body: bytes,
        *,
        timeout_s: float | None = None,
    ) -> Awaitable[UpstreamResponse]:
        """Send the request; `url` is already percent-encoded and is sent as is."""
        ...

    async def close(self) -> None: ...
