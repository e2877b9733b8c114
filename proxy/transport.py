"""How bytes reach a provider: the network behind a small interface.

The relay's policy (which headers, which URL, what a 429 means) lives in
`upstream.py` and `relay.py`; this module only sends a request and hands back a
response whose body is read chunk by chunk as it arrives. Production uses our own
HTTP/1.1 client (`proxy/http1.py`), which costs a fraction of httpx's CPU and of
aiohttp's memory per open stream (see bench/RESULTS.md); tests use `HttpxTransport`
around httpx's `MockTransport` or respx.

Lower-layer errors become `UpstreamUnavailable` (502) or `UpstreamTimeout` (504)
here, once, with `raise ... from exc`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Protocol

import httpx

from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable

Headers = list[tuple[bytes, bytes]]


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


# ------------------------------------------------------------------------ httpx


class HttpxTransport:
    """The same interface over an httpx client, so tests can inject httpx's
    `MockTransport` or use respx."""

    def __init__(self, client: httpx.AsyncClient, provider_id: str = "") -> None:
        self.client = client
        self._provider_id = provider_id

    async def send(
        self,
        method: str,
        url: str,
        headers: Headers,
        body: bytes,
        *,
        timeout_s: float | None = None,
    ) -> UpstreamResponse:
        request = httpx.Request(method, url, headers=headers, content=body)
        if timeout_s is not None:
            request.extensions["timeout"] = httpx.Timeout(timeout_s).as_dict()
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise httpx_error(exc, self._provider_id) from exc
        return _HttpxResponse(response, self._provider_id)

    async def close(self) -> None:
        await self.client.aclose()


class _HttpxResponse:
    __slots__ = ("_provider_id", "_response", "raw_headers", "status")

    def __init__(self, response: httpx.Response, provider_id: str) -> None:
        self._response = response
        self._provider_id = provider_id
        self.status = response.status_code
        self.raw_headers: Headers = list(response.headers.raw)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            content = self._response.content  # a mocked response may come pre-read
        except httpx.ResponseNotRead:
            pass
        else:
            if content:
                yield content
            return
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise httpx_error(exc, self._provider_id) from exc

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def aclose(self) -> None:
        await self._response.aclose()


def httpx_error(exc: httpx.HTTPError, provider_id: str) -> UpstreamError:
    """Map an httpx failure to 502 (unreachable) or 504 (went silent)."""
    if isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout):
        return UpstreamTimeout(
            f"upstream {provider_id} sent nothing in time ({type(exc).__name__})"
        )
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamUnavailable(f"upstream {provider_id} did not accept a connection in time")
    return UpstreamUnavailable(f"upstream {provider_id} is unreachable ({type(exc).__name__})")
