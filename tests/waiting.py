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
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T | None], within: float = 10.0) -> T:
    """Poll `predicate` until it returns truthy, and return that (the snapshot that
    held); fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        time.sleep(0.01)
    return result


async def eventually(check: Callable[[], Any], within: float = 10.0) -> Any:
    """Poll `check` (sync or async) until it returns truthy, and return that; fail
    after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.02)
