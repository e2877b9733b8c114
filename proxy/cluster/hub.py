"""One process's link to the shared Redis: the client, the instance id, the pub/sub
wake-ups, the lease renewals, and whether Redis is reachable at all.

Up or down is one state for the whole process (one Redis), changed only here: the
first failed call anywhere flips every provider to its local fallback share at once
(one warning, not one per request); a probe loop brings them all back together.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Final, Protocol

import structlog
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.cluster.scripts import RedisDown
from proxy.settings import ClusterSettings


class Member(Protocol):
    """What the hub needs of each provider's shared admission (`ClusterAdmission`)."""

    channel: str

    @property
    def provider_id(self) -> str: ...
    def on_message(self, data: str) -> None: ...
    async def renew(self) -> None: ...
    def enter_fallback(self) -> int | None: ...
    async def rejoin(self) -> None: ...


log = structlog.get_logger("sluice")

PROBE_S: Final = 0.25
"""How often a replica in fallback mode tries Redis again."""

SOCKET_TIMEOUT_S: Final = 2.0
"""A Redis call slower than this counts as Redis being down."""


def default_instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def check_url(url: str) -> str | None:
    """Why `url` is not a Redis URL we can use, or None (for a one-line config error)."""
    try:
        Redis.from_url(url)
    except ValueError as exc:
        return str(exc)
    return None


class ClusterHub:
    """Shared by every provider of the process; started after their state is restored."""

    def __init__(self, settings: ClusterSettings, *, client: Redis | None = None) -> None:
        # `|` separates the fields of a lease or waiter member.
        self.instance_id = (settings.instance_id or default_instance_id()).replace("|", "_")
        self.lease_s = settings.lease_s
        self.redis = client or Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            # No silent retries: a script re-sent after a lost reply could run twice.
            retry=Retry(NoBackoff(), 0),
        )
        self.up = True  # until a call fails
        self._members: dict[str, Member] = {}  # by wake channel
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    @property
    def renew_interval_s(self) -> float:
        """Leases and waiter liveness are renewed three times per lease."""
        return self.lease_s / 3

    def register(self, member: Member) -> None:
        self._members[member.channel] = member

    async def start(self) -> None:
        """Register this replica (first renewal) and start the background loops."""
        if self._tasks:
            return
        if self.up:
            try:
                for member in list(self._members.values()):
                    await member.renew()
            except RedisDown as exc:
                self.down(exc)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._maintain()), loop.create_task(self._listen())]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.redis.aclose()

    # ------------------------------------------------------------ up and down

    def down(self, exc: BaseException) -> None:
        """Redis failed a call: every provider falls back to its local share now.

        Applied every time (it is idempotent), not only on the change: a provider
        that rejoined while another's rejoin failed must fall back again too."""
        if self._closed:
            return
        shares = {m.provider_id: m.enter_fallback() for m in self._members.values()}
        if not self.up:
            return
        self.up = False
        log.warning(
            "cluster_fallback",
            detail="Redis unreachable: each provider admits at most its local share "
            "(ceil(limit / replicas last seen)) until Redis is back",
            local_limits=shares,
            error=str(exc),
        )

    async def _rejoin(self) -> bool:
        # Connections pooled before the outage may be dead ones the server closed
        # (a restart); used after the rejoin, each would fail a call and flip this
        # replica back to fallback. Start over with fresh ones.
        await self.redis.connection_pool.disconnect(inuse_connections=False)
        try:
            await self.ping()
            for member in list(self._members.values()):
                await member.rejoin()
        except RedisDown:
            return False
        self.up = True
        log.warning("cluster_rejoined", detail="Redis reachable again: shared admission resumed")
        return True

    async def ping(self) -> None:
        try:
            await self.redis.ping()
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            raise RedisDown(str(exc)) from exc

    # ------------------------------------------------------------ background

    async def _maintain(self) -> None:
        """Renew leases and heartbeats while up; probe for Redis while down."""
        while True:
            if self.up:
                await asyncio.sleep(self.renew_interval_s)
                try:
                    for member in list(self._members.values()):
                        await member.renew()
                except RedisDown as exc:
                    self.down(exc)
                except Exception:
                    log.exception("cluster renewal failed")
            else:
                await asyncio.sleep(PROBE_S)
                await self._rejoin()

    async def _listen(self) -> None:
        """Deliver wake-ups. Messages lost while the subscription was down are covered
        by a re-check of every provider after each (re)subscription, and by the timed
        re-checks each provider keeps while it has waiters."""
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*self._members)
                for member in list(self._members.values()):
                    member.on_message("w 0")
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    target = self._members.get(str(message["channel"]))
                    if target is not None:
                        target.on_message(str(message["data"]))
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
                try:
                    await self.ping()
                except RedisDown:
                    self.down(exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
            await asyncio.sleep(PROBE_S)
