"""Time as the core sees it: a clock to read and a scheduler to call back later.

In production these are `loop.time` and `loop.call_later`; tests pass a fake
whose time moves only when the test says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    """A scheduled callback that can be cancelled (asyncio's TimerHandle is one)."""

    def cancel(self) -> None: ...


Clock = Callable[[], float]
"""Seconds on a monotonic scale."""

Scheduler = Callable[[float, Callable[[], None]], Timer]
"""`scheduler(delay_s, callback)` runs `callback` once after `delay_s`, like `loop.call_later`."""
