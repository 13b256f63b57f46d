-- Fixed window: the port of tollgate_core::algorithm::fixed_window.
-- State: 'w:<start>:<count>'. Returns the decision and the new (start, count).

local function fixed_window(s_start, s_count, now, limit, w, cost)
  local start = window_start(now, w)
  local count = 0
  if s_start == start then
    count = s_count
  end
  local ending = start + w - now
  local function reset(c)
    if c == 0 then
      return 0
    end
    return ending
  end
  local left = max(limit - count, 0)
  if cost > limit then
    return decision(NEVER, limit, left, reset(count), 0, 0), s_start, s_count
  end
  if count + cost <= limit then
    local c = count + cost
    local d = decision(ALLOW, limit, limit - c, reset(c), 0, 0)
    if cost == 0 then
      return d, s_start, s_count
    end
    return d, start, c
  end
  return decision(DENY, limit, left, ending, ending, 0), s_start, s_count
end
