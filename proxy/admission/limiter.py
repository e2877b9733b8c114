"""One provider's slot limiter: fast path, priority queue, cooldown, pause, usage gate,
watchdog, the adaptive limit and its restore (docs/design.md, "The admission core").

Everything that decides who goes next lives here and nowhere else. The limiter
never reads the wall clock, never sleeps and never touches the network: time comes
from the injected clock, delays from the injected scheduler, and the upstream's
`/usage` answer from an injected poll function that reports back through a
callback. That is what lets every rule below be tested on fake time.

A slot is *in use* from admission until its permit is released plus `cooldown_ms`
(the upstream counts a finished generation for a while). `in_flight` in the status
is running permits plus cooling slots.

Client shares: a request may name its client, and a client may
have a cap (`max_in_flight`) on the permits it holds at once. A client at its cap does
not block anyone else: the line admits the oldest waiter whose client is under its
cap. Its running permits count toward the cap; cooling slots only toward the limit.
How, without scanning the line: each capped client keeps its waiters in a line of its
own, and stands in the provider's line as one *turn* at the place of its oldest
waiter, but only while it is under its cap. So the provider's line holds exactly the
waiters that may go next, and its head is the one to admit.

Timers: at most one each for cooldown expiry, pause end, usage re-poll, the
watchdog and the next restore step, re-armed as needed; plus one per waiter for
`queue_timeout_s` (a cheap heap entry in the event loop, not a task).

Restore (`restore_after_s` > 0). An auto-reduced limit goes back up one step at a
time, each after `restore_after_s` of *demand* without a 429: time during which
requests wait, or every slot is in use, while not paused. Demand time is summed on
the injected clock from the last 429 or the last step up; time without demand does
not count (an idle provider proves nothing about the upstream's cap), nor does a
pause. A reducing 429 within one window of a step up is that step failing: its
reduction undoes the step and the window doubles (up to
`events.RESTORE_WINDOW_MAX_FACTOR` times `restore_after_s`). The limit never rises
above `auto_reduced_from`; reaching it clears the auto-reduce state. A manual limit
starts over: configured window, nothing summed.
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

from proxy.admission import events, reduce
from proxy.admission.clock import Clock, Scheduler, Timer
from proxy.admission.events import LimiterCounters, LimiterEvent
from proxy.admission.queue import WaitQueue
from proxy.admission.reduce import Answer, ReduceRule

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
    reduce_on_429: ReduceRule = "always"
    reduce_on_429_match: str = ""
    restore_after_s: float = 0.0  # 0: an auto-reduced limit is restored manually
    # Every configured client (`[[clients]]`) with its `max_in_flight` for this
    # provider, None for no cap; empty when no clients are configured.
    client_max_in_flight: tuple[tuple[str, int | None], ...] = ()
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
class ClientStatus:
    """One configured client's share of a provider."""

    client_id: str
    in_flight: int  # its running requests (a cooling slot counts only toward the limit)
    queued: int
    max_in_flight: int | None


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
    clients: tuple[ClientStatus, ...] = ()  # every configured client, in config order


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
        "client",
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
        client: _Client | None = None,
    ) -> None:
        self._limiter = limiter
        self.limit_epoch = limit_epoch
        self.prompt_started_at = prompt_started_at
        self.seq = seq
        self.conversation_id = conversation_id
        self.admitted_at = admitted_at
        self.client = client
        self.released = False

    @property
    def client_id(self) -> str | None:
        return self.client.client_id if self.client is not None else None

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self._limiter is not None:
                self._limiter._release(self)

    async def rate_limited(self, retry_after_s: float | None, answer: Answer | None = None) -> None:
        """The upstream answered 429 to this permit's request: pause, maybe reduce, and
        release (`Limiter.on_rate_limited`). A coroutine to match the cluster's slot,
        which must reach Redis first; here nothing is awaited."""
        if self._limiter is not None and not self.released:
            self._limiter.on_rate_limited(self, retry_after_s, answer)
        self.release()

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
        "client",
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
        client: _Client | None = None,
        *,
        queued_at: float = 0.0,
        prompt_source: str | None = None,
    ) -> None:
        self._limiter = limiter
        self.prompt_started_at = prompt_started_at
        self.seq = seq
        self.conversation_id = conversation_id
        self.on_done = on_done
        self.client = client
        self.state = _State.WAITING
        self.permit: Permit | None = None
        self.timer: Timer | None = None
        self.queued_at = queued_at
        self.prompt_source = prompt_source

    @property
    def waiting(self) -> bool:
        return self.state is _State.WAITING

    @property
    def client_id(self) -> str | None:
        return self.client.client_id if self.client is not None else None

    def cancel(self) -> None:
        """The client gave up. A waiter cancelled after its grant hands the slot back,
        so a grant racing a disconnect never loses the slot."""
        if self.state is _State.WAITING:
            self._limiter._drop(self, _State.CANCELLED)
        elif self.state is _State.GRANTED and self.permit is not None:
            self.permit.release()

    def __repr__(self) -> str:
        return f"<Waiter #{self.seq} {self.state.value} prompt_started_at={self.prompt_started_at}>"


class _Client:
    """A configured client's share of this provider: its running permits and, when it
    has a cap, its own line and its turn in the provider's line."""

    __slots__ = ("cap", "client_id", "line", "queued", "running", "turn")

    def __init__(self, client_id: str, cap: int | None) -> None:
        self.client_id = client_id
        self.cap = cap
        self.running = 0
        self.queued = 0
        # Only a capped client queues apart; an uncapped one waits in the provider's line.
        self.line: WaitQueue[Waiter] | None = WaitQueue() if cap is not None else None
        self.turn: _Turn | None = None

    @property
    def under_cap(self) -> bool:
        return self.cap is None or self.running < self.cap


class _Turn:
    """A capped client's place in the provider's line: at its oldest waiter's
    (prompt, seq), while the client is under its cap. Superseded (so skipped, like a
    cancelled waiter) when the client's head changes or the turn is taken."""

    __slots__ = ("client", "waiter")

    def __init__(self, client: _Client, waiter: Waiter) -> None:
        self.client = client
        self.waiter = waiter

    @property
    def waiting(self) -> bool:
        return self.client.turn is self

    def __lt__(self, other: object) -> bool:
        # A client's superseded turn can share its (prompt, seq) with a newer one at
        # the same waiter; the heap then needs an order between the two, any order.
        return False


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
        # The line of those who may go next: waiters of no capped client, and one turn
        # per capped client that is under its cap and has waiters.
        self._queue: WaitQueue[Waiter | _Turn] = WaitQueue()
        self._queued = 0  # every waiter, in the line or in a capped client's own
        self._clients = {cid: _Client(cid, cap) for cid, cap in policy.client_max_in_flight}
        self._paused_until = -math.inf
        self._limit_epoch = 0  # bumped by every limit change; permits remember theirs

        self.auto_reduced = False
        self.auto_reduced_from: int | None = None
        self.upstream_sessions: int | None = None
        self.counters = LimiterCounters()
        self.rate = events.AdmissionRate(clock())  # for the Retry-After of a refusal

        # Restore (see the module docstring).
        self._restore_window_s = policy.restore_after_s
        self._demand_s = 0.0  # demand summed since the last 429 or step up ...
        self._demand_since: float | None = None  # ... plus the stretch running since then
        self._raised_at: float | None = None  # the last step up, until a 429 undoes it

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
        `client_id` names a configured client (its cap applies); any other id, or
        None, is no client.
        `prompt_source` only labels the waiter in the queue listing.
        """
        if seq is None:
            seq = next(self._seq)
        now = self._clock()
        policy = self.policy
        client = self._clients.get(client_id) if client_id is not None else None
        # The fast path refuses while anyone who may go next waits, or while paused,
        # so a newcomer can never overtake the queue (not even after the limit was
        # removed while a pause still holds earlier waiters). Waiters of capped
        # clients at their cap are not in `_queue`: they do not hold others back.
        if (
            not self._queue
            and now >= self._paused_until
            and self._free_slots(now) > 0
            and (client is None or client.under_cap)
        ):
            return self._admit(prompt_started_at, seq, conversation_id, now, client)
        if self._queued >= policy.max_queue:
            # A refused request would have waited behind the whole line.
            return Rejection("queue_full", self._retry_after_s(now, self._queued))
        waiter = Waiter(
            self,
            prompt_started_at,
            seq,
            conversation_id,
            on_done,
            client,
            queued_at=now,
            prompt_source=prompt_source,
        )
        self._queued += 1
        if client is None:
            self._queue.push(prompt_started_at, seq, waiter)
        else:
            client.queued += 1
            if client.line is None:
                self._queue.push(prompt_started_at, seq, waiter)
            else:
                client.line.push(prompt_started_at, seq, waiter)
                turn = client.turn
                if turn is not None and (prompt_started_at, seq) < (
                    turn.waiter.prompt_started_at,
                    turn.waiter.seq,
                ):
                    self._retire(client)  # the client's oldest waiter is this one now
                self._offer(client)
        waiter.timer = self._schedule(policy.queue_timeout_s, lambda: self._expire(waiter))
        self._pump()
        return waiter

    # ------------------------------------------------------------ limit control

    @property
    def limit(self) -> int | None:
        return self.policy.limit

    def set_limit(self, limit: int | None) -> None:
        """A manual change (admin API or restored state): clears the auto-reduce state
        and starts restore over (the configured window, no demand summed)."""
        self.auto_reduced = False
        self.auto_reduced_from = None
        self._restore_window_s = self.policy.restore_after_s
        self._demand_s = 0.0
        self._demand_since = None
        self._raised_at = None
        self._change_limit(limit)

    def restore_auto_reduced(self, limit: int, auto_reduced_from: int | None) -> None:
        """Reinstate an auto-reduced limit read back from the store at start."""
        self._change_limit(limit)
        self.auto_reduced = True
        self.auto_reduced_from = auto_reduced_from
        self._note_demand(self._clock())

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

    def on_rate_limited(
        self, permit: Permit, retry_after_s: float | None, answer: Answer | None = None
    ) -> None:
        """The upstream answered 429 to `permit`'s request: pause, maybe reduce, release.

        Every 429 pauses and starts the restore window over; `reduce_on_429` judges
        from `answer` whether it may also lower the limit. A 429 for a request
        admitted before the last limit change is the same overshoot that change
        already answered, so it extends the pause but does not lower the limit again
        (concurrent 429s cost one step, not one step each) - except the first
        reducing 429 within one window of a restore step: its reduction undoes the
        step, whenever its request was admitted.
        """
        now = self._clock()
        policy = self.policy
        delay = policy.pause_s if retry_after_s is None else max(0.0, retry_after_s)
        verdict = reduce.judge(policy.reduce_on_429, policy.reduce_on_429_match, answer)
        self._emit(events.rate_limited(permit.conversation_id, verdict.note, permit.client_id))
        if now + delay > self._paused_until:  # a new 429 extends a pause, never shortens it
            self._paused_until = now + delay
            self._emit(events.paused(delay))
        self._demand_s = 0.0  # "without a 429": the quiet window starts over
        self._demand_since = None
        undo = (
            verdict.reduce
            and self._raised_at is not None
            and now - self._raised_at <= self._restore_window_s
        )
        limit = policy.limit
        if (
            verdict.reduce
            and limit is not None
            and limit > 1
            and (undo or permit.limit_epoch == self._limit_epoch)
        ):
            undone_window_s = None
            if undo:
                undone_window_s = self._restore_window_s
                self._raised_at = None
                self._restore_window_s = events.next_restore_window(
                    self._restore_window_s, policy.restore_after_s
                )
            if not self.auto_reduced:
                self.auto_reduced_from = limit
            self.auto_reduced = True
            self._change_limit(limit - 1)  # the pause is in force: this admits nobody
            self._emit(events.limit_reduced(limit, limit - 1, undone_window_s=undone_window_s))
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
        `WaitQueue.place`): cheap enough to ask for every waiter every few seconds. A
        waiter held back by its client's cap counts after everyone who may go now."""
        if not waiter.waiting:
            return None
        client = waiter.client
        if client is None or client.line is None:  # it waits in the provider's line
            return self._queue.place(waiter.prompt_started_at, waiter.seq, waiter) + 1
        turn = client.turn
        if turn is not None and turn.waiter is waiter:  # its client's turn stands for it
            return self._queue.place(waiter.prompt_started_at, waiter.seq, turn) + 1
        behind = client.line.ahead(waiter.prompt_started_at, waiter.seq)
        return len(self._queue) + behind - (turn is not None) + 1

    def waiters(self, offset: int = 0, limit: int = 100) -> list[WaiterInfo]:
        """The queued requests from place `offset + 1` on, at most `limit`, in
        admission order (those held back by their client's cap last, as `position`
        counts them)."""
        now = self._clock()
        line: list[Waiter] = []
        for entry in self._queue.first(offset + limit):
            line.append(entry.waiter if isinstance(entry, _Turn) else entry)
        if len(line) < offset + limit:
            parked = [
                w
                for client in self._clients.values()
                if client.line is not None
                for w in client.line.first(len(client.line))
                if client.turn is None or client.turn.waiter is not w
            ]
            parked.sort(key=lambda w: (w.prompt_started_at, w.seq))
            line += parked
        return [
            WaiterInfo(
                position=offset + i + 1,
                prompt_started_at=w.prompt_started_at,
                prompt_source=w.prompt_source,
                conversation_id=w.conversation_id,
                client_id=w.client_id,
                waited_s=now - w.queued_at,
            )
            for i, w in enumerate(line[offset : offset + limit])
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
            queued=self._queued,
            paused=paused,
            paused_until=self._paused_until if paused else None,
            cooldown_ms=self.policy.cooldown_ms,
            auto_reduced=self.auto_reduced,
            auto_reduced_from=self.auto_reduced_from if self.auto_reduced else None,
            notice=self.notice(),
            usage_gate=self._gated(),
            upstream_sessions=self.upstream_sessions,
            clients=tuple(
                ClientStatus(c.client_id, c.running, c.queued, c.cap)
                for c in self._clients.values()
            ),
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
        self,
        prompt_started_at: float,
        seq: int,
        conversation_id: str | None,
        now: float,
        client: _Client | None,
    ) -> Permit:
        permit = Permit(
            self, prompt_started_at, seq, conversation_id, now, self._limit_epoch, client
        )
        self._running[seq] = permit
        if client is not None:
            client.running += 1
        self.counters.admitted += 1
        self.rate.observe(now)
        self._arm_watchdog(now)
        if self._restore_window_s > 0:
            self._note_demand(now)  # the fast path's admission may fill the last slot
        return permit

    def _arm_watchdog(self, now: float) -> None:
        """Slots are watched while a limit or a client cap is set and any is held,
        including slots admitted before the limit was set."""
        watched = self.policy.limit is not None or self._clients
        if watched and self._running and "watchdog" not in self._timers:
            self._arm("watchdog", now + self.policy.watchdog_interval_s, self._watchdog)

    def _release(self, permit: Permit) -> None:
        """Called once per permit, by `Permit.release`."""
        if self._running.pop(permit.seq, None) is None:
            return  # reclaimed by the watchdog earlier
        client = permit.client
        # The client's cap frees at once: a cooling slot counts only toward the limit.
        turn = client is not None and self._client_released(client)
        now = self._clock()
        if self.policy.limit is not None and self.policy.cooldown_ms > 0:
            heapq.heappush(self._cooling, now + self.policy.cooldown_ms / 1000)
            self._arm_cooldown()
            if turn:
                self._pump()  # another slot may be free for the client's next waiter
        else:
            self._pump()

    def _client_released(self, client: _Client) -> bool:
        """One of `client`'s permits ended; True if that gave it a turn in the line."""
        client.running -= 1
        if client.turn is None and client.line:
            return self._offer(client)
        return False

    def _offer(self, client: _Client) -> bool:
        """Give a capped client under its cap a turn at its oldest waiter's place."""
        line = client.line
        if client.turn is not None or line is None or not client.under_cap:
            return False
        head = line.peek()
        if head is None:
            line.clear_dead()
            return False
        client.turn = _Turn(client, head)
        self._queue.push(head.prompt_started_at, head.seq, client.turn)
        return True

    def _retire(self, client: _Client) -> None:
        """Take back the client's turn (it stays in the heap, skipped as dead)."""
        if client.turn is not None:
            client.turn = None
            self._queue.discard()

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
            if self._restore_window_s > 0:
                self._note_demand(self._clock())
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
            entry = queue.pop()
            if isinstance(entry, _Turn):
                # A capped client's turn: admit its oldest waiter, then, if still
                # under its cap, queue its next one at that one's place.
                client = entry.client
                client.turn = None
                waiter = client.line.pop() if client.line is not None else entry.waiter
                assert waiter is entry.waiter, "a turn outlived its client's head"
                self._grant(waiter, now)
                self._offer(client)
            else:
                self._grant(entry, now)
        # Nobody waits: forget gate state and stop re-polling.
        self._gate = _Gate.CLOSED
        self._disarm("repoll")
        queue.clear_dead()

    def _grant(self, waiter: Waiter, now: float) -> None:
        # Admit before calling back: by the time the waiter's task runs, the slot
        # is already counted, so no newcomer can take it in between.
        client = waiter.client
        self._queued -= 1
        if client is not None:
            client.queued -= 1
        permit = self._admit(
            waiter.prompt_started_at, waiter.seq, waiter.conversation_id, now, client
        )
        waiter.state = _State.GRANTED
        waiter.permit = permit
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None
        waiter.on_done(permit)

    def _drop(self, waiter: Waiter, state: _State) -> None:
        """Take a still-waiting waiter out of the line (lazily: the heap skips it)."""
        waiter.state = state
        self._queued -= 1
        client = waiter.client
        if client is None or client.line is None:
            self._queue.discard()
            if client is not None:
                client.queued -= 1
        else:
            client.queued -= 1
            client.line.discard()
            if client.turn is not None and client.turn.waiter is waiter:
                # Its turn stood at this waiter's place: move it to the next one's.
                self._retire(client)
                self._offer(client)
            elif not client.line:
                client.line.clear_dead()
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
            self._emit(events.slot_reclaimed(held_ms, permit.conversation_id, permit.client_id))
            # Reclaiming releases the slot now; the permit's own release later is a no-op.
            self._release(permit)
        if self._running:
            self._arm("watchdog", now + self.policy.watchdog_interval_s, self._watchdog)

    # ------------------------------------------------------------------- restore

    def _restorable(self) -> bool:
        limit = self.policy.limit
        target = self.auto_reduced_from
        return (
            self._restore_window_s > 0
            and self.auto_reduced
            and limit is not None
            and target is not None
            and limit < target
        )

    def _note_demand(self, now: float) -> None:
        """Sum demand time and keep the one restore timer at the moment the window
        fills, if demand lasts. Called after every change that can start or end
        demand: each pump, and each admission (the fast path does not pump)."""
        if not self._restorable():
            self._demand_since = None
            self._disarm("restore")
            return
        demand = bool(self._queue) or self._free_slots(now) <= 0
        if demand:
            if self._demand_since is None:
                # Paused (just after a 429), demand counts from the pause's end.
                self._demand_since = max(now, self._paused_until)
        elif self._demand_since is not None:
            self._demand_s += max(0.0, now - self._demand_since)
            self._demand_since = None
        if self._demand_since is None:
            self._disarm("restore")
        else:
            due = self._demand_since + self._restore_window_s - self._demand_s
            self._arm("restore", due, self._on_restore)

    def _on_restore(self) -> None:
        """The window filled with demand and no 429: one step up."""
        self._timers.pop("restore", None)
        now = self._clock()
        since = self._demand_since
        demand_s = self._demand_s + (max(0.0, now - since) if since is not None else 0.0)
        limit = self.policy.limit
        target = self.auto_reduced_from
        if (
            limit is None
            or target is None
            or not self._restorable()
            or demand_s < self._restore_window_s - 1e-9
        ):
            self._note_demand(now)
            return
        back = limit + 1 >= target
        self._raised_at = now
        self._demand_s = 0.0
        self._demand_since = None
        if back:
            self.auto_reduced = False
            self.auto_reduced_from = None
        self._change_limit(limit + 1)  # wakes a waiter into the new slot
        self._emit(events.limit_restored(limit, limit + 1, self._restore_window_s, back=back))

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
