"""The Lua scripts that make every cluster-wide admission decision, one atomic call each.

Redis runs a script start to finish with nothing interleaved, and every script reads
the time with `TIME`, so all replicas decide on one clock and one state. The Python
side never reads a shared value and writes it back in a second call.

Keys of one provider (all share the hash tag `{id}`, so they sit in one Redis Cluster
slot and one script may touch them all):

- `state` (hash): `limit` ("" = none), `cooldown_ms`, `epoch` (bumped by every limit
  change; a permit remembers its epoch), `paused_until` (ms), `auto_reduced`,
  `auto_reduced_from`, and the config file's values when they were last applied
  (`limit_basis`, `cooldown_basis`).
- `leases` (zset): a running slot -> its lease expiry (ms). Only unexpired leases
  count, so a crashed replica's slots come back when their leases run out.
- `cooling` (zset): a released slot -> the time it is recycled (`cooldown_ms`).
- `queue` (zset): a waiter -> its prompt start time (ms). Equal scores sort by
  member, and a member starts with a zero-padded global `seq` number, so ties go in
  arrival order. A member is `tie|instance|local id`.
- `alive` (zset): a waiter -> its liveness expiry, renewed by its replica. A waiter
  whose replica died is dropped when it reaches the head, so it never blocks the line.
- `gate` (string): the usage gate's verdict, `one` (admit one waiter) or `noinfo`.
- `instances` (zset): replica -> heartbeat expiry; its size is "replicas last seen".
- `seq` (counter), `usage` (last `/usage` answer), `poll` (the cluster's poll lock).
- `meta:<waiter>` (string, expiring): what the queue listing shows of a waiter (prompt
  source, conversation, client, when it was queued), written by its replica once it
  waits; it expires `queue_timeout_s + lease_s` later, so it outlives no waiter long.
- `rate:<instance>` (string, expiring): a replica's measured admissions per second,
  shared for the Retry-After of refusals; it expires with the replica's heartbeat.

Wake-ups go out on the provider's channel: `w <delay ms>` (a slot frees, now or after
the cooldown) and `s <state>` (limit, cooldown, epoch, ... changed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

KEY_NAMES: Final = (
    "state",
    "leases",
    "cooling",
    "queue",
    "alive",
    "gate",
    "instances",
    "seq",
    "usage",
    "poll",
)


def keys_for(provider_id: str) -> list[str]:
    return [f"sluice:{{{provider_id}}}:{name}" for name in KEY_NAMES]


def channel_for(provider_id: str) -> str:
    return f"sluice:{{{provider_id}}}:wake"


class RedisDown(Exception):
    """Redis could not be reached (or answered read-only): the caller falls back."""


class NoState(Exception):
    """The provider's state is missing (Redis restarted empty or was flushed)."""


# Shared by every script: names, the clock, and the grant loop. KEYS[1] is the state
# key; the other keys' names follow from it (one hash tag, so one Redis Cluster slot:
# the call routes by KEYS[1] and every key it touches lives on that node). Passing
# one name instead of ten halves what the client encodes per call. ARGV[1..2] are
# always this replica's instance id and the lease length in ms.
_COMMON = r"""
local P = string.sub(KEYS[1], 1, -6)  -- 'sluice:{id}:' (KEYS[1] ends in 'state')
local K_STATE, K_LEASES, K_COOLING, K_QUEUE = KEYS[1], P .. 'leases', P .. 'cooling', P .. 'queue'
local K_ALIVE, K_GATE, K_INSTANCES, K_SEQ = P .. 'alive', P .. 'gate', P .. 'instances', P .. 'seq'
local K_USAGE, K_POLL, CHANNEL = P .. 'usage', P .. 'poll', P .. 'wake'
local INSTANCE, LEASE_MS = ARGV[1], tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function ms(x) return string.format('%d', x) end
local AFTER_NOW = string.format('(%d', now)

local function owner(member) return string.match(member, '^[^|]*|([^|]*)|') end

local function load_state()
  local v = redis.call('HMGET', K_STATE, 'limit', 'cooldown_ms', 'epoch', 'paused_until',
    'auto_reduced', 'auto_reduced_from')
  return {limit = tonumber(v[1]), cooldown = tonumber(v[2]) or 0, epoch = tonumber(v[3]) or 0,
    paused_until = tonumber(v[4]) or 0, auto_reduced = v[5] == '1',
    auto_reduced_from = tonumber(v[6])}
end

local function state_reply(st)
  return {st.limit or -1, st.cooldown, st.epoch, st.auto_reduced and 1 or 0,
    st.auto_reduced_from or -1, math.max(0, st.paused_until - now)}
end

local function publish_state(st)
  redis.call('PUBLISH', CHANNEL, 's ' .. table.concat(state_reply(st), ' '))
end

-- Slots in use: unexpired leases plus slots still cooling down.
local function in_use()
  redis.call('ZREMRANGEBYSCORE', K_COOLING, '-inf', now)
  return redis.call('ZCOUNT', K_LEASES, AFTER_NOW, '+inf') + redis.call('ZCARD', K_COOLING)
end

-- When the next slot comes back: the earliest recycle or lease expiry (-1: unknown).
local function next_free_ms()
  local best = -1
  local c = redis.call('ZRANGE', K_COOLING, 0, 0, 'WITHSCORES')
  if c[2] then best = tonumber(c[2]) - now end
  local l = redis.call('ZRANGEBYSCORE', K_LEASES, AFTER_NOW, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if l[2] then
    local d = tonumber(l[2]) - now
    if best < 0 or d < best then best = d end
  end
  return best
end

-- The first live waiter. Dead ones (their replica stopped renewing them) are
-- dropped here, so a crashed replica's waiters cannot block the line.
local function live_head()
  local dropped = 0
  while true do
    local h = redis.call('ZRANGE', K_QUEUE, 0, 0)[1]
    if not h then return nil, dropped end
    local alive = tonumber(redis.call('ZSCORE', K_ALIVE, h))
    if alive and alive > now then return h, dropped end
    redis.call('ZREM', K_QUEUE, h)
    redis.call('ZREM', K_ALIVE, h)
    dropped = dropped + 1
  end
end

-- Admit this replica's waiters while the global head is one of them and the rules
-- allow; a replica never admits another's waiter, it only wakes it.
local function pump(st, gated, poll_lock_ms)
  local granted = {}
  local used = in_use()
  local code, next_ms, dropped = 'idle', -1, 0
  while true do
    local h, d = live_head()
    dropped = dropped + d
    if not h then
      redis.call('DEL', K_GATE)
      code = 'idle'
      break
    end
    if now < st.paused_until then
      redis.call('DEL', K_GATE)
      code, next_ms = 'paused', st.paused_until - now
      break
    end
    if st.limit and used >= st.limit then
      redis.call('DEL', K_GATE)  -- the slot that frees up polls afresh
      code, next_ms = 'full', next_free_ms()
      break
    end
    if owner(h) ~= INSTANCE then
      code, next_ms = 'other', tonumber(redis.call('ZSCORE', K_ALIVE, h)) - now
      break
    end
    if gated and st.limit then
      local g = redis.call('GET', K_GATE)
      if not g then
        -- One poll of /usage at a time for the whole cluster: whoever takes the lock polls.
        if redis.call('SET', K_POLL, INSTANCE, 'NX', 'PX', poll_lock_ms) then
          code = 'poll'
        else
          code, next_ms = 'pollwait', redis.call('PTTL', K_POLL)
        end
        break
      end
      if g == 'one' then redis.call('DEL', K_GATE) end  -- one waiter per successful poll
    end
    redis.call('ZREM', K_QUEUE, h)
    redis.call('ZREM', K_ALIVE, h)
    redis.call('ZADD', K_LEASES, ms(now + LEASE_MS), h)
    used = used + 1
    granted[#granted + 1] = h
  end
  -- The head changed and now belongs to another replica with a slot free: its turn.
  -- (Only on a change, so two replicas can never wake each other in a loop.)
  if code == 'other' and (#granted > 0 or dropped > 0) then
    redis.call('PUBLISH', CHANNEL, 'w 0')
  end
  return {code, next_ms, granted}
end

local function pump_reply(kind, detail, st, p)
  return {kind, detail, state_reply(st), p[1], p[2], p[3]}
end

local function release(st, lease)
  if redis.call('ZREM', K_LEASES, lease) == 1 then
    local cooldown = 0
    if st.limit and st.cooldown > 0 then
      cooldown = st.cooldown
      redis.call('ZADD', K_COOLING, ms(now + cooldown), lease)
    end
    if redis.call('ZCARD', K_QUEUE) > 0 then
      redis.call('PUBLISH', CHANNEL, 'w ' .. ms(cooldown))
    end
  end
end
"""

_NOSTATE = "if redis.call('EXISTS', K_STATE) == 0 then return {'nostate'} end\n"

# ARGV[3] prompt start (ms, as sent), [4] tie or "", [5] local id, [6] max_queue,
# [7] gated, [8] poll lock ms.
_ADMIT = (
    _NOSTATE
    + r"""
local st = load_state()
local head = live_head()
local tie = ARGV[4]
if tie == '' then tie = string.format('%016d', redis.call('INCR', K_SEQ)) end
local member = tie .. '|' .. INSTANCE .. '|' .. ARGV[5]
-- The fast path: nobody waits anywhere, not paused, a slot free. It refuses while
-- anyone waits on any replica, so no newcomer overtakes the global line.
if not head and now >= st.paused_until and (not st.limit or in_use() < st.limit) then
  redis.call('ZADD', K_LEASES, ms(now + LEASE_MS), member)
  return {'admitted', member, state_reply(st)}
end
if redis.call('ZCOUNT', K_ALIVE, AFTER_NOW, '+inf') >= tonumber(ARGV[6]) then
  return {'queue_full', member, state_reply(st)}
end
redis.call('ZADD', K_QUEUE, ARGV[3], member)
redis.call('ZADD', K_ALIVE, ms(now + LEASE_MS), member)
return pump_reply('queued', member, st, pump(st, ARGV[7] == '1', ARGV[8]))
"""
)

# ARGV[3] gated, [4] poll lock ms.
_PUMP = (
    _NOSTATE
    + r"""
local st = load_state()
return pump_reply('pumped', '', st, pump(st, ARGV[3] == '1', ARGV[4]))
"""
)

# ARGV[3] lease, [4] gated, [5] poll lock ms.
_RELEASE = (
    _NOSTATE
    + r"""
local st = load_state()
release(st, ARGV[3])
return pump_reply('released', '', st, pump(st, ARGV[4] == '1', ARGV[5]))
"""
)

# ARGV[3] member, [4] gated, [5] poll lock ms.
_LEAVE = (
    _NOSTATE
    + r"""
local st = load_state()
local was_head = redis.call('ZRANK', K_QUEUE, ARGV[3]) == 0
redis.call('ZREM', K_QUEUE, ARGV[3])
redis.call('ZREM', K_ALIVE, ARGV[3])
if was_head and redis.call('ZCARD', K_QUEUE) > 0 then redis.call('PUBLISH', CHANNEL, 'w 0') end
return pump_reply('left', '', st, pump(st, ARGV[4] == '1', ARGV[5]))
"""
)

# ARGV[3] lease, [4] the permit's limit epoch, [5] pause ms, [6] gated, [7] poll lock ms.
_RATE_LIMITED = (
    _NOSTATE
    + r"""
local st = load_state()
local extended, reduced, before = 0, 0, st.limit or -1
local until_ms = now + tonumber(ARGV[5])
if until_ms > st.paused_until then  -- a new 429 extends a pause, never shortens it
  st.paused_until = until_ms
  redis.call('HSET', K_STATE, 'paused_until', ms(until_ms))
  extended = 1
end
-- A 429 for a slot admitted before the last limit change is the overshoot that
-- change already answered: several replicas' 429s cost one step, not one each.
if st.limit and st.limit > 1 and tonumber(ARGV[4]) == st.epoch then
  if not st.auto_reduced then st.auto_reduced_from = st.limit end
  st.auto_reduced, st.limit, st.epoch = true, st.limit - 1, st.epoch + 1
  redis.call('HSET', K_STATE, 'limit', ms(st.limit), 'auto_reduced', '1',
    'auto_reduced_from', ms(st.auto_reduced_from), 'epoch', ms(st.epoch))
  reduced = 1
end
if extended == 1 or reduced == 1 then publish_state(st) end
-- Release last: the pause is already in force, so the slot does not go to a waiter.
release(st, ARGV[3])
return pump_reply('rate_limited', extended .. ' ' .. reduced .. ' ' .. before, st,
  pump(st, ARGV[6] == '1', ARGV[7]))
"""
)

# ARGV[3] sessions or "" (no information), [4] poll interval ms, [5] gated, [6] lock ms.
_USAGE = (
    _NOSTATE
    + r"""
local st = load_state()
local sessions = tonumber(ARGV[3])
local mine = redis.call('GET', K_POLL) == INSTANCE
local result
if sessions then redis.call('SET', K_USAGE, ARGV[3], 'PX', 600000) end
if not sessions or not st.limit then
  redis.call('SET', K_GATE, 'noinfo', 'PX', LEASE_MS)  -- admit as if there were no gate
  result = 'no_info'
elseif sessions < st.limit then
  redis.call('SET', K_GATE, 'one', 'PX', LEASE_MS)  -- room: one waiter, cluster-wide
  result = 'room'
else
  result = 'full'
end
if result == 'full' then
  redis.call('SET', K_POLL, INSTANCE, 'PX', ARGV[4])  -- nobody polls again within the interval
else
  if mine then redis.call('DEL', K_POLL) end
  redis.call('PUBLISH', CHANNEL, 'w 0')  -- the head may be another replica's by now
end
return pump_reply(result, '', st, pump(st, ARGV[5] == '1', ARGV[6]))
"""
)

# ARGV[3] force (re-add what is missing), [4] n leases, then the leases, then
# (waiter, prompt) pairs.
_RENEW = (
    _NOSTATE
    + r"""
local force, n = ARGV[3] == '1', tonumber(ARGV[4])
local until_ms = ms(now + LEASE_MS)
local missing_leases, missing_waiters = {}, {}
for i = 5, 4 + n do
  if force or redis.call('ZSCORE', K_LEASES, ARGV[i]) then
    redis.call('ZADD', K_LEASES, until_ms, ARGV[i])
  else
    missing_leases[#missing_leases + 1] = ARGV[i]
  end
end
for i = 5 + n, #ARGV, 2 do
  if force then
    redis.call('ZADD', K_QUEUE, ARGV[i + 1], ARGV[i])
    redis.call('ZADD', K_ALIVE, until_ms, ARGV[i])
  elseif redis.call('ZSCORE', K_ALIVE, ARGV[i]) then
    redis.call('ZADD', K_ALIVE, until_ms, ARGV[i])
  else
    missing_waiters[#missing_waiters + 1] = ARGV[i]
  end
end
redis.call('ZADD', K_INSTANCES, until_ms, INSTANCE)
redis.call('ZREMRANGEBYSCORE', K_INSTANCES, '-inf', now)
-- Leases nobody renewed any more: those slots stopped counting when they expired;
-- drop them now and report them once (the caller journals slot_reclaimed).
local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now)
for _, m in ipairs(expired) do redis.call('ZREM', K_LEASES, m) end
local dead = redis.call('ZRANGEBYSCORE', K_ALIVE, '-inf', now)
for _, m in ipairs(dead) do
  redis.call('ZREM', K_QUEUE, m)
  redis.call('ZREM', K_ALIVE, m)
end
if (#expired > 0 or #dead > 0) and redis.call('ZCARD', K_QUEUE) > 0 then
  redis.call('PUBLISH', CHANNEL, 'w 0')
end
return {'renewed', redis.call('ZCARD', K_INSTANCES), state_reply(load_state()),
  missing_leases, missing_waiters, expired}
"""
)

_STATUS = (
    _NOSTATE
    + r"""
local st = load_state()
redis.call('ZREMRANGEBYSCORE', K_COOLING, '-inf', now)
local per, rows = {}, {}
local function count(members, i)
  for _, m in ipairs(members) do
    local o = owner(m) or '?'
    per[o] = per[o] or {0, 0, 0}
    per[o][i] = per[o][i] + 1
  end
  return #members
end
local running = count(redis.call('ZRANGEBYSCORE', K_LEASES, AFTER_NOW, '+inf'), 1)
local cooling = count(redis.call('ZRANGE', K_COOLING, 0, -1), 2)
local queued = count(redis.call('ZRANGEBYSCORE', K_ALIVE, AFTER_NOW, '+inf'), 3)
for _, inst in ipairs(redis.call('ZRANGEBYSCORE', K_INSTANCES, AFTER_NOW, '+inf')) do
  per[inst] = per[inst] or {0, 0, 0}
end
for inst, c in pairs(per) do rows[#rows + 1] = {inst, c[1], c[2], c[3]} end
return {'status', redis.call('GET', K_USAGE) or '', state_reply(st), running, cooling, queued,
  rows}
"""
)

# ARGV[3] limit or "".
_SET_LIMIT = (
    _NOSTATE
    + r"""
local st = load_state()
redis.call('HSET', K_STATE, 'limit', ARGV[3], 'auto_reduced', '0', 'auto_reduced_from', '',
  'epoch', ms(st.epoch + 1))
st = load_state()
publish_state(st)  -- every replica at once; a raise wakes their waiters
return {'ok', '', state_reply(st)}
"""
)

# ARGV[3] cooldown ms.
_SET_COOLDOWN = (
    _NOSTATE
    + r"""
redis.call('HSET', K_STATE, 'cooldown_ms', ARGV[3])
local st = load_state()
publish_state(st)
return {'ok', '', state_reply(st)}
"""
)

# ARGV[3] the config file's limit or "", [4] its cooldown_ms.
_INIT = r"""
local limit_src, cooldown_src = 'redis', 'redis'
if redis.call('EXISTS', K_STATE) == 0 then
  redis.call('HSET', K_STATE, 'limit', ARGV[3], 'cooldown_ms', ARGV[4], 'epoch', '1',
    'paused_until', '0', 'auto_reduced', '0', 'auto_reduced_from', '',
    'limit_basis', ARGV[3], 'cooldown_basis', ARGV[4])
  limit_src, cooldown_src = 'config', 'config'
else
  -- The config file changed since the shared value was written: the operator's
  -- newer intent wins, as in single-process mode.
  if redis.call('HGET', K_STATE, 'limit_basis') ~= ARGV[3] then
    local st = load_state()
    redis.call('HSET', K_STATE, 'limit', ARGV[3], 'auto_reduced', '0',
      'auto_reduced_from', '', 'limit_basis', ARGV[3], 'epoch', ms(st.epoch + 1))
    limit_src = 'config (changed since the stored value)'
  end
  if redis.call('HGET', K_STATE, 'cooldown_basis') ~= ARGV[4] then
    redis.call('HSET', K_STATE, 'cooldown_ms', ARGV[4], 'cooldown_basis', ARGV[4])
    cooldown_src = 'config (changed since the stored value)'
  end
end
local st = load_state()
if limit_src ~= 'redis' or cooldown_src ~= 'redis' then publish_state(st) end
return {'ok', limit_src .. '|' .. cooldown_src, state_reply(st)}
"""

# ARGV[3..9] the state to seed if Redis lost it: limit, cooldown_ms, auto_reduced,
# auto_reduced_from, epoch, limit_basis, cooldown_basis; [10] n, then the leases this
# replica holds.
_REJOIN = r"""
local seeded = '0'
if redis.call('EXISTS', K_STATE) == 0 then
  redis.call('HSET', K_STATE, 'limit', ARGV[3], 'cooldown_ms', ARGV[4], 'auto_reduced', ARGV[5],
    'auto_reduced_from', ARGV[6], 'epoch', ARGV[7], 'paused_until', '0',
    'limit_basis', ARGV[8], 'cooldown_basis', ARGV[9])
  seeded = '1'
end
-- Forget what this replica left behind while it could not reach Redis (slots it has
-- released since, waiters now queued locally), then count the slots it still holds.
local held = {}
for i = 11, 10 + tonumber(ARGV[10]) do held[ARGV[i]] = true end
for _, m in ipairs(redis.call('ZRANGE', K_LEASES, 0, -1)) do
  if owner(m) == INSTANCE and not held[m] then redis.call('ZREM', K_LEASES, m) end
end
for _, m in ipairs(redis.call('ZRANGE', K_QUEUE, 0, -1)) do
  if owner(m) == INSTANCE then
    redis.call('ZREM', K_QUEUE, m)
    redis.call('ZREM', K_ALIVE, m)
  end
end
local until_ms = ms(now + LEASE_MS)
for m in pairs(held) do redis.call('ZADD', K_LEASES, until_ms, m) end
redis.call('ZADD', K_INSTANCES, until_ms, INSTANCE)
redis.call('ZREMRANGEBYSCORE', K_INSTANCES, '-inf', now)
if redis.call('ZCARD', K_QUEUE) > 0 then redis.call('PUBLISH', CHANNEL, 'w 0') end
return {'ok', seeded, state_reply(load_state()), redis.call('ZCARD', K_INSTANCES)}
"""

# ARGV[3] offset, [4] limit: the live waiters in admission order, with their metadata.
_QUEUE = (
    _NOSTATE
    + r"""
local offset, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local out, seen = {}, 0
local members = redis.call('ZRANGE', K_QUEUE, 0, -1, 'WITHSCORES')
for i = 1, #members, 2 do
  local m = members[i]
  local alive = tonumber(redis.call('ZSCORE', K_ALIVE, m))
  if alive and alive > now then
    seen = seen + 1
    if seen > offset then
      out[#out + 1] = {m, members[i + 1], redis.call('GET', P .. 'meta:' .. m) or ''}
      if #out >= limit then break end
    end
  end
end
return {'queue', out}
"""
)

_GOODBYE = r"""
redis.call('ZREM', K_INSTANCES, INSTANCE)
return {'ok'}
"""


@dataclass(frozen=True)
class Shared:
    """The provider's shared state as a script saw it."""

    limit: int | None
    cooldown_ms: int
    epoch: int
    auto_reduced: bool
    auto_reduced_from: int | None
    paused_ms: int  # the rest of the pause, 0 when not paused

    @classmethod
    def parse(cls, raw: Sequence[Any]) -> Shared:
        limit, cooldown, epoch, auto_reduced, auto_from, paused = (int(x) for x in raw)
        return cls(
            limit=None if limit < 0 else limit,
            cooldown_ms=cooldown,
            epoch=epoch,
            auto_reduced=bool(auto_reduced),
            auto_reduced_from=None if auto_from < 0 else auto_from,
            paused_ms=paused,
        )


@dataclass(frozen=True)
class Pump:
    """What the grant loop did for the calling replica.

    `code` says why it stopped: `idle` (nobody waits), `paused`, `full`, `other` (the
    head is another replica's), `poll` (this replica holds the poll lock: poll
    `/usage` now), `pollwait` (someone else polled or is polling). `next_ms` is when a
    re-check makes sense (-1: no hint)."""

    code: str
    next_ms: int
    granted: tuple[str, ...]


@dataclass(frozen=True)
class Reply:
    kind: str
    detail: str
    state: Shared
    pump: Pump | None

    @classmethod
    def parse(cls, raw: Sequence[Any]) -> Reply:
        if raw[0] == "nostate":
            raise NoState
        pump = None
        if len(raw) > 3:
            pump = Pump(str(raw[3]), int(raw[4]), tuple(str(m) for m in raw[5]))
        return cls(str(raw[0]), str(raw[1] or ""), Shared.parse(raw[2]), pump)


@dataclass(frozen=True)
class Renewal:
    replicas: int
    state: Shared
    missing_leases: tuple[str, ...]
    missing_waiters: tuple[str, ...]
    expired: tuple[str, ...]  # other replicas' leases this call dropped


@dataclass(frozen=True)
class InstanceRow:
    instance_id: str
    running: int
    cooling: int
    queued: int


@dataclass(frozen=True)
class Census:
    """Cluster-wide figures plus the per-replica breakdown."""

    state: Shared
    running: int
    cooling: int
    queued: int
    upstream_sessions: int | None
    instances: tuple[InstanceRow, ...]


_DOWN: Final = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    OSError,
)


def owner(member: str) -> str:
    """The instance id inside a lease or waiter member (`tie|instance|local`)."""
    return member.split("|", 2)[1] if member.count("|") >= 2 else "?"


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


class Scripts:
    """The scripts of one provider, bound to one Redis client and one replica.

    Every method is one round trip. Connection failures become `RedisDown` here, at
    the boundary; a missing state becomes `NoState`."""

    def __init__(self, client: Redis, provider_id: str, instance_id: str, lease_ms: int) -> None:
        self.keys = keys_for(provider_id)
        self.channel = channel_for(provider_id)
        self._client = client
        self._prefix = self.keys[0].removesuffix("state")  # 'sluice:{id}:'
        self._key = [self.keys[0]]  # the state key: the scripts derive the others
        self._head = [instance_id, str(lease_ms)]
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(_COMMON + body)
            for name, body in (
                ("admit", _ADMIT),
                ("pump", _PUMP),
                ("release", _RELEASE),
                ("leave", _LEAVE),
                ("rate_limited", _RATE_LIMITED),
                ("usage", _USAGE),
                ("renew", _RENEW),
                ("status", _STATUS),
                ("set_limit", _SET_LIMIT),
                ("set_cooldown", _SET_COOLDOWN),
                ("init", _INIT),
                ("rejoin", _REJOIN),
                ("queue", _QUEUE),
                ("goodbye", _GOODBYE),
            )
        }

    async def _run(self, name: str, *args: str | int) -> Any:
        try:
            return await self._scripts[name](keys=self._key, args=[*self._head, *args])
        except _DOWN as exc:
            raise RedisDown(str(exc) or type(exc).__name__) from exc

    async def admit(
        self,
        prompt_ms: float,
        tie: str,
        local_id: str,
        *,
        max_queue: int,
        gated: bool,
        poll_lock_ms: int,
    ) -> Reply:
        return Reply.parse(
            await self._run(
                "admit", repr(prompt_ms), tie, local_id, max_queue, int(gated), poll_lock_ms
            )
        )

    async def pump(self, *, gated: bool, poll_lock_ms: int) -> Reply:
        return Reply.parse(await self._run("pump", int(gated), poll_lock_ms))

    async def release(self, lease: str, *, gated: bool, poll_lock_ms: int) -> Reply:
        return Reply.parse(await self._run("release", lease, int(gated), poll_lock_ms))

    async def leave(self, member: str, *, gated: bool, poll_lock_ms: int) -> Reply:
        return Reply.parse(await self._run("leave", member, int(gated), poll_lock_ms))

    async def rate_limited(
        self, lease: str, epoch: int, pause_ms: int, *, gated: bool, poll_lock_ms: int
    ) -> Reply:
        return Reply.parse(
            await self._run("rate_limited", lease, epoch, pause_ms, int(gated), poll_lock_ms)
        )

    async def usage(
        self, sessions: int | None, *, interval_ms: int, gated: bool, poll_lock_ms: int
    ) -> Reply:
        return Reply.parse(
            await self._run("usage", _opt(sessions), interval_ms, int(gated), poll_lock_ms)
        )

    async def renew(
        self, leases: Sequence[str], waiters: Sequence[tuple[str, float]], *, force: bool = False
    ) -> Renewal:
        pairs = [x for member, prompt in waiters for x in (member, repr(prompt))]
        raw = await self._run("renew", int(force), len(leases), *leases, *pairs)
        if raw[0] == "nostate":
            raise NoState
        return Renewal(
            replicas=int(raw[1]),
            state=Shared.parse(raw[2]),
            missing_leases=tuple(raw[3]),
            missing_waiters=tuple(raw[4]),
            expired=tuple(raw[5]),
        )

    async def status(self) -> Census:
        raw = await self._run("status")
        if raw[0] == "nostate":
            raise NoState
        usage = str(raw[1] or "")
        rows = sorted(
            (InstanceRow(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in raw[6]),
            key=lambda row: row.instance_id,
        )
        return Census(
            state=Shared.parse(raw[2]),
            running=int(raw[3]),
            cooling=int(raw[4]),
            queued=int(raw[5]),
            upstream_sessions=int(usage) if usage.isdigit() else None,
            instances=tuple(rows),
        )

    async def set_limit(self, limit: int | None) -> Shared:
        return Reply.parse(await self._run("set_limit", _opt(limit))).state

    async def set_cooldown(self, cooldown_ms: int) -> Shared:
        return Reply.parse(await self._run("set_cooldown", cooldown_ms)).state

    async def init(self, limit: int | None, cooldown_ms: int) -> tuple[str, str, Shared]:
        """Create the state from the config file, or keep Redis's unless the config
        changed since; returns where the limit and the cooldown came from."""
        reply = Reply.parse(await self._run("init", _opt(limit), cooldown_ms))
        limit_source, _, cooldown_source = reply.detail.partition("|")
        return limit_source, cooldown_source, reply.state

    async def rejoin(
        self,
        seed: Shared,
        basis: tuple[int | None, int],
        leases: Sequence[str],
    ) -> tuple[bool, Shared, int]:
        """Seed the state if Redis lost it, drop this replica's stale entries, register
        the slots it holds. Returns (seeded, state, replicas)."""
        raw = await self._run(
            "rejoin",
            _opt(seed.limit),
            seed.cooldown_ms,
            int(seed.auto_reduced),
            _opt(seed.auto_reduced_from),
            seed.epoch,
            _opt(basis[0]),
            basis[1],
            len(leases),
            *leases,
        )
        return raw[1] == "1", Shared.parse(raw[2]), int(raw[3])

    async def goodbye(self) -> None:
        await self._run("goodbye")

    # ------------------------------------------------ the queue listing and its estimates

    async def queue(self, offset: int, limit: int) -> list[tuple[str, float, str]]:
        """(member, prompt start ms, metadata or "") of the live waiters from place
        `offset + 1` on, at most `limit`, in admission order."""
        raw = await self._run("queue", offset, limit)
        if raw[0] == "nostate":
            raise NoState
        return [(str(m), float(score), str(meta or "")) for m, score, meta in raw[1]]

    async def rank(self, member: str) -> int | None:
        """A waiter's 0-based place in the shared line (waiters whose replica died
        count until they are dropped, within `lease_s`), or None if it is not there."""
        try:
            rank = await self._client.zrank(self.keys[3], member)
        except _DOWN as exc:
            raise RedisDown(str(exc) or type(exc).__name__) from exc
        return rank if isinstance(rank, int) else None

    async def note(self, member: str, meta: str, ttl_ms: int) -> None:
        """Store what the queue listing shows of a waiter, expiring after `ttl_ms`."""
        try:
            await self._client.set(self._prefix + "meta:" + member, meta, px=ttl_ms)
        except _DOWN as exc:
            raise RedisDown(str(exc) or type(exc).__name__) from exc

    async def share_rate(
        self, instance_id: str, per_s: float, ttl_ms: int, others: Sequence[str]
    ) -> float:
        """Publish this replica's admission rate (expiring after `ttl_ms`) and return
        the sum of `others`' published rates."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.set(self._prefix + "rate:" + instance_id, repr(per_s), px=ttl_ms)
                pipe.mget([self._prefix + "rate:" + other for other in others] or ["-"])
                _, rates = await pipe.execute()
        except _DOWN as exc:
            raise RedisDown(str(exc) or type(exc).__name__) from exc
        total = 0.0
        for rate in rates if others else ():
            with contextlib.suppress(TypeError, ValueError):
                total += float(rate)
        return total
