-- tollgate: the fast path, right after the helpers and the token bucket in the joined source. A
-- 'decide' whose limits are all token buckets on distinct keys (the default policy: tier + route
-- + global) is answered here; as an EVAL script, before the rest of the chunk defines its
-- functions (src/script.rs calls it right after this file): one MGET
-- instead of a GET per key, and none of the general path's bookkeeping for keys listed twice or
-- for other algorithms. It uses the same helpers and the same token_bucket() as the general path
-- (tollgate.lua), so it answers exactly what that path answers, in the same reply shape; the test
-- vectors run through it. Anything else falls through to the general path below.
--
-- fast_decide(KEYS, ARGV): the call's keys and arguments (named as the EVAL globals they are on
-- that path); the packed reply, or nil when the call is not one for the fast path.
local function fast_decide(KEYS, ARGV)
  local n = #KEYS
  if ARGV[1] ~= 'decide' or n == 0 then
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
  local now = call_time(ARGV)
  local too_late = late(now, KEYS, ARGV)
  if too_late then
    return too_late
  end
  -- One key: a GET (pcall: a key of another type reads as absent, as MGET answers it), cheaper
  -- than an MGET of one.
  local vals
  if n == 1 then
    vals = { redis.pcall('GET', KEYS[1]) }
  else
    vals = redis.call('MGET', unpack(KEYS))
  end
  local rows, tats, next_tats, all = {}, {}, {}, true
  for i = 1, n do
    local p = 6 + (i - 1) * 7
    -- A bucket's state is 'b:<tat>' (see read_state in common.lua, whose general parse costs
    -- a few µs more per key); anything else, or nothing, is a fresh bucket.
    local v, tat = vals[i], 0
    if type(v) == 'string' and string.sub(v, 1, 2) == 'b:' then
      tat = tonumber(string.sub(v, 3)) or 0
    end
    local d, next_tat = token_bucket(tat, now, tonumber(ARGV[p + 2]), tonumber(ARGV[p + 3]),
      tonumber(ARGV[p + 5]))
    rows[i], tats[i], next_tats[i] = d, tat, next_tat
    if d[1] ~= ALLOW then
      all = false
    end
  end
  -- All or nothing, as decide_all() in tollgate.lua: only when every limit allows is anything
  -- written; otherwise the limits that would have passed report themselves as they stand.
  local out, k = { 0, now, 0 }, 3
  for i = 1, n do
    local d, a, b = rows[i], 0, 0
    if d[1] == ALLOW then
      if not all then
        local p = 6 + (i - 1) * 7
        d = token_bucket(tats[i], now, tonumber(ARGV[p + 2]), tonumber(ARGV[p + 3]), 0)
      elseif next_tats[i] ~= tats[i] then
        a, b = tats[i], next_tats[i]
        write_state(KEYS[i], string.format('b:%d', b), b, now)
      end
    end
    out[k + 1], out[k + 2], out[k + 3], out[k + 4] = d[1], d[2], d[3], d[4]
    out[k + 5], out[k + 6], out[k + 7], out[k + 8] = d[5], d[6], a, b
    k = k + 8
  end
  return packed(out)
end
