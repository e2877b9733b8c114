"""Random interleavings with client caps (SPEC section 11), checked against the rules.

Hypothesis draws operations (acquire for a client with small prompt times so ties
happen, release, cancel, time advance, limit and cooldown changes, 429s that pause
and send the request back) and `Run` applies them to a limiter on fake time while
keeping its own model of who waits and who holds what. At every grant: no client
past its cap, the limit not exceeded, not paused, and the grant is the oldest waiter
whose client is under its cap. After every step: the counts agree with the model and
no waiter that may go sits beside a free slot. At the end everything drains.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.admission.events import LimiterEvent
from proxy.admission.limiter import Limiter, Permit, Policy, Rejection, Waiter
from tests.fakes import FakeTime

CAPS: dict[str | None, int | None] = {"a": 1, "b": 2, "c": None, None: None}
CLIENTS = tuple(CAPS)
KINDS = (
    "acquire",
    "acquire",
    "acquire",
    "acquire",
    "release",
    "release",
    "release",
    "cancel",
    "advance",
    "limit",
    "cooldown",
    "rate_limited",
)
Op = tuple[str, int, int]


@dataclass(eq=False)
class Request:
    cid: str
    client: str | None
    prompt: float
    state: str = "new"  # new, waiting, granted, fast, cancelled, expired, refused
    seq: int | None = None
    waiter: Waiter | None = None
    permit: Permit | None = None
    outcomes: int = 0

    @property
    def key(self) -> tuple[float, int]:
        assert self.seq is not None
        return (self.prompt, self.seq)


@dataclass
class Run:
    policy: Policy
    ft: FakeTime = field(default_factory=FakeTime)
    live: dict[tuple[float, int], Request] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    held: list[Permit] = field(default_factory=list)
    reclaimed: set[str] = field(default_factory=set)
    limiter: Limiter = field(init=False)

    def __post_init__(self) -> None:
        caps = tuple((c, cap) for c, cap in CAPS.items() if c is not None)
        self.policy = dataclasses.replace(self.policy, client_max_in_flight=caps)
        self.limiter = Limiter(
            "prop",
            self.policy,
            clock=self.ft.clock,
            scheduler=self.ft.call_later,
            on_event=self.on_event,
        )

    # ------------------------------------------------------------ the model

    def running(self, client: str | None) -> int:
        """The client's permits held and not reclaimed, by the model's count."""
        return sum(
            1
            for p in self.held
            if p.client_id == client and p.conversation_id not in self.reclaimed
        )

    def under_cap(self, client: str | None) -> bool:
        cap = CAPS[client]
        return cap is None or self.running(client) < cap

    def eligible(self) -> list[Request]:
        """The waiters that may go next: their client is under its cap."""
        return [r for r in self.live.values() if self.under_cap(r.client)]

    # ------------------------------------------------------------ callbacks

    def on_event(self, event: LimiterEvent) -> None:
        if event.kind != "slot_reclaimed":
            return
        [permit] = [p for p in self.held if re.search(rf"\b{p.conversation_id}\b", event.detail)]
        cid = permit.conversation_id
        assert cid is not None
        assert cid not in self.reclaimed, f"{cid} reclaimed twice"
        if permit.client_id is not None:
            assert f"client {permit.client_id}" in event.detail
        self.reclaimed.add(cid)

    def on_done(self, request: Request, outcome: Permit | Rejection) -> None:
        request.outcomes += 1
        assert request.outcomes == 1, f"{request.cid} got a second outcome"
        if isinstance(outcome, Rejection):
            assert outcome.reason == "queue_timeout"
            assert request.state == "waiting"
            del self.live[request.key]
            request.state = "expired"
            return
        assert request.state in ("new", "waiting"), f"{request.cid} granted while {request.state}"
        request.seq = outcome.seq
        assert outcome.client_id == request.client
        assert self.under_cap(request.client), f"{request.client} admitted past its cap"
        candidates = {r.key for r in self.eligible()} | {request.key}
        assert request.key == min(candidates), "the grant skipped an older waiter under its cap"
        self.live.pop(request.key, None)
        status = self.limiter.status()
        assert not status.paused, "admitted while paused"
        if status.limit is not None:
            assert status.in_flight - 1 < status.limit, "admitted with every slot in use"
        request.state = "granted"
        request.permit = outcome
        self.held.append(outcome)

    # ---------------------------------------------------------------- ops

    def acquire(self, client: str | None, prompt: float, seq: int | None = None) -> None:
        had_eligible = bool(self.eligible())
        request = Request(f"r{len(self.requests)}", client, prompt, seq=seq)
        self.requests.append(request)
        ticket = self.limiter.acquire(
            prompt,
            lambda outcome: self.on_done(request, outcome),
            conversation_id=request.cid,
            seq=seq,
            client_id=client,
        )
        if isinstance(ticket, Permit):
            assert request.state == "new"
            assert not had_eligible, "the fast path jumped a waiter that may go"
            assert self.under_cap(client), "the fast path admitted past the cap"
            status = self.limiter.status()
            assert not status.paused
            if status.limit is not None:
                assert status.in_flight - 1 < status.limit, "fast path past the limit"
            request.state = "fast"
            request.seq = ticket.seq
            request.permit = ticket
            self.held.append(ticket)
        elif isinstance(ticket, Waiter):
            request.waiter = ticket
            request.seq = ticket.seq
            if request.state == "new":
                request.state = "waiting"
                self.live[request.key] = request
        else:
            assert ticket.reason == "queue_full"
            assert len(self.live) >= self.policy.max_queue
            request.state = "refused"

    def release(self, index: int) -> None:
        if self.held:
            self.held.pop(index % len(self.held)).release()

    def cancel(self, index: int) -> None:
        pool = [r for r in self.requests if r.state == "waiting"]
        if pool:
            request = pool[index % len(pool)]
            assert request.waiter is not None
            request.waiter.cancel()
            del self.live[request.key]
            request.state = "cancelled"

    def rate_limited(self, index: int, choice: int) -> None:
        if not self.held:
            return
        permit = self.held.pop(index % len(self.held))
        self.limiter.on_rate_limited(permit, (0.0, 0.5, 2.0)[choice % 3])
        assert permit.released
        if choice % 2 and permit.conversation_id not in self.reclaimed:
            self.acquire(permit.client_id, permit.prompt_started_at, seq=permit.seq)

    def apply(self, op: Op) -> None:
        kind, a, b = op
        if kind == "acquire":
            self.acquire(CLIENTS[b % len(CLIENTS)], float(a % 5))
        elif kind == "release":
            self.release(a)
        elif kind == "cancel":
            self.cancel(a)
        elif kind == "advance":
            self.ft.advance(a / 500)
        elif kind == "limit":
            self.limiter.set_limit(None if a % 6 == 0 else a % 6)
        elif kind == "cooldown":
            self.limiter.set_cooldown_ms(a % 5 * 250)
        else:
            self.rate_limited(a, b)
        self.check()

    # ---------------------------------------------------------- invariants

    def check(self) -> None:
        status = self.limiter.status()
        assert status.queued == len(self.live)
        running = [p for p in self.held if p.conversation_id not in self.reclaimed]
        assert status.running == len(running)
        for c in status.clients:
            assert c.in_flight == self.running(c.client_id), c
            assert c.queued == sum(1 for r in self.live.values() if r.client == c.client_id), c
            assert c.max_in_flight is None or c.in_flight <= c.max_in_flight, c
        free = status.limit is None or status.in_flight < status.limit
        if self.eligible() and not status.paused:
            assert not free, "a waiter under its cap sits beside a free slot"

    def drain(self) -> None:
        for _ in range(1000):
            while self.held:
                self.held.pop().release()
            status = self.limiter.status()
            if status.queued == 0 and status.in_flight == 0:
                break
            self.ft.advance(5.0)
            self.check()
        else:
            pytest.fail(f"the limiter did not drain: {self.limiter.status()}")
        assert not self.live
        for request in self.requests:
            assert request.state in ("granted", "fast", "cancelled", "expired", "refused")


ops = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(0, 999), st.integers(0, 999)),
    min_size=30,
    max_size=150,
)


@pytest.mark.parametrize(
    ("queue_timeout_s", "max_queue"),
    [
        pytest.param(1e9, Policy.max_queue, id="unbounded"),
        pytest.param(1.5, 4, id="queue-bounds"),
    ],
)
@settings(max_examples=200, deadline=None, database=None)
@given(steps=ops, limit=st.integers(1, 4), cooldown_ms=st.sampled_from([0, 250, 1000]))
def test_no_client_exceeds_its_cap_and_the_limit_holds(
    queue_timeout_s: float, max_queue: int, steps: list[Op], limit: int, cooldown_ms: int
) -> None:
    policy = Policy(
        limit=limit,
        cooldown_ms=cooldown_ms,
        slot_timeout_s=4.0,
        watchdog_interval_s=1.0,
        pause_s=3.0,
        queue_timeout_s=queue_timeout_s,
        max_queue=max_queue,
    )
    model = Run(policy)
    for step in steps:
        model.apply(step)
    model.drain()
