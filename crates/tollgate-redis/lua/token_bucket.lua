-- Token bucket, GCRA form: the port of tollgate_core::algorithm::token_bucket.
-- State: 'b:<tat>' (theoretical arrival time, µs). Returns the decision and the new tat.

local function token_bucket(tat, now, limit, t, cost)
  local tau = t * limit
  local used = max(tat - now, 0)
  local left = idiv(max(tau - used, 0), t)
  if cost > limit then
    return decision(NEVER, limit, left, used, 0, 0), tat
  end
  local needed = used + t * cost
  if needed <= tau then
    local next_tat = tat
    if cost > 0 then
      next_tat = now + needed
    end
    return decision(ALLOW, limit, idiv(tau - needed, t), needed, 0, 0), next_tat
  end
  return decision(DENY, limit, left, used, needed - tau, 0), tat
end

local function token_bucket_earliest(tat, now, limit, t, cost)
  if cost > limit then
    return nil
  end
  return max(now, tat + t * cost - t * limit)
end
