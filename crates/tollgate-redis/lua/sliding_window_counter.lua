-- Sliding window counter: the port of tollgate_core::algorithm::sliding_window_counter.
-- State: 'c:<start>:<previous>:<current>'. Returns the decision and the new state (a list), or
-- nil when the state does not change.

local function sliding_window_counter(s_start, s_prev, s_curr, now, limit, w, cost)
  local start = window_start(now, w)
  local prev, curr = 0, 0
  if s_start == start then
    prev, curr = s_prev, s_curr
  elseif s_start + w == start then
    prev, curr = s_curr, 0
  end
  local weighted = prev * (w - (now - start))
  local function left(c)
    return max(idiv(max(limit * w - weighted, 0), w) - c, 0)
  end
  local function reset(c)
    if c > 0 then
      return start + 2 * w - now
    elseif prev > 0 then
      return start + w - now
    end
    return 0
  end
  if cost > limit then
    return decision(NEVER, limit, left(curr), reset(curr), 0, 0), nil
  end
  if weighted + (curr + cost) * w <= limit * w then
    local c = curr + cost
    local d = decision(ALLOW, limit, left(c), reset(c), 0, 0)
    if cost == 0 then
      return d, nil
    end
    return d, { start, prev, c }
  end
  local retry_at
  if curr + cost <= limit then
    retry_at = start + w - min(idiv((limit - curr - cost) * w, prev), w)
  else
    retry_at = start + 2 * w - min(idiv((limit - cost) * w, curr), w)
  end
  return decision(DENY, limit, left(curr), reset(curr), max(retry_at - now, 0), 0), nil
end

local function sliding_window_counter_expires(st, w)
  if st[3] > 0 then
    return st[1] + 2 * w
  elseif st[2] > 0 then
    return st[1] + w
  end
  return st[1]
end
