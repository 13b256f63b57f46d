-- Sliding window log: the port of tollgate_core::algorithm::sliding_window_log, on a sorted set.
--
-- One member per unit of cost, scored with its admission time (µs); a request of cost c adds c
-- members named '<request id>:<limit index>:<i>', unique even for simultaneous requests (the id
-- is unique per call). A member is live while score > now - window. The set never holds more than
-- `limit` live members, and expired ones are removed before every write, so a key's memory is
-- bounded by its limit.
--
-- `pending` counts units this same call already admitted to this key (a key listed twice); they
-- sit at `now`.

local function log_live(key, now, w)
  local n = redis.pcall('ZCOUNT', key, '(' .. fmt(now - w), '+inf')
  if type(n) ~= 'number' then
    return 0
  end
  return n
end

-- The score of the k-th oldest live member (1-based), or nil.
local function log_nth(key, now, w, k)
  local r = redis.pcall('ZRANGEBYSCORE', key, '(' .. fmt(now - w), '+inf', 'WITHSCORES', 'LIMIT', k - 1, 1)
  if type(r) ~= 'table' or r[2] == nil then
    return nil
  end
  return tonumber(r[2])
end

local function log_newest(key)
  local r = redis.pcall('ZRANGE', key, -1, -1, 'WITHSCORES')
  if type(r) ~= 'table' or r[2] == nil then
    return nil
  end
  return tonumber(r[2])
end

local function sliding_window_log(key, pending, now, limit, w, cost)
  local live = log_live(key, now, w)
  local used = live + pending
  local left = max(limit - used, 0)
  local newest = log_newest(key)
  if pending > 0 then
    newest = now
  end
  local function reset(added)
    local n = newest
    if added then
      n = now
    end
    if n == nil then
      return 0
    end
    return max(n + w - now, 0)
  end
  if cost > limit then
    return decision(NEVER, limit, left, reset(false), 0, 0)
  end
  if used + cost <= limit then
    return decision(ALLOW, limit, left - cost, reset(cost > 0), 0, 0)
  end
  local need = used + cost - limit
  local retry = w -- the oldest needed is one of this call's own, admitted now
  if need <= live then
    local at = log_nth(key, now, w, need)
    if at ~= nil then
      retry = max(at + w - now, 0)
    end
  end
  return decision(DENY, limit, left, reset(false), retry, 0)
end

-- Admits `cost` units at `now`: drops expired members (and any value of another type), adds the
-- new ones, and sets the expiry to when the newest leaves the window.
local function sliding_window_log_add(key, now, w, cost, id, index)
  local t = redis.call('TYPE', key)
  if type(t) == 'table' then
    t = t.ok
  end
  if t ~= 'zset' and t ~= 'none' then
    redis.call('DEL', key)
  end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now - w))
  local score = fmt(now)
  local args = {}
  for i = 1, cost do
    args[#args + 1] = score
    args[#args + 1] = id .. ':' .. index .. ':' .. i
    if #args >= 1000 then
      redis.call('ZADD', key, unpack(args))
      args = {}
    end
  end
  if #args > 0 then
    redis.call('ZADD', key, unpack(args))
  end
  redis.call('PEXPIRE', key, ttl_ms(w))
end
