"""Client shares in the slot limiter, on fake time: one test per rule of SPEC section 11.

A client at its `max_in_flight` for a provider does not block others: the line admits
the oldest waiter whose client is under its cap. Its running requests count toward
the cap; cooling slots count only toward the provider's limit.
"""

from __future__ import annotations

import dataclasses

from proxy.admission.events import LimiterEvent
from proxy.admission.limiter import (
    ClientStatus,
    Limiter,
    LimiterStatus,
    Permit,
    Policy,
    Rejection,
    Waiter,
)
from tests.fakes import FakeTime
from tests.test_limiter import FakePolls

START = 1000.0
CAPS: tuple[tuple[str, int | None], ...] = (("a", 1), ("b", 2), ("free", None))


class Rig:
    """A limiter with clients `a` (cap 1), `b` (cap 2) and `free` (no cap) on fake
    time, every outcome and event recorded."""

    def __init__(self, policy: Policy, *, gate_poller: bool = False) -> None:
        self.ft = FakeTime(START)
        self.polls = FakePolls()
        self.events: list[LimiterEvent] = []
        self.outcomes: dict[str, Permit | Rejection] = {}
        self.order: list[str] = []
        self.limiter = Limiter(
            "prov",
            dataclasses.replace(policy, client_max_in_flight=CAPS),
            clock=self.ft.clock,
            scheduler=self.ft.call_later,
            poll_usage=self.polls if gate_poller else None,
            on_event=self.events.append,
        )

    def acquire(
        self, name: str, client: str | None, prompt: float = 0.0
    ) -> Permit | Waiter | Rejection:
        def on_done(outcome: Permit | Rejection) -> None:
            assert name not in self.outcomes, f"{name} got a second outcome"
            self.outcomes[name] = outcome
            self.order.append(name)

        return self.limiter.acquire(prompt, on_done, conversation_id=name, client_id=client)

    def hold(self, name: str, client: str | None, prompt: float = 0.0) -> Permit:
        ticket = self.acquire(name, client, prompt)
        assert isinstance(ticket, Permit), f"{name} was not admitted at once: {ticket!r}"
        return ticket

    def wait(self, name: str, client: str | None, prompt: float = 0.0) -> Waiter:
        ticket = self.acquire(name, client, prompt)
        assert isinstance(ticket, Waiter), f"{name} was not queued: {ticket!r}"
        return ticket

    def permit(self, name: str) -> Permit:
        outcome = self.outcomes[name]
        assert isinstance(outcome, Permit), outcome
        return outcome

    def status(self) -> LimiterStatus:
        return self.limiter.status()

    def client(self, client_id: str) -> ClientStatus:
        [found] = [c for c in self.status().clients if c.client_id == client_id]
        return found


# ------------------------------------------------------------------- the cap


def test_the_fast_path_respects_the_cap() -> None:
    rig = Rig(Policy(limit=5, cooldown_ms=0))
    assert rig.hold("a1", "a").client_id == "a"
    assert rig.wait("a2", "a").client_id == "a"  # four slots free, but a holds its one
    status = rig.status()
    assert (status.running, status.queued) == (1, 1)


def test_a_client_at_its_cap_does_not_block_a_newcomer() -> None:
    rig = Rig(Policy(limit=3, cooldown_ms=0))
    rig.hold("a1", "a")
    rig.wait("a2", "a", prompt=-100.0)  # older than anyone, but a is at its cap
    rig.hold("b1", "b", prompt=50.0)  # the fast path: nobody who may go next waits


def test_a_client_at_its_cap_does_not_block_the_waiters_behind_it() -> None:
    rig = Rig(Policy(limit=2, cooldown_ms=0))
    rig.hold("a1", "a")
    other = rig.hold("x", None)
    rig.wait("a2", "a", prompt=1.0)
    rig.wait("b1", "b", prompt=2.0)
    other.release()
    assert rig.order == ["b1"]  # the oldest waiter whose client is under its cap
    assert rig.client("a").queued == 1


def test_a_capped_waiter_goes_as_soon_as_its_client_drops_under_the_cap() -> None:
    rig = Rig(Policy(limit=3, cooldown_ms=0))
    first = rig.hold("a1", "a")
    rig.wait("a2", "a")
    first.release()
    assert rig.order == ["a2"]
    assert rig.client("a").in_flight == 1


def test_a_capped_client_keeps_its_place_among_the_others() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    first = rig.hold("x", None)
    rig.wait("b1", "b", prompt=1.0)
    rig.wait("n1", None, prompt=2.0)
    rig.wait("b2", "b", prompt=3.0)
    rig.wait("n2", None, prompt=4.0)
    first.release()
    for name in ("b1", "n1", "b2", "n2"):
        rig.permit(name).release()
    assert rig.order == ["b1", "n1", "b2", "n2"]  # under its cap, b is in line as anyone


def test_a_cap_above_one_admits_that_many_at_once() -> None:
    rig = Rig(Policy(limit=None, cooldown_ms=0))
    rig.hold("b1", "b")
    rig.hold("b2", "b")
    rig.wait("b3", "b")  # an unlimited provider still enforces the client's cap
    assert rig.order == []
    assert rig.client("b") == ClientStatus("b", 2, 1, 2)


def test_a_newcomer_older_than_its_clients_head_takes_the_turn() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    first = rig.hold("x", None)
    rig.wait("a-late", "a", prompt=5.0)
    rig.wait("n", None, prompt=3.0)
    rig.wait("a-early", "a", prompt=1.0)
    first.release()
    assert rig.order == ["a-early"]
    rig.permit("a-early").release()
    rig.permit("n").release()
    assert rig.order == ["a-early", "n", "a-late"]


def test_an_uncapped_client_waits_in_the_common_line_and_is_counted() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    first = rig.hold("f1", "free")
    rig.wait("f2", "free")
    assert rig.client("free") == ClientStatus("free", 1, 1, None)
    first.release()
    assert rig.order == ["f2"]


def test_an_unknown_client_id_is_no_client() -> None:
    rig = Rig(Policy(limit=3, cooldown_ms=0))
    assert rig.hold("z1", "zed").client_id is None
    rig.hold("z2", "zed")
    assert [c.client_id for c in rig.status().clients] == ["a", "b", "free"]
    assert rig.status().running == 2


# ------------------------------------------------------ running versus cooling


def test_running_requests_count_toward_the_cap_cooling_slots_do_not() -> None:
    rig = Rig(Policy(limit=3, cooldown_ms=1000))
    first = rig.hold("a1", "a")
    rig.wait("a2", "a")
    first.release()  # its slot cools down, but a is under its cap at once
    assert rig.order == ["a2"]
    status = rig.status()
    assert (status.running, status.cooling, status.in_flight) == (1, 1, 2)
    assert rig.client("a").in_flight == 1


def test_cooling_slots_still_count_toward_the_limit() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=1000))
    first = rig.hold("a1", "a")
    rig.wait("a2", "a")
    first.release()
    assert rig.order == []  # under its cap, but the one slot is cooling
    rig.ft.advance(0.999)
    assert rig.order == []
    rig.ft.advance(0.001)
    assert rig.order == ["a2"]


# --------------------------------------------------------------- cancellation


def test_cancel_of_a_parked_waiter() -> None:
    rig = Rig(Policy(limit=3, cooldown_ms=0))
    first = rig.hold("a1", "a")
    parked = rig.wait("a2", "a", prompt=1.0)
    rig.wait("a3", "a", prompt=2.0)
    parked.cancel()
    assert (rig.status().queued, rig.client("a").queued) == (1, 1)
    first.release()
    assert rig.order == ["a3"]
    assert "a2" not in rig.outcomes


def test_cancelling_the_waiter_a_turn_stands_at_moves_the_turn() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    first = rig.hold("x", None)
    head = rig.wait("a-head", "a", prompt=1.0)  # a is under its cap: its turn is here
    rig.wait("n", None, prompt=2.0)
    rig.wait("a-next", "a", prompt=3.0)
    head.cancel()
    first.release()
    assert rig.order == ["n"]  # a's turn moved to a-next's place, behind n
    rig.permit("n").release()
    assert rig.order == ["n", "a-next"]


def test_a_parked_waiter_times_out() -> None:
    rig = Rig(Policy(limit=3, cooldown_ms=0, queue_timeout_s=10))
    rig.hold("a1", "a")
    rig.wait("a2", "a")
    rig.ft.advance(10)
    outcome = rig.outcomes["a2"]
    assert isinstance(outcome, Rejection)
    assert outcome.reason == "queue_timeout"
    assert (rig.status().queued, rig.client("a").queued) == (0, 0)


def test_parked_waiters_count_toward_max_queue() -> None:
    rig = Rig(Policy(limit=3, cooldown_ms=0, max_queue=1))
    rig.hold("a1", "a")
    rig.wait("a2", "a")
    refused = rig.acquire("a3", "a")
    assert isinstance(refused, Rejection)
    assert refused.reason == "queue_full"


def test_a_grant_handed_back_at_once_lets_the_client_go_again() -> None:
    """A waiter cancelled as it is granted releases inside the grant: the client's
    turn must still come back for its next waiter."""
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    first = rig.hold("x", None)
    granted: list[Permit] = []

    def hand_back(outcome: Permit | Rejection) -> None:
        assert isinstance(outcome, Permit)
        granted.append(outcome)
        outcome.release()

    rig.limiter.acquire(1.0, hand_back, conversation_id="gone", client_id="a")
    rig.wait("a-next", "a", prompt=2.0)
    first.release()
    assert len(granted) == 1
    assert rig.order == ["a-next"]
    assert rig.client("a") == ClientStatus("a", 1, 0, 1)


# ------------------------------------------------------ with the other rules


def test_cap_and_pause() -> None:
    rig = Rig(Policy(limit=3, cooldown_ms=0))
    first = rig.hold("a1", "a")
    rig.wait("a2", "a", prompt=1.0)
    rig.wait("a3", "a", prompt=2.0)
    rig.limiter.on_rate_limited(first, 5.0)  # pauses, lowers the limit to 2, releases a1
    assert rig.order == []  # a is under its cap now, but the queue is paused
    assert rig.status().paused
    rig.wait("b1", "b", prompt=0.0)
    rig.ft.advance(5)
    assert rig.order == ["b1", "a2"]  # a3 waits: a is at its cap again
    assert rig.client("a") == ClientStatus("a", 1, 1, 1)


def test_cap_and_usage_gate_polls_only_for_a_waiter_that_may_go() -> None:
    rig = Rig(Policy(limit=3, cooldown_ms=0, usage_gate=True), gate_poller=True)
    first = rig.hold("a1", "a")
    rig.wait("a2", "a")
    assert rig.polls.started == 0  # nobody who may go next waits: nothing to poll for
    first.release()
    assert rig.polls.started == 1
    rig.polls.answer(0)
    assert rig.order == ["a2"]


def test_cap_and_usage_gate_admit_one_per_poll_under_the_cap() -> None:
    rig = Rig(Policy(limit=2, cooldown_ms=0, usage_gate=True), gate_poller=True)
    first = rig.hold("a1", "a")
    other = rig.hold("x", None)
    rig.wait("a2", "a", prompt=1.0)
    rig.wait("b1", "b", prompt=2.0)
    other.release()
    rig.polls.answer(1)  # room for one, and a is at its cap: b1
    assert rig.order == ["b1"]
    first.release()
    rig.polls.answer(0)
    assert rig.order == ["b1", "a2"]


def test_raising_the_limit_admits_only_clients_under_their_cap() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    rig.hold("a1", "a")
    rig.wait("a2", "a", prompt=1.0)
    rig.wait("a3", "a", prompt=2.0)
    rig.wait("b1", "b", prompt=3.0)
    rig.wait("b2", "b", prompt=4.0)
    rig.wait("b3", "b", prompt=5.0)
    rig.limiter.set_limit(10)
    assert rig.order == ["b1", "b2"]
    assert rig.client("a") == ClientStatus("a", 1, 2, 1)
    assert rig.client("b") == ClientStatus("b", 2, 1, 2)
    assert rig.status().queued == 3


def test_lowering_the_limit_keeps_parked_waiters_parked() -> None:
    rig = Rig(Policy(limit=3, cooldown_ms=0))
    first = rig.hold("a1", "a")
    rig.wait("a2", "a")
    rig.limiter.set_limit(1)
    first.release()
    assert rig.order == ["a2"]  # the one slot, and a is under its cap


def test_the_watchdog_frees_the_cap_and_names_the_client() -> None:
    rig = Rig(Policy(limit=None, slot_timeout_s=10, watchdog_interval_s=5, cooldown_ms=0))
    rig.hold("a1", "a")
    rig.wait("a2", "a")
    rig.ft.advance(15)
    assert rig.order == ["a2"]
    [event] = [e for e in rig.events if e.kind == "slot_reclaimed"]
    assert "client a" in event.detail
    assert "conversation a1" in event.detail


def test_a_429_event_names_the_client() -> None:
    rig = Rig(Policy(limit=2, cooldown_ms=0))
    permit = rig.hold("b1", "b")
    rig.limiter.on_rate_limited(permit, 1.0)
    [event] = [e for e in rig.events if e.kind == "rate_limited"]
    assert "client b" in event.detail
    assert permit.client_id == "b"


def test_status_lists_every_configured_client() -> None:
    rig = Rig(Policy(limit=1, cooldown_ms=0))
    assert rig.status().clients == (
        ClientStatus("a", 0, 0, 1),
        ClientStatus("b", 0, 0, 2),
        ClientStatus("free", 0, 0, None),
    )


def test_without_clients_status_has_none() -> None:
    limiter = Limiter("p", Policy(limit=1), clock=lambda: 0.0, scheduler=FakeTime().call_later)
    assert limiter.status().clients == ()
