"""Test support: the upstream `Transport` interface over an httpx client, so tests can
inject httpx's `MockTransport` or intercept with respx. Production never uses it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from proxy.settings import ProviderConfig
from proxy.upstream.transport import Headers, Transport, UpstreamResponse


def for_provider(config: ProviderConfig, transport: httpx.AsyncBaseTransport) -> Transport:
    """An httpx-backed transport with the provider's timeouts."""
    client = httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(
            connect=config.connect_timeout_s,
            read=config.read_timeout_s,
            write=config.read_timeout_s,
            pool=config.connect_timeout_s,
        ),
        follow_redirects=False,
        trust_env=False,
    )
    return HttpxTransport(client, config.id)


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
