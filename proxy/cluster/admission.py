"""A provider's admission in cluster mode: the `Admission` the edge talks to, with the
shared state in Redis.

Every decision that must be global is one script call (`scripts.py`); this object only
keeps what is local to the replica: its waiting requests (futures), the slots it holds
(leases it renews), one re-check timer, and a cached view of the shared state for the
cheap synchronous reads (`limit`, metrics).

How a waiter gets its slot: only its own replica admits it, in a script that finds it
at the global head with a slot free. Replicas re-check when woken by pub/sub (a
release, a limit change, a grant that moved the head to them), when a timer the
script suggested fires (the cooldown ends, the pause ends, a lease or a dead replica's
waiter expires), and at least every second while they have waiters.

Races worth knowing:
- A grant can arrive (in any script reply) before the reply of the call that queued
  the waiter: waiters are registered under a local id before the call, and a grant
  names that id.
- A waiter that leaves (client gone, queue timeout) while a grant for it is in flight:
  the grant finds it gone and hands the slot straight back.
- A slot is released in Redis by a task; if that call fails the lease simply expires
  (`lease_s`), or the rejoin after an outage drops it.

Restore (`restore_after_s` > 0): while the shared state is auto-reduced, every replica
runs the `restore` script every `RESTORE_TICK_S` (or a tenth of the window); the one
holding the restore lock (`SET NX PX`, passed on if it stops renewing it) samples the
shared census for demand, sums it and steps the shared limit up. So the limit rises
once for the cluster; the others see it through the state published on the channel.
Demand is sampled, not followed event by event as the single-process limiter does:
off by at most a tick per window.

Client caps are cluster-wide: the scripts count each capped client's
leases in Redis and keep its waiters in a line of its own (see `scripts.py`). In
fallback mode the local share applies the caps to this replica's own slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, Literal, TypeVar

import structlog

from proxy.admission import (
    ClientStatus,
    LimiterCounters,
    LimiterEvent,
    LimiterStatus,
    Permit,
    Rejection,
    events,
)
from proxy.admission.aio import Alarm, Keepalive
from proxy.admission.limiter import Waiter, WaiterInfo
from proxy.admission.reduce import Answer, judge
from proxy.cluster.fallback import LocalShare, release_local, share
from proxy.cluster.hub import ClusterHub
from proxy.cluster.scripts import ClientRow, NoState, RedisDown, Reply, Scripts, Shared, owner
from proxy.errors import StoreError
from proxy.runtime.provider import AdmissionFactory, limit_text
from proxy.runtime.seam import Admission, ClusterView, InstanceLoad
from proxy.runtime.store import ProviderOverrides
from proxy.settings import ProviderConfig
from proxy.upstream.client import USAGE_TIMEOUT_S

log = structlog.get_logger("sluice")
T = TypeVar("T")

RECHECK_S: Final = 1.0
"""The longest a replica with waiters goes without re-checking the shared line."""

MAX_TIES: Final = 4096
"""Global tie numbers remembered for requests that may come back after a 429."""

RESTORE_TICK_S: Final = 1.0
"""How often replicas run the restore script while the shared limit is auto-reduced
(a tenth of `restore_after_s` when that is shorter, never under `MIN_RESTORE_TICK_S`)."""

MIN_RESTORE_TICK_S: Final = 0.05
META_MAX_CHARS: Final = 256
"""Longest label (conversation, client) kept in a waiter's metadata in Redis."""


class ClusterSlot:
    """A slot held by this replica: a lease in Redis (renewed until released), and in
    fallback mode also a slot of the local share."""

    __slots__ = (
        "_owner",
        "admitted_at",
        "client_id",
        "conversation_id",
        "epoch",
        "lease_id",
        "local",
        "released",
    )

    def __init__(
        self,
        owner: ClusterAdmission,
        lease_id: str,
        epoch: int,
        conversation_id: str | None,
        admitted_at: float,
        local: Permit | Waiter | None = None,
        client_id: str | None = None,
    ) -> None:
        self._owner = owner
        self.lease_id = lease_id
        self.epoch = epoch  # the limit epoch at admission (-1: admitted in fallback mode)
        self.conversation_id = conversation_id
        self.admitted_at = admitted_at
        self.local = local
        self.client_id = client_id
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._owner._release(self)

    async def rate_limited(self, retry_after_s: float | None, answer: Answer | None = None) -> None:
        """The upstream answered 429 to this slot's request: the shared pause (and
        maybe reduction) is in force in Redis before this returns; the slot is released."""
        await self._owner._rate_limited(self, retry_after_s, answer)

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<ClusterSlot {self.lease_id} {state}>"


class _Waiter:
    """One `admit()` call waiting for its outcome, queued in Redis or in the local share.

    It outlives a switch between the two: on fallback it moves to the local queue, on
    rejoin back to the shared one, keeping its prompt start time and tie number."""

    __slots__ = (
        "attach_id",
        "client_id",
        "conversation_id",
        "done",
        "future",
        "member",
        "prompt",
        "prompt_source",
        "seq",
        "slot",
        "ticket",
    )

    def __init__(
        self,
        future: asyncio.Future[ClusterSlot | Rejection],
        prompt: float,
        seq: int,
        conversation_id: str | None,
        prompt_source: str | None = None,
        client_id: str | None = None,
    ) -> None:
        self.future = future
        self.prompt = prompt
        self.seq = seq
        self.conversation_id = conversation_id
        self.prompt_source = prompt_source
        self.client_id = client_id
        self.done = False
        self.slot: ClusterSlot | None = None
        self.attach_id: str | None = None  # registered in the shared queue under this id
        self.member: str | None = None  # its member in Redis, once the enqueue answered
        self.ticket: Waiter | None = None  # its place in the local share's queue

    def grant(self, slot: ClusterSlot) -> bool:
        """False if nobody waits any more (the caller hands the slot back)."""
        if self.done or self.future.done():
            return False
        self.done = True
        self.slot = slot
        self.future.set_result(slot)
        return True

    def reject(self, rejection: Rejection) -> None:
        if not self.done:
            self.done = True
            if not self.future.done():
                self.future.set_result(rejection)


def cluster_admission(hub: ClusterHub, loop: asyncio.AbstractEventLoop) -> AdmissionFactory:
    """The factory the app hands every `Provider` in cluster mode."""

    def make(
        config: ProviderConfig,
        poll_usage: Callable[[], Awaitable[int | None]],
        on_event: Callable[[LimiterEvent], None],
    ) -> Admission:
        return ClusterAdmission(config, hub, loop=loop, poll_usage=poll_usage, on_event=on_event)

    return make


class ClusterAdmission:
    """`Admission` for one provider with its state shared through Redis."""

    shared = True

    def __init__(
        self,
        config: ProviderConfig,
        hub: ClusterHub,
        *,
        loop: asyncio.AbstractEventLoop,
        poll_usage: Callable[[], Awaitable[int | None]],
        on_event: Callable[[LimiterEvent], None],
    ) -> None:
        self.config = config
        self._hub = hub
        self._loop = loop
        self._poll_usage = poll_usage
        self._on_event = on_event
        self._scripts = Scripts(hub.redis, config.id, hub.instance_id, round(hub.lease_s * 1000))
        self._caps = dict(config.policy.client_max_in_flight)  # configured clients' caps
        self.channel = self._scripts.channel
        self._counters = LimiterCounters()
        self._seqs = itertools.count()
        self._ids = itertools.count()
        self._ties: dict[int, str] = {}  # request seq -> global tie, kept for 429 retries
        self._waiting: dict[str, _Waiter] = {}  # attach id -> waiter in the shared queue
        self._parked: set[_Waiter] = set()  # waiters in the local share's queue
        self._held: dict[str, ClusterSlot] = {}  # lease id -> slot
        self._state = Shared(config.policy.limit, config.policy.cooldown_ms, 0, False, None, 0)
        self._initialized = False
        self._replicas = 0  # replicas last seen (0: never reached Redis)
        self._fallback: LocalShare | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = math.inf
        self._pumping = False
        self._pump_again = False
        self._polling = False
        self._recheck_s = min(RECHECK_S, hub.lease_s / 3)
        # The poll lock outlives a poll that hits the usage timeout.
        self._poll_lock_ms = (
            config.policy.usage_poll_interval_ms + round(USAGE_TIMEOUT_S * 1000) + 1000
        )
        self._last = self._empty_status()
        self._view = ClusterView("redis", hub.instance_id, 0, None, ())
        restore_s = config.policy.restore_after_s
        self._restore_ms = round(restore_s * 1000)
        self._restore_max_ms = round(restore_s * events.RESTORE_WINDOW_MAX_FACTOR * 1000)
        self._restore_tick_s = max(MIN_RESTORE_TICK_S, min(RESTORE_TICK_S, restore_s / 10))
        self._restore_timer: asyncio.TimerHandle | None = None
        # This replica's admissions per second, and the others' as they last shared
        # them: the cluster's rate, for the Retry-After of a refusal.
        self._rate = events.AdmissionRate(loop.time())
        self._others_rate = 0.0
        hub.register(self)

    # ------------------------------------------------------------ Admission

    @property
    def provider_id(self) -> str:
        return self.config.id

    @property
    def limit(self) -> int | None:
        return self._state.limit

    @property
    def cooldown_ms(self) -> int:
        return self._state.cooldown_ms

    @property
    def auto_reduced_from(self) -> int | None:
        return self._state.auto_reduced_from if self._state.auto_reduced else None

    @property
    def counters(self) -> LimiterCounters:
        return self._counters

    def notice(self) -> str | None:
        return _notice(self._state)

    def next_seq(self) -> int:
        return next(self._seqs)

    async def admit(
        self,
        prompt_started_at: float,
        *,
        conversation_id: str | None = None,
        seq: int | None = None,
        prompt_source: str | None = None,
        client_id: str | None = None,
        keepalive: Keepalive | None = None,
    ) -> ClusterSlot | Rejection:
        if seq is None:
            seq = next(self._seqs)
        if client_id not in self._caps:
            client_id = None  # not a configured client: no client, as in one process
        waiter = _Waiter(
            self._loop.create_future(),
            prompt_started_at,
            seq,
            conversation_id,
            prompt_source,
            client_id,
        )
        # The queue timeout is the request's own, whichever queue it is in meanwhile.
        timer = self._loop.call_later(self.config.policy.queue_timeout_s, self._expire, waiter)
        try:
            self._attach(waiter)
            while keepalive is not None and not waiter.future.done():
                alarm = Alarm(waiter.future, keepalive.interval_s)
                try:
                    await alarm.wake
                finally:
                    alarm.cancel()
                if not waiter.future.done():
                    await keepalive.tick(await self._position(waiter))
            return await waiter.future
        except BaseException:
            self._cancel(waiter)
            raise
        finally:
            timer.cancel()

    async def _rate_limited(
        self, slot: ClusterSlot, retry_after_s: float | None, answer: Answer | None = None
    ) -> None:
        policy = self.config.policy
        delay = policy.pause_s if retry_after_s is None else max(0.0, retry_after_s)
        verdict = judge(policy.reduce_on_429, policy.reduce_on_429_match, answer)
        local = self._fallback
        if local is not None:
            if isinstance(slot.local, Permit):
                # The local share pauses and reduces itself (and reports the events).
                local.limiter.on_rate_limited(slot.local, delay, answer)
            else:
                self._emit(events.rate_limited(slot.conversation_id, verdict.note, slot.client_id))
            slot.release()
            return
        self._emit(events.rate_limited(slot.conversation_id, verdict.note, slot.client_id))
        # The script releases the slot after the pause is in force; the relay's own
        # release later is a no-op.
        slot.released = True
        self._held.pop(slot.lease_id, None)
        pause_ms = round(delay * 1000)
        reply = await self._try(
            lambda: self._scripts.rate_limited(
                slot.lease_id,
                slot.epoch,
                pause_ms,
                gated=policy.usage_gate,
                poll_lock_ms=self._poll_lock_ms,
                reduce=verdict.reduce,
                restore_ms=self._restore_ms,
                restore_max_ms=self._restore_max_ms,
            )
        )
        if reply is None:
            return
        extended, reduced, before, undone_ms = reply.detail.split()
        if extended == "1":
            self._emit(events.paused(delay))
        if reduced == "1":
            undone = int(undone_ms) / 1000 if int(undone_ms) >= 0 else None
            self._emit(events.limit_reduced(before, reply.state.limit, undone_window_s=undone))
        self._on_reply(reply)
        self._arm_restore()

    async def set_limit(self, limit: int | None) -> None:
        """The durable write: Redis, seen by every replica at once (pub/sub)."""
        self._state = await self._write(lambda: self._scripts.set_limit(limit))

    async def set_cooldown_ms(self, cooldown_ms: int) -> None:
        self._state = await self._write(lambda: self._scripts.set_cooldown(cooldown_ms))

    async def restore(self, stored: ProviderOverrides | None) -> str:
        """Cluster mode keeps its durable settings in Redis, not in this replica's
        SQLite file (`stored` is ignored): create them from the config file, or keep
        Redis's unless the config file changed since they were written."""
        try:
            limit_source, cooldown_source = await self._init()
        except RedisDown as exc:
            self._hub.down(exc)
            return (
                f"limit={limit_text(self._state.limit)} (config), "
                f"cooldown_ms={self._state.cooldown_ms} (config); "
                f"Redis unreachable: local share {self._view.local_limit}"
            )
        return (
            f"limit={limit_text(self._state.limit)} ({limit_source}), "
            f"cooldown_ms={self._state.cooldown_ms} ({cooldown_source}); "
            f"shared through Redis as {self._hub.instance_id}"
        )

    async def status(self) -> LimiterStatus:
        if self._fallback is None:
            try:
                census = await self._call(self._scripts.status)
            except RedisDown as exc:
                self._hub.down(exc)
            else:
                st = self._state = census.state
                paused = st.paused_ms > 0
                self._last = LimiterStatus(
                    provider_id=self.config.id,
                    limit=st.limit,
                    in_flight=census.running + census.cooling,
                    running=census.running,
                    cooling=census.cooling,
                    queued=census.queued,
                    paused=paused,
                    paused_until=self._loop.time() + st.paused_ms / 1000 if paused else None,
                    cooldown_ms=st.cooldown_ms,
                    auto_reduced=st.auto_reduced,
                    auto_reduced_from=st.auto_reduced_from if st.auto_reduced else None,
                    notice=_notice(st),
                    usage_gate=self.config.policy.usage_gate and st.limit is not None,
                    upstream_sessions=census.upstream_sessions,
                    clients=self._client_status(census.clients),
                )
                loads = tuple(
                    InstanceLoad(row.instance_id, row.running + row.cooling, row.queued)
                    for row in census.instances
                )
                me = self._hub.instance_id
                self._view = ClusterView("redis", me, self._replicas, None, loads)
                return self._last
        return self._local_status()

    def snapshot(self) -> LimiterStatus:
        return self._local_status() if self._fallback is not None else self._last

    async def waiters(self, offset: int, limit: int) -> list[WaiterInfo]:
        """The shared line, cluster-wide, with the metadata each replica stored for
        its waiters. While Redis is unreachable: this replica's local line only."""
        if self._fallback is not None:
            return self._fallback.limiter.waiters(offset, limit)
        try:
            rows = await self._call(lambda: self._scripts.queue(offset, limit))
        except RedisDown as exc:
            self._hub.down(exc)
            local = self._fallback
            return local.limiter.waiters(offset, limit) if local is not None else []
        now_ms = time.time() * 1000
        found = []
        for i, (_, prompt_ms, raw) in enumerate(rows):
            meta = _parse_meta(raw)
            queued_at = meta.get("t")
            found.append(
                WaiterInfo(
                    position=offset + i + 1,
                    prompt_started_at=prompt_ms,
                    prompt_source=_opt_str(meta.get("s")),
                    conversation_id=_opt_str(meta.get("c")),
                    client_id=_opt_str(meta.get("k")),
                    waited_s=(
                        max(0.0, now_ms - queued_at) / 1000
                        if isinstance(queued_at, int | float)
                        else 0.0
                    ),
                )
            )
        return found

    def cluster(self) -> ClusterView | None:
        return self._view

    async def close(self) -> None:
        self._disarm()
        if self._restore_timer is not None:
            self._restore_timer.cancel()
            self._restore_timer = None
        if self._fallback is not None:
            self._fallback.close()
        # Let releases already on their way land, so those slots free now rather
        # than when their leases run out.
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
        for task in list(self._tasks):
            task.cancel()
        if self._hub.up:
            with contextlib.suppress(RedisDown):
                await self._scripts.goodbye()

    # ------------------------------------------------------- called by the hub

    def on_message(self, data: str) -> None:
        """A wake-up from the provider's channel (`w <delay ms>` or `s <state>`)."""
        kind, _, rest = data.partition(" ")
        if kind == "s":
            self._state = Shared.parse(rest.split())
            self._arm_restore()
        if self._fallback is not None or not self._waiting:
            return
        if kind == "w" and rest.isdigit() and int(rest) > 0:
            self._arm(int(rest) / 1000)  # a slot frees when its cooldown ends
        else:
            self._kick()

    async def renew(self) -> None:
        """Every lease_s / 3: renew this replica's leases, its waiters' liveness and its
        heartbeat; journal other replicas' expired leases; run the local watchdog."""
        if self._fallback is not None:
            return
        waiters = [(w.member, w.prompt) for w in self._waiting.values() if w.member is not None]
        try:
            renewal = await self._scripts.renew(list(self._held), waiters)
        except NoState:
            await self._reseed()
            return
        self._replicas = renewal.replicas
        self._state = renewal.state
        for member in renewal.expired:
            self._emit(events.lease_expired(owner(member)))
        # Ours, still in use, but gone from Redis: a stall longer than lease_s, or a
        # Redis that lost data without restarting. Count them again.
        # Judged on the state now, not the one sent: a waiter granted (or a slot
        # released) while the renewal was in flight is missing for a good reason.
        still = {w.member: w.prompt for w in self._waiting.values() if w.member is not None}
        lost_leases = [m for m in renewal.missing_leases if m in self._held]
        lost_waiters = [(m, still[m]) for m in renewal.missing_waiters if m in still]
        if lost_leases or lost_waiters:
            log.warning(
                "cluster_lease_lost",
                provider=self.config.id,
                detail="leases or waiters of this replica had expired in Redis while in use; "
                "registered again",
                leases=len(lost_leases),
                waiters=len(lost_waiters),
            )
            await self._scripts.renew(
                lost_leases, lost_waiters, force=True, clients=self._clients_of()
            )
        self._watchdog()
        await self.status()  # refreshes the snapshot that metrics read
        self._arm_restore()
        await self._share_rate()

    def enter_fallback(self) -> int | None:
        """Redis is unreachable: enforce this replica's share locally, counting the
        slots it holds, and move its waiters to the local queue. Returns the share."""
        if self._fallback is not None:
            return self._fallback.share
        self._disarm()
        local = LocalShare(
            self.config,
            share=share(self._state.limit, self._replicas),
            cooldown_ms=self._state.cooldown_ms,
            loop=self._loop,
            poll_usage=self._poll_usage,
            on_event=self._emit,
        )
        self._fallback = local
        for slot in self._held.values():
            slot.local = local.hold(slot.client_id)
        waiters = sorted(self._waiting.values(), key=lambda w: (w.prompt, w.seq))
        self._waiting.clear()
        for waiter in waiters:
            waiter.attach_id = waiter.member = None  # Redis drops them (liveness/rejoin)
            self._attach_local(waiter, local)
        self._local_status()
        return local.share

    async def rejoin(self) -> None:
        """Redis is back: register the slots held now (admitted before or during the
        outage) as leases, then move the local waiters back to the shared queue."""
        if self._fallback is None and self._initialized:
            return  # already back (the hub retries until every provider is)
        if not self._initialized:
            await self._init()
        seeded, state, replicas = await self._scripts.rejoin(
            dataclasses.replace(self._state, epoch=self._state.epoch + 1),
            (self.config.policy.limit, self.config.policy.cooldown_ms),
            list(self._held),
            self._clients_of(),
        )
        self._state = state
        self._replicas = replicas
        if seeded:
            log.warning(
                "cluster_state_reseeded",
                provider=self.config.id,
                detail="Redis had lost the shared state; seeded it from this replica's "
                "last view (run Redis with AOF persistence to keep it)",
                limit=state.limit,
            )
        local, self._fallback = self._fallback, None
        if local is None:
            return
        # Take the waiters out of the local queue first, then give back the local
        # slots: in that order no local waiter can be granted on the way out.
        parked = sorted(self._parked, key=lambda w: (w.prompt, w.seq))
        self._parked.clear()
        for waiter in parked:
            if waiter.ticket is not None:
                waiter.ticket.cancel()
                waiter.ticket = None
        for slot in self._held.values():
            release_local(slot.local)
            slot.local = None
        local.close()
        self._view = ClusterView("redis", self._hub.instance_id, replicas, None, ())
        for waiter in parked:
            if not waiter.done:
                self._attach(waiter)

    # ------------------------------------------------------------- internals

    def _attach(self, waiter: _Waiter) -> None:
        if self._fallback is not None:
            self._attach_local(waiter, self._fallback)
            return
        # Registered before the call: a grant naming this id may come back in another
        # call's reply before this call's own reply.
        attach_id = str(next(self._ids))
        waiter.attach_id = attach_id
        waiter.member = None
        self._waiting[attach_id] = waiter
        self._spawn(self._enqueue(waiter, attach_id))

    async def _enqueue(self, waiter: _Waiter, attach_id: str) -> None:
        tie = self._ties.get(waiter.seq, "")
        reply = await self._try(
            lambda: self._scripts.admit(
                waiter.prompt,
                tie,
                attach_id,
                max_queue=self.config.policy.max_queue,
                gated=self.config.policy.usage_gate,
                poll_lock_ms=self._poll_lock_ms,
                client=waiter.client_id,
                cap=self._caps.get(waiter.client_id) if waiter.client_id else None,
            )
        )
        if reply is None:
            return  # the fallback took this waiter (still registered) into the local share
        member = reply.detail
        self._remember_tie(waiter.seq, member)
        registered = self._waiting.get(attach_id) is waiter
        if reply.kind == "admitted":
            if registered:
                del self._waiting[attach_id]
            self._grant(waiter if registered else None, member, reply.state.epoch)
        elif reply.kind == "queue_full":
            if registered:
                del self._waiting[attach_id]
                # The script refused it because max_queue waiters were ahead.
                waiter.reject(self._refusal("queue_full", self.config.policy.max_queue))
        elif registered:
            waiter.member = member
        else:
            # It left (or moved to the local share) while the call was in flight.
            self._spawn(self._leave(member))
        self._on_reply(reply)
        if reply.kind == "queued" and not waiter.done and waiter.member == member:
            await self._note(waiter, member)

    def _grant(self, waiter: _Waiter | None, lease_id: str, epoch: int) -> None:
        slot = ClusterSlot(
            self,
            lease_id,
            epoch,
            waiter.conversation_id if waiter else None,
            self._loop.time(),
            client_id=waiter.client_id if waiter else None,
        )
        self._held[lease_id] = slot
        if waiter is None or not waiter.grant(slot):
            slot.release()  # nobody waits for it any more: hand it straight back
            return
        self._counters.admitted += 1
        self._rate.observe(self._loop.time())

    def _on_reply(self, reply: Reply) -> None:
        """Deliver the grants a script made for this replica; plan the next re-check."""
        self._state = reply.state
        pump = reply.pump
        if pump is None:
            return
        for member in pump.granted:
            waiter = self._waiting.pop(member.rpartition("|")[2], None)
            self._grant(waiter, member, reply.state.epoch)
        if pump.code == "poll":
            self._start_poll()
        if self._waiting and self._fallback is None:
            delay = self._recheck_s
            if pump.next_ms >= 0:
                delay = min(delay, pump.next_ms / 1000)
            self._arm(delay)

    def _release(self, slot: ClusterSlot) -> None:
        """Called once per slot, by `ClusterSlot.release`."""
        self._held.pop(slot.lease_id, None)
        release_local(slot.local)
        slot.local = None
        if self._fallback is None:
            self._spawn(self._release_shared(slot.lease_id))
        # In fallback mode the lease stays in Redis until it expires or the rejoin
        # drops it; the slot already counts nowhere else.

    async def _release_shared(self, lease_id: str) -> None:
        reply = await self._try(
            lambda: self._scripts.release(
                lease_id, gated=self.config.policy.usage_gate, poll_lock_ms=self._poll_lock_ms
            )
        )
        if reply is not None:
            self._on_reply(reply)

    def _cancel(self, waiter: _Waiter) -> None:
        """The `admit()` call ended without taking its outcome (client gone)."""
        if waiter.slot is not None:
            waiter.slot.release()  # granted in that same instant: hand it back
        elif not waiter.done:
            waiter.done = True
            self._detach(waiter)

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.done:
            # The waiters ahead: the cluster-wide line as the last census counted it
            # (its own place would take a round trip to Redis).
            waiter.reject(self._refusal("queue_timeout", self._last.queued))
            self._detach(waiter)

    def _refusal(self, reason: Literal["queue_full", "queue_timeout"], ahead: int) -> Rejection:
        """A refusal with the Retry-After the pure core estimates (events.retry_after_s)
        from `ahead` waiters, the cluster's admission rate and the shared pause."""
        if self._fallback is not None:
            ahead = len(self._parked)
        retry_after = events.retry_after_s(
            self._state.paused_ms / 1000,
            ahead=ahead,
            admissions_per_s=self._rate.per_s(self._loop.time()) + self._others_rate,
            cap_s=self.config.policy.queue_timeout_s,
        )
        return Rejection(reason, retry_after)

    async def _position(self, waiter: _Waiter) -> int | None:
        """A waiter's 1-based place for its keepalive: its rank in the shared line
        (one ZRANK), or in the local line while Redis is unreachable; None while its
        enqueue is still on its way."""
        if waiter.ticket is not None and self._fallback is not None:
            return self._fallback.limiter.position(waiter.ticket)
        member = waiter.member
        if member is None:
            return None
        try:
            rank = await self._scripts.rank(member)
        except RedisDown:
            return None  # the next Redis call notices and falls back
        return None if rank is None else rank + 1

    async def _note(self, waiter: _Waiter, member: str) -> None:
        """Store what the queue listing shows of a waiter that now waits in Redis: a
        small value that expires once the waiter cannot be waiting any more."""
        meta = {
            "s": waiter.prompt_source,
            "c": _clip(waiter.conversation_id),
            "k": _clip(waiter.client_id),
            "t": round(time.time() * 1000),
        }
        ttl_ms = round((self.config.policy.queue_timeout_s + self._hub.lease_s) * 1000)
        with contextlib.suppress(RedisDown):
            await self._scripts.note(member, json.dumps(meta, separators=(",", ":")), ttl_ms)

    async def _share_rate(self) -> None:
        """Publish this replica's admission rate and read the others' (for refusals)."""
        others = [
            i.instance_id for i in self._view.instances if i.instance_id != self._hub.instance_id
        ]
        ttl_ms = round(self._hub.lease_s * 1000)
        with contextlib.suppress(RedisDown):
            self._others_rate = await self._scripts.share_rate(
                self._hub.instance_id, self._rate.per_s(self._loop.time()), ttl_ms, others
            )

    def _detach(self, waiter: _Waiter) -> None:
        """Take a waiter out of whichever queue holds it."""
        if waiter.ticket is not None:
            waiter.ticket.cancel()
            waiter.ticket = None
        self._parked.discard(waiter)
        if waiter.attach_id is not None:
            if self._waiting.get(waiter.attach_id) is waiter:
                del self._waiting[waiter.attach_id]
            if waiter.member is not None and self._fallback is None:
                self._spawn(self._leave(waiter.member))
            waiter.attach_id = waiter.member = None

    async def _leave(self, member: str) -> None:
        reply = await self._try(
            lambda: self._scripts.leave(
                member, gated=self.config.policy.usage_gate, poll_lock_ms=self._poll_lock_ms
            )
        )
        if reply is not None:
            self._on_reply(reply)

    def _attach_local(self, waiter: _Waiter, local: LocalShare) -> None:
        def on_done(outcome: Permit | Rejection) -> None:
            self._parked.discard(waiter)
            if isinstance(outcome, Permit):
                self._grant_local(waiter, outcome)
            else:
                waiter.reject(outcome)

        ticket = local.acquire(
            waiter.prompt,
            on_done,
            conversation_id=waiter.conversation_id,
            seq=waiter.seq,
            prompt_source=waiter.prompt_source,
            client_id=waiter.client_id,
        )
        if isinstance(ticket, Waiter):
            if ticket.waiting:
                waiter.ticket = ticket
                self._parked.add(waiter)
        elif isinstance(ticket, Rejection):
            # The local share has no queue timeout of its own: estimate as the cluster does.
            on_done(self._refusal(ticket.reason, len(self._parked)))
        else:
            on_done(ticket)

    def _grant_local(self, waiter: _Waiter, permit: Permit) -> None:
        n = next(self._ids)
        # A lease id of its own, registered in Redis when the replica rejoins.
        lease_id = f"f{n}|{self._hub.instance_id}|{n}"
        slot = ClusterSlot(
            self,
            lease_id,
            -1,
            waiter.conversation_id,
            self._loop.time(),
            local=permit,
            client_id=waiter.client_id,
        )
        self._held[lease_id] = slot
        if not waiter.grant(slot):
            slot.release()
            return
        self._counters.admitted += 1
        self._rate.observe(self._loop.time())

    def _local_status(self) -> LimiterStatus:
        local = self._fallback
        if local is None:
            return self._last
        st = self._state
        status = dataclasses.replace(
            local.limiter.status(),
            limit=st.limit,
            cooldown_ms=st.cooldown_ms,
            auto_reduced=st.auto_reduced,
            auto_reduced_from=st.auto_reduced_from if st.auto_reduced else None,
            notice=_notice(st),
        )
        me = InstanceLoad(self._hub.instance_id, status.in_flight, status.queued)
        self._view = ClusterView(
            "fallback", self._hub.instance_id, self._replicas, local.limiter.limit, (me,)
        )
        return status

    def _empty_status(self) -> LimiterStatus:
        st = self._state
        return LimiterStatus(
            provider_id=self.config.id,
            limit=st.limit,
            in_flight=0,
            running=0,
            cooling=0,
            queued=0,
            paused=False,
            paused_until=None,
            cooldown_ms=st.cooldown_ms,
            auto_reduced=False,
            auto_reduced_from=None,
            notice=None,
            usage_gate=self.config.policy.usage_gate and st.limit is not None,
            upstream_sessions=None,
            clients=self._client_status(()),
        )

    def _client_status(self, rows: tuple[ClientRow, ...]) -> tuple[ClientStatus, ...]:
        """Every configured client, in config order, with its cluster-wide share."""
        found = {row.client_id: row for row in rows}
        return tuple(
            ClientStatus(
                cid,
                found[cid].running if cid in found else 0,
                found[cid].queued if cid in found else 0,
                cap,
            )
            for cid, cap in self.config.policy.client_max_in_flight
        )

    def _clients_of(self) -> dict[str, tuple[str, int | None]]:
        """This replica's slots and waiters that belong to a client -> (client, cap),
        for registering them again in Redis."""
        found: dict[str, tuple[str, int | None]] = {}
        for lease_id, slot in self._held.items():
            if slot.client_id is not None:
                found[lease_id] = (slot.client_id, self._caps.get(slot.client_id))
        for waiter in self._waiting.values():
            if waiter.member is not None and waiter.client_id is not None:
                found[waiter.member] = (waiter.client_id, self._caps.get(waiter.client_id))
        return found

    # ------------------------------------------------------ re-checks and polls

    def _arm(self, delay: float) -> None:
        """One re-check timer, moved earlier when a sooner re-check is wanted."""
        due = self._loop.time() + max(0.0, delay)
        if self._timer is not None:
            if self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer_due = due
        self._timer = self._loop.call_at(due + 0.001, self._on_timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_due = math.inf

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_due = math.inf
        self._kick()

    def _kick(self) -> None:
        """Re-check the shared line for this replica's waiters; calls that arrive
        while one is running fold into one more round."""
        if self._fallback is not None or not self._waiting:
            return
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        self._spawn(self._pump())

    async def _pump(self) -> None:
        try:
            while True:
                self._pump_again = False
                if self._fallback is not None or not self._waiting:
                    return
                reply = await self._try(
                    lambda: self._scripts.pump(
                        gated=self.config.policy.usage_gate, poll_lock_ms=self._poll_lock_ms
                    )
                )
                if reply is None:
                    return
                self._on_reply(reply)
                if not self._pump_again:
                    return
        finally:
            self._pumping = False

    def _start_poll(self) -> None:
        """This replica took the cluster's poll lock: poll `/usage` and share the answer."""
        if self._polling:
            return
        self._polling = True
        self._spawn(self._poll())

    async def _poll(self) -> None:
        try:
            sessions = await self._poll_usage()
            reply = await self._try(
                lambda: self._scripts.usage(
                    sessions,
                    interval_ms=self.config.policy.usage_poll_interval_ms,
                    gated=self.config.policy.usage_gate,
                    poll_lock_ms=self._poll_lock_ms,
                )
            )
        finally:
            self._polling = False
        if reply is None:
            return
        c = self._counters
        if reply.kind == "room":
            c.usage_polls_room += 1
        elif reply.kind == "full":
            c.usage_polls_full += 1
        else:
            c.usage_polls_no_info += 1
        self._on_reply(reply)

    # ------------------------------------------------------------------ restore

    def _arm_restore(self) -> None:
        """Keep the restore tick running while the shared limit is auto-reduced (as
        last seen: a 429 reply, a state message, a renewal)."""
        if self._restore_ms <= 0 or self._restore_timer is not None:
            return
        st = self._state
        if (
            self._fallback is None
            and st.auto_reduced
            and st.limit is not None
            and st.auto_reduced_from is not None
            and st.limit < st.auto_reduced_from
        ):
            self._restore_timer = self._loop.call_later(self._restore_tick_s, self._on_restore_tick)

    def _on_restore_tick(self) -> None:
        self._restore_timer = None
        if self._fallback is None:
            self._spawn(self._restore_tick())

    async def _restore_tick(self) -> None:
        tick_ms = round(self._restore_tick_s * 1000)
        reply = await self._try(
            lambda: self._scripts.restore(
                self._restore_ms, lock_ms=max(3 * tick_ms, 100), max_gap_ms=2 * tick_ms
            )
        )
        if reply is None:
            return
        self._state = reply.state
        if reply.kind == "restored":
            before, after, window_ms, back = reply.detail.split()
            self._emit(
                events.limit_restored(
                    int(before), int(after), int(window_ms) / 1000, back=back == "1"
                )
            )
        self._arm_restore()

    # ------------------------------------------------------------------ misc

    async def _init(self) -> tuple[str, str]:
        limit_source, cooldown_source, state = await self._scripts.init(
            self.config.policy.limit, self.config.policy.cooldown_ms
        )
        self._state = state
        self._initialized = True
        return limit_source, cooldown_source

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run a script; if Redis lost the state (restarted empty without this replica
        noticing a broken connection), seed it again and retry once."""
        try:
            return await call()
        except NoState:
            await self._reseed()
            return await call()

    async def _try(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """`_call` where Redis being unreachable only means falling back: the hub is
        told (it moves this replica to its local share) and None comes back."""
        try:
            return await self._call(call)
        except RedisDown as exc:
            self._hub.down(exc)
            return None

    async def _reseed(self) -> None:
        _, state, replicas = await self._scripts.rejoin(
            dataclasses.replace(self._state, epoch=self._state.epoch + 1),
            (self.config.policy.limit, self.config.policy.cooldown_ms),
            list(self._held),
            self._clients_of(),
        )
        self._state = state
        self._replicas = replicas
        waiters = [(w.member, w.prompt) for w in self._waiting.values() if w.member is not None]
        if waiters:
            await self._scripts.renew([], waiters, force=True, clients=self._clients_of())
        log.warning(
            "cluster_state_reseeded",
            provider=self.config.id,
            detail="Redis had lost the shared state; seeded it from this replica's last view",
        )

    async def _write(self, call: Callable[[], Awaitable[Shared]]) -> Shared:
        """An admin write: to Redis or not at all (a 500, nothing changed)."""
        if self._fallback is not None:
            raise StoreError("Redis is unreachable; cluster settings can change once it is back")
        try:
            return await self._call(call)
        except RedisDown as exc:
            self._hub.down(exc)
            raise StoreError(f"Redis is unreachable: {exc}") from exc

    def _watchdog(self) -> None:
        """Slots held longer than slot_timeout_s are reclaimed, as in one process."""
        now = self._loop.time()
        limit_s = self.config.policy.slot_timeout_s
        for slot in [s for s in self._held.values() if now - s.admitted_at > limit_s]:
            held_ms = round((now - slot.admitted_at) * 1000)
            self._emit(events.slot_reclaimed(held_ms, slot.conversation_id, slot.client_id))
            slot.release()

    def _remember_tie(self, seq: int, member: str) -> None:
        if seq not in self._ties:
            if len(self._ties) >= MAX_TIES:
                del self._ties[next(iter(self._ties))]
            self._ties[seq] = member.partition("|")[0]

    def _emit(self, event: LimiterEvent) -> None:
        """Count and report an event (also those of the fallback's local limiter)."""
        self._counters.count(event)
        self._on_event(event)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("cluster task failed", provider=self.config.id, exc_info=exc, error=repr(exc))

    def __repr__(self) -> str:
        mode = "fallback" if self._fallback is not None else "redis"
        return (
            f"<ClusterAdmission {self.config.id} {mode} limit={self._state.limit} "
            f"held={len(self._held)} waiting={len(self._waiting) + len(self._parked)}>"
        )


def _notice(st: Shared) -> str | None:
    return events.notice(st.limit, st.auto_reduced)


def _clip(label: str | None) -> str | None:
    return label[:META_MAX_CHARS] if label is not None else None


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _parse_meta(raw: str) -> dict[str, Any]:
    """A waiter's stored metadata; empty when missing (expired, or never written)."""
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}
