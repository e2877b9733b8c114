"""When each prompt was first seen, kept where every request can ask (docs/design.md,
"Task age"): in one process, the pure `PromptMemory` backed by the SQLite store; in a
cluster, Redis (`proxy.cluster.prompt_times`), so every replica derives the same time.

Only digests are kept, never text. Asking never touches the disk: a prompt seen for
the first time is queued for the store and written in batches (every `FLUSH_S`, and
at close, so a clean shutdown loses nothing). A crash loses at most the last batch:
those prompts then restart their clock when next seen, which costs them some
priority and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

import structlog

from proxy.errors import StoreError
from proxy.prompts import PromptMemory
from proxy.runtime.store import Store

log = structlog.get_logger("sluice")

FLUSH_S = 1.0
"""Most seconds a newly seen prompt waits before it is written to the store."""

MAX_ENTRIES = 100_000
"""Prompts and responses remembered at once (about 15 MB); the least recently used
go first."""


class PromptTimes(Protocol):
    """First-seen times by digest (epoch ms)."""

    async def first_seen(self, key: bytes, now_ms: float) -> float:
        """The time `key` was first seen; now, if never (and remember it)."""
        ...

    async def known(self, key: bytes, now_ms: float) -> float | None:
        """The time recorded for `key`, or None; never records."""
        ...

    def remember(self, key: bytes, started_at_ms: float, now_ms: float) -> None:
        """Record `key` (a relayed response's id) with the time of its prompt."""
        ...

    async def close(self) -> None: ...


class LocalPromptTimes:
    """One process: the memory answers, the store keeps it across restarts."""

    def __init__(self, store: Store, ttl_ms: float, max_entries: int = MAX_ENTRIES) -> None:
        self.memory = PromptMemory(max_entries=max_entries, ttl_ms=ttl_ms)
        self._store = store
        self._ttl_ms = ttl_ms
        self._max_entries = max_entries
        self._pending: dict[bytes, tuple[int, int]] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def start(self, now_ms: float) -> int:
        """Load what the store remembers (unexpired, newest first up to the bound) and
        start the batch writer; returns how many entries were loaded."""
        rows = await self._store.load_prompt_times(round(now_ms - self._ttl_ms), self._max_entries)
        for key, started_at_ms, used_at_ms in rows:
            self.memory.put(key, started_at_ms, used_at_ms)
        self._flusher = asyncio.get_running_loop().create_task(self._flush_every())
        return len(rows)

    async def first_seen(self, key: bytes, now_ms: float) -> float:
        started, new = self.memory.first_seen(key, now_ms)
        if new:
            self._pending[key] = (round(started), round(now_ms))
        return started

    async def known(self, key: bytes, now_ms: float) -> float | None:
        return self.memory.get(key, now_ms)

    def remember(self, key: bytes, started_at_ms: float, now_ms: float) -> None:
        self.memory.put(key, started_at_ms, now_ms)
        self._pending[key] = (round(started_at_ms), round(now_ms))

    async def flush(self, now_ms: float | None = None) -> None:
        """Write the pending entries in one transaction (and forget expired rows)."""
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        rows = [(key, started, used) for key, (started, used) in batch.items()]
        forget = None if now_ms is None else round(now_ms - self._ttl_ms)
        try:
            await self._store.save_prompt_times(rows, forget)
        except StoreError as err:
            # Not fatal: those prompts restart their clock after a restart.
            log.warning("prompt times not stored", entries=len(rows), error=str(err))

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await self.flush(time.time() * 1000)

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        await self.flush()
