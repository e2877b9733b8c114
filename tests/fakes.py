"""Fake time for the admission core: a clock that moves only when told, and a
scheduler that runs callbacks when the clock passes their due time."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable


class FakeTimer:
    def __init__(self, due: float, callback: Callable[[], None]) -> None:
        self.due = due
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTime:
    """`clock` and `call_later` for a Limiter; `advance(s)` runs what falls due, in order."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._timers: list[tuple[float, int, FakeTimer]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.now + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.due, next(self._seq), timer))
        return timer

    def pending(self) -> list[FakeTimer]:
        """Timers still armed, soonest first."""
        return sorted((t for _, _, t in self._timers if not t.cancelled), key=lambda t: t.due)

    def advance(self, seconds: float) -> None:
        """Move time forward, running every timer due by then at its own due time."""
        target = self.now + seconds
        while self._timers and self._timers[0][0] <= target:
            due, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self.now = max(self.now, due)
            timer.callback()
        self.now = target
