"""When each prompt was first seen, by digest (docs/design.md, "Task age").

An `OrderedDict` kept in order of last use: a hit moves the entry to the new end,
so the old end holds the entry unused the longest. That one order serves both
rules: `expire` drops from the old end while entries there are older than the
ttl, and an insert beyond `max_entries` evicts from the same end. Every
operation is O(1) but `expire`, which is O(number dropped).

Pure: times are arguments (epoch ms), nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator


class PromptMemory:
    """First-seen times by digest, bounded (LRU) and expiring. Pure: times are arguments."""

    __slots__ = ("_entries", "_max_entries", "_ttl_ms")

    def __init__(self, max_entries: int = 100_000, ttl_ms: float = 86_400_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        if not (ttl_ms > 0 and math.isfinite(ttl_ms)):
            raise ValueError(f"ttl_ms must be a finite number above 0, got {ttl_ms}")
        self._max_entries = max_entries
        self._ttl_ms = float(ttl_ms)
        # key -> (started_at_ms, last_used_ms), least recently used first
        self._entries: OrderedDict[bytes, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (
            f"<PromptMemory entries={len(self._entries)} max_entries={self._max_entries} "
            f"ttl_ms={self._ttl_ms:g}>"
        )

    def first_seen(self, key: bytes, now_ms: float) -> tuple[float, bool]:
        """`(started_at_ms, is_new)`: the recorded time of a known, unexpired key
        (and its last use becomes `now_ms`), else `now_ms`, recorded as the key's
        start."""
        started = self.get(key, now_ms)
        if started is not None:
            return started, False
        self.put(key, now_ms, now_ms)
        return now_ms, True

    def get(self, key: bytes, now_ms: float) -> float | None:
        """The recorded start of an unexpired key, its last use becoming `now_ms`;
        None for an unknown key. An expired key is dropped on the way."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        started, last_used = entry
        if now_ms - last_used >= self._ttl_ms:
            del self._entries[key]
            return None
        self._entries[key] = (started, now_ms)
        self._entries.move_to_end(key)
        return started

    def put(self, key: bytes, started_at_ms: float, now_ms: float) -> None:
        """Record `key` as started at `started_at_ms`, last used at `now_ms`
        (replacing what was known), evicting the least recently used entry when
        that makes one too many.

        To load a saved memory, put its entries oldest use first with each one's
        last use as `now_ms` (as `items()` gives them), so the order stays by
        last use."""
        entries = self._entries
        entries[key] = (started_at_ms, now_ms)
        entries.move_to_end(key)
        if len(entries) > self._max_entries:
            entries.popitem(last=False)

    def expire(self, now_ms: float) -> int:
        """Drop the entries unused for `ttl_ms` or longer; how many were dropped."""
        entries = self._entries
        horizon = now_ms - self._ttl_ms
        dropped = 0
        # Oldest use first: stop at the first entry still in use.
        while entries:
            key, (_, last_used) = next(iter(entries.items()))
            if last_used > horizon:
                break
            del entries[key]
            dropped += 1
        return dropped

    def items(self) -> Iterator[tuple[bytes, float, float]]:
        """`(key, started_at_ms, last_used_ms)` for every entry, least recently
        used first: what a store saves and gives back to `put` on start."""
        for key, (started, last_used) in self._entries.items():
            yield key, started, last_used
