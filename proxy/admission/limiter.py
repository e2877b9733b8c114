"""One provider's slot limiter: fast path, priority queue, cooldown, pause, usage gate,
watchdog and the adaptive limit (SPEC section 5).

Everything that decides who goes next lives here and nowhere else. The limiter
never reads the wall clock, never sleeps and never touches the network: time comes
from the injected clock, delays from the injected scheduler, and the upstream's
`/usage` answer from an injected poll function that reports back through a
callback. That is what lets every rule below be tested on fake time.

A slot is *in use* from admission until its permit is released plus `cooldown_ms`
(the upstream counts a finished generation for a while). `in_flight` in the status
is running permits plus cooling slots.

Timers: at most one each for cooldown expiry, pause end, usage re-poll and the
watchdog, re-armed as needed; plus one per waiter for `queue_timeout_s` (a cheap
heap entry in the event loop, not a task).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from proxy.admission import events
from proxy.admission.clock import Clock, Scheduler, Timer
from proxy.admission.events import LimiterCounters, LimiterEvent
from proxy.admission.queue import WaitQueue

UsagePoll = Callable[[Callable[[int | None], None]], None]
"""`poll(done)` starts a poll of the upstream's `/usage` and later calls
`done(concurrent_sessions)`, or `done(None)` when the answer carried no information."""


@dataclass(frozen=True)
class Policy:
    """A provider's admission policy: every `[admission]` key and its default, resolved
    per provider by `dataclasses.replace` (settings.py). The limiter enforces the first
    group; the edge reads the rest."""

    limit: int | None = None
    cooldown_ms: int = 350
    slot_timeout_s: float = 300.0
    watchdog_interval_s: float = 30.0
    pause_s: float = 30.0
    usage_poll_interval_ms: int = 1000
    queue_timeout_s: float = 600.0
    max_queue: int = 10_000
    usage_gate: bool = False
    # Read by the edge, not the limiter.
    retry_on_429: int = 2
    admitted_paths: tuple[str, ...] = (
        "/chat/completions",
        "/completions",
        "/responses",
        "/messages",
    )
    derive_prompt_start: bool = True
    queued_keepalive_s: float = 0.0  # > 0: a queued stream gets its 200 and comments


@dataclass(frozen=True)
class LimiterStatus:
    """A snapshot for the admin API, logs, metrics and `sluice status`."""

    provider_id: str
    limit: int | None
    in_flight: int
    running: int
    cooling: int
    queued: int
    paused: bool
    paused_until: float | None  # on the limiter's clock; the edge converts to epoch ms
    cooldown_ms: int
    auto_reduced: bool
    auto_reduced_from: int | None
    notice: str | None
    usage_gate: bool
    upstream_sessions: int | None  # the last successful /usage answer


@dataclass(frozen=True)
class WaiterInfo:
    """One queued request as the queue listing shows it."""

    position: int  # 1-based, in admission order
    prompt_started_at: float  # the priority, as given to `acquire` (epoch ms at the edge)
    prompt_source: str | None
    conversation_id: str | None
    client_id: str | None
    waited_s: float


@dataclass(frozen=True)
class Rejection:
    """A request that will not be admitted, as a value: the edge turns it into a 503."""

    reason: Literal["queue_full", "queue_timeout"]
    retry_after_s: int


class Permit:
    """A held slot. Release it exactly once in a `finally`; releasing again is harmless."""

    __slots__ = (
        "_limiter",
        "admitted_at",
        "conversation_id",
        "limit_epoch",
        "prompt_started_at",
        "released",
        "seq",
    )

    def __init__(
        self,
        limiter: Limiter | None,
        prompt_started_at: float,
        seq: int,
        conversation_id: str | None,
        admitted_at: float,
        limit_epoch: int = 0,
    ) -> None:
        self._limiter = limiter
        self.limit_epoch = limit_epoch
        self.prompt_started_at = prompt_started_at
        self.seq = seq
        self.conversation_id = conversation_id
        self.admitted_at = admitted_at
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self._limiter is not None:
                self._limiter._release(self)

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<Permit #{self.seq} {state} conversation={self.conversation_id!r}>"


class _State(Enum):
    WAITING = "waiting"
    GRANTED = "granted"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class Waiter:
    """A queued request. Its outcome arrives once, through `on_done`."""

    __slots__ = (
        "_limiter",
        "client_id",
        "conversation_id",
        "on_done",
        "permit",
        "prompt_source",
        "prompt_started_at",
        "queued_at",
        "seq",
        "state",
        "timer",
    )

    def __init__(
        self,
        limiter: Limiter,
        prompt_started_at: float,
        seq: int,
        conversation_id: str | None,
        on_done: Callable[[Permit | Rejection], None],
        *,
        queued_at: float = 0.0,
        prompt_source: str | None = None,
        client_id: str | None = None,
    ) -> None:
        self._limiter = limiter
        self.prompt_started_at = prompt_started_at
        self.seq = seq
        self.conversation_id = conversation_id
        self.on_done = on_done
        self.state = _State.WAITING
        self.permit: Permit | None = None
        self.timer: Timer | None = None
        self.queued_at = queued_at
        self.prompt_source = prompt_source
        self.client_id = client_id

    @property
    def waiting(self) -> bool:
        return self.state is _State.WAITING

    def cancel(self) -> None:
        """The client gave up. A waiter cancelled after its grant hands the slot back,
        so a grant racing a disconnect never loses the slot."""
        if self.state is _State.WAITING:
            self._limiter._drop(self, _State.CANCELLED)
        elif self.state is _State.GRANTED and self.permit is not None:
            self.permit.release()

    def __repr__(self) -> str:
        return f"<Waiter #{self.seq} {self.state.value} prompt_started_at={self.prompt_started_at}>"


class _Gate(Enum):
    """What the last /usage poll allows the current pump to do."""

    CLOSED = "closed"  # poll needed before the next queued admission
    ONE = "one"  # a successful poll showed room: admit one waiter
    NO_INFO = "no_info"  # the poll said nothing: admit as if there were no gate


class Limiter:
    """The admission state of one provider."""

    def __init__(
        self,
        provider_id: str,
        policy: Policy,
        *,
        clock: Clock,
        scheduler: Scheduler,
        poll_usage: UsagePoll | None = None,
        on_event: Callable[[LimiterEvent], None] | None = None,
    ) -> None:
        self.provider_id = provider_id
        self.policy = policy
        self._clock = clock
        self._schedule = scheduler
        self._poll_usage = poll_usage
        self._on_event = on_event or (lambda event: None)
        self._seq = itertools.count()

        self._running: dict[int, Permit] = {}  # by seq, for the watchdog
        self._cooling: list[float] = []  # heap of recycle times
        self._queue: WaitQueue[Waiter] = WaitQueue()
        self._paused_until = -math.inf
        self._limit_epoch = 0  # bumped by every limit change; permits remember theirs

        self.auto_reduced = False
        self.auto_reduced_from: int | None = None
        self.upstream_sessions: int | None = None
        self.counters = LimiterCounters()
        self.rate = events.AdmissionRate(clock())  # for the Retry-After of a refusal

        self._gate = _Gate.CLOSED
        self._polling = False
        self._pumping = False
        self._pump_again = False
        self._timers: dict[str, tuple[float, Timer]] = {}  # name -> (due, timer)

    # ------------------------------------------------------------------ acquire

    def next_seq(self) -> int:
        """An arrival number, for a request that will later be queued with it."""
        return next(self._seq)

    def acquire(
        self,
        prompt_started_at: float,
        on_done: Callable[[Permit | Rejection], None],
        *,
        conversation_id: str | None = None,
        seq: int | None = None,
        prompt_source: str | None = None,
        client_id: str | None = None,
    ) -> Permit | Waiter | Rejection:
        """Admit now (a Permit), queue (a Waiter whose `on_done` gets the outcome),
        or refuse at once (a Rejection).

        `prompt_started_at` orders the queue (smaller first); `seq` breaks ties and
        lets a request that was sent back by a 429 keep its original place.
        `prompt_source` and `client_id` only label the waiter in the queue listing.
        """
        if seq is None:
            seq = next(self._seq)
        now = self._clock()
        policy = self.policy
        # The fast path refuses while anyone waits or while paused, so a newcomer
        # can never overtake the queue (not even after the limit was removed while
        # a pause still holds earlier waiters).
        if not self._queue and now >= self._paused_until and self._free_slots(now) > 0:
            return self._admit(prompt_started_at, seq, conversation_id, now)
        if len(self._queue) >= policy.max_queue:
            # A refused request would have waited behind the whole line.
            return Rejection("queue_full", self._retry_after_s(now, len(self._queue)))
        waiter = Waiter(
            self,
            prompt_started_at,
            seq,
            conversation_id,
            on_done,
            queued_at=now,
            prompt_source=prompt_source,
            client_id=client_id,
        )
        self._queue.push(prompt_started_at, seq, waiter)
        waiter.timer = self._schedule(policy.queue_timeout_s, lambda: self._expire(waiter))
        self._pump()
        return waiter

    # ------------------------------------------------------------ limit control

    @property
    def limit(self) -> int | None:
        return self.policy.limit

    def set_limit(self, limit: int | None) -> None:
        """A manual change (admin API or restored state): clears the auto-reduce state."""
        self.auto_reduced = False
        self.auto_reduced_from = None
        self._change_limit(limit)

    def restore_auto_reduced(self, limit: int, auto_reduced_from: int | None) -> None:
        """Reinstate an auto-reduced limit read back from the store at start."""
        self._change_limit(limit)
        self.auto_reduced = True
        self.auto_reduced_from = auto_reduced_from

    def set_cooldown_ms(self, cooldown_ms: int) -> None:
        """Applies to slots released from now on; slots already cooling keep their time."""
        self.policy = dataclasses.replace(self.policy, cooldown_ms=cooldown_ms)

    def notice(self) -> str | None:
        return events.notice(self.policy.limit, self.auto_reduced)

    def _change_limit(self, limit: int | None) -> None:
        """The one place the limit changes. Lowering never evicts a running request;
        raising (or removing) wakes as many waiters as now fit."""
        self.policy = dataclasses.replace(self.policy, limit=limit)
        self._limit_epoch += 1
        self._arm_watchdog(self._clock())
        self._pump()

    # -------------------------------------------------------------------- 429

    def on_rate_limited(self, permit: Permit, retry_after_s: float | None) -> None:
        """The upstream answered 429 to `permit`'s request: pause, maybe reduce, release.

        A 429 for a request admitted before the last limit change is the same
        overshoot that change already answered, so it extends the pause but does not
        lower the limit again (concurrent 429s cost one step, not one step each).
        """
        now = self._clock()
        delay = self.policy.pause_s if retry_after_s is None else max(0.0, retry_after_s)
        self._emit(events.rate_limited(permit.conversation_id))
        if now + delay > self._paused_until:  # a new 429 extends a pause, never shortens it
            self._paused_until = now + delay
            self._emit(events.paused(delay))
        limit = self.policy.limit
        if limit is not None and limit > 1 and permit.limit_epoch == self._limit_epoch:
            if not self.auto_reduced:
                self.auto_reduced_from = limit
            self.auto_reduced = True
            self._change_limit(limit - 1)  # the pause is in force: this admits nobody
            self._emit(events.limit_reduced(limit, limit - 1))
        # Release last: the pause must already be in force, or the freed slot
        # would go straight to the next waiter.
        permit.release()
        self._pump()

    @property
    def paused(self) -> bool:
        return self._clock() < self._paused_until

    # ------------------------------------------------------------- the line

    def position(self, waiter: Waiter) -> int | None:
        """`waiter`'s 1-based place in admission order, or None once it stopped
        waiting. O(1) while the line does not change, else O(place) (see
        `WaitQueue.place`): cheap enough to ask for every waiter every few seconds."""
        if not waiter.waiting:
            return None
        return self._queue.place(waiter.prompt_started_at, waiter.seq, waiter) + 1

    def waiters(self, offset: int = 0, limit: int = 100) -> list[WaiterInfo]:
        """The queued requests from place `offset + 1` on, at most `limit`, in
        admission order."""
        now = self._clock()
        first = self._queue.first(offset + limit)[offset:]
        return [
            WaiterInfo(
                position=offset + i + 1,
                prompt_started_at=w.prompt_started_at,
                prompt_source=w.prompt_source,
                conversation_id=w.conversation_id,
                client_id=w.client_id,
                waited_s=now - w.queued_at,
            )
            for i, w in enumerate(first)
        ]

    # ----------------------------------------------------------------- status

    def status(self) -> LimiterStatus:
        now = self._clock()
        self._recycle(now)
        paused = now < self._paused_until
        return LimiterStatus(
            provider_id=self.provider_id,
            limit=self.policy.limit,
            in_flight=len(self._running) + len(self._cooling),
            running=len(self._running),
            cooling=len(self._cooling),
            queued=len(self._queue),
            paused=paused,
            paused_until=self._paused_until if paused else None,
            cooldown_ms=self.policy.cooldown_ms,
            auto_reduced=self.auto_reduced,
            auto_reduced_from=self.auto_reduced_from if self.auto_reduced else None,
            notice=self.notice(),
            usage_gate=self._gated(),
            upstream_sessions=self.upstream_sessions,
        )

    def __repr__(self) -> str:
        s = self.status()
        return (
            f"<Limiter {self.provider_id} limit={s.limit} in_flight={s.in_flight} "
            f"queued={s.queued} paused={s.paused}>"
        )

    def close(self) -> None:
        """Cancel every timer (the provider is going away)."""
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    # --------------------------------------------------------------- internals

    def _admit(
        self, prompt_started_at: float, seq: int, conversation_id: str | None, now: float
    ) -> Permit:
        permit = Permit(self, prompt_started_at, seq, conversation_id, now, self._limit_epoch)
        self._running[seq] = permit
        self.counters.admitted += 1
        self.rate.observe(now)
        self._arm_watchdog(now)
        return permit

    def _arm_watchdog(self, now: float) -> None:
        """Slots are watched while a limit is set and any is held, including slots
        admitted before the limit was set."""
        if self.policy.limit is not None and self._running and "watchdog" not in self._timers:
            self._arm("watchdog", now + self.policy.watchdog_interval_s, self._watchdog)

    def _release(self, permit: Permit) -> None:
        """Called once per permit, by `Permit.release`."""
        if self._running.pop(permit.seq, None) is None:
            return  # reclaimed by the watchdog earlier
        now = self._clock()
        if self.policy.limit is not None and self.policy.cooldown_ms > 0:
            heapq.heappush(self._cooling, now + self.policy.cooldown_ms / 1000)
            self._arm_cooldown()
        else:
            self._pump()

    def _free_slots(self, now: float) -> int:
        limit = self.policy.limit
        if limit is None:
            return 1 << 30
        self._recycle(now)
        return limit - len(self._running) - len(self._cooling)

    def _recycle(self, now: float) -> bool:
        """Return cooled-down slots to the pool; True if any came back."""
        cooling = self._cooling
        recycled = False
        while cooling and cooling[0] <= now:
            heapq.heappop(cooling)
            recycled = True
        return recycled

    def _arm_cooldown(self) -> None:
        if self._cooling:
            self._arm("cooldown", self._cooling[0], self._on_cooldown)

    def _on_cooldown(self) -> None:
        self._timers.pop("cooldown", None)
        self._recycle(self._clock())
        self._arm_cooldown()
        self._pump()

    def _gated(self) -> bool:
        return (
            self.policy.usage_gate
            and self.policy.limit is not None
            and self._poll_usage is not None
        )

    def _retry_after_s(self, now: float, ahead: int) -> int:
        """A refusal's Retry-After: `ahead` waiters at the measured admission rate,
        after the rest of any pause (events.retry_after_s)."""
        return events.retry_after_s(
            self._paused_until - now,
            ahead=ahead,
            admissions_per_s=self.rate.per_s(now),
            cap_s=self.policy.queue_timeout_s,
        )

    def _pump(self) -> None:
        """Admit waiters while the rules allow. Re-entrant calls (an `on_done` that
        releases at once, a synchronous poll answer) are folded into the running pump."""
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            self._pump_again = True
            while self._pump_again:
                self._pump_again = False
                self._pump_once()
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        now = self._clock()
        queue = self._queue
        while queue:
            if now < self._paused_until:
                self._arm("pause", self._paused_until, self._on_timer("pause"))
                self._gate = _Gate.CLOSED
                return
            if self._free_slots(now) <= 0:
                self._gate = _Gate.CLOSED  # the recycle that frees a slot polls afresh
                return
            if self._gated():
                if self._gate is _Gate.CLOSED:
                    self._start_poll()
                    return
                if self._gate is _Gate.ONE:
                    self._gate = _Gate.CLOSED  # at most one waiter per successful poll
            self._grant(queue.pop(), now)
        # Nobody waits: forget gate state and stop re-polling.
        self._gate = _Gate.CLOSED
        self._disarm("repoll")
        queue.clear_dead()

    def _grant(self, waiter: Waiter, now: float) -> None:
        # Admit before calling back: by the time the waiter's task runs, the slot
        # is already counted, so no newcomer can take it in between.
        permit = self._admit(waiter.prompt_started_at, waiter.seq, waiter.conversation_id, now)
        waiter.state = _State.GRANTED
        waiter.permit = permit
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None
        waiter.on_done(permit)

    def _drop(self, waiter: Waiter, state: _State) -> None:
        """Take a still-waiting waiter out of the line (lazily: the heap skips it)."""
        waiter.state = state
        self._queue.discard()
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None
        if not self._queue:
            self._pump()  # nobody left: clear the gate and the re-poll timer

    def _expire(self, waiter: Waiter) -> None:
        if waiter.state is _State.WAITING:
            waiter.timer = None
            now = self._clock()
            pause_left = self._paused_until - now
            # Counted before it leaves the line; no further than the count that
            # already gives the longest answer (many waiters can expire at once).
            stop = events.saturating_ahead(
                pause_left, self.rate.per_s(now), self.policy.queue_timeout_s
            )
            ahead = self._queue.ahead(waiter.prompt_started_at, waiter.seq, stop)
            self._drop(waiter, _State.EXPIRED)
            waiter.on_done(Rejection("queue_timeout", self._retry_after_s(now, ahead)))

    # ---------------------------------------------------------------- usage gate

    def _start_poll(self) -> None:
        if self._polling or self._poll_usage is None:
            return  # polls never overlap; the answer in flight will pump
        self._polling = True
        self._disarm("repoll")
        self._poll_usage(self._on_usage)

    def _on_usage(self, sessions: int | None) -> None:
        self._polling = False
        limit = self.policy.limit
        if sessions is None or limit is None:
            self.counters.usage_polls_no_info += 1
            self._gate = _Gate.NO_INFO
        else:
            self.upstream_sessions = sessions
            if sessions < limit:
                self.counters.usage_polls_room += 1
                self._gate = _Gate.ONE
            else:
                self.counters.usage_polls_full += 1
                self._gate = _Gate.CLOSED
                if self._queue:
                    delay = self.policy.usage_poll_interval_ms / 1000
                    self._arm("repoll", self._clock() + delay, self._on_timer("repoll"))
                return
        self._pump()

    # ------------------------------------------------------------------ watchdog

    def _watchdog(self) -> None:
        self._timers.pop("watchdog", None)
        now = self._clock()
        limit_s = self.policy.slot_timeout_s
        for permit in [p for p in self._running.values() if now - p.admitted_at > limit_s]:
            held_ms = round((now - permit.admitted_at) * 1000)
            self._emit(events.slot_reclaimed(held_ms, permit.conversation_id))
            # Reclaiming releases the slot now; the permit's own release later is a no-op.
            self._release(permit)
        if self._running:
            self._arm("watchdog", now + self.policy.watchdog_interval_s, self._watchdog)

    # -------------------------------------------------------------------- timers

    def _on_timer(self, name: str) -> Callable[[], None]:
        def fire() -> None:
            self._timers.pop(name, None)
            self._pump()

        return fire

    def _arm(self, name: str, due: float, callback: Callable[[], None]) -> None:
        """(Re)arm the one timer called `name` to fire at `due` on the limiter's clock."""
        current = self._timers.get(name)
        if current is not None:
            if current[0] == due:
                return
            current[1].cancel()
        delay = max(0.0, due - self._clock())
        self._timers[name] = (due, self._schedule(delay, callback))

    def _disarm(self, name: str) -> None:
        current = self._timers.pop(name, None)
        if current is not None:
            current[1].cancel()

    def _emit(self, event: LimiterEvent) -> None:
        self.counters.count(event)
        self._on_event(event)
