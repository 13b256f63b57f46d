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

-- The fast path proper, over n token buckets: the keys keys[k0 + 1 .. k0 + n]; limit i's limit at
-- argv[limit_at + (i - 1) * stride], its interval right after, its cost `cost_off` after the
-- limit; `deadline` on the server's clock (nil or 0: none), `now` the call's time.
local function fast_path(keys, k0, n, argv, limit_at, stride, cost_off, deadline, now)
  if deadline ~= nil and deadline ~= 0 and now > deadline then
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
    -- A bucket's state is 'b:<tat>' (see read_state in common.lua, whose general parse costs
    -- a few µs more per key); anything else, or nothing, is a fresh bucket.
    local v, tat = vals[i], 0
    if type(v) == 'string' and string.sub(v, 1, 2) == 'b:' then
      tat = tonumber(string.sub(v, 3)) or 0
    end
    out[3 + i] = tat
    -- token_bucket(tat, now, limit, t, cost): admitted iff the cost fits the burst and the
    -- bucket, used up to max(tat - now, 0), has room for t * cost more within tau = t * limit.
    local p = limit_at + (i - 1) * stride
    local limit, t, cost = tonumber(argv[p]), tonumber(argv[p + 1]), tonumber(argv[p + cost_off])
    local used = tat - now
    if used < 0 then
      used = 0
    end
    local needed = used + t * cost
    if cost > limit or needed > t * limit then
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

-- A batch, mode 'b': several independent decisions of one client, each as the compact layout
-- would send it alone. ARGV = 'b', now ('' = TIME, read once for the whole batch), then per
-- decision its key count n, its deadline (0 = none) and limit, interval (µs) and cost per key;
-- KEYS = every decision's keys, in the same order. Each decision is decided in turn, all or
-- nothing on its own keys (a later one reads what an earlier one wrote, as if they had come one
-- after the other), and answers exactly what the compact layout answers for it alone; the reply
-- is the array of those answers. A decision past its own deadline answers late and writes
-- nothing; the others go on.
local function batch(KEYS, ARGV)
  local now = call_time(ARGV)
  local replies, k0, p, argc = {}, 0, 3, #ARGV
  while p <= argc do
    local n, deadline = tonumber(ARGV[p]), tonumber(ARGV[p + 1])
    if n == nil or n < 1 or deadline == nil or p + 1 + 3 * n > argc or k0 + n > #KEYS then
      return redis.error_reply('tollgate: malformed batch at argument ' .. p)
    end
    replies[#replies + 1] = fast_path(KEYS, k0, n, ARGV, p + 2, 3, 2, deadline, now)
    k0 = k0 + n
    p = p + 2 + 3 * n
  end
  if k0 ~= #KEYS then
    return redis.error_reply('tollgate: a batch of ' .. k0 .. ' keys given ' .. #KEYS)
  end
  return replies
end

local function fast_decide(KEYS, ARGV)
  local n = #KEYS
  local mode = ARGV[1]
  if mode == 'd' then
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
