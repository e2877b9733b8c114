"""Random interleavings of every limiter operation, checked against the admission rules.

An op-sequence interpreter: hypothesis draws a list of operations (acquire with small
prompt times so ties happen, release, cancel, time advance, limit and cooldown
changes, `/usage` answers and 429s) and `Run` applies them to a limiter on fake time
while keeping its own model of who waits in which order. The invariants are checked
at every grant (inside `on_done`) and after every step; at the end everything is
released and the limiter must drain to zero.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.admission.events import LimiterEvent
from proxy.admission.limiter import (
    Limiter,
    Permit,
    Policy,
    Rejection,
    Waiter,
)
from tests.fakes import FakeTime

Done = Callable[[int | None], None]
Op = tuple[str, int, int]

KINDS = (
    "acquire",
    "acquire",
    "acquire",
    "release",
    "release",
    "cancel",
    "advance",
    "advance",
    "limit",
    "cooldown",
    "answer",
    "answer",
    "answer",
    "rate_limited",
)
RETRY_AFTER: tuple[float | None, ...] = (None, 0.0, 0.5, 1.0, 2.5)


@dataclass(eq=False)
class Request:
    cid: str
    prompt: float
    queued_at: float
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
    gate: bool
    ft: FakeTime = field(default_factory=FakeTime)
    polls: list[Done] = field(default_factory=list)
    live: dict[tuple[float, int], Request] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    held: list[Permit] = field(default_factory=list)
    reclaimed: set[str] = field(default_factory=set)
    # Permits admitted while a limit was in force: the watchdog must cover these.
    # (Kept as objects, so their ids stay unique.)
    watched: dict[int, Permit] = field(default_factory=dict)
    grants: int = 0
    budget: float = 0.0  # queued grants the last /usage answer allows
    limiter: Limiter = field(init=False)

    def __post_init__(self) -> None:
        self.limiter = Limiter(
            "prop",
            self.policy,
            clock=self.ft.clock,
            scheduler=self.ft.call_later,
            poll_usage=self.poll if self.gate else None,
            on_event=self.on_event,
        )

    # ------------------------------------------------------------ callbacks

    def poll(self, done: Done) -> None:
        assert not self.polls, "a /usage poll started while another was outstanding"
        self.polls.append(done)

    def on_event(self, event: LimiterEvent) -> None:
        if event.kind != "slot_reclaimed":
            return
        # The detail names the conversation; which word it is in is not our business.
        [permit] = [p for p in self.held if re.search(rf"\b{p.conversation_id}\b", event.detail)]
        cid = permit.conversation_id
        assert cid is not None
        assert cid not in self.reclaimed, f"{cid} reclaimed twice"
        assert self.ft.now - permit.admitted_at > self.policy.slot_timeout_s
        self.reclaimed.add(cid)

    def on_done(self, request: Request, outcome: Permit | Rejection) -> None:
        request.outcomes += 1
        assert request.outcomes == 1, f"{request.cid} got a second outcome: {outcome!r}"
        if isinstance(outcome, Rejection):
            assert outcome.reason == "queue_timeout"
            assert outcome.retry_after_s >= 1
            assert request.state == "waiting", f"{request.cid} timed out while {request.state}"
            waited = self.ft.now - request.queued_at
            assert waited >= self.policy.queue_timeout_s - 1e-9, "timed out early"
            del self.live[request.key]
            request.state = "expired"
            return
        assert request.state in ("new", "waiting"), f"{request.cid} granted while {request.state}"
        # A grant during `acquire` itself arrives before the waiter is in the model.
        request.seq = outcome.seq
        candidates = set(self.live)
        if request.state == "waiting":
            assert self.live.get(request.key) is request
        candidates.add(request.key)
        assert request.key == min(candidates), "the grant skipped a higher-priority waiter"
        self.live.pop(request.key, None)
        status = self.limiter.status()
        assert not status.paused, "a waiter was admitted while paused"
        if status.limit is not None:
            assert status.in_flight - 1 < status.limit, "admitted with every slot in use"
            if self.gate:
                assert self.budget > 0, "admitted past the usage gate"
                self.budget -= 1
        request.state = "granted"
        request.permit = outcome
        self.admitted(outcome, status.limit)

    def admitted(self, permit: Permit, limit: int | None) -> None:
        self.grants += 1
        self.held.append(permit)
        if limit is not None:
            self.watched[id(permit)] = permit

    # ---------------------------------------------------------------- ops

    def acquire(self, prompt: float, seq: int | None = None) -> None:
        had_waiters = bool(self.live)
        request = Request(f"r{len(self.requests)}", prompt, self.ft.now, seq=seq)
        self.requests.append(request)
        ticket = self.limiter.acquire(
            prompt,
            lambda outcome: self.on_done(request, outcome),
            conversation_id=request.cid,
            seq=seq,
        )
        status = self.limiter.status()
        if isinstance(ticket, Permit):
            assert request.state == "new"
            request.state = "fast"
            request.seq = ticket.seq
            request.permit = ticket
            self.admitted(ticket, status.limit)
            assert not had_waiters, "the fast path jumped the queue"
            assert not status.paused, "the fast path admitted while paused"
            if status.limit is not None:
                assert status.in_flight - 1 < status.limit, "fast path past the limit"
        elif isinstance(ticket, Waiter):
            assert len(self.live) < self.policy.max_queue, "queued past max_queue"
            request.waiter = ticket
            request.seq = ticket.seq
            if request.state == "new":
                assert request.key not in self.live
                request.state = "waiting"
                self.live[request.key] = request
        else:
            assert ticket.reason == "queue_full"
            assert ticket.retry_after_s >= 1
            assert len(self.live) >= self.policy.max_queue
            request.state = "refused"

    def release(self, index: int) -> None:
        if self.held:
            self.held.pop(index % len(self.held)).release()

    def cancel(self, index: int, only_waiting: bool) -> None:
        pool = [
            r
            for r in self.requests
            if r.waiter is not None and (r.state == "waiting" or not only_waiting)
        ]
        if not pool:
            return
        request = pool[index % len(pool)]
        assert request.waiter is not None
        request.waiter.cancel()
        if request.state == "waiting":
            del self.live[request.key]
            request.state = "cancelled"
        elif request.state == "granted":
            assert request.permit is not None
            assert request.permit.released, "cancel after grant kept the slot"
            if request.permit in self.held:
                self.held.remove(request.permit)

    def answer(self, mode: int, extra: int) -> None:
        if not self.polls:
            return
        limit = self.limiter.limit
        sessions: int | None
        if mode == 0:
            sessions = None
        elif mode == 1:
            sessions = max(0, (limit or 1) - 1 - extra % 2)
        else:
            sessions = (limit or 0) + extra % 3
        if sessions is None or limit is None:
            self.budget = math.inf
        else:
            self.budget = 1.0 if sessions < limit else 0.0
        self.polls.pop()(sessions)

    def rate_limited(self, index: int, choice: int) -> None:
        if not self.held:
            return
        permit = self.held.pop(index % len(self.held))
        retry_after = RETRY_AFTER[choice % len(RETRY_AFTER)]
        grants = self.grants
        self.limiter.on_rate_limited(permit, retry_after)
        assert permit.released
        if retry_after != 0.0:  # the pause is in force before the slot is freed
            assert self.grants == grants, "the 429'd slot went to a waiter before the pause"
        if choice // len(RETRY_AFTER) % 2:  # sent back to the queue with its place
            self.acquire(permit.prompt_started_at, seq=permit.seq)

    def apply(self, op: Op) -> None:
        kind, a, b = op
        if kind == "acquire":
            self.acquire(float(a % 5))
        elif kind == "release":
            self.release(a)
        elif kind == "cancel":
            self.cancel(a, only_waiting=b % 2 == 0)
        elif kind == "advance":
            self.ft.advance(a / 500)
        elif kind == "limit":
            self.limiter.set_limit(None if a % 6 == 0 else a % 6)
        elif kind == "cooldown":
            self.limiter.set_cooldown_ms(a % 5 * 250)
        elif kind == "answer":
            self.answer(a % 3, b)
        else:
            self.rate_limited(a, b)
        # Every pump ends with the gate closed, so an answer's allowance never
        # outlives the step that delivered it.
        self.budget = 0.0
        self.check()

    # ---------------------------------------------------------- invariants

    def check(self) -> None:
        status = self.limiter.status()
        assert status.queued == len(self.live)
        running = [p for p in self.held if p.conversation_id not in self.reclaimed]
        assert status.running == len(running), "running count disagrees with held permits"
        assert status.cooling >= 0
        assert status.in_flight == status.running + status.cooling
        assert status.limit is None or status.limit >= 1
        assert len(self.polls) <= 1
        deadline = self.policy.slot_timeout_s + self.policy.watchdog_interval_s + 1e-9
        for permit in self.held:
            if id(permit) in self.watched and permit.conversation_id not in self.reclaimed:
                assert self.ft.now - permit.admitted_at <= deadline, "the watchdog missed a slot"
        free = status.limit is None or status.in_flight < status.limit
        if status.queued and not status.paused and free:
            # Someone waits with a slot free: only the usage gate may hold them back,
            # and only with a poll outstanding or a re-poll armed.
            assert self.gate, "a free slot sits idle"
            assert status.limit is not None, "waiters left with no limit"
            interval = self.policy.usage_poll_interval_ms / 1000
            repoll = any(self.ft.now < t.due <= self.ft.now + interval for t in self.ft.pending())
            assert self.polls or repoll, "a gated waiter with no poll coming"

    def drain(self) -> None:
        """Release everything, answer polls with no information, let time pass."""
        for _ in range(1000):
            if self.polls:
                self.budget = math.inf
                self.polls.pop()(None)
                self.budget = 0.0
                self.check()
                continue
            while self.held:
                self.held.pop().release()
            status = self.limiter.status()
            if status.queued == 0 and status.in_flight == 0:
                break
            self.ft.advance(5.0)
            self.check()
        else:
            pytest.fail(f"the limiter did not drain: {self.limiter.status()}")
        status = self.limiter.status()
        assert (status.queued, status.in_flight, status.running) == (0, 0, 0)
        assert not self.live
        for request in self.requests:
            assert request.state in ("granted", "fast", "cancelled", "expired", "refused")
            expected = 1 if request.state in ("granted", "expired") else 0
            assert request.outcomes == expected, request


ops = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(0, 999), st.integers(0, 999)),
    min_size=30,
    max_size=120,
)


def run(policy: Policy, gate: bool, steps: list[Op]) -> None:
    model = Run(policy, gate)
    for step in steps:
        model.apply(step)
    model.drain()


@pytest.mark.parametrize(
    ("queue_timeout_s", "max_queue"),
    [
        # No waiter times out within a run, and the default max_queue.
        pytest.param(1e9, Policy.max_queue, id="unbounded"),
        pytest.param(1.5, 3, id="queue-bounds"),
    ],
)
@settings(max_examples=150, deadline=None, database=None)
@given(
    steps=ops,
    limit=st.integers(1, 4),
    cooldown_ms=st.sampled_from([0, 250, 1000]),
    gate=st.booleans(),
)
def test_random_interleavings_keep_every_admission_rule(
    queue_timeout_s: float,
    max_queue: int,
    steps: list[Op],
    limit: int,
    cooldown_ms: int,
    gate: bool,
) -> None:
    policy = Policy(
        limit=limit,
        cooldown_ms=cooldown_ms,
        slot_timeout_s=4.0,
        watchdog_interval_s=1.0,
        pause_s=3.0,
        usage_poll_interval_ms=500,
        queue_timeout_s=queue_timeout_s,
        max_queue=max_queue,
        usage_gate=gate,
    )
    run(policy, gate, steps)
