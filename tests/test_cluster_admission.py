"""`ClusterAdmission` in one process: several replicas (each its own hub, client and
instance id) on one real redis-server, driven through the `Admission` interface the
relay uses."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from proxy.admission import LimiterEvent, Policy, Rejection
from proxy.admission.reduce import Answer
from proxy.cluster.admission import ClusterAdmission, ClusterSlot
from proxy.cluster.hub import ClusterHub
from proxy.settings import ClusterSettings, ProviderConfig
from tests.redis_server import RedisServer, redis_binary, redis_server
from tests.servers import free_port
from tests.waiting import eventually

BASE = ProviderConfig(
    id="p",
    base_url="http://127.0.0.1:9/v1",
    api_key=None,
    default=True,
    connect_timeout_s=1,
    read_timeout_s=1,
    policy=Policy(
        limit=1,
        cooldown_ms=0,
        pause_s=1,
        usage_poll_interval_ms=200,
        queue_timeout_s=10,
        max_queue=100,
        retry_on_429=0,
        admitted_paths=("/chat/completions",),
    ),
)


@dataclasses.dataclass
class Node:
    """One replica: its hub, its admission of provider `p`, the events it journaled."""

    hub: ClusterHub
    admission: ClusterAdmission
    events: list[LimiterEvent]

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


async def _no_usage() -> int | None:
    return None


@contextlib.asynccontextmanager
async def replicas(
    url: str,
    n: int,
    *,
    lease_s: float = 3.0,
    poll_usage: Callable[[], Awaitable[int | None]] = _no_usage,
    **config: Any,
) -> AsyncIterator[list[Node]]:
    provider = dataclasses.replace(BASE, policy=dataclasses.replace(BASE.policy, **config))
    loop = asyncio.get_running_loop()
    nodes = []
    for i in range(n):
        hub = ClusterHub(ClusterSettings(redis_url=url, lease_s=lease_s, instance_id=f"r{i}"))
        events: list[LimiterEvent] = []
        admission = ClusterAdmission(
            provider, hub, loop=loop, poll_usage=poll_usage, on_event=events.append
        )
        await admission.restore(None)
        await hub.start()
        nodes.append(Node(hub, admission, events))
    try:
        yield nodes
    finally:
        for node in nodes:
            await node.admission.close()
            await node.hub.close()


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with redis_server() as found:
        yield found


@pytest.fixture
async def url(server: RedisServer) -> str:
    client = Redis.from_url(server.url)
    await client.flushall()
    await client.aclose()
    return server.url


async def slot(node: Node, prompt: float, **kwargs: Any) -> ClusterSlot:
    outcome = await node.admission.admit(prompt, **kwargs)
    assert isinstance(outcome, ClusterSlot), outcome
    return outcome


async def test_the_fast_path_admits_and_a_release_frees_the_slot(url: str) -> None:
    async with replicas(url, 2, limit=1) as (a, b):
        held = await slot(a, 1)
        status = await b.admission.status()
        assert (status.limit, status.in_flight, status.queued) == (1, 1, 0)
        held.release()
        held.release()  # twice is harmless
        await eventually(lambda: _in_flight(b, 0))
        assert a.admission.counters.admitted == 1


async def _in_flight(node: Node, n: int) -> bool:
    return (await node.admission.status()).in_flight == n


async def _queued(node: Node, n: int) -> bool:
    return (await node.admission.status()).queued == n


async def test_waiters_of_all_replicas_are_admitted_oldest_prompt_first(url: str) -> None:
    async with replicas(url, 3, limit=1, cooldown_ms=20) as nodes:
        holder = await slot(nodes[0], 0)
        order: list[str] = []

        async def agent(node: Node, prompt: float) -> None:
            held = await slot(node, prompt)
            order.append(f"{node.hub.instance_id}@{prompt:g}")
            await asyncio.sleep(0.01)
            held.release()

        plan = [(2, 500), (1, 300), (0, 400), (2, 100), (1, 200), (0, 300), (2, 600)]
        tasks = []
        for i, prompt in plan:
            tasks.append(asyncio.create_task(agent(nodes[i], prompt)))
            await eventually(functools.partial(_queued, nodes[0], len(tasks)))
        holder.release()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        # Equal prompts (300) go in arrival order: r1 queued before r0.
        assert order == ["r2@100", "r1@200", "r1@300", "r0@300", "r0@400", "r2@500", "r2@600"]


async def test_a_waiter_that_leaves_gives_up_its_place(url: str) -> None:
    async with replicas(url, 2, limit=1) as (a, b):
        holder = await slot(a, 0)
        leaving = asyncio.create_task(b.admission.admit(1))
        staying = asyncio.create_task(a.admission.admit(2))
        await eventually(lambda: _queued(a, 2))
        leaving.cancel()
        await eventually(lambda: _queued(a, 1))
        holder.release()
        assert isinstance(await asyncio.wait_for(staying, 5), ClusterSlot)
        with pytest.raises(asyncio.CancelledError):
            await leaving


async def test_a_queue_timeout_is_a_rejection_and_leaves_the_shared_queue(url: str) -> None:
    async with replicas(url, 2, limit=1, queue_timeout_s=0.3) as (a, b):
        await slot(a, 0)
        outcome = await b.admission.admit(1)
        assert outcome == Rejection("queue_timeout", 1)
        await eventually(lambda: _queued(a, 0))


async def test_a_limit_set_on_one_replica_applies_on_every_replica_at_once(url: str) -> None:
    async with replicas(url, 2, limit=1) as (a, b):
        await slot(a, 0)
        waiting = asyncio.create_task(b.admission.admit(1))
        await eventually(lambda: _queued(a, 1))
        await a.admission.set_limit(2)
        # b's waiter is admitted by b, woken by the change; b's view follows at once.
        assert isinstance(await asyncio.wait_for(waiting, 2), ClusterSlot)
        assert b.admission.limit == 2
        await b.admission.set_cooldown_ms(75)
        await eventually(lambda: a.admission.cooldown_ms == 75)


async def test_429s_seen_by_two_replicas_at_once_reduce_the_limit_once(url: str) -> None:
    async with replicas(url, 2, limit=4) as (a, b):
        first, second = await slot(a, 1), await slot(b, 2)
        await asyncio.gather(first.rate_limited(0.2), second.rate_limited(0.2))
        status = await a.admission.status()
        assert (status.limit, status.auto_reduced, status.auto_reduced_from) == (3, True, 4)
        reductions = a.kinds().count("limit_reduced") + b.kinds().count("limit_reduced")
        assert reductions == 1
        assert a.kinds().count("rate_limited") == b.kinds().count("rate_limited") == 1
        assert status.notice is not None
        assert "auto-reduced to 3" in status.notice
        # The released slots are free again (cooldown 0) once the pause ends.
        await eventually(lambda: _in_flight(a, 0))
        assert isinstance(await asyncio.wait_for(a.admission.admit(3), 2), ClusterSlot)


async def test_the_usage_gate_polls_once_per_interval_for_the_whole_cluster(url: str) -> None:
    polls: list[float] = []
    sessions = {"now": 5}

    async def poll() -> int | None:
        polls.append(time.monotonic())
        return sessions["now"]

    async with replicas(
        url, 3, limit=3, usage_gate=True, usage_poll_interval_ms=200, poll_usage=poll
    ) as nodes:
        holders = [await slot(node, 0) for node in nodes]
        waiters = [asyncio.create_task(n.admission.admit(10 + i)) for i, n in enumerate(nodes)]
        await eventually(lambda: _queued(nodes[0], 3))
        for held in holders:
            held.release()
        # The upstream reports it full: one poll per interval for all three replicas.
        await asyncio.sleep(1.0)
        assert 3 <= len(polls) <= 7, polls
        assert all(not w.done() for w in waiters)
        # Room for one: each successful poll admits one waiter, cluster-wide.
        sessions["now"] = 1
        outcomes = await asyncio.wait_for(asyncio.gather(*waiters), 5)
        assert all(isinstance(o, ClusterSlot) for o in outcomes)
        room = sum(n.admission.counters.usage_polls_room for n in nodes)
        assert room == 3  # one waiter per successful poll
        assert (await nodes[2].admission.status()).upstream_sessions == 1


async def test_redis_down_means_a_local_share_then_a_rejoin(tmp_path: Any) -> None:
    with redis_server() as redis:
        async with replicas(redis.url, 2, limit=4, lease_s=1.5) as (a, b):
            await a.admission.renew()  # a sees b too: 2 replicas
            held = await slot(a, 0)
            redis.stop()
            # Share: ceil(4 / 2) = 2. The slot held from before counts against it.
            local = await slot(a, 1)
            third = asyncio.create_task(a.admission.admit(2))
            await asyncio.sleep(0.1)
            assert not third.done()
            status = await a.admission.status()
            view = a.admission.cluster()
            assert view is not None
            assert (view.mode, view.local_limit) == ("fallback", 2)
            assert (status.limit, status.in_flight, status.queued) == (4, 2, 1)
            with pytest.raises(Exception, match="unreachable"):
                await a.admission.set_limit(1)
            held.release()
            assert isinstance(await asyncio.wait_for(third, 2), ClusterSlot)
            # Redis comes back empty: the replicas seed it again and count what they hold.
            redis.start()
            await eventually(lambda: a.hub.up and b.hub.up, within=5)
            status = await b.admission.status()
            assert (status.limit, status.in_flight) == (4, 2)
            view = b.admission.cluster()
            assert view is not None
            assert view.mode == "redis"
            # Queued locally during the outage, back in the shared line after it.
            more = [asyncio.create_task(a.admission.admit(5 + i)) for i in range(3)]
            await eventually(lambda: _in_flight(b, 4))
            assert sum(t.done() for t in more) == 2
            local.release()
            await eventually(lambda: all(t.done() for t in more))


async def test_a_replica_started_without_redis_admits_one_at_a_time_until_it_joins(
    tmp_path: Any,
) -> None:
    redis = RedisServer(redis_binary(), free_port(), tmp_path)  # not running yet
    async with replicas(redis.url, 1, limit=4) as (a,):
        view = a.admission.cluster()
        assert view is not None
        # Never having seen the cluster, it cannot know its share: it assumes the worst.
        assert (view.mode, view.local_limit) == ("fallback", 1)
        first = await slot(a, 1)
        second = asyncio.create_task(a.admission.admit(2))
        await asyncio.sleep(0.1)
        assert not second.done()
        redis.start()
        try:
            await eventually(lambda: a.hub.up)
            # Joined: the config's limit applies, the held slot counts as a lease.
            assert isinstance(await asyncio.wait_for(second, 2), ClusterSlot)
            status = await a.admission.status()
            assert (status.limit, status.in_flight) == (4, 2)
            first.release()
            await eventually(lambda: _in_flight(a, 1))
        finally:
            redis.stop()


async def test_a_flushed_redis_is_seeded_again_from_a_replicas_view(url: str) -> None:
    async with replicas(url, 2, limit=3) as (a, b):
        await a.admission.set_limit(2)
        await eventually(lambda: b.admission.limit == 2)  # b's view, by pub/sub
        held = await slot(a, 1)
        client = Redis.from_url(url)
        await client.flushall()
        await client.aclose()
        # The next script finds no state: the replica seeds it and carries on.
        other = await slot(b, 2)
        status = await a.admission.status()
        assert (status.limit, status.in_flight) == (2, 1)
        assert isinstance(other, ClusterSlot)
        await a.admission.renew()  # the held slot is registered again
        assert (await b.admission.status()).in_flight == 2
        held.release()
        other.release()
        await eventually(lambda: _in_flight(a, 0))


async def test_restore_happens_once_for_three_replicas(url: str) -> None:
    """Reduced 3 -> 2, every slot busy: after restore_after_s one replica steps the
    shared limit up, once; all three see it."""
    async with replicas(url, 3, limit=3, restore_after_s=0.5, pause_s=0) as nodes:
        first = await slot(nodes[0], 0)
        await first.rate_limited(0.0)
        assert nodes[0].admission.limit == 2
        held = [await slot(nodes[1], 1), await slot(nodes[2], 2)]  # all busy, across replicas
        started = time.monotonic()
        await eventually(lambda: all(node.admission.limit == 3 for node in nodes), within=5)
        assert time.monotonic() - started >= 0.5 - 0.05
        steps = [e for node in nodes for e in node.events if e.kind == "limit_restored"]
        assert len(steps) == 1
        assert steps[0].detail == (
            "limit 2 -> 3 after 0.5 s without a 429 while busy; "
            "the limit before the reductions is back"
        )
        status = await nodes[2].admission.status()
        assert (status.auto_reduced, status.auto_reduced_from, status.notice) == (
            False,
            None,
            None,
        )
        await asyncio.sleep(1.0)  # nothing more to restore: no second step anywhere
        assert sum(node.kinds().count("limit_restored") for node in nodes) == 1
        for held_slot in held:
            held_slot.release()


async def test_a_non_matching_429_pauses_every_replica_without_lowering_the_limit(
    url: str,
) -> None:
    async with replicas(
        url, 2, limit=3, reduce_on_429="match", reduce_on_429_match="concurrency"
    ) as (a, b):
        held = await slot(a, 0)
        tokens = Answer((("retry-after", "1"),), b'{"error": {"code": "rate_limit_exceeded"}}')
        await held.rate_limited(1.0, tokens)
        status = await b.admission.status()
        assert status.paused
        assert (status.limit, status.auto_reduced) == (3, False)
        assert a.kinds() == ["rate_limited", "paused"]
        assert (
            a.events[0].detail == "429 from upstream (limit kept: no match for reduce_on_429_match)"
        )


# ------------------------------------------------------ client shares (SPEC 11)

CAPS = (("team-a", 1), ("team-b", None))


async def test_client_caps_are_cluster_wide(url: str) -> None:
    async with replicas(url, 2, limit=3, client_max_in_flight=CAPS) as (a, b):
        first = await slot(a, 0, client_id="team-a")
        capped = asyncio.create_task(b.admission.admit(1, client_id="team-a"))
        await eventually(lambda: _queued(a, 1))
        # Two slots free and team-a's waiter is older: team-b goes at once.
        await slot(b, 2, client_id="team-b")
        await slot(a, 3)  # and so does a request of no client
        assert not capped.done()
        status = await a.admission.status()
        assert [(c.client_id, c.in_flight, c.queued, c.max_in_flight) for c in status.clients] == [
            ("team-a", 1, 1, 1),
            ("team-b", 1, 0, None),
        ]
        first.release()
        got = await asyncio.wait_for(capped, 2)
        assert isinstance(got, ClusterSlot)
        assert got.client_id == "team-a"


async def test_an_unknown_client_id_is_no_client_in_cluster_mode(url: str) -> None:
    async with replicas(url, 1, limit=3, client_max_in_flight=CAPS) as (a,):
        held = [await slot(a, i, client_id="stranger") for i in range(3)]
        assert all(s.client_id is None for s in held)


async def test_the_local_share_applies_client_caps(tmp_path: Any) -> None:
    with redis_server() as redis:
        async with replicas(redis.url, 1, limit=4, lease_s=1.5, client_max_in_flight=CAPS) as (a,):
            held = await slot(a, 0, client_id="team-a")
            redis.stop()
            await eventually(lambda: not a.hub.up, within=5)
            # The local share (4: one replica) counts the held slot toward team-a's cap.
            capped = asyncio.create_task(a.admission.admit(1, client_id="team-a"))
            await slot(a, 2, client_id="team-b")
            await asyncio.sleep(0.1)
            assert not capped.done()
            status = await a.admission.status()
            assert status.clients[0].in_flight == 1
            held.release()
            assert isinstance(await asyncio.wait_for(capped, 2), ClusterSlot)


# ------------------------------------------ the shared line: listing, place, Retry-After


class Ticks:
    """A keepalive recording the places it is told."""

    interval_s = 0.05

    def __init__(self) -> None:
        self.positions: list[int | None] = []

    async def tick(self, position: int | None) -> None:
        self.positions.append(position)


async def test_the_queue_listing_is_cluster_wide_in_admission_order(url: str) -> None:
    team_a = (("team-a", None),)  # a configured client without a cap
    async with replicas(url, 2, limit=1, client_max_in_flight=team_a) as (a, b):
        holder = await slot(a, 0)
        plan = [(b, 300.0, "c3", "derived"), (a, 100.0, "c1", "header"), (b, 200.0, "c2", None)]
        tasks = []
        for node, prompt, conversation, source in plan:
            tasks.append(
                asyncio.create_task(
                    node.admission.admit(
                        prompt,
                        conversation_id=conversation,
                        prompt_source=source,
                        client_id="team-a" if node is b else None,
                    )
                )
            )
            await eventually(functools.partial(_queued, a, len(tasks)))

        async def listed() -> list[Any]:
            found = await a.admission.waiters(0, 10)
            # The metadata lands just after the enqueue: wait until all of it is there.
            return found if all(w.conversation_id for w in found) else []

        waiters = await eventually(listed)
        assert [(w.position, w.prompt_started_at, w.conversation_id) for w in waiters] == [
            (1, 100.0, "c1"),
            (2, 200.0, "c2"),
            (3, 300.0, "c3"),
        ]
        assert [(w.prompt_source, w.client_id) for w in waiters] == [
            ("header", None),
            (None, "team-a"),
            ("derived", "team-a"),
        ]
        assert all(0 <= w.waited_s < 10 for w in waiters)
        page = await b.admission.waiters(1, 1)
        assert [(w.position, w.conversation_id) for w in page] == [(2, "c2")]
        holder.release()
        for next_done in asyncio.as_completed(tasks, timeout=10):  # one slot: in turn
            outcome = await next_done
            assert isinstance(outcome, ClusterSlot)
            outcome.release()


async def test_keepalive_positions_come_from_the_shared_line(url: str) -> None:
    async with replicas(url, 2, limit=1) as (a, b):
        holder = await slot(a, 0)
        ahead = asyncio.create_task(a.admission.admit(1))
        await eventually(lambda: _queued(a, 1))
        ticks = Ticks()
        task = asyncio.create_task(b.admission.admit(2, keepalive=ticks))
        await eventually(lambda: 2 in ticks.positions)
        holder.release()
        first = await asyncio.wait_for(ahead, 10)
        assert isinstance(first, ClusterSlot)
        await eventually(lambda: 1 in ticks.positions)
        first.release()
        second = await asyncio.wait_for(task, 10)
        assert isinstance(second, ClusterSlot)
        second.release()
        assert set(ticks.positions) <= {None, 1, 2}


async def test_queue_full_retry_after_uses_the_shared_rate_and_grows_with_the_queue(
    url: str,
) -> None:
    async def refused(max_queue: int) -> int:
        async with replicas(url, 2, limit=1, max_queue=max_queue) as (a, b):
            for _ in range(10):  # admissions on both replicas, shared through Redis
                (await slot(a, 0)).release()
                (await slot(b, 0)).release()
                await eventually(lambda: _in_flight(a, 0))
            await a.admission.renew()
            await b.admission.renew()
            holder = await slot(a, 0)
            waiting = [asyncio.create_task(b.admission.admit(1)) for _ in range(max_queue)]
            await eventually(lambda: _queued(a, max_queue))
            outcome = await a.admission.admit(5)
            assert isinstance(outcome, Rejection)
            assert outcome.reason == "queue_full"
            holder.release()
            for next_done in asyncio.as_completed(waiting, timeout=10):
                got = await next_done
                assert isinstance(got, ClusterSlot)
                got.release()
            return outcome.retry_after_s

    short, long = await refused(1), await refused(40)
    assert 1 <= short < long, (short, long)
