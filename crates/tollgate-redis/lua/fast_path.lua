-- tollgate: the fast path, right after the helpers and the token bucket in the joined script. A
-- 'decide' whose limits are all token buckets on distinct keys (the default policy: tier + route
-- + global) is answered here, before the rest of the script defines its functions: one MGET
-- instead of a GET per key, and none of the general path's bookkeeping for keys listed twice or
-- for other algorithms. It uses the same helpers and the same token_bucket() as the general path
-- (tollgate.lua), so it answers exactly what that path answers, in the same reply shape; the test
-- vectors run through it. Anything else falls through to the general path below.

if ARGV[1] == 'decide' then
  local n = #KEYS
  local fast = n > 0
  for i = 1, n do
    if not fast then
      break
    end
    -- ARGV[7 + 7(i-1)]: limit i's algorithm; 0 is the token bucket.
    if ARGV[7 + (i - 1) * 7] ~= '0' then
      fast = false
    end
    for j = 1, i - 1 do
      if KEYS[j] == KEYS[i] then
        fast = false
      end
    end
  end
  if fast then
    local now = call_time()
    local too_late = late(now)
    if too_late then
      return too_late
    end
    local vals = redis.call('MGET', unpack(KEYS))
    local rows, tats, next_tats, all = {}, {}, {}, true
    for i = 1, n do
      local p = 6 + (i - 1) * 7
      -- A bucket's state is 'b:<tat>' (see read_state in common.lua, whose general parse costs
      -- a few µs more per key); anything else, or nothing, is a fresh bucket.
      local v, tat = vals[i], 0
      if type(v) == 'string' and string.sub(v, 1, 2) == 'b:' then
        tat = tonumber(string.sub(v, 3)) or 0
      end
      rows[i], next_tats[i] = token_bucket(tat, now, tonumber(ARGV[p + 2]), tonumber(ARGV[p + 3]),
        tonumber(ARGV[p + 5]))
      tats[i] = tat
      if rows[i][1] ~= ALLOW then
        all = false
      end
    end
    -- All or nothing, as decide_all() in tollgate.lua: only when every limit allows is anything
    -- written; otherwise the limits that would have passed report themselves as they stand.
    local out = { 0, now, 0 }
    for i = 1, n do
      local d, a, b = rows[i], 0, 0
      if d[1] == ALLOW then
        if not all then
          local p = 6 + (i - 1) * 7
          d = token_bucket(tats[i], now, tonumber(ARGV[p + 2]), tonumber(ARGV[p + 3]), 0)
        elseif next_tats[i] ~= tats[i] then
          a, b = tats[i], next_tats[i]
          write_state(KEYS[i], 'b:' .. fmt(b), b, now)
        end
      end
      for j = 1, 6 do
        out[#out + 1] = d[j]
      end
      out[#out + 1] = a
      out[#out + 1] = b
    end
    return packed(out)
  end
end
