"""The cluster mode's Lua scripts, run directly against a real redis-server: each rule
of the shared admission state as one test (ordering, leases, liveness, pause, epoch,
cooldown, usage gate, init and rejoin)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from proxy.cluster.scripts import NoState, Reply, Scripts, Shared, keys_for
from tests.redis_server import RedisServer, redis_server

LEASE_MS = 10_000
POLL_LOCK_MS = 5_000


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with redis_server() as found:
        yield found


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[Redis]:
    redis = Redis.from_url(server.url, decode_responses=True)
    await redis.flushall()
    yield redis
    await redis.aclose()


def replica(client: Redis, instance: str, lease_ms: int = LEASE_MS) -> Scripts:
    return Scripts(client, "p", instance, lease_ms)


async def start(s: Scripts, limit: int | None, cooldown_ms: int = 0) -> Shared:
    _, _, state = await s.init(limit, cooldown_ms)
    return state


async def admit(s: Scripts, prompt: float, local: str, *, gated: bool = False) -> Reply:
    return await s.admit(prompt, "", local, max_queue=100, gated=gated, poll_lock_ms=POLL_LOCK_MS)


async def release(s: Scripts, lease: str, *, gated: bool = False) -> Reply:
    return await s.release(lease, gated=gated, poll_lock_ms=POLL_LOCK_MS)


async def pump(s: Scripts, *, gated: bool = False) -> Reply:
    return await s.pump(gated=gated, poll_lock_ms=POLL_LOCK_MS)


async def rate_limited(s: Scripts, lease: str, epoch: int, pause_ms: int) -> Reply:
    return await s.rate_limited(lease, epoch, pause_ms, gated=False, poll_lock_ms=POLL_LOCK_MS)


async def usage(s: Scripts, sessions: int | None) -> Reply:
    """A `/usage` answer under the usage gate, with a 1 s poll interval."""
    return await s.usage(sessions, interval_ms=1_000, gated=True, poll_lock_ms=POLL_LOCK_MS)


def granted(reply: Reply) -> list[str]:
    assert reply.pump is not None
    return [m.rpartition("|")[2] for m in reply.pump.granted]


async def test_fast_path_admits_up_to_the_limit_then_queues(client: Redis) -> None:
    a = replica(client, "a")
    await start(a, 2)
    assert (await admit(a, 1, "1")).kind == "admitted"
    assert (await admit(a, 2, "2")).kind == "admitted"
    third = await admit(a, 3, "3")
    assert third.kind == "queued"
    assert third.pump is not None
    assert third.pump.code == "full"


async def test_the_global_line_goes_by_prompt_start_then_arrival_across_replicas(
    client: Redis,
) -> None:
    a, b = replica(client, "a"), replica(client, "b")
    await start(a, 1)
    holder = (await admit(a, 0, "holder")).detail
    # Arrival order: b@300, a@100, b@200, a@200 (equal prompt: b arrived first).
    for s, prompt, local in ((b, 300, "b300"), (a, 100, "a100"), (b, 200, "b200")):
        assert (await admit(s, prompt, local)).kind == "queued"
    assert (await admit(a, 200, "a200")).kind == "queued"
    order = []
    lease = holder
    for _ in range(4):
        reply = await release(a, lease)
        got = granted(reply)
        if not got:
            # The head is b's: a never admits it, b does when it re-checks.
            assert reply.pump is not None
            assert reply.pump.code == "other"
            reply = await pump(b)
            got = granted(reply)
        assert len(got) == 1
        order.append(got[0])
        assert reply.pump is not None
        lease = reply.pump.granted[0]
    assert order == ["a100", "b200", "a200", "b300"]


async def test_a_replica_does_not_admit_behind_another_replicas_head(client: Redis) -> None:
    a, b = replica(client, "a"), replica(client, "b")
    await start(a, 2)
    holders = [(await admit(a, 0, f"h{i}")).detail for i in range(2)]
    await admit(b, 100, "b-old")
    await admit(a, 200, "a-new")
    await release(a, holders[0])  # a's pump sees b's waiter at the head: wakes it, waits
    assert granted(await pump(a)) == []
    assert granted(await pump(b)) == ["b-old"]
    assert granted(await release(a, holders[1])) == ["a-new"]


async def test_a_lease_stops_counting_when_it_expires(client: Redis) -> None:
    a, b = replica(client, "a", lease_ms=300), replica(client, "b", lease_ms=300)
    await start(a, 1)
    lease = (await admit(a, 0, "x")).detail
    queued = await admit(b, 1, "y")
    assert queued.kind == "queued"
    assert queued.pump is not None
    assert queued.pump.code == "full"
    assert 0 < queued.pump.next_ms <= 300  # re-check when the lease runs out
    await asyncio.sleep(0.18)
    await b.renew([], [(queued.detail, 1)])  # b keeps its waiter alive; a is gone
    await asyncio.sleep(0.18)
    assert granted(await pump(b)) == ["y"]  # a's lease no longer counts
    # A renewal drops a's expired lease and reports it once, for the journal.
    assert (await b.renew([queued.detail], [])).expired == (lease,)
    assert (await b.renew([queued.detail], [])).expired == ()


async def test_a_renewed_lease_keeps_its_slot(client: Redis) -> None:
    a = replica(client, "a", lease_ms=300)
    await start(a, 1)
    lease = (await admit(a, 0, "x")).detail
    for _ in range(4):
        await asyncio.sleep(0.1)
        renewal = await a.renew([lease], [])
        assert renewal.missing_leases == ()
    assert (await admit(a, 1, "y")).kind == "queued"


async def test_a_dead_replicas_waiter_does_not_block_the_head(client: Redis) -> None:
    a, b = replica(client, "a", lease_ms=300), replica(client, "b", lease_ms=300)
    await start(b, 1)
    holder = (await admit(b, 0, "h")).detail
    await admit(a, 100, "a-dead")  # a dies: nobody renews its waiter
    mine = await admit(b, 200, "b-live")
    await b.renew([holder], [(mine.detail, 200)])
    reply = await release(b, holder)
    assert granted(reply) == []
    assert reply.pump is not None
    assert reply.pump.code == "other"
    assert 0 < reply.pump.next_ms <= 300  # when the dead waiter's liveness runs out
    await asyncio.sleep(0.2)
    await b.renew([], [(mine.detail, 200)])
    await asyncio.sleep(0.15)
    assert granted(await pump(b)) == ["b-live"]


async def test_a_new_429_extends_the_pause_never_shortens_it(client: Redis) -> None:
    a = replica(client, "a")
    await start(a, 4)
    leases = [(await admit(a, i, str(i))).detail for i in range(3)]
    first = await rate_limited(a, leases[0], 1, 2_000)
    assert first.detail.split()[0] == "1"
    shorter = await rate_limited(a, leases[1], 1, 100)
    assert shorter.detail.split()[0] == "0"
    assert shorter.state.paused_ms > 1_500
    longer = await rate_limited(a, leases[2], 1, 5_000)
    assert longer.detail.split()[0] == "1"
    assert longer.state.paused_ms > 4_500
    # While paused nothing is admitted, the fast path included.
    assert (await admit(a, 9, "late")).kind == "queued"


async def test_429s_of_one_overshoot_reduce_the_limit_once(client: Redis) -> None:
    a, b = replica(client, "a"), replica(client, "b")
    state = await start(a, 4)
    epoch = state.epoch
    first = (await admit(a, 1, "1")).detail
    second = (await admit(b, 2, "2")).detail
    one = await rate_limited(a, first, epoch, 0)
    two = await rate_limited(b, second, epoch, 0)
    assert one.detail.split()[1] == "1"
    assert two.detail.split()[1] == "0"
    assert two.state.limit == 3
    assert two.state.auto_reduced
    assert two.state.auto_reduced_from == 4
    # A slot admitted under the new limit that gets a 429 is a new overshoot.
    third = await admit(a, 3, "3")
    again = await rate_limited(a, third.detail, third.state.epoch, 0)
    assert again.state.limit == 2
    assert again.state.auto_reduced_from == 4


async def test_a_limit_of_one_is_never_reduced(client: Redis) -> None:
    a = replica(client, "a")
    state = await start(a, 1)
    lease = (await admit(a, 1, "1")).detail
    reply = await rate_limited(a, lease, state.epoch, 0)
    assert reply.state.limit == 1
    assert not reply.state.auto_reduced


async def test_a_manual_limit_clears_auto_reduce_bumps_the_epoch_and_wakes_everyone(
    client: Redis,
) -> None:
    a = replica(client, "a")
    state = await start(a, 3)
    lease = (await admit(a, 1, "1")).detail
    await rate_limited(a, lease, state.epoch, 0)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(a.channel)
    new = await a.set_limit(5)
    assert new.limit == 5
    assert not new.auto_reduced
    assert new.auto_reduced_from is None
    assert new.epoch == state.epoch + 2
    message = None
    for _ in range(3):  # the first read may only consume the subscription's confirmation
        message = message or await pubsub.get_message(timeout=1.0)
    assert message is not None
    assert message["data"].split()[:4] == ["s", "5", "0", str(new.epoch)]
    removed = await a.set_limit(None)
    assert removed.limit is None
    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]


async def test_a_released_slot_cools_down_before_it_is_recycled(client: Redis) -> None:
    a = replica(client, "a")
    await start(a, 1, cooldown_ms=200)
    lease = (await admit(a, 0, "x")).detail
    await admit(a, 1, "y")
    reply = await release(a, lease)
    assert granted(reply) == []
    assert reply.pump is not None
    assert reply.pump.code == "full"
    assert 100 < reply.pump.next_ms <= 200
    await asyncio.sleep(0.22)
    assert granted(await pump(a)) == ["y"]


async def test_the_usage_gate_polls_once_for_the_cluster_and_admits_one_per_poll(
    client: Redis,
) -> None:
    a, b = replica(client, "a"), replica(client, "b")
    await start(a, 3)
    holder = (await admit(a, 0, "h")).detail
    await admit(a, 0.5, "h2")
    await admit(a, 0.7, "h3")
    await admit(a, 1, "a1", gated=True)
    await admit(b, 2, "b1", gated=True)
    first = await release(a, holder, gated=True)
    assert first.pump is not None
    assert first.pump.code == "poll"
    # a's poll: room for one. It admits a1 and no more (the next needs a new poll).
    room = await usage(a, 1)
    assert room.kind == "room"
    assert granted(room) == ["a1"]
    # The slot that frees next needs a fresh poll, taken by b (its waiter is the head).
    await release(a, room.pump.granted[0] if room.pump else "", gated=True)
    polled = await pump(b, gated=True)
    assert polled.pump is not None
    assert polled.pump.code == "poll"
    assert (await pump(a, gated=True)).pump is not None
    # The answer is "full": nobody may poll again within the interval.
    full = await usage(b, 3)
    assert full.kind == "full"
    assert granted(full) == []
    wait = await pump(b, gated=True)
    assert wait.pump is not None
    assert wait.pump.code == "pollwait"
    assert 500 < wait.pump.next_ms <= 1_000
    # No information: admit as without a gate.
    await client.delete(keys_for("p")[9])
    assert (await pump(b, gated=True)).pump is not None
    no_info = await usage(b, None)
    assert no_info.kind == "no_info"
    assert granted(no_info) == ["b1"]


async def test_the_queue_bound_counts_live_waiters_of_every_replica(client: Redis) -> None:
    a, b = replica(client, "a"), replica(client, "b")
    await start(a, 1)
    await admit(a, 0, "h")
    assert (await a.admit(1, "", "1", max_queue=2, gated=False, poll_lock_ms=1)).kind == "queued"
    assert (await b.admit(2, "", "2", max_queue=2, gated=False, poll_lock_ms=1)).kind == "queued"
    full = await a.admit(3, "", "3", max_queue=2, gated=False, poll_lock_ms=1)
    assert full.kind == "queue_full"


async def test_a_429_retry_keeps_its_tie_and_so_its_place(client: Redis) -> None:
    a = replica(client, "a")
    await start(a, 1)
    holder = (await admit(a, 0, "h")).detail
    early = await admit(a, 500, "early")
    await admit(a, 500, "late")
    tie = early.detail.partition("|")[0]
    await a.leave(early.detail, gated=False, poll_lock_ms=POLL_LOCK_MS)
    # The same request comes back with its tie: it is still ahead of "late".
    back = await a.admit(500, tie, "again", max_queue=100, gated=False, poll_lock_ms=1)
    assert back.detail.startswith(tie)
    assert granted(await release(a, holder)) == ["again"]


async def test_status_counts_cluster_wide_and_per_replica(client: Redis) -> None:
    a, b = replica(client, "a"), replica(client, "b")
    await start(a, 2, cooldown_ms=5_000)
    first = (await admit(a, 0, "1")).detail
    await admit(b, 1, "2")
    await admit(b, 2, "3")
    await release(a, first)
    await a.renew([], [])
    census = await a.status()
    assert (census.running, census.cooling, census.queued) == (1, 1, 1)
    rows = {r.instance_id: (r.running, r.cooling, r.queued) for r in census.instances}
    assert rows == {"a": (0, 1, 0), "b": (1, 0, 1)}


async def test_init_keeps_the_shared_state_unless_the_config_changed(client: Redis) -> None:
    a = replica(client, "a")
    assert (await a.init(4, 350))[:2] == ("config", "config")
    await a.set_limit(2)
    assert (await a.init(4, 350))[:2] == ("redis", "redis")
    assert (await a.status()).state.limit == 2
    limit_source, _, state = await a.init(6, 350)
    assert limit_source.startswith("config (changed")
    assert state.limit == 6


async def test_scripts_refuse_to_run_on_a_lost_state(client: Redis) -> None:
    a = replica(client, "a")
    await start(a, 1)
    await client.flushall()
    with pytest.raises(NoState):
        await admit(a, 1, "x")


async def test_rejoin_seeds_a_lost_state_registers_held_slots_and_drops_stale_ones(
    client: Redis,
) -> None:
    a, b = replica(client, "a"), replica(client, "b")
    await start(a, 4)
    kept = (await admit(a, 0, "kept")).detail
    gone = (await admit(a, 1, "gone")).detail
    await admit(b, 2, "b")
    waiting = await a.admit(3, "", "w", max_queue=100, gated=False, poll_lock_ms=1)
    assert waiting.kind == "admitted"
    seed = Shared(3, 100, 7, True, 4, 0)
    seeded, state, _ = await a.rejoin(seed, (4, 350), [kept, "f9|a|9"])
    assert not seeded
    assert state.limit == 4
    census = await a.status()
    leases = {r.instance_id: r.running for r in census.instances}
    assert leases == {"a": 2, "b": 1}  # kept + f9, gone and the 4th dropped
    assert gone not in str(census)
    await client.flushall()
    seeded, state, replicas = await a.rejoin(seed, (4, 350), [kept])
    assert seeded
    assert (state.limit, state.auto_reduced, state.auto_reduced_from) == (3, True, 4)
    assert replicas == 1
    assert (await a.status()).running == 1


# --- reduce_on_429 and restore ---------------------------------------------------------

RESTORE_MS = 300


async def restore(s: Scripts) -> Reply:
    return await s.restore(RESTORE_MS, lock_ms=1_000, max_gap_ms=1_000)


async def reduced_to_3_of_4(a: Scripts) -> Shared:
    """Limit 4, one reducing 429: 3, auto-reduced from 4; no pause."""
    state = await start(a, 4)
    lease = (await admit(a, 0, "429")).detail
    return (await rate_limited(a, lease, state.epoch, 0)).state


async def test_a_429_that_may_not_reduce_pauses_and_keeps_the_limit(client: Redis) -> None:
    a = replica(client, "a")
    state = await start(a, 4)
    lease = (await admit(a, 1, "1")).detail
    reply = await a.rate_limited(
        lease, state.epoch, 2_000, gated=False, poll_lock_ms=POLL_LOCK_MS, reduce=False
    )
    assert reply.detail.split()[:2] == ["1", "0"]  # paused, not reduced
    assert reply.state.paused_ms > 1_500
    assert (reply.state.limit, reply.state.auto_reduced) == (4, False)


async def test_restore_steps_up_after_a_window_of_demand_and_only_for_the_lock_holder(
    client: Redis,
) -> None:
    a, b = replica(client, "a"), replica(client, "b")
    await reduced_to_3_of_4(a)
    for i in range(3):
        assert (await admit(b, i, f"busy{i}")).kind == "admitted"  # every slot in use
    assert (await restore(a)).kind == "waiting"  # a takes the lock: the first sample
    assert (await restore(b)).kind == "other"
    await asyncio.sleep(RESTORE_MS / 1000 / 2)
    waiting = await restore(a)
    assert waiting.kind == "waiting"
    assert RESTORE_MS / 3 <= int(waiting.detail.split()[0]) < RESTORE_MS
    await asyncio.sleep(RESTORE_MS / 1000 / 2 + 0.05)
    assert (await restore(b)).kind == "other"  # the holder alone sums and steps
    done = await restore(a)
    assert done.kind == "restored"
    assert done.detail == f"3 4 {RESTORE_MS} 1"  # back at the limit before the reductions
    assert (done.state.limit, done.state.auto_reduced, done.state.auto_reduced_from) == (
        4,
        False,
        None,
    )
    assert (await restore(a)).kind == "idle"


async def test_restore_without_demand_never_steps_up(client: Redis) -> None:
    a = replica(client, "a")
    await reduced_to_3_of_4(a)
    for _ in range(4):
        assert (await restore(a)).kind == "waiting"
        await asyncio.sleep(RESTORE_MS / 1000 / 2)
    assert (await restore(a)).state.limit == 3


async def rate_limited_after_step(s: Scripts, lease: str) -> Reply:
    """A 429 for `lease`, admitted at epoch 0 (before every limit change here)."""
    return await s.rate_limited(
        lease,
        0,
        0,
        gated=False,
        poll_lock_ms=POLL_LOCK_MS,
        restore_ms=RESTORE_MS,
        restore_max_ms=16 * RESTORE_MS,
    )


async def stepped_up_to_4(a: Scripts) -> list[str]:
    """Reduced to 3, every slot busy for a window: back at 4. The three leases."""
    await reduced_to_3_of_4(a)
    leases = [(await admit(a, i, f"busy{i}")).detail for i in range(3)]
    await restore(a)
    await asyncio.sleep(RESTORE_MS / 1000 + 0.05)
    assert (await restore(a)).kind == "restored"
    return leases


async def test_a_429_within_a_window_of_a_step_up_undoes_it_and_doubles_the_window(
    client: Redis,
) -> None:
    a = replica(client, "a")
    leases = await stepped_up_to_4(a)
    # Admitted before the step (an older epoch), yet it undoes the step; once only.
    undo = await rate_limited_after_step(a, leases[0])
    assert undo.detail.split() == ["1", "1", "4", str(RESTORE_MS)]
    assert (undo.state.limit, undo.state.auto_reduced_from) == (3, 4)
    again = await rate_limited_after_step(a, leases[1])
    assert again.detail.split()[1:] == ["0", "3", "-1"]
    waiting = await restore(a)
    assert waiting.kind == "waiting"
    assert waiting.detail.split()[1] == str(2 * RESTORE_MS)


async def test_a_manual_limit_starts_restore_over(client: Redis) -> None:
    a = replica(client, "a")
    leases = await stepped_up_to_4(a)
    await rate_limited_after_step(a, leases[0])  # undone: the window doubled
    await restore(a)
    fields = set(await client.hgetall(keys_for("p")[0]))
    assert {"restore_window", "restore_tick"} <= fields
    await a.set_limit(4)
    fields = set(await client.hgetall(keys_for("p")[0]))
    assert not {"restore_window", "restore_quiet", "restore_tick", "raised_at"} & fields


# ------------------------------------------------------ client shares (SPEC 11)


async def admit_for(
    s: Scripts, prompt: float, local: str, client: str | None, cap: int | None
) -> Reply:
    return await s.admit(
        prompt,
        "",
        local,
        max_queue=100,
        gated=False,
        poll_lock_ms=POLL_LOCK_MS,
        client=client,
        cap=cap,
    )


async def test_a_client_at_its_cap_does_not_block_others(client: Redis) -> None:
    a = replica(client, "a")
    await start(a, 3)
    assert (await admit_for(a, 0, "a1", "team-a", 1)).kind == "admitted"
    assert (await admit_for(a, 1, "a2", "team-a", 1)).kind == "queued"  # at its cap
    # Two slots free and team-a's waiter is older, but it may not go: the fast path
    # admits team-b's newcomer.
    assert (await admit_for(a, 2, "b1", "team-b", 1)).kind == "admitted"


async def test_caps_are_cluster_wide(client: Redis) -> None:
    a, b = replica(client, "a"), replica(client, "b")
    await start(a, 3)
    first = await admit_for(a, 0, "a1", "team-a", 1)
    assert first.kind == "admitted"
    queued = await admit_for(b, 1, "a2", "team-a", 1)  # another replica, the same client
    assert queued.kind == "queued"
    assert queued.pump is not None
    assert queued.pump.code == "idle"  # nobody who may go next waits
    reply = await release(a, first.detail)  # team-a drops under its cap: its turn
    assert granted(reply) == []
    assert reply.pump is not None
    assert reply.pump.code == "other"  # the waiter is b's: a wakes it
    assert granted(await pump(b)) == ["a2"]


async def test_a_capped_waiter_goes_as_soon_as_its_client_drops_under_the_cap(
    client: Redis,
) -> None:
    a = replica(client, "a")
    await start(a, 2, cooldown_ms=5_000)
    first = await admit_for(a, 0, "a1", "team-a", 1)
    await admit_for(a, 1, "a2", "team-a", 1)
    # The released slot cools down, but the other is free and team-a is under its
    # cap at once: running leases count toward a cap, cooling slots do not.
    assert granted(await release(a, first.detail)) == ["a2"]
    census = await a.status()
    assert (census.running, census.cooling) == (1, 1)


async def test_the_oldest_waiter_under_its_cap_goes_first(client: Redis) -> None:
    a = replica(client, "a")
    await start(a, 1)
    holder = (await admit_for(a, 0, "h", None, None)).detail
    await admit_for(a, 1, "a1", "team-a", 1)
    await admit_for(a, 2, "n", None, None)
    await admit_for(a, 3, "a2", "team-a", 1)
    order = []
    lease = holder
    for _ in range(3):
        reply = await release(a, lease)
        order += granted(reply)
        assert reply.pump is not None
        lease = reply.pump.granted[0]
    assert order == ["a1", "n", "a2"]


async def test_a_newcomer_older_than_its_clients_head_takes_the_turn(client: Redis) -> None:
    a = replica(client, "a")
    await start(a, 1)
    holder = (await admit_for(a, 0, "h", None, None)).detail
    await admit_for(a, 5, "late", "team-a", 1)
    await admit_for(a, 3, "n", None, None)
    await admit_for(a, 1, "early", "team-a", 1)
    assert granted(await release(a, holder)) == ["early"]


async def test_leaving_moves_the_clients_turn(client: Redis) -> None:
    a = replica(client, "a")
    await start(a, 1)
    holder = (await admit_for(a, 0, "h", None, None)).detail
    head = await admit_for(a, 1, "a1", "team-a", 1)
    await admit_for(a, 2, "n", None, None)
    await admit_for(a, 3, "a2", "team-a", 1)
    await a.leave(head.detail, gated=False, poll_lock_ms=POLL_LOCK_MS)
    reply = await release(a, holder)
    assert granted(reply) == ["n"]  # team-a's turn moved to a2's place, behind n
    assert reply.pump is not None
    assert granted(await release(a, reply.pump.granted[0])) == ["a2"]
    assert (await a.status()).queued == 0


async def test_a_renewed_lease_keeps_counting_toward_the_cap(client: Redis) -> None:
    a = replica(client, "a", lease_ms=300)
    await start(a, 3)
    lease = (await admit_for(a, 0, "a1", "team-a", 1)).detail
    waiter = await admit_for(a, 1, "a2", "team-a", 1)
    for _ in range(4):
        await asyncio.sleep(0.1)
        await a.renew([lease], [(waiter.detail, 1)])
    assert granted(await pump(a)) == []
    assert (await a.status()).queued == 1


async def test_an_expired_lease_frees_its_clients_cap(client: Redis) -> None:
    a, b = replica(client, "a", lease_ms=300), replica(client, "b", lease_ms=300)
    await start(a, 3)
    await admit_for(a, 0, "a1", "team-a", 1)  # a dies holding it
    waiter = await admit_for(b, 1, "a2", "team-a", 1)
    await asyncio.sleep(0.18)
    await b.renew([], [(waiter.detail, 1)])
    assert granted(await pump(b)) == []
    await asyncio.sleep(0.18)
    renewal = await b.renew([], [(waiter.detail, 1)])  # drops a's lease: team-a's turn
    assert len(renewal.expired) == 1
    assert granted(await pump(b)) == ["a2"]


async def test_a_dead_replicas_capped_waiter_does_not_block_its_client(client: Redis) -> None:
    a, b = replica(client, "a", lease_ms=300), replica(client, "b", lease_ms=300)
    await start(b, 1)
    holder = (await admit_for(b, 0, "h", None, None)).detail
    await admit_for(a, 1, "dead", "team-a", 1)  # a dies: nobody renews its waiter
    mine = await admit_for(b, 2, "live", "team-a", 1)
    await asyncio.sleep(0.2)
    await b.renew([holder], [(mine.detail, 2)])
    await asyncio.sleep(0.15)
    assert granted(await release(b, holder)) == ["live"]


async def test_status_counts_each_clients_share(client: Redis) -> None:
    a, b = replica(client, "a"), replica(client, "b")
    await start(a, 3)
    await admit_for(a, 0, "a1", "team-a", 1)
    await admit_for(b, 1, "a2", "team-a", 1)
    await admit_for(b, 2, "b1", "team-b", None)
    await admit_for(a, 3, "n", None, None)
    census = await a.status()
    rows = {r.client_id: (r.running, r.queued) for r in census.clients}
    assert rows == {"team-a": (1, 1), "team-b": (1, 0)}
    assert (census.running, census.queued) == (3, 1)


async def test_rejoin_counts_held_slots_toward_their_clients_caps(client: Redis) -> None:
    a, b = replica(client, "a"), replica(client, "b")
    await start(a, 3)
    # a held team-a's slot through an outage (a fallback lease id), then rejoins.
    seed = Shared(3, 0, 1, False, None, 0)
    held = "f1|a|1"
    await a.rejoin(seed, (3, 0), [held], {held: ("team-a", 1)})
    assert (await admit_for(b, 1, "a2", "team-a", 1)).kind == "queued"
    assert granted(await release(a, held)) == []  # the waiter is b's
    assert granted(await pump(b)) == ["a2"]


async def test_a_forced_renewal_registers_lost_waiters_in_their_clients_line(
    client: Redis,
) -> None:
    a = replica(client, "a")
    await start(a, 3)
    lease = (await admit_for(a, 0, "a1", "team-a", 1)).detail
    waiter = (await admit_for(a, 1, "a2", "team-a", 1)).detail
    await client.flushall()
    await start(a, 3)  # the state is back, the entries are not
    clients = {lease: ("team-a", 1), waiter: ("team-a", 1)}
    await a.renew([lease], [(waiter, 1)], force=True, clients=clients)
    assert granted(await pump(a)) == []  # team-a is still at its cap
    assert granted(await release(a, lease)) == ["a2"]
