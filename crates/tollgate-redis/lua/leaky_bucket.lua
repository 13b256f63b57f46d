-- Leaky bucket as a shaper: the port of tollgate_core::algorithm::leaky_bucket.
-- State: 'b:<tat>' (when the next request may leave, µs).

local function leaky_remaining(delay, max_delay, t)
  if delay <= max_delay then
    return idiv(max_delay - delay, t) + 1
  end
  return 0
end

local function leaky_bucket(tat, now, limit, t, max_delay, cost)
  local delay = max(tat - now, 0)
  if cost > limit then
    return decision(NEVER, limit, leaky_remaining(delay, max_delay, t), delay, 0, 0), tat
  end
  if delay <= max_delay then
    local busy = delay + t * cost
    local next_tat = tat
    if cost > 0 then
      next_tat = now + busy
    end
    return decision(ALLOW, limit, leaky_remaining(busy, max_delay, t), busy, 0, delay), next_tat
  end
  return decision(DENY, limit, 0, delay, delay - max_delay, 0), tat
end

local function leaky_bucket_earliest(tat, now, limit, cost)
  if cost > limit then
    return nil
  end
  return max(now, tat)
end
