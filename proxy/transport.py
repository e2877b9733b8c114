"""How bytes reach a provider: the network behind a small interface.

The relay's policy (which headers, which URL, what a 429 means) lives in
`upstream.py` and `relay.py`; this module only sends a request and hands back a
response whose body is read chunk by chunk as it arrives. Production uses aiohttp,
which costs about a quarter of httpx's CPU per request (see bench/RESULTS.md);
tests use `HttpxTransport` around httpx's `MockTransport` or respx.

Lower-layer errors become `UpstreamUnavailable` (502) or `UpstreamTimeout` (504)
here, once, with `raise ... from exc`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Protocol

import aiohttp
import httpx
from multidict import CIMultiDict
from yarl import URL

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
    async def send(
        self,
        method: str,
        url: str,
        headers: Headers,
        body: bytes,
        *,
        timeout_s: float | None = None,
    ) -> UpstreamResponse:
        """Send the request; `url` is already percent-encoded and is sent as is."""
        ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------------- aiohttp


class AiohttpTransport:
    """A pooled aiohttp session: unlimited connections (a proxy holds one per open
    stream), no automatic headers, no decompression (Content-Encoding passes through),
    no redirects, TLS verified."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        ca_bundle: str = "",
        provider_id: str = "",
    ) -> None:
        self._provider_id = provider_id
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        context = ssl.create_default_context(cafile=ca_bundle or None)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, limit_per_host=0, keepalive_timeout=30, ssl=context
            ),
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            trust_env=False,
        )

    async def send(
        self,
        method: str,
        url: str,
        headers: Headers,
        body: bytes,
        *,
        timeout_s: float | None = None,
    ) -> UpstreamResponse:
        timeout = (
            self._timeout
            if timeout_s is None
            else aiohttp.ClientTimeout(total=timeout_s, sock_connect=timeout_s)
        )
        try:
            response = await self._session.request(
                method,
                URL(url, encoded=True),
                headers=CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers),
                data=body or None,
                allow_redirects=False,
                timeout=timeout,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _aiohttp_error(exc, self._provider_id) from exc
        return _AiohttpResponse(response, self._provider_id)

    async def close(self) -> None:
        await self._session.close()


class _AiohttpResponse:
    __slots__ = ("_done", "_provider_id", "_response", "raw_headers", "status")

    def __init__(self, response: aiohttp.ClientResponse, provider_id: str) -> None:
        self._response = response
        self._provider_id = provider_id
        self._done = False
        self.status = response.status
        self.raw_headers: Headers = list(response.raw_headers)

    async def chunks(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while chunk := await content.readany():
                yield chunk
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _aiohttp_error(exc, self._provider_id) from exc
        self._done = True

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def aclose(self) -> None:
        # A fully read body lets the connection go back to the pool; anything else
        # closes it, which is also how the upstream learns the client went away.
        if self._done:
            self._response.release()
        else:
            self._response.close()


def _aiohttp_error(exc: BaseException, provider_id: str) -> UpstreamError:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamUnavailable(f"upstream {provider_id} did not accept a connection in time")
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return UpstreamTimeout(f"upstream {provider_id} sent nothing in time")
    return UpstreamUnavailable(f"upstream {provider_id} is unreachable ({type(exc).__name__})")


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
