"""A response whose first body bytes were read ahead, and are relayed as if unread.

The relay reads the start of an upstream 429 to judge it (`reduce_on_429 = "match"`)
before deciding whether to retry it or relay it; relayed, the client must still get
the body byte for byte. The read ahead is bounded in bytes and in time: a 429 whose
body trickles is judged on what arrived, and the read still under way is handed on
to the replay, so nothing is lost or read twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from proxy.errors import UpstreamError
from proxy.upstream.transport import Headers, UpstreamResponse


class ReadAhead:
    """`response`, with `read_head` to look at its body's first bytes; `chunks()` then
    gives the whole body from its first byte. An `UpstreamResponse` itself."""

    __slots__ = (
        "_ended",
        "_error",
        "_head",
        "_next",
        "_response",
        "_rest",
        "raw_headers",
        "status",
    )

    def __init__(self, response: UpstreamResponse) -> None:
        self._response = response
        self.status: int = response.status
        self.raw_headers: Headers = response.raw_headers  # the same list: clearing it clears both
        self._rest = aiter(response.chunks())
        self._head: list[bytes] = []
        self._next: asyncio.Future[bytes] | None = None  # a read left running by read_head
        self._ended = False
        self._error: UpstreamError | None = None

    async def read_head(self, limit: int, timeout_s: float) -> bytes:
        """At most `limit` bytes of the body's start: what arrives within `timeout_s`,
        up to the end of the body. An upstream error ends the read early; the replay
        raises it where it happened."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        size = 0
        try:
            while size < limit and not self._ended and self._error is None:
                if self._next is None:
                    self._next = asyncio.ensure_future(anext(self._rest))
                left = max(0.0, deadline - loop.time())
                done, _ = await asyncio.wait((self._next,), timeout=left)
                if not done:
                    break  # slow: judge what came; the read goes on for the replay
                if chunk := self._take():
                    self._head.append(chunk)
                    size += len(chunk)
        except BaseException:
            # Cancelled (the client left): nobody will replay, and a read left running
            # would outlive the response.
            if self._next is not None:
                self._next.cancel()
                self._next = None
            raise
        return b"".join(self._head)[:limit]

    def _take(self) -> bytes:
        """The finished read's piece (b"" at the end of the body or on an error)."""
        future, self._next = self._next, None
        assert future is not None
        try:
            return future.result()
        except StopAsyncIteration:
            self._ended = True
        except UpstreamError as exc:
            self._error = exc
        return b""

    def chunks(self) -> AsyncIterator[bytes]:
        return self._replay()

    async def _replay(self) -> AsyncIterator[bytes]:
        head, self._head = self._head, []
        for chunk in head:
            yield chunk
        del head
        if self._next is not None:
            await asyncio.wait((self._next,))  # not cancelled with us: aclose() does that
            if chunk := self._take():
                yield chunk
        if self._error is not None:
            raise self._error
        if self._ended:
            return
        async for chunk in self._rest:
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def aclose(self) -> None:
        future, self._next = self._next, None
        if future is not None:
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # retrieved, so never reported as unretrieved
        await self._response.aclose()
