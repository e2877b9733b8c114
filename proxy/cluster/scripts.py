"""The Lua scripts that make every cluster-wide admission decision, one atomic call each.

Redis runs a script start to finish with nothing interleaved, and every script reads
the time with `TIME`, so all replicas decide on one clock and one state. The Python
side never reads a shared value and writes it back in a second call.

Keys of one provider (all share the hash tag `{id}`, so they sit in one Redis Cluster
slot and one script may touch them all):

- `state` (hash): `limit` ("" = none), `cooldown_ms`, `epoch` (bumped by every limit
  change; a permit remembers its epoch), `paused_until` (ms), `auto_reduced`,
  `auto_reduced_from`, and the config file's values when they were last applied
  (`limit_basis`, `cooldown_basis`). Restore (`restore_after_s`): `restore_window`
  (ms, when doubled), `restore_quiet` (demand ms summed since the last 429 or step
  up), `restore_tick` (the last sample), `raised_at` (the last step up, ms).
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
- `seq` (counter), `usage` (last `/usage` answer), `poll` (the cluster's poll lock),
  `restore` (the lock of the one replica that samples demand and restores).
- Client shares, only with `[[clients]]`: `wclient` (hash) a waiter or lease -> its
  client id; `caps` (hash) a capped client -> its `max_in_flight`
  (written by every enqueue, from the replica's config); per capped client `cq:<id>`
  (zset) its waiters -> prompt start and `cl:<id>` (zset) its leases -> expiry; `turn`
  (hash) a capped client -> the one waiter of it that stands in `queue`.

A capped client's waiters wait in `cq:<id>`, and `queue` holds only the oldest of them,
and only while the client is under its cap (fewer unexpired leases in `cl:<id>` than
its cap): as in the single-process limiter, `queue` holds exactly the waiters that may
go next, so its head is the one to admit and nothing scans past capped waiters.

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
from collections.abc import Mapping, Sequence
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
    "restore",
    "wclient",
    "caps",
    "turn",
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
local K_USAGE, K_POLL, K_RESTORE, CHANNEL = P .. 'usage', P .. 'poll', P .. 'restore', P .. 'wake'
local K_WCLIENT, K_CAPS, K_TURN = P .. 'wclient', P .. 'caps', P .. 'turn'
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

-- Client shares: a capped client's own line and its leases.
local function cq(c) return P .. 'cq:' .. c end
local function cl(c) return P .. 'cl:' .. c end

local function running_of(c) return redis.call('ZCOUNT', cl(c), AFTER_NOW, '+inf') end

-- Put capped client c in the line at its oldest waiter's place if it is under its
-- cap, or take it out; true if it got a turn it did not have.
local function sync(c)
  local cap = tonumber(redis.call('HGET', K_CAPS, c))
  local want = nil
  if cap and running_of(c) < cap then want = redis.call('ZRANGE', cq(c), 0, 0)[1] end
  local have = redis.call('HGET', K_TURN, c) or nil
  if want == have then return false end
  if have then redis.call('ZREM', K_QUEUE, have) end
  if not want then
    redis.call('HDEL', K_TURN, c)
    return false
  end
  redis.call('ZADD', K_QUEUE, redis.call('ZSCORE', cq(c), want), want)
  redis.call('HSET', K_TURN, c, want)
  return true
end

-- A waiter leaves every line it is in (its client's turn moves on).
local function drop_waiter(m)
  redis.call('ZREM', K_QUEUE, m)
  redis.call('ZREM', K_ALIVE, m)
  local c = redis.call('HGET', K_WCLIENT, m)
  if c then
    redis.call('HDEL', K_WCLIENT, m)
    if redis.call('ZREM', cq(c), m) == 1 then sync(c) end
  end
end

-- A lease stops counting toward its client's cap; true if that gave the client a turn.
local function drop_client_lease(m)
  local c = redis.call('HGET', K_WCLIENT, m)
  if not c then return false end
  redis.call('HDEL', K_WCLIENT, m)
  return redis.call('ZREM', cl(c), m) == 1 and sync(c)
end

-- Tag a new lease with its client; a capped client's counts toward its cap.
local function client_lease(m, c, capped, until_ms)
  redis.call('HSET', K_WCLIENT, m, c)
  if capped then redis.call('ZADD', cl(c), until_ms, m) end
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
    drop_waiter(h)
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
    local c = redis.call('HGET', K_WCLIENT, h)
    if c and redis.call('ZSCORE', cq(c), h) then
      -- A capped client's turn: admit its oldest waiter, then move its turn on.
      redis.call('ZREM', cq(c), h)
      redis.call('HDEL', K_TURN, c)
      redis.call('ZADD', cl(c), ms(now + LEASE_MS), h)
    end
    redis.call('ZREM', K_QUEUE, h)
    redis.call('ZREM', K_ALIVE, h)
    redis.call('ZADD', K_LEASES, ms(now + LEASE_MS), h)
    if c then sync(c) end
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
  -- The client's cap frees at once: a cooling slot counts only toward the limit.
  local turn = drop_client_lease(lease)
  if redis.call('ZREM', K_LEASES, lease) == 1 then
    local cooldown = 0
    if st.limit and st.cooldown > 0 then
      cooldown = st.cooldown
      redis.call('ZADD', K_COOLING, ms(now + cooldown), lease)
    end
    if redis.call('ZCARD', K_QUEUE) > 0 then
      -- A client back under its cap may go now if another slot is free.
      redis.call('PUBLISH', CHANNEL, 'w ' .. (turn and '0' or ms(cooldown)))
    end
  end
end
"""

_NOSTATE = "if redis.call('EXISTS', K_STATE) == 0 then return {'nostate'} end\n"

# ARGV[3] prompt start (ms, as sent), [4] tie or "", [5] local id, [6] max_queue,
# [7] gated, [8] poll lock ms, [9] client id or "", [10] its max_in_flight or "".
_ADMIT = (
    _NOSTATE
    + r"""
local st = load_state()
local head = live_head()
local tie = ARGV[4]
if tie == '' then tie = string.format('%016d', redis.call('INCR', K_SEQ)) end
local member = tie .. '|' .. INSTANCE .. '|' .. ARGV[5]
local client, cap = ARGV[9], tonumber(ARGV[10])
if client == '' then client, cap = nil, nil end
if cap then redis.call('HSET', K_CAPS, client, ARGV[10]) end
-- The fast path: nobody who may go next waits anywhere, not paused, a slot free,
-- the client under its cap. It refuses while any such waiter waits on any replica,
-- so no newcomer overtakes the global line.
if not head and now >= st.paused_until and (not st.limit or in_use() < st.limit)
    and (not cap or running_of(client) < cap) then
  redis.call('ZADD', K_LEASES, ms(now + LEASE_MS), member)
  if client then client_lease(member, client, cap, ms(now + LEASE_MS)) end
  return {'admitted', member, state_reply(st)}
end
if redis.call('ZCOUNT', K_ALIVE, AFTER_NOW, '+inf') >= tonumber(ARGV[6]) then
  return {'queue_full', member, state_reply(st)}
end
redis.call('ZADD', K_ALIVE, ms(now + LEASE_MS), member)
if client then redis.call('HSET', K_WCLIENT, member, client) end
if cap then
  redis.call('ZADD', cq(client), ARGV[3], member)
  sync(client)
else
  redis.call('ZADD', K_QUEUE, ARGV[3], member)
end
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
drop_waiter(ARGV[3])
if was_head and redis.call('ZCARD', K_QUEUE) > 0 then redis.call('PUBLISH', CHANNEL, 'w 0') end
return pump_reply('left', '', st, pump(st, ARGV[4] == '1', ARGV[5]))
"""
)

# ARGV[3] lease, [4] the permit's limit epoch, [5] pause ms, [6] gated, [7] poll lock ms,
# [8] reduce (reduce_on_429's verdict, 1 or 0), [9] restore_after_s in ms, [10] the
# longest restore window in ms.
_RATE_LIMITED = (
    _NOSTATE
    + r"""
local st = load_state()
local reduce = ARGV[8] == '1'
local extended, reduced, before, undone = 0, 0, st.limit or -1, -1
local until_ms = now + tonumber(ARGV[5])
if until_ms > st.paused_until then  -- a new 429 extends a pause, never shortens it
  st.paused_until = until_ms
  redis.call('HSET', K_STATE, 'paused_until', ms(until_ms))
  extended = 1
end
-- Every 429 starts the restore window over; a reducing one within a window of a
-- step up undoes that step (whenever its slot was admitted) and doubles the window.
redis.call('HDEL', K_STATE, 'restore_quiet', 'restore_tick')
local window = tonumber(redis.call('HGET', K_STATE, 'restore_window')) or tonumber(ARGV[9])
local raised_at = tonumber(redis.call('HGET', K_STATE, 'raised_at'))
local undo = reduce and raised_at ~= nil and now - raised_at <= window
-- A 429 for a slot admitted before the last limit change is the overshoot that
-- change already answered: several replicas' 429s cost one step, not one each.
if reduce and st.limit and st.limit > 1 and (undo or tonumber(ARGV[4]) == st.epoch) then
  if undo then
    undone = window
    redis.call('HSET', K_STATE, 'restore_window', ms(math.min(window * 2, tonumber(ARGV[10]))))
    redis.call('HDEL', K_STATE, 'raised_at')
  end
  if not st.auto_reduced then st.auto_reduced_from = st.limit end
  st.auto_reduced, st.limit, st.epoch = true, st.limit - 1, st.epoch + 1
  redis.call('HSET', K_STATE, 'limit', ms(st.limit), 'auto_reduced', '1',
    'auto_reduced_from', ms(st.auto_reduced_from), 'epoch', ms(st.epoch))
  reduced = 1
end
if extended == 1 or reduced == 1 then publish_state(st) end
-- Release last: the pause is already in force, so the slot does not go to a waiter.
release(st, ARGV[3])
return pump_reply('rate_limited', extended .. ' ' .. reduced .. ' ' .. before .. ' ' .. undone,
  st, pump(st, ARGV[6] == '1', ARGV[7]))
"""
)

# ARGV[3] restore_after_s in ms, [4] the lock's life in ms, [5] the longest stretch
# between two samples that counts (ms). Run by every replica while auto-reduced;
# only the holder of the restore lock samples, so demand is summed once and the
# shared limit steps up once, whichever replicas run.
_RESTORE = (
    _NOSTATE
    + r"""
if not redis.call('SET', K_RESTORE, INSTANCE, 'NX', 'PX', ARGV[4]) then
  if redis.call('GET', K_RESTORE) ~= INSTANCE then
    return {'other', '', state_reply(load_state())}
  end
  redis.call('PEXPIRE', K_RESTORE, ARGV[4])
end
local st = load_state()
if not (st.auto_reduced and st.limit and st.auto_reduced_from
    and st.limit < st.auto_reduced_from) then
  redis.call('HDEL', K_STATE, 'restore_quiet', 'restore_tick')
  return {'idle', '', state_reply(st)}
end
local window = tonumber(redis.call('HGET', K_STATE, 'restore_window')) or tonumber(ARGV[3])
local quiet = tonumber(redis.call('HGET', K_STATE, 'restore_quiet')) or 0
local tick = tonumber(redis.call('HGET', K_STATE, 'restore_tick'))
-- Demand, from the shared census: someone waits on any replica, or every slot is in
-- use; never while paused. The stretch since the last sample counts if there is
-- demand now.
local demand = now >= st.paused_until
  and (redis.call('ZCOUNT', K_ALIVE, AFTER_NOW, '+inf') > 0 or in_use() >= st.limit)
if demand and tick then quiet = quiet + math.min(now - tick, tonumber(ARGV[5])) end
if quiet < window then
  redis.call('HSET', K_STATE, 'restore_quiet', ms(quiet), 'restore_tick', ms(now))
  return {'waiting', ms(quiet) .. ' ' .. ms(window), state_reply(st)}
end
local before = st.limit
st.limit, st.epoch = st.limit + 1, st.epoch + 1
local back = st.limit >= st.auto_reduced_from
if back then st.auto_reduced, st.auto_reduced_from = false, nil end
redis.call('HSET', K_STATE, 'limit', ms(st.limit), 'epoch', ms(st.epoch),
  'auto_reduced', back and '0' or '1', 'auto_reduced_from', back and '' or ms(st.auto_reduced_from),
  'raised_at', ms(now))
redis.call('HDEL', K_STATE, 'restore_quiet', 'restore_tick')
publish_state(st)  -- every replica at once; the raise wakes their waiters
return {'restored', before .. ' ' .. st.limit .. ' ' .. ms(window) .. ' ' .. (back and 1 or 0),
  state_reply(st)}
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

# ARGV[3] force (re-add what is missing), [4] n leases, [5] n waiters, then the
# leases, then (waiter, prompt) pairs, then (member, client, max_in_flight or "")
# triples for the leases and waiters that belong to a client.
_RENEW = (
    _NOSTATE
    + r"""
local force, n, w = ARGV[3] == '1', tonumber(ARGV[4]), tonumber(ARGV[5])
local until_ms = ms(now + LEASE_MS)
local missing_leases, missing_waiters = {}, {}
local clients, touched = {}, {}
for i = 6 + n + 2 * w, #ARGV, 3 do clients[ARGV[i]] = {ARGV[i + 1], tonumber(ARGV[i + 2])} end
for i = 6, 5 + n do
  local m = ARGV[i]
  if force or redis.call('ZSCORE', K_LEASES, m) then
    redis.call('ZADD', K_LEASES, until_ms, m)
    local c = redis.call('HGET', K_WCLIENT, m)
    if not c and force and clients[m] then  -- Redis lost the lease's client: tag it again
      c = clients[m][1]
      if clients[m][2] then redis.call('HSET', K_CAPS, c, clients[m][2]) end
      client_lease(m, c, clients[m][2], until_ms)
      touched[c] = true
    elseif c and redis.call('ZSCORE', cl(c), m) then
      redis.call('ZADD', cl(c), until_ms, m)  -- it counts toward the cap while it runs
      touched[c] = true
    end
  else
    missing_leases[#missing_leases + 1] = m
  end
end
for i = 6 + n, 5 + n + 2 * w, 2 do
  local m, info = ARGV[i], clients[ARGV[i]]
  if force then
    redis.call('ZADD', K_ALIVE, until_ms, m)
    if info then
      redis.call('HSET', K_WCLIENT, m, info[1])
      if info[2] then redis.call('HSET', K_CAPS, info[1], info[2]) end
    end
    if info and info[2] then
      redis.call('ZADD', cq(info[1]), ARGV[i + 1], m)
      touched[info[1]] = true
    else
      redis.call('ZADD', K_QUEUE, ARGV[i + 1], m)
    end
  elseif redis.call('ZSCORE', K_ALIVE, m) then
    redis.call('ZADD', K_ALIVE, until_ms, m)
  else
    missing_waiters[#missing_waiters + 1] = m
  end
end
for c in pairs(touched) do sync(c) end
redis.call('ZADD', K_INSTANCES, until_ms, INSTANCE)
redis.call('ZREMRANGEBYSCORE', K_INSTANCES, '-inf', now)
-- Leases nobody renewed any more: those slots stopped counting when they expired;
-- drop them now and report them once (the caller journals slot_reclaimed).
local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now)
for _, m in ipairs(expired) do
  redis.call('ZREM', K_LEASES, m)
  drop_client_lease(m)
end
local dead = redis.call('ZRANGEBYSCORE', K_ALIVE, '-inf', now)
for _, m in ipairs(dead) do drop_waiter(m) end
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
-- Per client: its running leases and its waiters (cooling slots are nobody's).
local by_client, client_rows = {}, {}
local function tally(members, i)
  for _, m in ipairs(members) do
    local c = redis.call('HGET', K_WCLIENT, m)
    if c then
      by_client[c] = by_client[c] or {0, 0}
      by_client[c][i] = by_client[c][i] + 1
    end
  end
end
if redis.call('HLEN', K_WCLIENT) > 0 then
  tally(redis.call('ZRANGEBYSCORE', K_LEASES, AFTER_NOW, '+inf'), 1)
  tally(redis.call('ZRANGEBYSCORE', K_ALIVE, AFTER_NOW, '+inf'), 2)
end
for c, n in pairs(by_client) do client_rows[#client_rows + 1] = {c, n[1], n[2]} end
return {'status', redis.call('GET', K_USAGE) or '', state_reply(st), running, cooling, queued,
  rows, client_rows}
"""
)

# ARGV[3] limit or "".
_SET_LIMIT = (
    _NOSTATE
    + r"""
local st = load_state()
redis.call('HSET', K_STATE, 'limit', ARGV[3], 'auto_reduced', '0', 'auto_reduced_from', '',
  'epoch', ms(st.epoch + 1))
-- A manual limit starts restore over: the configured window, nothing summed.
redis.call('HDEL', K_STATE, 'restore_window', 'restore_quiet', 'restore_tick', 'raised_at')
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
    redis.call('HDEL', K_STATE, 'restore_window', 'restore_quiet', 'restore_tick', 'raised_at')
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
# replica holds, then (lease, client, max_in_flight or "") triples for those of a client.
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
local held, n = {}, tonumber(ARGV[10])
for i = 11, 10 + n do held[ARGV[i]] = true end
for _, m in ipairs(redis.call('ZRANGE', K_LEASES, 0, -1)) do
  if owner(m) == INSTANCE and not held[m] then
    redis.call('ZREM', K_LEASES, m)
    drop_client_lease(m)
  end
end
-- Every waiter is in `alive`, a capped client's too (`queue` holds only its turn).
for _, m in ipairs(redis.call('ZRANGE', K_ALIVE, 0, -1)) do
  if owner(m) == INSTANCE then drop_waiter(m) end
end
local until_ms = ms(now + LEASE_MS)
for m in pairs(held) do redis.call('ZADD', K_LEASES, until_ms, m) end
local touched = {}
for i = 11 + n, #ARGV, 3 do
  local m, c, cap = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  if cap then redis.call('HSET', K_CAPS, c, ARGV[i + 2]) end
  client_lease(m, c, cap, until_ms)
  touched[c] = true
end
for c in pairs(touched) do sync(c) end
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
class ClientRow:
    """A client's cluster-wide share: its running leases and its waiters."""

    client_id: str
    running: int
    queued: int


@dataclass(frozen=True)
class Census:
    """Cluster-wide figures plus the per-replica (and per-client) breakdown."""

    state: Shared
    running: int
    cooling: int
    queued: int
    upstream_sessions: int | None
    instances: tuple[InstanceRow, ...]
    clients: tuple[ClientRow, ...] = ()


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


ClientOf = Mapping[str, tuple[str, int | None]]
"""A lease or waiter member -> its client id and that client's `max_in_flight`."""


def _client_triples(members: Sequence[str], clients: ClientOf) -> list[str]:
    return [
        x
        for m in members
        if (found := clients.get(m)) is not None
        for x in (m, found[0], _opt(found[1]))
    ]


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
                ("restore", _RESTORE),
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
        client: str | None = None,
        cap: int | None = None,
    ) -> Reply:
        """Queue (or admit at once) one request; `client` and its `cap` (its
        `max_in_flight` for this provider, None for none) when a client sent it."""
        return Reply.parse(
            await self._run(
                "admit",
                repr(prompt_ms),
                tie,
                local_id,
                max_queue,
                int(gated),
                poll_lock_ms,
                client or "",
                _opt(cap) if client else "",
            )
        )

    async def pump(self, *, gated: bool, poll_lock_ms: int) -> Reply:
        return Reply.parse(await self._run("pump", int(gated), poll_lock_ms))

    async def release(self, lease: str, *, gated: bool, poll_lock_ms: int) -> Reply:
        return Reply.parse(await self._run("release", lease, int(gated), poll_lock_ms))

    async def leave(self, member: str, *, gated: bool, poll_lock_ms: int) -> Reply:
        return Reply.parse(await self._run("leave", member, int(gated), poll_lock_ms))

    async def rate_limited(
        self,
        lease: str,
        epoch: int,
        pause_ms: int,
        *,
        gated: bool,
        poll_lock_ms: int,
        reduce: bool = True,
        restore_ms: int = 0,
        restore_max_ms: int = 0,
    ) -> Reply:
        """Pause; with `reduce`, lower the limit (once per overshoot) or undo a restore
        step made within its window (`restore_ms`, doubled up to `restore_max_ms`).
        `detail`: "<extended> <reduced> <limit before> <undone window ms or -1>"."""
        return Reply.parse(
            await self._run(
                "rate_limited",
                lease,
                epoch,
                pause_ms,
                int(gated),
                poll_lock_ms,
                int(reduce),
                restore_ms,
                restore_max_ms,
            )
        )

    async def restore(self, restore_ms: int, *, lock_ms: int, max_gap_ms: int) -> Reply:
        """Sample demand and step the limit up once the window is full, if this replica
        holds (or takes) the restore lock. `kind`: `other` (another replica holds it),
        `idle` (nothing to restore), `waiting` (detail "<demand ms> <window ms>"), or
        `restored` (detail "<before> <after> <window ms> <1: back at the original>")."""
        return Reply.parse(await self._run("restore", restore_ms, lock_ms, max_gap_ms))

    async def usage(
        self, sessions: int | None, *, interval_ms: int, gated: bool, poll_lock_ms: int
    ) -> Reply:
        return Reply.parse(
            await self._run("usage", _opt(sessions), interval_ms, int(gated), poll_lock_ms)
        )

    async def renew(
        self,
        leases: Sequence[str],
        waiters: Sequence[tuple[str, float]],
        *,
        force: bool = False,
        clients: ClientOf | None = None,
    ) -> Renewal:
        """Renew leases and waiters; with `force`, register again what Redis lost,
        tagged with its client from `clients`."""
        pairs = [x for member, prompt in waiters for x in (member, repr(prompt))]
        triples = _client_triples([*leases, *(m for m, _ in waiters)], clients) if clients else []
        raw = await self._run(
            "renew", int(force), len(leases), len(waiters), *leases, *pairs, *triples
        )
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
            clients=tuple(ClientRow(str(r[0]), int(r[1]), int(r[2])) for r in raw[7]),
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
        clients: ClientOf | None = None,
    ) -> tuple[bool, Shared, int]:
        """Seed the state if Redis lost it, drop this replica's stale entries, register
        the slots it holds (with their clients, from `clients`). Returns (seeded,
        state, replicas)."""
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
            *(_client_triples(leases, clients) if clients else []),
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
