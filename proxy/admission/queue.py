"""The waiting line: a binary heap ordered by (prompt start time, arrival sequence).

Insert and pop are O(log n); cancelling is O(1) because a cancelled entry stays in
the heap, marked dead, and is dropped when it reaches the top (lazy deletion, as
aiolimiter does). `len()` counts only live entries.

`ahead()` (a waiter's place in line) walks only the part of the heap that sorts
before it: a heap node's subtree is never smaller than the node, so every subtree
whose root sorts after the key is skipped. Its cost grows with the place asked
about, not with the queue: O(1) for the head, O(n) at worst for the tail.

`place()` answers the same for keepalive ticks, which ask about every waiter every
few seconds: once the line has been asked about a few times without changing, it
sorts the line once (O(n log n), in C) and answers from that table in O(1) until the
next change. A busy line that changes between every two ticks pays `ahead()` per
tick, and at most one sort per change.
"""

from __future__ import annotations

import heapq
from operator import itemgetter
from typing import Final, Generic, Protocol, TypeVar


class Entry(Protocol):
    """What the queue holds: anything that can say whether it still waits."""

    @property
    def waiting(self) -> bool: ...


E = TypeVar("E", bound=Entry)

SORT_AFTER: Final = 3
"""Questions `place()` answers by walking the heap before it sorts the line: a sort
costs about as much as walking to the middle of the line two or three times."""

_KEY = itemgetter(0, 1)


class WaitQueue(Generic[E]):
    __slots__ = ("_asked", "_heap", "_live", "_places")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, E]] = []
        self._live = 0
        self._places: dict[E, int] | None = None  # place of every live entry, until a change
        self._asked = 0  # place() questions since the last change

    def __len__(self) -> int:
        return self._live

    def push(self, prompt_started_at: float, seq: int, entry: E) -> None:
        heapq.heappush(self._heap, (prompt_started_at, seq, entry))
        self._live += 1
        self._changed()

    def discard(self) -> None:
        """Account for one entry that stopped waiting while still in the heap."""
        self._live -= 1
        self._changed()

    def _changed(self) -> None:
        self._places = None
        self._asked = 0

    def peek(self) -> E | None:
        """The live entry that would be popped next, or None."""
        heap = self._heap
        while heap and not heap[0][2].waiting:
            heapq.heappop(heap)
        return heap[0][2] if heap else None

    def pop(self) -> E:
        """Remove and return the best live entry. The queue must not be empty."""
        entry = self.peek()
        assert entry is not None, "pop from an empty WaitQueue"
        heapq.heappop(self._heap)
        self._live -= 1
        self._changed()
        return entry

    def ahead(self, prompt_started_at: float, seq: int, stop: int | None = None) -> int:
        """How many live entries sort before `(prompt_started_at, seq)`; counting ends
        once `stop` are found (the caller needs no more)."""
        heap = self._heap
        if stop is None:
            stop = len(heap)
        count = 0
        if count >= stop or not heap:
            return count
        size = len(heap)
        pending = [0]
        while pending:
            i = pending.pop()
            at, s, entry = heap[i]
            if at > prompt_started_at or (at == prompt_started_at and s >= seq):
                continue  # this entry and everything under it go later
            if entry.waiting:
                count += 1
                if count >= stop:
                    return count
            child = 2 * i + 1
            if child < size:
                pending.append(child)
                if child + 1 < size:
                    pending.append(child + 1)
        return count

    def place(self, prompt_started_at: float, seq: int, entry: E) -> int:
        """How many live entries are ahead of `entry` (queued as `(prompt_started_at,
        seq)`): `ahead()`, or the sorted table while the line stays as it is."""
        places = self._places
        if places is not None:
            found = places.get(entry)
            if found is not None:
                return found
        self._asked += 1
        if self._asked < SORT_AFTER:
            return self.ahead(prompt_started_at, seq)
        live = sorted((item for item in self._heap if item[2].waiting), key=_KEY)
        self._places = places = {item[2]: i for i, item in enumerate(live)}
        return places.get(entry, 0)

    def first(self, n: int) -> list[E]:
        """The first `n` live entries in admission order (O(n_heap log n))."""
        live = (item for item in self._heap if item[2].waiting)
        return [entry for _, _, entry in heapq.nsmallest(n, live, key=_order)]

    def clear_dead(self) -> None:
        """Drop every dead entry at once (used when the live count reaches zero)."""
        if self._live == 0:
            self._heap.clear()


def _order(item: tuple[float, int, object]) -> tuple[float, int]:
    return item[0], item[1]
