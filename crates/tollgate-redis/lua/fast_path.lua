-- tollgate: the fast path, right after the helpers and the token bucket in the joined source. A
-- 'decide' whose limits are all token buckets on distinct keys (the default policy: tier + route
-- + global) is answered here; as an EVAL script, before the rest of the chunk defines its
-- functions (src/script.rs calls it right after this file): one MGET instead of a GET per key,
-- and none of the general path's bookkeeping for keys listed twice or for other algorithms.
--
-- It decides and writes, and leaves the describing to the client: the reply (status FAST) is the
-- server time, whether every limit allowed (so the call wrote), and each bucket's state as read.
-- The client computes each limit's decision from those with tollgate-core's token bucket, the
-- function token_bucket() ports, and refuses a reply whose verdict it does not reproduce. So the
-- arithmetic here is token_bucket()'s admission test and new state only: no decision tables, no
-- second pass for the limits that would have passed, a reply of 3 + n numbers instead of 3 + 8n.
-- The test vectors run through it (their decisions come back through the client's side, their
-- later steps read the states it wrote). Anything else falls through to the general path below.
--
-- fast_decide(KEYS, ARGV): the call's keys and arguments (named as the EVAL globals they are on
-- that path); the packed reply, or nil when the call is not one for the fast path.
--
-- Three layouts reach it. The store sends the compact one, mode 'd', for every decision it knows
-- to be one for this path (token buckets only, distinct keys) when it does not batch: ARGV = 'd',
-- now ('' = TIME), deadline, then limit, interval (µs) and cost per key; 3 + 3n arguments instead
-- of 6 + 7n, and nothing to check here. With batching on it sends the same decisions as a batch,
-- mode 'b' (see batch() below), one or several per call. A 'decide' in the general layout (see
-- tollgate.lua) whose limits qualify is answered here too, after the check.
local FAST = 5

-- The three forms of the fast path below (the general loop, one bucket, a batch) share these.

-- Whether a call with `deadline` (server µs; nil or 0: none) runs too late at `now`.
local function past(deadline, now)
  return deadline ~= nil and deadline ~= 0 and now > deadline
end

-- The tat of a bucket as GET / MGET answered for its key: 'b:<tat>' (bytes 98, 58; see
-- read_state in common.lua, whose general parse costs a few µs more per key); anything else, or
-- nothing, is a fresh bucket, 0.
local function bucket_tat(v)
  if type(v) == 'string' then
    local b, c = string.byte(v, 1, 2)
    if b == 98 and c == 58 then
      return tonumber(string.sub(v, 3)) or 0
    end
  end
  return 0
end

-- token_bucket(tat, now, limit, t, cost)'s admission test: admitted iff the cost fits the burst
-- and the bucket, used up to max(tat - now, 0), has room for t * cost more within
-- tau = t * limit. The room then used, `needed` (the new tat is now + needed), or nil: denied.
local function admits(tat, now, limit, t, cost)
  local used = tat - now
  if used < 0 then
    used = 0
  end
  local needed = used + t * cost
  if cost > limit or needed > t * limit then
    return nil
  end
  return needed
end

-- The fast path proper, over n token buckets: the keys keys[k0 + 1 .. k0 + n]; limit i's limit at
-- argv[limit_at + (i - 1) * stride], its interval right after, its cost `cost_off` after the
-- limit; `deadline` on the server's clock (nil or 0: none), `now` the call's time.
local function fast_path(keys, k0, n, argv, limit_at, stride, cost_off, deadline, now)
  if past(deadline, now) then
    return late_reply(now, n)
  end
  -- One key: a GET (pcall: a key of another type reads as absent, as MGET answers it), cheaper
  -- than an MGET of one.
  local vals
  if n == 1 then
    vals = { redis.pcall('GET', keys[k0 + 1]) }
  else
    vals = redis.call('MGET', unpack(keys, k0 + 1, k0 + n))
  end
  local out, nexts, all = { FAST, now, 1 }, {}, true
  for i = 1, n do
    local tat = bucket_tat(vals[i])
    out[3 + i] = tat
    local p = limit_at + (i - 1) * stride
    local cost = tonumber(argv[p + cost_off])
    local needed = admits(tat, now, tonumber(argv[p]), tonumber(argv[p + 1]), cost)
    if needed == nil then
      all = false
    elseif cost > 0 then
      nexts[i] = now + needed
    end
  end
  -- All or nothing, as decide_all() in tollgate.lua: only when every limit allows is anything
  -- written.
  if all then
    for i = 1, n do
      local next_tat = nexts[i]
      if next_tat ~= nil and next_tat ~= out[3 + i] then
        write_state(keys[k0 + i], 'b:' .. fmt(next_tat), next_tat, now)
      end
    end
  else
    out[3] = 0
  end
  return packed(out)
end

-- The fast path over one token bucket, the commonest call (one limit; and a batch of one
-- decision on one key, as a lone request sends it), without the tables of the loop above: the
-- same admission test and new state. Returns 1 (allowed, written) or 0 and the bucket's tat as
-- read; nil when the call is past its deadline (it writes nothing then).
local function fast_one(key, now, deadline, limit, t, cost)
  if past(deadline, now) then
    return nil
  end
  -- pcall: a key of another type reads as absent.
  local tat = bucket_tat(redis.pcall('GET', key))
  local needed = admits(tat, now, limit, t, cost)
  if needed == nil then
    return 0, tat
  end
  if cost > 0 then
    -- write_state()'s SET: the new tat is past now, its TTL the ms up to it, rounded up.
    redis.call('SET', key, string.format('b:%d', now + needed), 'PX',
      math.ceil(needed / 1000) + TTL_PAD_MS)
  end
  return 1, tat
end

-- A batch, mode 'b': several independent decisions of one client, each as the compact layout
-- would send it alone, in a packed form (one string of little-endian 64-bit integers each way,
-- instead of 2 + 3n arguments and one reply per decision, which cost Redis more to parse and to
-- build than the deciding does).
--
-- KEYS = the batch's distinct keys. ARGV = 'b', now ('' = TIME, read once for the whole batch),
-- then one string: per decision its key count n and its deadline (0 = none), then per key its
-- place in KEYS (from 1), limit, interval (µs) and cost. The reply is one string: per decision
-- the count of values of its answer, then that answer's values, exactly what the compact layout
-- answers for it alone (see packed() in common.lua).
--
-- Each decision is decided in turn, all or nothing on its own keys (a later one reads what an
-- earlier one wrote, as if they had come one after the other); one past its own deadline
-- answers late and writes nothing, and the others go on. Every key is read once (one MGET),
-- kept here while the decisions go through it, and written once at the end with the state the
-- last of them left: what Redis would hold after the same decisions one call each, for one GET
-- and one SET per key instead of one of each per decision, which is most of the saving where
-- decisions share a key (the service-wide limit every request passes, a busy caller's bucket).
-- A malformed batch is refused before anything is written.
local function batch(KEYS, ARGV)
  local now = call_time(ARGV)
  local nkeys, s = #KEYS, ARGV[3]
  if type(s) ~= 'string' or #s % 8 ~= 0 then
    return redis.error_reply('tollgate: malformed batch: no packed decisions')
  end
  if nkeys == 1 and #s == 48 then
    -- One decision on one key: fast_one(), its answer in the batch's reply.
    local n, deadline, j, limit, t, cost = struct.unpack('<i8i8i8i8i8i8', s)
    if n == 1 and j == 1 then
      local allowed, tat = fast_one(KEYS[1], now, deadline, limit, t, cost)
      if allowed == nil then
        return struct.pack('<i8', 11) .. late_reply(now, 1)
      end
      return struct.pack('<i8i8i8i8i8', 4, FAST, now, allowed, tat)
    end
  end
  local vals
  if nkeys == 1 then
    -- pcall: a key of another type reads as absent, as MGET answers it.
    vals = { redis.pcall('GET', KEYS[1]) }
  elseif nkeys > 1 then
    vals = redis.call('MGET', unpack(KEYS))
  else
    vals = {}
  end
  -- Each key's bucket as read ('b:<tat>'; anything else, or nothing, is fresh), and as the
  -- decisions so far left it. A key given twice would be decided on two states: refused.
  local read, tats, seen = {}, {}, {}
  for j = 1, nkeys do
    local key = KEYS[j]
    if seen[key] then
      return redis.error_reply('tollgate: malformed batch: key ' .. j .. ' given twice')
    end
    seen[key] = true
    local tat = bucket_tat(vals[j])
    read[j], tats[j] = tat, tat
  end
  local flat, len, pos, size = {}, 0, 1, #s
  while pos <= size do
    if pos + 15 > size then
      return redis.error_reply('tollgate: malformed batch at byte ' .. pos)
    end
    local n, deadline
    n, deadline, pos = struct.unpack('<i8i8', s, pos)
    if n < 1 or pos + 32 * n - 1 > size then
      return redis.error_reply('tollgate: malformed batch at byte ' .. pos)
    end
    if past(deadline, now) then
      -- late_reply()'s values: status LATE, no rows.
      flat[len + 1], flat[len + 2], flat[len + 3], flat[len + 4] = 3 + 8 * n, LATE, now, 0
      len = len + 4
      for _ = 1, 8 * n do
        len = len + 1
        flat[len] = 0
      end
      pos = pos + 32 * n
    else
      -- fast_path()'s test over this decision's buckets, as the batch has left them.
      local at, all, nexts = len, true, {}
      flat[at + 1], flat[at + 2], flat[at + 3], flat[at + 4] = 3 + n, FAST, now, 1
      for i = 1, n do
        local j, limit, t, cost
        j, limit, t, cost, pos = struct.unpack('<i8i8i8i8', s, pos)
        local tat = tats[j]
        if tat == nil then
          return redis.error_reply('tollgate: malformed batch: no key ' .. j)
        end
        flat[at + 4 + i] = tat
        local needed = admits(tat, now, limit, t, cost)
        if needed == nil then
          all = false
        elseif cost > 0 then
          nexts[j] = now + needed
        end
      end
      if all then
        for j, next_tat in pairs(nexts) do
          tats[j] = next_tat
        end
      else
        flat[at + 4] = 0
      end
      len = at + 4 + n
    end
  end
  -- Each key the batch changed, written once, with the state its last decision left.
  for j = 1, nkeys do
    local tat = tats[j]
    if tat ~= read[j] then
      write_state(KEYS[j], 'b:' .. fmt(tat), tat, now)
    end
  end
  return struct.pack('<' .. string.rep('i8', len), unpack(flat, 1, len))
end

local function fast_decide(KEYS, ARGV)
  local n = #KEYS
  local mode = ARGV[1]
  if mode == 'd' then
    if n == 1 then
      local now = call_time(ARGV)
      local allowed, tat = fast_one(KEYS[1], now, tonumber(ARGV[3]), tonumber(ARGV[4]),
        tonumber(ARGV[5]), tonumber(ARGV[6]))
      if allowed == nil then
        return late_reply(now, 1)
      end
      return struct.pack('<i8i8i8i8', FAST, now, allowed, tat)
    end
    return fast_path(KEYS, 0, n, ARGV, 4, 3, 2, tonumber(ARGV[3]), call_time(ARGV))
  end
  if mode == 'b' then
    return batch(KEYS, ARGV)
  end
  if mode ~= 'decide' or n == 0 then
    return nil
  end
  for i = 1, n do
    -- ARGV[7 + 7(i-1)]: limit i's algorithm; 0 is the token bucket.
    if ARGV[7 + (i - 1) * 7] ~= '0' then
      return nil
    end
    local key = KEYS[i]
    for j = 1, i - 1 do
      if KEYS[j] == key then
        return nil
      end
    end
  end
  -- The general layout: limit i's algorithm at 7 + 7(i - 1), then limit, interval, max_delay,
  -- cost; the deadline at 6.
  return fast_path(KEYS, 0, n, ARGV, 8, 7, 3, tonumber(ARGV[6]), call_time(ARGV))
end
