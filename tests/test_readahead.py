"""`ReadAhead`: a 429's first bytes read to judge it, then relayed as if unread."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.upstream.readahead import ReadAhead

Item = bytes | None | Exception  # a piece, the end, or an error


class Trickle:
    """An upstream response whose body pieces the test feeds in."""

    def __init__(self, *items: Item) -> None:
        self.status = 429
        self.raw_headers = [(b"retry-after", b"1")]
        self.pieces: asyncio.Queue[Item] = asyncio.Queue()
        for item in items:
            self.pieces.put_nowait(item)
        self.closed = False

    def chunks(self) -> AsyncIterator[bytes]:
        return self._body()

    async def _body(self) -> AsyncIterator[bytes]:
        while (item := await self.pieces.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def aclose(self) -> None:
        self.closed = True


async def test_the_head_is_read_and_the_replay_gives_the_whole_body() -> None:
    upstream = Trickle(b"ab", b"cd", None)
    ahead = ReadAhead(upstream)
    assert await ahead.read_head(1000, 1.0) == b"abcd"
    assert [chunk async for chunk in ahead.chunks()] == [b"ab", b"cd"]
    assert (ahead.status, ahead.raw_headers) == (429, [(b"retry-after", b"1")])


async def test_the_head_stops_at_the_limit_but_the_replay_does_not() -> None:
    upstream = Trickle(b"abc", b"def", b"ghi", None)
    ahead = ReadAhead(upstream)
    assert await ahead.read_head(4, 1.0) == b"abcd"
    assert await ahead.read() == b"abcdefghi"


async def test_a_slow_body_is_judged_on_what_came_and_nothing_is_lost() -> None:
    upstream = Trickle(b"first")
    ahead = ReadAhead(upstream)
    assert await ahead.read_head(1000, 0.05) == b"first"  # the rest has not come yet
    replay = ahead.chunks()
    assert await anext(replay) == b"first"
    upstream.pieces.put_nowait(b"second")  # taken by the read left running
    upstream.pieces.put_nowait(b"third")
    upstream.pieces.put_nowait(None)
    assert [chunk async for chunk in replay] == [b"second", b"third"]


async def test_an_upstream_error_during_the_head_is_raised_by_the_replay_in_its_place() -> None:
    upstream = Trickle(b"part", UpstreamUnavailable("cut"))
    ahead = ReadAhead(upstream)
    assert await ahead.read_head(1000, 1.0) == b"part"
    replay = ahead.chunks()
    assert await anext(replay) == b"part"
    with pytest.raises(UpstreamUnavailable):
        await anext(replay)


async def test_an_error_after_the_head_comes_through_the_replay_too() -> None:
    upstream = Trickle(b"head")
    ahead = ReadAhead(upstream)
    await ahead.read_head(1000, 0.05)
    upstream.pieces.put_nowait(UpstreamTimeout("silent"))
    with pytest.raises(UpstreamTimeout):
        await ahead.read()


async def test_aclose_with_a_read_still_running_cancels_it_and_closes_the_response() -> None:
    upstream = Trickle()
    ahead = ReadAhead(upstream)
    assert await ahead.read_head(1000, 0.02) == b""
    pending = ahead._next
    assert pending is not None
    assert not pending.done()
    await ahead.aclose()
    await asyncio.sleep(0)
    assert pending.cancelled()
    assert upstream.closed
    await ahead.aclose()  # twice is harmless


async def test_a_cancelled_read_ahead_leaves_no_read_running() -> None:
    upstream = Trickle()
    ahead = ReadAhead(upstream)
    task = asyncio.create_task(ahead.read_head(1000, 10.0))
    await asyncio.sleep(0.02)
    pending = ahead._next
    assert pending is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert pending.cancelled()
    assert ahead._next is None
