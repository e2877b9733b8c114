"""Which 429s lower the limit, and the opt-in restore (SPEC section 12), on the pure
limiter and fake time: one rule per test, as in test_limiter.py."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.admission.events import RESTORE_WINDOW_MAX_FACTOR
from proxy.admission.limiter import Permit, Policy
from proxy.admission.reduce import Answer
from tests.test_limiter import START, Rig

WINDOW = 60.0
CONCURRENCY = Answer((("retry-after", "1"),), b'{"error": {"code": "concurrency_limit"}}')
TOKENS = Answer((("retry-after", "1"),), b'{"error": {"code": "rate_limit_exceeded"}}')


def restoring(limit: int = 4, **policy: Any) -> Rig:
    """A limiter that restores after `WINDOW`; slots are never reclaimed (these tests
    hold them for hours of fake time)."""
    return Rig(
        Policy(limit=limit, cooldown_ms=0, slot_timeout_s=1e9, restore_after_s=WINDOW, **policy)
    )


def reduce_to(rig: Rig, limit: int) -> None:
    """429s (1 s pauses, waited out) until the limit is `limit`."""
    while rig.limiter.limit != limit:
        rig.limiter.on_rate_limited(rig.hold("429"), 1.0)
        rig.ft.advance(1.0)


def busy(rig: Rig) -> list[Permit]:
    """Fill every free slot: demand without anyone queued."""
    limit = rig.limiter.limit
    assert limit is not None
    return [rig.hold(f"busy{i}") for i in range(limit - rig.status().in_flight)]


def details(rig: Rig, kind: str) -> list[str]:
    return [event.detail for event in rig.events if event.kind == kind]


# ------------------------------------------------------------------ reduce_on_429


def test_a_429_that_does_not_match_pauses_without_lowering_the_limit() -> None:
    rig = Rig(Policy(limit=4, cooldown_ms=0, reduce_on_429="match", reduce_on_429_match="concurr"))
    rig.limiter.on_rate_limited(rig.hold("a"), 5.0, TOKENS)
    status = rig.status()
    assert status.paused
    assert status.paused_until == pytest.approx(START + 5.0)
    assert (status.limit, status.auto_reduced, status.notice) == (4, False, None)
    assert rig.kinds() == ["rate_limited", "paused"]
    assert details(rig, "rate_limited") == [
        "429 from upstream (limit kept: no match for reduce_on_429_match) (conversation a)"
    ]


def test_a_429_that_matches_lowers_the_limit_and_says_it_matched() -> None:
    rig = Rig(Policy(limit=4, cooldown_ms=0, reduce_on_429="match", reduce_on_429_match="concurr"))
    rig.limiter.on_rate_limited(rig.hold("a"), 5.0, CONCURRENCY)
    assert (rig.limiter.limit, rig.status().auto_reduced_from) == (3, 4)
    assert rig.kinds() == ["rate_limited", "paused", "limit_reduced"]
    assert details(rig, "rate_limited") == [
        "429 from upstream (matched reduce_on_429_match) (conversation a)"
    ]


def test_never_pauses_and_never_lowers_the_limit() -> None:
    rig = Rig(Policy(limit=2, cooldown_ms=0, reduce_on_429="never"))
    for name in "abc":
        rig.limiter.on_rate_limited(rig.hold(name), 2.0, CONCURRENCY)
        assert rig.status().paused
        rig.ft.advance(2.0)
    assert (rig.limiter.limit, rig.status().auto_reduced) == (2, False)
    assert rig.kinds() == ["rate_limited", "paused"] * 3
    assert details(rig, "rate_limited")[0] == (
        "429 from upstream (limit kept: reduce_on_429 = never) (conversation a)"
    )


def test_always_is_the_default_and_keeps_the_wording() -> None:
    rig = Rig(Policy(limit=4, cooldown_ms=0))
    rig.limiter.on_rate_limited(rig.hold("a"), 1.0)  # nothing read of the answer
    assert rig.limiter.limit == 3
    assert details(rig, "rate_limited") == ["429 from upstream (conversation a)"]


# ------------------------------------------------------------------------ restore


def test_restore_raises_one_step_after_a_quiet_window_with_demand() -> None:
    rig = restoring()
    reduce_to(rig, 3)
    busy(rig)  # every slot in use from now on
    rig.ft.advance(WINDOW - 0.1)
    assert rig.limiter.limit == 3
    rig.ft.advance(0.1)
    assert rig.limiter.limit == 4
    assert rig.kinds()[-1] == "limit_restored"
    assert details(rig, "limit_restored") == [
        "limit 3 -> 4 after 60 s without a 429 while busy; the limit before the reductions is back"
    ]


def test_no_raise_without_demand() -> None:
    rig = restoring()
    reduce_to(rig, 3)
    rig.ft.advance(WINDOW * 100)  # idle: nothing proves the upstream takes more
    assert rig.limiter.limit == 3
    assert "limit_restored" not in rig.kinds()
    assert "restore" not in rig.limiter._timers


def test_waiters_in_the_queue_are_demand() -> None:
    rig = restoring(limit=2)
    reduce_to(rig, 1)
    held = rig.hold("a")
    rig.wait("w")
    rig.ft.advance(WINDOW)
    assert rig.limiter.limit == 2
    assert rig.granted() == ["w"]  # the raise admits the waiter into the new slot
    assert not held.released


def test_demand_time_adds_up_across_quiet_gaps() -> None:
    rig = restoring()
    reduce_to(rig, 3)
    permits = busy(rig)
    rig.ft.advance(WINDOW / 2)
    permits[0].release()  # a slot free: no demand
    rig.ft.advance(WINDOW * 10)
    assert rig.limiter.limit == 3
    rig.hold("again")  # all busy again
    rig.ft.advance(WINDOW / 2 - 0.1)
    assert rig.limiter.limit == 3
    rig.ft.advance(0.1)
    assert rig.limiter.limit == 4


def test_a_pause_is_not_demand() -> None:
    rig = restoring()
    reduce_to(rig, 3)
    rig.limiter.on_rate_limited(rig.hold("x"), 30.0, CONCURRENCY)  # now 2, paused 30 s
    for name in ("w1", "w2", "w3"):
        rig.wait(name)  # they wait out the pause: demand only from its end
    rig.ft.advance(30.0 + WINDOW - 0.1)
    assert rig.limiter.limit == 2
    assert rig.granted() == ["w1", "w2"]
    rig.ft.advance(0.1)
    assert rig.limiter.limit == 3
    assert rig.granted() == ["w1", "w2", "w3"]


def test_any_429_starts_the_quiet_window_over() -> None:
    rig = restoring(reduce_on_429="match", reduce_on_429_match="concurr")
    rig.limiter.on_rate_limited(rig.hold("x"), 0.0, CONCURRENCY)
    permits = busy(rig)
    rig.ft.advance(WINDOW - 1)
    permits[0].release()
    rig.limiter.on_rate_limited(rig.hold("y"), 0.0, TOKENS)  # keeps the limit, still a 429
    busy(rig)
    rig.ft.advance(WINDOW - 1)
    assert rig.limiter.limit == 3
    rig.ft.advance(1)
    assert rig.limiter.limit == 4


def test_a_429_within_a_window_of_a_raise_undoes_it_and_doubles_the_window() -> None:
    rig = restoring()
    reduce_to(rig, 2)
    permits = busy(rig)
    rig.ft.advance(WINDOW)
    assert rig.limiter.limit == 3
    # A request admitted before the raise: still the raise's fault, and one step only.
    rig.ft.advance(WINDOW - 1)
    rig.limiter.on_rate_limited(permits[0], 0.0)
    assert rig.limiter.limit == 2
    assert rig.kinds()[-3:] == ["rate_limited", "paused", "limit_reduced"]
    assert details(rig, "limit_reduced")[-1] == (
        "limit 3 -> 2 after a 429 within 60 s of a restore step: the step is undone"
    )
    rig.limiter.on_rate_limited(permits[1], 0.0)  # the same overshoot: no second step
    assert rig.limiter.limit == 2
    busy(rig)
    rig.ft.advance(2 * WINDOW - 0.1)  # the next step waits twice as long
    assert rig.limiter.limit == 2
    rig.ft.advance(0.1)
    assert rig.limiter.limit == 3


def test_a_429_later_than_a_window_after_a_raise_is_an_ordinary_reduction() -> None:
    rig = restoring()
    reduce_to(rig, 2)
    busy(rig)
    rig.ft.advance(WINDOW)
    assert rig.limiter.limit == 3
    rig.ft.advance(WINDOW + 1)
    rig.limiter.on_rate_limited(rig.hold("late"), 0.0)
    assert rig.limiter.limit == 2
    assert "undone" not in details(rig, "limit_reduced")[-1]
    busy(rig)
    rig.ft.advance(WINDOW)  # the window did not double
    assert rig.limiter.limit == 3


def test_the_window_doubles_up_to_sixteen_times_restore_after_s() -> None:
    rig = restoring(limit=2)
    reduce_to(rig, 1)
    window = WINDOW
    for _ in range(6):
        permits = busy(rig)
        rig.ft.advance(window)
        assert rig.limiter.limit == 2
        rig.limiter.on_rate_limited(rig.hold("undo"), 0.0)  # at once: undone
        for permit in permits:
            permit.release()
        assert rig.limiter.limit == 1
        window = min(window * 2, WINDOW * RESTORE_WINDOW_MAX_FACTOR)
    assert window == WINDOW * 16
    busy(rig)
    rig.ft.advance(WINDOW * 16 - 0.1)
    assert rig.limiter.limit == 1
    rig.ft.advance(0.1)
    assert rig.limiter.limit == 2


def test_restore_never_rises_above_the_limit_before_the_reductions() -> None:
    rig = restoring(limit=3)
    reduce_to(rig, 1)
    for _ in range(2):
        busy(rig)
        rig.ft.advance(WINDOW)
    assert rig.limiter.limit == 3
    busy(rig)
    rig.wait("w")
    rig.ft.advance(WINDOW * 50)
    assert rig.limiter.limit == 3
    assert rig.kinds().count("limit_restored") == 2
    assert "restore" not in rig.limiter._timers


def test_the_notice_clears_when_the_original_limit_is_back() -> None:
    rig = restoring(limit=3)
    reduce_to(rig, 1)
    busy(rig)
    rig.ft.advance(WINDOW)
    status = rig.status()
    assert (status.limit, status.auto_reduced, status.auto_reduced_from) == (2, True, 3)
    assert status.notice is not None
    assert "auto-reduced to 2" in status.notice
    busy(rig)
    rig.ft.advance(WINDOW)
    status = rig.status()
    assert (status.limit, status.auto_reduced, status.auto_reduced_from) == (3, False, None)
    assert status.notice is None


def test_a_manual_limit_resets_the_restore_state() -> None:
    rig = restoring(limit=4)
    reduce_to(rig, 2)
    permits = busy(rig)
    rig.ft.advance(WINDOW)
    rig.limiter.on_rate_limited(permits[0], 0.0)  # undone: window now 2x
    rig.ft.advance(WINDOW / 2)  # demand summed meanwhile
    rig.limiter.set_limit(3)
    assert not rig.status().auto_reduced
    assert "restore" not in rig.limiter._timers
    # A fresh reduction restores after the configured window, nothing carried over.
    rig.limiter.on_rate_limited(rig.hold("x"), 0.0)
    assert (rig.limiter.limit, rig.status().auto_reduced_from) == (2, 3)
    for permit in permits:
        permit.release()
    busy(rig)
    rig.ft.advance(WINDOW - 0.1)
    assert rig.limiter.limit == 2
    rig.ft.advance(0.1)
    assert rig.limiter.limit == 3


def test_restore_is_off_by_default() -> None:
    rig = Rig(Policy(limit=2, cooldown_ms=0))
    reduce_to(rig, 1)
    busy(rig)
    rig.wait("w")
    rig.ft.advance(10**6)
    assert rig.limiter.limit == 1
    assert "restore" not in rig.limiter._timers


def test_an_auto_reduced_limit_read_back_at_start_is_restored_too() -> None:
    rig = restoring(limit=5)
    rig.limiter.restore_auto_reduced(3, 5)
    busy(rig)
    rig.ft.advance(WINDOW)
    assert (rig.limiter.limit, rig.status().auto_reduced_from) == (4, 5)


def test_restore_keeps_one_timer() -> None:
    rig = restoring()
    reduce_to(rig, 2)
    busy(rig)
    for name in "abcde":
        rig.wait(name)
    pending = [t for t in rig.ft.pending() if t.callback == rig.limiter._on_restore]
    assert len(pending) == 1
    assert pending[0].due == pytest.approx(rig.ft.now + WINDOW)
