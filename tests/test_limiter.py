"""The slot limiter on fake time: one test per admission rule of SPEC section 5.

Nothing here sleeps or runs an event loop. Time moves only through `FakeTime.advance`,
and the upstream's `/usage` is a fake poller whose answers the test gives explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from proxy.admission.events import LimiterEvent
from proxy.admission.limiter import (
    Limiter,
    LimiterStatus,
    Permit,
    Policy,
    Rejection,
    Waiter,
)
from tests.fakes import FakeTime

START = 1000.0

Outcome = Permit | Rejection
Done = Callable[[int | None], None]


class FakePolls:
    """A fake `/usage` poller: it records each poll's `done` for the test to answer."""

    def __init__(self) -> None:
        self.outstanding: list[Done] = []
        self.started = 0
        self.max_outstanding = 0

    def __call__(self, done: Done) -> None:
        self.started += 1
        self.outstanding.append(done)
        self.max_outstanding = max(self.max_outstanding, len(self.outstanding))

    def answer(self, sessions: int | None) -> None:
        assert len(self.outstanding) == 1, f"{len(self.outstanding)} polls outstanding"
        self.outstanding.pop()(sessions)


class Rig:
    """A limiter on fake time with every outcome, event and poll recorded."""

    def __init__(self, policy: Policy, *, gate_poller: bool = False) -> None:
        self.ft = FakeTime(START)
        self.polls = FakePolls()
        self.events: list[LimiterEvent] = []
        self.outcomes: dict[str, list[Outcome]] = {}
        self.done_at: dict[str, float] = {}
        self.order: list[str] = []
        self.limiter = Limiter(
            "prov",
            policy,
            clock=self.ft.clock,
            scheduler=self.ft.call_later,
            poll_usage=self.polls if gate_poller else None,
            on_event=self.events.append,
        )

    def acquire(
        self, name: str, prompt: float = 0.0, *, seq: int | None = None
    ) -> Permit | Waiter | Rejection:
        def on_done(outcome: Outcome) -> None:
            self.outcomes.setdefault(name, []).append(outcome)
            self.done_at[name] = self.ft.now
            self.order.append(name)

        return self.limiter.acquire(prompt, on_done, conversation_id=name, seq=seq)

    def hold(self, name: str, prompt: float = 0.0) -> Permit:
        ticket = self.acquire(name, prompt)
        assert isinstance(ticket, Permit), f"{name} was not admitted at once: {ticket!r}"
        return ticket

    def wait(self, name: str, prompt: float = 0.0, *, seq: int | None = None) -> Waiter:
        ticket = self.acquire(name, prompt, seq=seq)
        assert isinstance(ticket, Waiter), f"{name} was not queued: {ticket!r}"
        return ticket

    def granted(self) -> list[str]:
        """Names whose waiter received a permit, in grant order."""
        return [name for name in self.order if isinstance(self.outcomes[name][0], Permit)]

    def permit(self, name: str) -> Permit:
        [outcome] = self.outcomes[name]
        assert isinstance(outcome, Permit)
        return outcome

    def status(self) -> LimiterStatus:
        return self.limiter.status()

    def kinds(self) -> list[str]:
        return [event.kind for event in self.events]


# ------------------------------------------------------------------ fast path


def test_grants_at_once_under_the_limit() -> None:
    rig = Rig(Policy(limit=2, cooldown_ms=0))
    first = rig.hold("a")
    second = rig.hold("b")
    assert not first.released
    assert not second.released
    assert first.conversation_id == "a"
    assert first.admitted_at == START
    status = rig.status()
    assert (status.in_flight, status.running, status.queued) == (2, 2, 0)
    assert rig.order == []  # a fast-path grant is the return value, not a callback


def test_unlimited_provider_always_grants_and_never_queues() -> None:
    rig = Rig(Policy(limit=None, max_queue=0))
    permits = [rig.hold(f"r{i}") for i in range(50)]
    status = rig.status()
    assert (status.in_flight, status.queued, status.limit) == (50, 0, None)
    for permit in permits:
        permit.release()
    assert rig.status().in_flight == 0


def test_queues_beyond_the_limit() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    rig.hold("a")
    waiter = rig.wait("b")
    assert waiter.waiting
    assert rig.outcomes == {}
    status = rig.status()
    assert (status.in_flight, status.queued) == (1, 1)


def test_fast_path_does_not_jump_a_queue_held_back_by_the_usage_gate() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0, usage_gate=True), gate_poller=True)
    rig.hold("a")
    rig.wait("b")
    rig.limiter.set_limit(3)  # two free slots, but "b" waits for the poll
    assert rig.polls.started == 1
    assert isinstance(rig.acquire("c"), Waiter)
    assert rig.status().queued == 2


def test_fast_path_refuses_while_paused() -> None:
    rig = Rig(Policy(limit=3, cooldown_ms=0))
    first = rig.hold("a")
    rig.limiter.on_rate_limited(first, 5.0)
    status = rig.status()
    assert status.in_flight == 0
    assert status.limit == 2
    assert isinstance(rig.acquire("b"), Waiter)  # ...and still no admission while paused
    rig.ft.advance(5.0)
    assert rig.granted() == ["b"]


# ------------------------------------------------------------------- ordering


def test_oldest_prompt_is_admitted_first_whatever_the_arrival_order() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    running = rig.hold("running")
    for name, prompt in [("p30", 30.0), ("p10", 10.0), ("p40", 40.0), ("p20", 20.0)]:
        rig.wait(name, prompt)
    running.release()
    for name in ["p10", "p20", "p30"]:
        rig.permit(name).release()
    assert rig.granted() == ["p10", "p20", "p30", "p40"]


def test_equal_prompt_times_are_admitted_in_arrival_order() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    running = rig.hold("running")
    names = ["first", "second", "third"]
    for name in names:
        rig.wait(name, 7.0)
    running.release()
    for name in names[:-1]:
        rig.permit(name).release()
    assert rig.granted() == names


def test_explicit_seq_keeps_a_requeued_request_ahead_of_later_arrivals() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    original = rig.hold("original", 5.0)  # seq drawn at its first arrival
    rig.wait("same-prompt-later", 5.0)
    rig.wait("later-prompt", 6.0)
    original.release()  # sent back (say by a 429) ...
    rig.permit("same-prompt-later").release()
    rig.wait("requeued", 5.0, seq=original.seq)  # ... and queued again with its place
    rig.wait("newcomer", 5.0)
    rig.permit("later-prompt").release()
    rig.permit("requeued").release()
    assert rig.granted() == ["same-prompt-later", "later-prompt", "requeued", "newcomer"]


def test_explicit_seq_from_next_seq_wins_a_tie_against_earlier_queued_requests() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    running = rig.hold("running")
    early = rig.limiter.next_seq()
    rig.wait("queued-first", 5.0)
    rig.wait("requeued", 5.0, seq=early)
    running.release()
    assert rig.granted() == ["requeued"]


# ------------------------------------------------------------------- cooldown


def test_released_slot_is_held_for_the_cooldown_before_a_waiter_gets_it() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=500))
    first = rig.hold("a")
    rig.wait("b")
    first.release()
    status = rig.status()
    assert (status.in_flight, status.running, status.cooling, status.queued) == (1, 0, 1, 1)
    rig.ft.advance(0.499)
    assert rig.granted() == []
    assert rig.status().in_flight == 1
    rig.ft.advance(0.002)
    assert rig.granted() == ["b"]
    assert rig.done_at["b"] == pytest.approx(START + 0.5)
    status = rig.status()
    assert (status.in_flight, status.running, status.cooling) == (1, 1, 0)


def test_cooling_slot_refuses_the_fast_path_until_it_recycles() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=500))
    rig.hold("a").release()
    assert isinstance(rig.acquire("b"), Waiter)
    rig.ft.advance(0.5)
    assert rig.granted() == ["b"]


def test_zero_cooldown_recycles_a_slot_at_once() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    first = rig.hold("a")
    rig.wait("b")
    first.release()
    assert rig.granted() == ["b"]
    assert rig.status().cooling == 0


def test_cooldown_change_applies_to_the_next_release_not_to_slots_already_cooling() -> None:
    rig = Rig(Policy(limit=2, cooldown_ms=1000))
    first = rig.hold("a")
    second = rig.hold("b")
    rig.wait("w1")
    rig.wait("w2")
    first.release()  # cools for the old 1000 ms
    rig.limiter.set_cooldown_ms(200)
    assert rig.status().cooldown_ms == 200
    second.release()  # cools for the new 200 ms
    rig.ft.advance(0.2)
    assert rig.granted() == ["w1"]
    assert rig.done_at["w1"] == pytest.approx(START + 0.2)
    rig.ft.advance(0.7)
    assert rig.granted() == ["w1"]  # the first slot did not pick up the shorter cooldown
    rig.ft.advance(0.1)
    assert rig.granted() == ["w1", "w2"]
    assert rig.done_at["w2"] == pytest.approx(START + 1.0)


# ---------------------------------------------------------------- limit control


def test_raising_the_limit_wakes_new_minus_old_waiters() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    rig.hold("a")
    for i in range(4):
        rig.wait(f"w{i}", float(i))
    rig.limiter.set_limit(3)
    assert rig.granted() == ["w0", "w1"]
    status = rig.status()
    assert (status.in_flight, status.queued) == (3, 2)


def test_lowering_the_limit_never_evicts_running_permits() -> None:
    rig = Rig(Policy(limit=3, cooldown_ms=0))
    permits = [rig.hold(name) for name in "abc"]
    rig.limiter.set_limit(1)
    assert not any(permit.released for permit in permits)
    assert rig.status().running == 3
    rig.wait("w")
    permits[0].release()
    permits[1].release()
    assert rig.granted() == []  # one still runs: the new limit of 1 is in use
    permits[2].release()
    assert rig.granted() == ["w"]


def test_removing_the_limit_grants_every_waiter() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    rig.hold("a")
    for i in range(3):
        rig.wait(f"w{i}")
    rig.limiter.set_limit(None)
    assert rig.granted() == ["w0", "w1", "w2"]
    status = rig.status()
    assert (status.limit, status.queued, status.in_flight) == (None, 0, 4)


def test_removing_the_limit_while_paused_lets_no_newcomer_jump_the_queue() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    first = rig.hold("a")
    rig.wait("w")
    rig.limiter.on_rate_limited(first, 10.0)
    rig.limiter.set_limit(None)  # the waiter stays queued: the pause holds it
    newcomer = rig.acquire("b")
    assert not (isinstance(newcomer, Permit) and "w" not in rig.outcomes)


# -------------------------------------------------------------------- watchdog


def test_watchdog_reclaims_a_slot_held_past_slot_timeout_at_the_next_tick() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0, slot_timeout_s=10.0, watchdog_interval_s=4.0))
    rig.hold("stuck")
    rig.wait("w1")
    rig.ft.advance(11.0)  # ticks at +4 and +8 find nothing older than 10 s
    assert rig.granted() == []
    assert rig.events == []
    rig.ft.advance(1.0)  # the tick at +12 does
    assert rig.kinds() == ["slot_reclaimed"]
    assert "stuck" in rig.events[0].detail
    assert "12000 ms" in rig.events[0].detail
    assert rig.granted() == ["w1"]
    assert rig.done_at["w1"] == pytest.approx(START + 12.0)


def test_release_of_a_reclaimed_permit_is_a_no_op() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0, slot_timeout_s=10.0, watchdog_interval_s=4.0))
    stuck = rig.hold("stuck")
    rig.wait("w1")
    rig.wait("w2")
    rig.ft.advance(12.0)
    assert rig.granted() == ["w1"]
    stuck.release()  # late: its slot was already handed to w1
    assert rig.granted() == ["w1"]
    assert rig.status().in_flight == 1
    rig.permit("w1").release()
    assert rig.granted() == ["w1", "w2"]
    rig.permit("w2").release()
    stuck.release()
    status = rig.status()
    assert (status.in_flight, status.running, status.queued) == (0, 0, 0)


def test_late_release_of_a_reclaimed_permit_starts_no_second_cooldown() -> None:
    rig = Rig(Policy(limit=2, cooldown_ms=500, slot_timeout_s=10.0, watchdog_interval_s=4.0))
    stuck = rig.hold("stuck")
    rig.ft.advance(12.0)  # reclaimed: its slot cools from +12 to +12.5
    rig.ft.advance(0.5)
    assert rig.status().in_flight == 0
    stuck.release()
    status = rig.status()
    assert (status.in_flight, status.cooling) == (0, 0)


def test_watchdog_leaves_slots_younger_than_slot_timeout_alone() -> None:
    rig = Rig(Policy(limit=2, cooldown_ms=0, slot_timeout_s=10.0, watchdog_interval_s=4.0))
    rig.hold("old")
    rig.ft.advance(6.0)
    young = rig.hold("young")
    rig.ft.advance(6.0)  # tick at +12: "old" is 12 s old, "young" 6 s
    assert rig.kinds() == ["slot_reclaimed"]
    assert re.search(r"\bold\b", rig.events[0].detail)
    assert rig.status().running == 1
    young.release()
    assert rig.status().in_flight == 0


def test_watchdog_covers_a_slot_admitted_before_the_limit_was_set() -> None:
    rig = Rig(Policy(limit=None, cooldown_ms=0, slot_timeout_s=10.0, watchdog_interval_s=4.0))
    rig.hold("stuck")
    rig.limiter.set_limit(1)  # the stuck request now fills the only slot
    rig.wait("w")
    rig.ft.advance(20.0)
    assert rig.kinds() == ["slot_reclaimed"]
    assert rig.granted() == ["w"]


# ------------------------------------------------------------------ usage gate


def gated_rig(limit: int = 1, **extra: int) -> Rig:
    policy = Policy(limit=limit, cooldown_ms=0, usage_gate=True, usage_poll_interval_ms=500)
    for key, value in extra.items():
        setattr(policy, key, value)
    return Rig(policy, gate_poller=True)


def test_fast_path_does_not_poll_the_usage() -> None:
    rig = gated_rig(limit=3)
    for name in "abc":
        rig.hold(name)
    assert rig.polls.started == 0
    assert rig.status().usage_gate is True


def test_usage_gate_polls_before_admitting_a_queued_waiter() -> None:
    rig = gated_rig()
    first = rig.hold("a")
    rig.wait("w")
    assert rig.polls.started == 0  # no free slot yet: nothing to ask about
    first.release()
    assert rig.polls.started == 1
    assert rig.granted() == []  # the slot is free, but the gate has not answered
    rig.polls.answer(0)
    assert rig.granted() == ["w"]
    assert rig.status().upstream_sessions == 0


def test_usage_gate_blocks_at_the_limit_and_repolls_every_interval() -> None:
    rig = gated_rig(limit=2)
    first = rig.hold("a")
    rig.hold("b")
    rig.wait("w")
    first.release()
    rig.polls.answer(2)  # the upstream counts 2 sessions: at the limit
    assert rig.granted() == []
    assert rig.status().upstream_sessions == 2
    rig.ft.advance(0.25)
    assert rig.polls.started == 1
    rig.ft.advance(0.25)
    assert rig.polls.started == 2  # re-polled after usage_poll_interval_ms
    rig.polls.answer(7)  # above the limit: still blocked
    rig.ft.advance(0.5)
    assert rig.polls.started == 3
    assert rig.granted() == []
    rig.polls.answer(1)
    assert rig.granted() == ["w"]
    assert rig.done_at["w"] == pytest.approx(START + 1.0)


def test_usage_gate_admits_at_most_one_waiter_per_successful_poll() -> None:
    rig = gated_rig()
    rig.hold("a")
    for i in range(3):
        rig.wait(f"w{i}", float(i))
    rig.limiter.set_limit(4)  # three free slots
    assert rig.polls.started == 1
    rig.polls.answer(0)
    assert rig.granted() == ["w0"]
    assert rig.polls.started == 2  # the next admission needs its own poll
    rig.polls.answer(1)
    assert rig.granted() == ["w0", "w1"]
    rig.polls.answer(2)
    assert rig.granted() == ["w0", "w1", "w2"]
    assert rig.polls.started == 3  # queue empty: no further poll


def test_usage_gate_without_information_admits_as_many_as_slots_allow() -> None:
    rig = gated_rig()
    rig.hold("a")
    for i in range(4):
        rig.wait(f"w{i}", float(i))
    rig.limiter.set_limit(4)
    rig.polls.answer(None)
    assert rig.granted() == ["w0", "w1", "w2"]
    assert rig.status().queued == 1
    assert rig.status().upstream_sessions is None


def test_usage_polls_never_overlap() -> None:
    rig = gated_rig(limit=3)
    permits = [rig.hold(name) for name in "abc"]
    rig.wait("w1")
    rig.wait("w2")
    permits[0].release()  # starts the poll
    permits[1].release()  # another free slot while it is outstanding
    rig.limiter.set_limit(4)
    rig.ft.advance(5.0)
    rig.wait("w3")
    assert rig.polls.started == 1
    assert rig.polls.max_outstanding == 1
    rig.polls.answer(0)
    assert rig.granted() == ["w1"]
    assert rig.polls.started == 2
    assert rig.polls.max_outstanding == 1


def test_repoll_timer_is_cleared_when_the_queue_drains() -> None:
    rig = gated_rig()
    first = rig.hold("a")
    waiter = rig.wait("w")
    first.release()
    rig.polls.answer(1)  # at the limit: re-poll in 0.5 s
    repoll = [t for t in rig.ft.pending() if t.due == pytest.approx(START + 0.5)]
    assert len(repoll) == 1
    waiter.cancel()
    assert repoll[0].cancelled
    assert repoll[0] not in rig.ft.pending()
    rig.ft.advance(10.0)
    assert rig.polls.started == 1


def test_answer_arriving_after_the_queue_drained_starts_no_repoll() -> None:
    rig = gated_rig()
    first = rig.hold("a")
    waiter = rig.wait("w")
    first.release()
    waiter.cancel()  # leaves while the poll is outstanding
    rig.polls.answer(5)
    rig.ft.advance(10.0)
    assert rig.polls.started == 1
    assert rig.granted() == []


def test_usage_gate_does_not_poll_while_paused() -> None:
    rig = gated_rig(limit=3)
    first = rig.hold("a")
    rig.limiter.on_rate_limited(first, 2.0)
    rig.wait("w")
    assert rig.polls.started == 0
    rig.ft.advance(2.0)
    assert rig.polls.started == 1
    rig.polls.answer(0)
    assert rig.granted() == ["w"]


# ---------------------------------------------------------------- release/cancel


def test_release_is_idempotent() -> None:
    rig = Rig(Policy(limit=2, cooldown_ms=0))
    first = rig.hold("a")
    rig.hold("b")
    first.release()
    first.release()
    assert rig.status().in_flight == 1
    assert first.released


def test_stale_permit_released_again_does_not_free_its_requeued_successor() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    original = rig.hold("original")
    original.release()  # e.g. the 429 path released it ...
    requeued = rig.limiter.acquire(0.0, lambda outcome: None, seq=original.seq)
    assert isinstance(requeued, Permit)  # ... and the request came back with its seq
    original.release()  # a second, stale release of the first permit
    assert rig.status().running == 1
    assert isinstance(rig.acquire("newcomer"), Waiter)


def test_double_release_frees_one_slot_for_one_waiter() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    first = rig.hold("a")
    rig.wait("w1")
    rig.wait("w2")
    first.release()
    first.release()
    assert rig.granted() == ["w1"]
    assert rig.status().queued == 1


def test_cancelled_waiter_never_receives_a_slot() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    first = rig.hold("a")
    gone = rig.wait("gone", 1.0)
    rig.wait("next", 2.0)
    gone.cancel()
    assert not gone.waiting
    assert rig.status().queued == 1
    first.release()
    assert rig.granted() == ["next"]
    assert "gone" not in rig.outcomes
    gone.cancel()  # cancelling again changes nothing
    assert rig.status().in_flight == 1


def test_cancel_after_grant_hands_the_slot_back() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    first = rig.hold("a")
    raced = rig.wait("raced")
    rig.wait("next")
    first.release()
    assert rig.granted() == ["raced"]
    raced.cancel()  # the client left just as its grant arrived
    assert rig.permit("raced").released
    assert rig.granted() == ["raced", "next"]
    raced.cancel()
    assert rig.status().in_flight == 1


def test_cancel_of_the_last_waiter_empties_the_queue() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    first = rig.hold("a")
    waiter = rig.wait("w")
    waiter.cancel()
    assert rig.status().queued == 0
    first.release()
    assert isinstance(rig.acquire("b"), Permit)  # the fast path is open again


# ---------------------------------------------------------------- queue bounds


def test_max_queue_refuses_the_next_waiter_with_queue_full() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0, max_queue=2))
    rig.hold("a")
    rig.wait("w1")
    rig.wait("w2")
    refused = rig.acquire("w3")
    assert isinstance(refused, Rejection)
    assert refused.reason == "queue_full"
    assert refused.retry_after_s >= 1
    assert rig.status().queued == 2
    assert "w3" not in rig.outcomes


def test_max_queue_zero_refuses_all_queueing() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0, max_queue=0))
    rig.hold("a")
    refused = rig.acquire("b")
    assert isinstance(refused, Rejection)
    assert refused.reason == "queue_full"
    assert rig.status().queued == 0


def test_queue_full_while_paused_carries_the_remaining_pause_as_retry_after() -> None:
    rig = Rig(Policy(limit=3, cooldown_ms=0, max_queue=1))
    first = rig.hold("a")
    rig.limiter.on_rate_limited(first, 7.5)
    rig.wait("w1")
    rig.ft.advance(1.0)
    refused = rig.acquire("w2")
    # 6.5 s of pause left, then the waiter ahead and this one at the measured rate
    # (one admission in the last second: ~1/s): ceil(6.5 + 2.02).
    assert refused == Rejection("queue_full", 9)
    assert rig.status().queued == 1


def test_queue_timeout_rejects_a_waiter_still_queued() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0, queue_timeout_s=5.0))
    first = rig.hold("a")
    rig.wait("w")
    rig.ft.advance(4.9)
    assert "w" not in rig.outcomes
    rig.ft.advance(0.1)
    [outcome] = rig.outcomes["w"]
    assert isinstance(outcome, Rejection)
    assert outcome.reason == "queue_timeout"
    assert outcome.retry_after_s >= 1
    assert rig.status().queued == 0
    first.release()
    assert rig.granted() == []


def test_queue_timeout_while_paused_rejects_and_leaves_the_queue() -> None:
    rig = Rig(Policy(limit=2, cooldown_ms=0, queue_timeout_s=5.0))
    first = rig.hold("a")
    rig.limiter.on_rate_limited(first, 100.0)
    rig.wait("w")
    rig.ft.advance(4.9)
    assert "w" not in rig.outcomes
    rig.ft.advance(0.1)
    assert rig.outcomes["w"] == [Rejection("queue_timeout", 95)]
    assert rig.status().queued == 0
    rig.ft.advance(100.0)  # the pause ends: nobody left to admit
    assert rig.granted() == []
    assert rig.status().in_flight == 0


def test_granted_waiter_is_not_timed_out_later() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0, queue_timeout_s=5.0))
    first = rig.hold("a")
    rig.wait("w")
    first.release()
    assert all(t.due != pytest.approx(START + 5.0) for t in rig.ft.pending())  # timer dropped
    rig.ft.advance(60.0)
    assert len(rig.outcomes["w"]) == 1
    assert rig.status().running == 1


# ------------------------------------------------------------------------ 429

NOTICE_3 = "Concurrency limit auto-reduced to 3 after a 429 — restore manually when ready."


def test_rate_limit_pauses_for_retry_after_and_the_queue_resumes_at_its_end() -> None:
    rig = Rig(Policy(limit=3, cooldown_ms=0))
    first = rig.hold("a")
    second = rig.hold("b")
    rig.limiter.on_rate_limited(first, 5.0)
    assert first.released
    status = rig.status()
    assert status.paused
    assert status.paused_until == pytest.approx(START + 5.0)
    rig.wait("w1")  # the fast path is closed...
    second.release()
    assert rig.granted() == []  # ...and so is the queue, though slots are free
    rig.ft.advance(4.9)
    assert rig.granted() == []
    rig.ft.advance(0.1)
    assert rig.granted() == ["w1"]
    assert rig.done_at["w1"] == pytest.approx(START + 5.0)
    assert not rig.status().paused


def test_rate_limit_without_retry_after_pauses_for_pause_s() -> None:
    rig = Rig(Policy(limit=3, cooldown_ms=0, pause_s=12.0))
    rig.limiter.on_rate_limited(rig.hold("a"), None)
    assert rig.status().paused_until == pytest.approx(START + 12.0)
    rig.wait("w")
    rig.ft.advance(11.9)
    assert rig.granted() == []
    rig.ft.advance(0.1)
    assert rig.granted() == ["w"]


def test_successive_rate_limits_reduce_the_limit_by_one_never_below_one() -> None:
    rig = Rig(Policy(limit=4, cooldown_ms=0))
    limits = []
    for i in range(5):
        permit = rig.hold(f"r{i}")  # admitted after the previous reduction
        rig.limiter.on_rate_limited(permit, 1.0)
        limits.append(rig.limiter.limit)
        rig.ft.advance(1.0)
    assert limits == [3, 2, 1, 1, 1]
    status = rig.status()
    assert (status.auto_reduced, status.auto_reduced_from) == (True, 4)


def test_auto_reduced_from_remembers_the_limit_before_the_first_reduction() -> None:
    rig = Rig(Policy(limit=4, cooldown_ms=0))
    rig.limiter.on_rate_limited(rig.hold("a"), 1.0)
    status = rig.status()
    assert (status.limit, status.auto_reduced, status.auto_reduced_from) == (3, True, 4)
    assert status.notice == NOTICE_3
    assert rig.limiter.notice() == NOTICE_3
    rig.ft.advance(1.0)
    rig.limiter.on_rate_limited(rig.hold("b"), 1.0)
    status = rig.status()
    assert (status.limit, status.auto_reduced_from) == (2, 4)
    assert status.notice == (
        "Concurrency limit auto-reduced to 2 after a 429 — restore manually when ready."
    )


def test_rate_limit_events_are_emitted_in_order() -> None:
    rig = Rig(Policy(limit=4, cooldown_ms=0))
    rig.limiter.on_rate_limited(rig.hold("a"), 2.0)
    assert rig.kinds() == ["rate_limited", "paused", "limit_reduced"]


def test_new_rate_limit_extends_the_pause_but_a_shorter_one_never_shortens_it() -> None:
    rig = Rig(Policy(limit=4, cooldown_ms=0))
    permits = [rig.hold(name) for name in "abc"]
    rig.limiter.on_rate_limited(permits[0], 10.0)  # paused until +10
    rig.ft.advance(2.0)
    rig.limiter.on_rate_limited(permits[1], 3.0)  # +5 < +10: keeps +10
    assert rig.status().paused_until == pytest.approx(START + 10.0)
    assert rig.kinds().count("paused") == 1
    rig.limiter.on_rate_limited(permits[2], 20.0)  # +22 > +10: extends
    assert rig.status().paused_until == pytest.approx(START + 22.0)
    assert rig.kinds().count("paused") == 2
    rig.wait("w")
    rig.ft.advance(19.9)  # well past the first pause's end
    assert rig.granted() == []
    rig.ft.advance(0.1)
    assert rig.granted() == ["w"]


def test_two_rate_limits_for_requests_admitted_before_the_same_reduction_lower_it_once() -> None:
    rig = Rig(Policy(limit=4, cooldown_ms=0))
    first = rig.hold("a")
    second = rig.hold("b")
    rig.ft.advance(1.0)
    rig.limiter.on_rate_limited(first, 5.0)
    rig.ft.advance(0.5)
    rig.limiter.on_rate_limited(second, 5.0)
    assert rig.limiter.limit == 3
    assert rig.kinds().count("limit_reduced") == 1
    assert rig.kinds().count("rate_limited") == 2


def test_rate_limits_arriving_in_the_admission_tick_lower_the_limit_once() -> None:
    rig = Rig(Policy(limit=4, cooldown_ms=0))
    first = rig.hold("a")
    second = rig.hold("b")
    rig.limiter.on_rate_limited(first, 5.0)  # both answered 429 within the same tick
    rig.limiter.on_rate_limited(second, 5.0)
    assert rig.limiter.limit == 3


def test_rate_limit_on_a_request_admitted_after_a_reduction_lowers_again() -> None:
    rig = Rig(Policy(limit=4, cooldown_ms=0))
    old = rig.hold("old")
    first = rig.hold("a")
    rig.ft.advance(0.5)
    rig.limiter.on_rate_limited(first, 1.0)
    rig.ft.advance(1.0)
    new = rig.hold("new")
    rig.limiter.on_rate_limited(old, 1.0)  # admitted before the reduction: no step
    assert rig.limiter.limit == 3
    rig.limiter.on_rate_limited(new, 1.0)  # admitted after it: one more step
    assert rig.limiter.limit == 2


def test_manual_set_limit_clears_the_auto_reduce_state() -> None:
    rig = Rig(Policy(limit=4, cooldown_ms=0))
    rig.limiter.on_rate_limited(rig.hold("a"), 1.0)
    assert rig.status().auto_reduced
    rig.limiter.set_limit(4)
    status = rig.status()
    assert (status.limit, status.auto_reduced, status.auto_reduced_from) == (4, False, None)
    assert status.notice is None
    rig.ft.advance(1.0)
    rig.limiter.on_rate_limited(rig.hold("b"), 1.0)
    assert rig.status().auto_reduced_from == 4  # a fresh first reduction


def test_restore_auto_reduced_reinstates_the_reduction_and_its_notice() -> None:
    rig = Rig(Policy(limit=5, cooldown_ms=0))
    rig.limiter.restore_auto_reduced(3, 5)
    status = rig.status()
    assert (status.limit, status.auto_reduced, status.auto_reduced_from) == (3, True, 5)
    assert status.notice == NOTICE_3


def test_rate_limit_on_the_last_slot_keeps_the_waiter_queued_until_the_pause_ends() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    first = rig.hold("a")
    rig.wait("w")
    rig.limiter.on_rate_limited(first, 3.0)  # the freed slot must not go to "w" now
    assert rig.granted() == []
    assert rig.limiter.limit == 1
    rig.ft.advance(3.0)
    assert rig.granted() == ["w"]


# ---------------------------------------------------------------------- status


def test_status_counts_running_plus_cooling_as_in_flight() -> None:
    rig = Rig(Policy(limit=3, cooldown_ms=500))
    first = rig.hold("a")
    rig.hold("b")
    first.release()
    assert rig.status() == LimiterStatus(
        provider_id="prov",
        limit=3,
        in_flight=2,
        running=1,
        cooling=1,
        queued=0,
        paused=False,
        paused_until=None,
        cooldown_ms=500,
        auto_reduced=False,
        auto_reduced_from=None,
        notice=None,
        usage_gate=False,
        upstream_sessions=None,
    )
    rig.ft.advance(0.5)
    status = rig.status()
    assert (status.in_flight, status.running, status.cooling) == (1, 1, 0)


def test_status_shows_paused_until_only_while_paused() -> None:
    rig = Rig(Policy(limit=3, cooldown_ms=0))
    rig.limiter.on_rate_limited(rig.hold("a"), 4.0)
    status = rig.status()
    assert status.paused
    assert status.paused_until == pytest.approx(START + 4.0)
    assert rig.limiter.paused
    rig.ft.advance(4.0)
    status = rig.status()
    assert (status.paused, status.paused_until) == (False, None)
    assert not rig.limiter.paused


def test_status_reports_the_usage_gate_only_with_a_poller_and_a_limit() -> None:
    assert gated_rig().status().usage_gate is True
    assert Rig(Policy(limit=2, usage_gate=True)).status().usage_gate is False
    unlimited = gated_rig()
    unlimited.limiter.set_limit(None)
    assert unlimited.status().usage_gate is False


# ------------------------------------------------- the line: place, listing, Retry-After


def test_position_is_the_place_in_admission_order() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    first = rig.hold("a")
    late = rig.wait("late", prompt=30.0)
    early = rig.wait("early", prompt=10.0)
    middle = rig.wait("middle", prompt=20.0)
    positions = [rig.limiter.position(w) for w in (early, middle, late)]
    assert positions == [1, 2, 3]
    middle.cancel()
    assert rig.limiter.position(late) == 2
    assert rig.limiter.position(middle) is None
    first.release()
    assert rig.limiter.position(early) is None  # admitted
    assert rig.limiter.position(late) == 1


def test_waiters_lists_the_line_with_its_labels() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0, client_max_in_flight=(("team-b", None),)))
    rig.hold("a")
    rig.limiter.acquire(
        30.0, lambda _: None, conversation_id="c3", prompt_source="arrival", client_id="team-b"
    )
    rig.ft.advance(2.0)
    rig.limiter.acquire(10.0, lambda _: None, conversation_id="c1", prompt_source="header")
    rig.ft.advance(0.5)
    listed = rig.limiter.waiters()
    assert [(w.position, w.prompt_started_at, w.conversation_id) for w in listed] == [
        (1, 10.0, "c1"),
        (2, 30.0, "c3"),
    ]
    assert (listed[0].prompt_source, listed[0].client_id, listed[0].waited_s) == (
        "header",
        None,
        0.5,
    )
    assert (listed[1].prompt_source, listed[1].client_id, listed[1].waited_s) == (
        "arrival",
        "team-b",
        2.5,
    )
    assert [w.position for w in rig.limiter.waiters(offset=1, limit=5)] == [2]
    assert rig.limiter.waiters(offset=2) == []


def test_a_waiter_held_back_by_its_clients_cap_is_listed_after_those_who_may_go() -> None:
    rig = Rig(Policy(limit=2, cooldown_ms=0, client_max_in_flight=(("capped", 1),)))
    rig.limiter.acquire(5.0, lambda _: None, client_id="capped")  # runs: at its cap now
    rig.hold("other")  # the second slot
    parked = rig.limiter.acquire(1.0, lambda _: None, conversation_id="p", client_id="capped")
    free = rig.limiter.acquire(20.0, lambda _: None, conversation_id="f")
    assert isinstance(parked, Waiter)
    assert isinstance(free, Waiter)
    listed = [(w.position, w.conversation_id) for w in rig.limiter.waiters()]
    assert listed == [(1, "f"), (2, "p")]  # older, but its client is at its cap
    assert (rig.limiter.position(free), rig.limiter.position(parked)) == (1, 2)


def _timeout_retry_afters(admissions: int, over_s: float) -> list[int]:
    """Retry-After of five waiters that time out together (after 20 s), in line
    order, after `admissions` admissions spread over `over_s` seconds."""
    rig = Rig(Policy(limit=1, cooldown_ms=0, queue_timeout_s=20.0))
    for i in range(admissions):
        rig.hold(f"warm{i}").release()
        rig.ft.advance(over_s / admissions)
    rig.hold("holder")
    # Queued tail first, so that each times out with the whole line still ahead of it.
    names = [f"w{i}" for i in range(5)]
    for i, name in enumerate(reversed(names)):
        rig.wait(name, prompt=float(len(names) - i))
    rig.ft.advance(20.0)
    answers = []
    for name in names:
        [outcome] = rig.outcomes[name]
        assert isinstance(outcome, Rejection)
        assert outcome.reason == "queue_timeout"
        answers.append(outcome.retry_after_s)
    return answers


def test_queue_timeout_retry_after_grows_with_the_waiters_ahead() -> None:
    answers = _timeout_retry_afters(admissions=600, over_s=600.0)
    assert answers == sorted(answers)
    assert answers[0] < answers[-1]
    assert answers[0] >= 1
    assert answers[-1] <= 20


def test_queue_timeout_retry_after_shrinks_with_a_faster_admission_rate() -> None:
    slow = _timeout_retry_afters(admissions=600, over_s=600.0)
    fast = _timeout_retry_afters(admissions=2400, over_s=600.0)
    assert all(f < s for f, s in zip(fast, slow, strict=True)), (fast, slow)


def test_queue_full_retry_after_grows_with_the_queue() -> None:
    def refused_after(max_queue: int) -> int:
        rig = Rig(Policy(limit=1, cooldown_ms=0, max_queue=max_queue))
        for i in range(100):
            rig.hold(f"warm{i}").release()
            rig.ft.advance(0.5)
        rig.hold("holder")
        for i in range(max_queue):
            rig.wait(f"w{i}")
        refused = rig.acquire("refused")
        assert isinstance(refused, Rejection)
        return refused.retry_after_s

    answers = [refused_after(n) for n in (1, 10, 50)]
    assert answers[0] < answers[1] < answers[2], answers


def test_retry_after_with_nothing_admitted_lately_is_the_queue_timeout() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0, max_queue=1, queue_timeout_s=90.0, slot_timeout_s=1e5))
    rig.hold("holder")
    rig.ft.advance(3600.0)  # an hour with one admission: the rate has decayed to nothing
    rig.wait("w")
    assert rig.acquire("refused") == Rejection("queue_full", 90)


async def test_a_permit_reports_its_own_429_pausing_reducing_and_releasing() -> None:
    rig = Rig(Policy(limit=2, cooldown_ms=0, pause_s=5))
    first = rig.hold("a")
    await first.rate_limited(None)
    status = rig.limiter.status()
    assert (status.paused, status.limit, status.auto_reduced, status.running) == (True, 1, True, 0)
    assert first.released
    await first.rate_limited(None)  # reported twice: harmless, like a second release
    assert rig.limiter.counters.rate_limited == 1
