"""Waiting for something observable to happen: poll it with a bounded deadline.

End-to-end tests watch real processes, so they poll what those processes expose
(status, stats) until it holds, and fail with a clear message at the deadline,
instead of sleeping and hoping.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], within: float = 10.0) -> None:
    """Poll `predicate` until it returns truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        time.sleep(0.01)


async def eventually(check: Callable[[], Any], within: float = 10.0) -> None:
    """Poll `check` (sync or async) until it returns truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.02)
