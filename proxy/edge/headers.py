"""Parsing of the request and response headers that steer admission.

Pure functions: they return numbers or raise `BadRequest`; the relay decides what
to do with them.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from proxy.errors import BadRequest

_DELTA_SECONDS = re.compile(r"^[0-9]+(\.[0-9]+)?$")

MIN_EPOCH_MS = 10**11
"""Below this an integer is not epoch milliseconds (10^11 ms is March 1973; epoch
seconds stay below it until the year 5138)."""


def prompt_started_at_ms(value: str | None, now_ms: float) -> float:
    """The `X-Prompt-Started-At` header as epoch milliseconds; absent means now.

    Accepts integer epoch milliseconds or an RFC 3339 timestamp with an offset.
    A time in the future counts as now, so a client cannot buy priority by lying
    about the future.
    """
    if value is None:
        return now_ms
    text = value.strip()
    if text.isascii() and text.isdigit() and len(text) <= 16:
        at = float(int(text))
        if at < MIN_EPOCH_MS:
            raise BadRequest(
                f"X-Prompt-Started-At {text} looks like epoch seconds (or is not a time); "
                f"send epoch milliseconds, e.g. {text}000"
            )
    else:
        try:
            parsed = datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError:
            parsed = None
        if parsed is None or parsed.tzinfo is None or "T" not in text.upper():
            raise BadRequest(
                "X-Prompt-Started-At must be epoch milliseconds (an integer) "
                "or an RFC 3339 timestamp with an offset, e.g. 2026-11-28T09:30:00Z"
            )
        at = parsed.timestamp() * 1000
    return min(at, now_ms)


def retry_after_s(headers: dict[str, str], now_epoch_s: float) -> float | None:
    """Seconds to pause after a 429: `retry-after-ms`, else `Retry-After` (delta
    seconds or an HTTP date); None when absent or unreadable (the caller then uses
    `pause_s`). `headers` has lower-case names."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value / 1000
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    if _DELTA_SECONDS.match(raw):
        return float(raw)
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date without a zone (asctime, "-0000") is GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_epoch_s)
