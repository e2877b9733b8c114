"""Prompt first-seen times in Redis, so every replica derives the same time for the
same prompt (docs/design.md, "Task age"). One round trip per question: a script
reads the key, or sets it when absent, and refreshes its expiry either way.

When Redis is unreachable the replica answers from its own memory for that request
(never an error: the request is still admitted, with a time that may be later than
the shared one)."""

from __future__ import annotations

import asyncio
import contextlib

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from proxy.prompts import PromptMemory

KEY_PREFIX = "sluice:prompt:"

_FIRST_SEEN = """
local v = redis.call('GET', KEYS[1])
if v then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return v
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"""

_KNOWN = """
local v = redis.call('GET', KEYS[1])
if v then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return v
"""

_ERRORS = (redis_errors.RedisError, OSError)


class RedisPromptTimes:
    """`PromptTimes` shared through Redis; the keys expire `ttl_ms` after last use."""

    def __init__(self, redis: Redis, ttl_ms: float) -> None:
        self._redis = redis
        self._ttl = str(max(1, round(ttl_ms)))
        self._first_seen = redis.register_script(_FIRST_SEEN)
        self._known = redis.register_script(_KNOWN)
        self._fallback = PromptMemory(ttl_ms=ttl_ms)
        self._tasks: set[asyncio.Task[None]] = set()

    async def first_seen(self, key: bytes, now_ms: float) -> float:
        try:
            value = await self._first_seen(
                keys=[KEY_PREFIX + key.hex()], args=[round(now_ms), self._ttl]
            )
        except _ERRORS:
            return self._fallback.first_seen(key, now_ms)[0]
        return float(value)

    async def known(self, key: bytes, now_ms: float) -> float | None:
        try:
            value = await self._known(keys=[KEY_PREFIX + key.hex()], args=[self._ttl])
        except _ERRORS:
            return self._fallback.get(key, now_ms)
        return None if value is None else float(value)

    def remember(self, key: bytes, started_at_ms: float, now_ms: float) -> None:
        self._fallback.put(key, started_at_ms, now_ms)
        # Written in the background: the response is already on its way to the client.
        task = asyncio.get_running_loop().create_task(
            self._set(KEY_PREFIX + key.hex(), round(started_at_ms))
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _set(self, name: str, value: int) -> None:
        with contextlib.suppress(*_ERRORS):
            await self._redis.set(name, value, px=int(self._ttl))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
