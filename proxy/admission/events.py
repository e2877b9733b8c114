"""What the admission reports, the same way in one process and in a cluster: event
kinds and their wording, the auto-reduce notice, the Retry-After of a refusal, and
the counters the metrics read. The single-process `Limiter` and the Redis-backed
`ClusterAdmission` both build their events here, so the two never drift apart."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

EventKind = Literal["rate_limited", "paused", "limit_reduced", "limit_restored", "slot_reclaimed"]

NOTICE: Final = (
    "Concurrency limit auto-reduced to {limit} after a 429 — restore manually when ready."
)


RESTORE_WINDOW_MAX_FACTOR: Final = 16
"""A raise undone by a 429 doubles the restore window, up to this many times
`restore_after_s`."""


@dataclass(frozen=True)
class LimiterEvent:
    """Something an operator should be able to read back: a 429, a reduction, a
    restore step, a reclaim."""

    kind: EventKind
    detail: str


@dataclass
class LimiterCounters:
    """Monotonic counts since start, read by the metrics collector at scrape time
    (plain ints: nothing on the request path pays for a metrics label lookup)."""

    admitted: int = 0
    rate_limited: int = 0
    auto_reductions: int = 0
    auto_restores: int = 0
    slots_reclaimed: int = 0
    usage_polls_room: int = 0
    usage_polls_full: int = 0
    usage_polls_no_info: int = 0

    def count(self, event: LimiterEvent) -> None:
        """Count the events that have a counter of their own."""
        if event.kind == "rate_limited":
            self.rate_limited += 1
        elif event.kind == "limit_reduced":
            self.auto_reductions += 1
        elif event.kind == "limit_restored":
            self.auto_restores += 1
        elif event.kind == "slot_reclaimed":
            self.slots_reclaimed += 1


def notice(limit: int | None, auto_reduced: bool) -> str | None:
    """The operator's notice while a 429 reduction is in force."""
    if not auto_reduced or limit is None:
        return None
    return NOTICE.format(limit=limit)


RATE_WINDOW_S: Final = 60.0
"""The time constant of the measured admission rate: admissions older than this
weigh less than 1/e."""


class AdmissionRate:
    """Admissions per second, exponentially weighted over `RATE_WINDOW_S` of the
    injected clock (a decayed count divided by the window). Until a whole window has
    passed since `started` the divisor is the time actually observed (at least one
    second), so the first admissions after a start are not read as a slow rate.
    Reading it after a quiet spell gives a rate that has decayed towards zero."""

    __slots__ = ("_at", "_since", "_weight")

    def __init__(self, started: float) -> None:
        self._since = started
        self._at = started
        self._weight = 0.0

    def observe(self, now: float) -> None:
        """One admission at `now`. On the fast path: within a second of the last decay
        it only counts (as if a little earlier: at most 1/60 too heavy), so most
        admissions cost one comparison and one addition, not an `exp`."""
        if now - self._at >= 1.0:
            self._weight *= math.exp((self._at - now) / RATE_WINDOW_S)
            self._at = now
        self._weight += 1.0

    def per_s(self, now: float) -> float:
        weight = self._weight
        if now > self._at:
            weight *= math.exp((self._at - now) / RATE_WINDOW_S)
        observed = max(1.0, now - self._since)
        return weight / (RATE_WINDOW_S * -math.expm1(-observed / RATE_WINDOW_S))


def retry_after_s(
    pause_left_s: float,
    *,
    ahead: int | None = None,
    admissions_per_s: float = 0.0,
    cap_s: float = math.inf,
) -> int:
    """What a refused client should wait, in whole seconds, at least 1.

    Without `ahead`: the rest of a pause, else a second. With `ahead` (the waiters
    that would go first): the rest of the pause plus the time the measured admission
    rate needs to admit them and this request, at most `cap_s` (the queue timeout:
    waiting longer than that would only end in another refusal), but never less than
    the rest of the pause. No measured rate means "nothing is moving": the cap.
    """
    pause = max(0.0, pause_left_s)
    wait = pause
    if ahead is not None:
        drain = (ahead + 1) / admissions_per_s if admissions_per_s > 0 else math.inf
        wait = max(pause, min(pause + drain, cap_s))
    return max(1, math.ceil(wait)) if wait > 0 else 1


def saturating_ahead(pause_left_s: float, admissions_per_s: float, cap_s: float) -> int:
    """How many waiters ahead already make `retry_after_s` reach `cap_s`: counting
    further cannot change the answer (lets a caller stop counting early)."""
    if admissions_per_s <= 0 or math.isinf(cap_s):
        return 0 if admissions_per_s <= 0 else 1 << 62
    return max(0, math.ceil((cap_s - max(0.0, pause_left_s)) * admissions_per_s))


def next_restore_window(window_s: float, restore_after_s: float) -> float:
    """The restore window after a raise was undone: doubled, at most
    `RESTORE_WINDOW_MAX_FACTOR` times the configured one."""
    return min(window_s * 2, restore_after_s * RESTORE_WINDOW_MAX_FACTOR)


def rate_limited(
    conversation_id: str | None, rule: str = "", client_id: str | None = None
) -> LimiterEvent:
    """`rule`: which `reduce_on_429` rule applied (a `Verdict.note`), if not "always"."""
    note = f" ({rule})" if rule else ""
    return LimiterEvent(
        "rate_limited",
        "429 from upstream" + note + _conversation(conversation_id) + _client(client_id),
    )


def paused(delay_s: float) -> LimiterEvent:
    return LimiterEvent("paused", f"queue paused for {delay_s:g} s")


def limit_reduced(
    before: int | str, after: int | None, *, undone_window_s: float | None = None
) -> LimiterEvent:
    """`undone_window_s`: the 429 came within that window of a restore step, which this
    reduction undoes (the next window is longer)."""
    detail = f"limit {before} -> {after} after a 429"
    if undone_window_s is not None:
        detail += f" within {undone_window_s:g} s of a restore step: the step is undone"
    return LimiterEvent("limit_reduced", detail)


def limit_restored(before: int, after: int, window_s: float, *, back: bool) -> LimiterEvent:
    """One restore step; `back`: the limit before the reductions is reached again."""
    detail = f"limit {before} -> {after} after {window_s:g} s without a 429 while busy"
    if back:
        detail += "; the limit before the reductions is back"
    return LimiterEvent("limit_restored", detail)


def slot_reclaimed(
    held_ms: int, conversation_id: str | None, client_id: str | None = None
) -> LimiterEvent:
    return LimiterEvent(
        "slot_reclaimed",
        f"slot held {held_ms} ms reclaimed" + _conversation(conversation_id) + _client(client_id),
    )


def lease_expired(replica: str) -> LimiterEvent:
    return LimiterEvent(
        "slot_reclaimed",
        f"slot of replica {replica} reclaimed: its lease expired (the replica stopped renewing it)",
    )


def _conversation(conversation_id: str | None) -> str:
    return f" (conversation {conversation_id})" if conversation_id else ""


def _client(client_id: str | None) -> str:
    return f" (client {client_id})" if client_id else ""
