-- tollgate: the fast path, first in the joined script. A 'decide' whose limits are all token
-- buckets on distinct keys (the default policy: tier + route + global) is answered here, before
-- the rest of the script defines its ~40 functions: one MGET, the GCRA arithmetic inline, one SET
-- per charged bucket, no per-limit tables. It answers exactly what the general path (tollgate.lua
-- with token_bucket.lua) answers, in the same reply shape; the test vectors run through it.
-- Anything else falls through to the general path below.

-- floor(a / b) for non-negative integers, exact even where a / b rounds up to an integer. Used by
-- every part of the script, so defined first.
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

if ARGV[1] == 'decide' then
  local n = #KEYS
  local fast = n > 0
  for i = 1, n do
    if not fast then
      break
    end
    -- ARGV[6 + 7(i-1)]: limit i's algorithm; 0 is the token bucket.
    if ARGV[6 + (i - 1) * 7] ~= '0' then
      fast = false
    end
    for j = 1, i - 1 do
      if KEYS[j] == KEYS[i] then
        fast = false
      end
    end
  end
  if fast then
    local now, pad = tonumber(ARGV[2]), 0
    if now then
      -- A replay with its own clock (see TTL_PAD_MS in common.lua).
      pad = 60000
    else
      local t = redis.call('TIME')
      now = tonumber(t[1]) * 1000000 + tonumber(t[2])
    end
    local vals = redis.call('MGET', unpack(KEYS))
    -- { status, now, wait, then per limit: outcome, limit, remaining, reset_after, retry_after,
    --   delay, tat before, tat after }
    local out, all = { 0, now, 0 }, true
    for i = 1, n do
      local p = 5 + (i - 1) * 7
      local limit, t, cost = tonumber(ARGV[p + 2]), tonumber(ARGV[p + 3]), tonumber(ARGV[p + 5])
      local v, tat = vals[i], 0
      if type(v) == 'string' and string.sub(v, 1, 2) == 'b:' then
        tat = tonumber(string.sub(v, 3)) or 0
      end
      local tau = t * limit
      local used = tat - now
      if used < 0 then
        used = 0
      end
      local left = tau - used
      if left < 0 then
        left = 0
      end
      local needed = used + t * cost
      local o = 3 + (i - 1) * 8
      if cost > limit then
        all = false
        out[o + 1], out[o + 3], out[o + 4], out[o + 5] = 2, idiv(left, t), used, 0
      elseif needed <= tau then
        out[o + 1], out[o + 3], out[o + 4], out[o + 5] = 0, idiv(tau - needed, t), needed, 0
      else
        all = false
        out[o + 1], out[o + 3], out[o + 4], out[o + 5] = 1, idiv(left, t), used, needed - tau
      end
      out[o + 2], out[o + 6], out[o + 7], out[o + 8] = limit, 0, tat, 0
    end
    -- All or nothing: only when every limit allows is anything written; otherwise the limits that
    -- would have passed report themselves as they stand.
    for i = 1, n do
      local p, o = 5 + (i - 1) * 7, 3 + (i - 1) * 8
      local tat = out[o + 7]
      out[o + 7] = 0
      if out[o + 1] == 0 then
        local limit, t, cost = tonumber(ARGV[p + 2]), tonumber(ARGV[p + 3]), tonumber(ARGV[p + 5])
        if not all then
          local used = out[o + 4] - t * cost
          out[o + 3], out[o + 4] = idiv(t * limit - used, t), used
        elseif cost > 0 then
          local next_tat = now + out[o + 4]
          out[o + 7], out[o + 8] = tat, next_tat
          redis.call('SET', KEYS[i], 'b:' .. string.format('%.0f', next_tat), 'PX',
            string.format('%.0f', math.ceil((next_tat - now) / 1000) + pad))
        end
      end
    end
    return out
  end
end
