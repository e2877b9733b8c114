"""The waiting line: a binary heap ordered by (prompt start time, arrival sequence).

Insert and pop are O(log n); cancelling is O(1) because a cancelled entry stays in
the heap, marked dead, and is dropped when it reaches the top (lazy deletion, as
aiolimiter does). `len()` counts only live entries.
"""

from __future__ import annotations

import heapq
from typing import Generic, Protocol, TypeVar


class Entry(Protocol):
    """What the queue holds: anything that can say whether it still waits."""

    @property
    def waiting(self) -> bool: ...


E = TypeVar("E", bound=Entry)


class WaitQueue(Generic[E]):
    __slots__ = ("_heap", "_live")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, E]] = []
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def push(self, prompt_started_at: float, seq: int, entry: E) -> None:
        heapq.heappush(self._heap, (prompt_started_at, seq, entry))
        self._live += 1

    def discard(self) -> None:
        """Account for one entry that stopped waiting while still in the heap."""
        self._live -= 1

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
        return entry

    def clear_dead(self) -> None:
        """Drop every dead entry at once (used when the live count reaches zero)."""
        if self._live == 0:
            self._heap.clear()
