-- tollgate: the entry point, tollgate(KEYS, ARGV). Decides every limit of one request in one atomic
-- call. Its arguments are named as the EVAL globals they are on that path (src/script.rs passes
-- them; a function library passes its callback's keys and args). Its local functions close over
-- the call's state, so they are created per call; the algorithms and helpers they use are not.
--
-- KEYS: one per limit; in mode 'lease', then the lease key (a sorted set), last.
-- ARGV[1] mode: 'decide' | 'lease' | 'peek' | 'earliest' | 'reserve' | 'cancel' | 'undo' | 'pause'
--   (and 'd', the fast path's compact decide, answered in fast_path.lua before this entry point)
-- ARGV[2] now in µs, or '' to use the server's clock (TIME). Only test-vector replays pass a time.
-- ARGV[3] call id: unique per call (sliding-window-log member names; 'undo' names the call undone);
--   in mode 'lease' (and the 'undo' or 'peek' of a lease call), the lease id, 32 hex digits: the
--   lease's member in its sorted set
-- ARGV[4] reserve: max wait (µs); pause: duration (µs); otherwise 0
-- ARGV[5] reserve: the departure time to hold (µs, server clock), or 0 for the earliest possible
-- ARGV[6] the call's deadline (µs, server clock), or 0: past it, the call writes nothing and
--   answers status 4 (`late` in common.lua)
-- then 7 values per limit: algorithm, limit, interval (µs), max_delay (µs), cost, a, b
--   algorithm: 0 token_bucket, 1 leaky_bucket, 2 fixed_window, 3 sliding_window_log,
--              4 sliding_window_counter, 5 a concurrency lease (the last key of a 'lease' call,
--              or a key of an 'undo' or 'peek'): limit = the most leases held at once, interval =
--              the lease's ttl (µs), max_delay = the retry_after of a full lease (µs), cost 1
--   a, b: cancel: tat before / after the reservation (and the cost slot: its charge, µs); undo:
--   what the decide call reported
--
-- Returns status, now, wait, then 8 numbers per limit: outcome, limit, remaining, reset_after,
-- retry_after, delay, a, b; packed into one string of little-endian 64-bit integers (`packed` in
-- common.lua).
--   status: decide/lease/peek/cancel/undo/pause 0; reserve 0 granted, 1 would exceed, 2 retry
--   (nothing held: a window must be asked again later, or the time asked for in ARGV[5] is gone),
--   3 never;
--   earliest: 0 (wait = when all limits could pass), 3 never; any mode: 4 late (past ARGV[6],
--   nothing written, no rows)
--   a, b: decide/reserve: bucket tat before / after the write; window start written; else 0
--   pause: outcome 1 when the limit was paused (a bucket), 0 otherwise
--   lease: the limits' rows, then the lease's: allowed (limit = max, remaining = leases free after
--   this one, or as it stands when not taken) or, when it is full, denied with its retry_after
--
-- A lease is a member of the sorted set at its key, named by the call id and scored with its
-- expiry (µs, this server's clock). A 'lease' call drops the expired members, and takes a lease
-- only if fewer than max remain and every limit allows (decided as 'decide' does; when the lease
-- is full the limits are only reported as they stand): all or nothing. An 'undo' of a lease call
-- removes its member.

local TOKEN, LEAKY, FIXED, LOG, COUNTER, LEASE = 0, 1, 2, 3, 4, 5
local TAGS = { [TOKEN] = 'b', [LEAKY] = 'b', [FIXED] = 'w', [COUNTER] = 'c' }

local function tollgate(KEYS, ARGV)
  local mode = ARGV[1]
  local now = call_time(ARGV)
  do
    local too_late = late(now, KEYS, ARGV)
    if too_late then
      return too_late
    end
  end
  local id = ARGV[3]
  local arg4 = tonumber(ARGV[4])
  local floor = tonumber(ARGV[5])
  -- The limits; a 'lease' call's last key is its lease.
  local n = #KEYS
  if mode == 'lease' then
    n = n - 1
  end

  local function param(i, j)
    return tonumber(ARGV[6 + (i - 1) * 7 + j])
  end

  -- States as read (orig) and as this call would leave them (tent), so a key listed twice sees its
  -- first charge; logs count their pending units instead.
  local orig, tent, pending = {}, {}, {}

  local function state_of(i, tentative)
    local key = KEYS[i]
    if tentative and tent[key] ~= nil then
      return tent[key]
    end
    if orig[key] == nil then
      orig[key] = read_state(key, TAGS[param(i, 1)]) or false
    end
    return orig[key]
  end

  -- Decides limit i with `cost`; returns the decision and the new state (nil: unchanged).
  local function decide_limit(i, cost, tentative)
    local alg, limit, t, max_delay = param(i, 1), param(i, 2), param(i, 3), param(i, 4)
    if alg == LOG then
      local p = 0
      if tentative then
        p = pending[KEYS[i]] or 0
      end
      return sliding_window_log(KEYS[i], p, now, limit, t, cost), nil
    end
    local st = state_of(i, tentative)
    if alg == TOKEN or alg == LEAKY then
      local tat = 0
      if st then
        tat = st[1]
      end
      local d, next_tat
      if alg == TOKEN then
        d, next_tat = token_bucket(tat, now, limit, t, cost)
      else
        d, next_tat = leaky_bucket(tat, now, limit, t, max_delay, cost)
      end
      if next_tat ~= tat then
        return d, { next_tat }
      end
      return d, nil
    elseif alg == FIXED then
      local s, c = 0, 0
      if st then
        s, c = st[1], st[2]
      end
      local d, ns, nc = fixed_window(s, c, now, limit, t, cost)
      if ns ~= s or nc ~= c then
        return d, { ns, nc }
      end
      return d, nil
    end
    local s, p, c = 0, 0, 0
    if st then
      s, p, c = st[1], st[2], st[3]
    end
    return sliding_window_counter(s, p, c, now, limit, t, cost)
  end

  local function write_limit(i, st)
    local key, alg, w = KEYS[i], param(i, 1), param(i, 3)
    if alg == TOKEN or alg == LEAKY then
      write_state(key, 'b:' .. fmt(st[1]), st[1], now)
    elseif alg == FIXED then
      write_state(key, 'w:' .. fmt(st[1]) .. ':' .. fmt(st[2]), st[1] + w, now)
    else
      write_state(key, 'c:' .. fmt(st[1]) .. ':' .. fmt(st[2]) .. ':' .. fmt(st[3]),
        sliding_window_counter_expires(st, w), now)
    end
  end

  local function tat_of(i, tentative)
    local st = state_of(i, tentative)
    if st then
      return st[1]
    end
    return 0
  end

  -- Records an admitted charge of limit i in the tentative states and the row's a/b.
  local function hold(i, cost, st, row)
    local key, alg = KEYS[i], param(i, 1)
    if alg == LOG then
      pending[key] = (pending[key] or 0) + cost
      return
    end
    if alg == TOKEN or alg == LEAKY then
      row[7] = tat_of(i, true)
      row[8] = st[1]
    else
      row[7] = st[1]
    end
    tent[key] = st
  end

  -- Writes every tentative state once per key and adds the logs' units.
  local function flush()
    local done = {}
    for i = 1, n do
      local key, cost = KEYS[i], param(i, 5)
      if param(i, 1) == LOG then
        if cost > 0 then
          sliding_window_log_add(key, now, param(i, 3), cost, id, i)
        end
      elseif not done[key] and tent[key] ~= nil then
        write_limit(i, tent[key])
        done[key] = true
      end
    end
  end

  local function reply(status, wait, rows)
    local out = { status, now, wait }
    for i = 1, #KEYS do
      local r = rows[i] or {}
      for j = 1, 8 do
        out[#out + 1] = r[j] or 0
      end
    end
    return packed(out)
  end

  -- All or nothing: if any limit denies, nothing is written, and the limits that would have passed
  -- report their state as it is (a peek).
  local function decide_all()
    local rows, all = {}, true
    for i = 1, n do
      local cost = param(i, 5)
      local d, st = decide_limit(i, cost, true)
      d[7], d[8] = 0, 0
      rows[i] = d
      if d[1] ~= ALLOW then
        all = false
      elseif cost > 0 and (st ~= nil or param(i, 1) == LOG) then
        hold(i, cost, st, d)
      end
    end
    if all then
      flush()
    else
      for i = 1, n do
        if rows[i][1] == ALLOW then
          rows[i] = decide_limit(i, 0, false)
        end
      end
    end
    return rows
  end

  -- The row of the lease at key i with `held` leases held: taken (one more held now), free (it
  -- would be taken; as it stands), or full (denied).
  local function lease_row(i, held, taken)
    local most = param(i, 2)
    if held >= most then
      return { DENY, most, 0, 0, param(i, 4), 0 }
    end
    if taken then
      held = held + 1
    end
    return { ALLOW, most, most - held, 0, 0, 0 }
  end

  if mode == 'decide' then
    return reply(0, 0, decide_all())
  end

  if mode == 'lease' then
    local li = n + 1
    local key, ttl = KEYS[li], param(li, 3)
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local held = redis.call('ZCARD', key)
    if held >= param(li, 2) then
      -- Full: the limits are not decided, only reported as a denial reports them.
      local rows = {}
      for i = 1, n do
        local d = decide_limit(i, param(i, 5), false)
        if d[1] == ALLOW then
          d = decide_limit(i, 0, false)
        end
        rows[i] = d
      end
      rows[li] = lease_row(li, held, false)
      return reply(0, 0, rows)
    end
    local rows = decide_all()
    local all = true
    for i = 1, n do
      if rows[i][1] ~= ALLOW then
        all = false
      end
    end
    if all then
      redis.call('ZADD', key, now + ttl, id)
      -- The key outlives its newest lease (a lease with a longer ttl, taken earlier, keeps it).
      local keep = math.ceil(ttl / 1000) + TTL_PAD_MS + LEASE_KEY_MARGIN_MS
      if redis.call('PTTL', key) < keep then
        redis.call('PEXPIRE', key, keep)
      end
    end
    rows[li] = lease_row(li, held, all)
    return reply(0, 0, rows)
  end

  if mode == 'peek' then
    local rows = {}
    for i = 1, n do
      if param(i, 1) == LEASE then
        -- The unexpired leases, as they stand (a peek writes nothing, so none is dropped).
        rows[i] = lease_row(i, redis.call('ZCOUNT', KEYS[i], '(' .. fmt(now), '+inf'), false)
      else
        rows[i] = decide_limit(i, param(i, 5), false)
      end
    end
    return reply(0, 0, rows)
  end

  if mode == 'reserve' or mode == 'earliest' then
    local at, all_buckets = max(now, floor), true
    for i = 1, n do
      local alg, limit, t, cost = param(i, 1), param(i, 2), param(i, 3), param(i, 5)
      local e
      if alg == TOKEN then
        e = token_bucket_earliest(tat_of(i, false), now, limit, t, cost)
      elseif alg == LEAKY then
        e = leaky_bucket_earliest(tat_of(i, false), now, limit, cost)
      else
        all_buckets = false
        local d = decide_limit(i, cost, false)
        if d[1] ~= NEVER then
          e = now + d[5]
        end
      end
      if e == nil then
        return reply(3, 0, {})
      end
      at = max(at, e)
    end
    local wait = at - now
    if mode == 'earliest' then
      return reply(0, wait, {})
    end
    if floor > 0 and at > floor then
      return reply(2, wait, {})
    end
    if wait > arg4 then
      return reply(1, wait, {})
    end
    if wait > 0 and not all_buckets then
      return reply(2, wait, {})
    end
    local rows = {}
    for i = 1, n do
      local alg, t, cost = param(i, 1), param(i, 3), param(i, 5)
      if alg == TOKEN or alg == LEAKY then
        local before = tat_of(i, true)
        local row = { ALLOW, param(i, 2), 0, 0, 0, 0 }
        hold(i, cost, { max(before, at) + t * cost }, row)
        rows[i] = row
      else
        -- wait == 0 here: the request passes now.
        local d, st = decide_limit(i, cost, true)
        d[7], d[8] = 0, 0
        if cost > 0 and (st ~= nil or alg == LOG) then
          hold(i, cost, st, d)
        end
        rows[i] = d
      end
    end
    flush()
    return reply(0, wait, rows)
  end

  -- Gives a reservation back (cancel in tollgate_core::algorithm): all of it if nobody reserved
  -- after it, else its charge (the cost slot, µs) minus what was reserved since.
  if mode == 'cancel' then
    for i = 1, n do
      local before, after, charge = param(i, 6), param(i, 7), param(i, 5)
      local st = read_state(KEYS[i], 'b')
      if st then
        local tat = st[1]
        if tat == after then
          write_state(KEYS[i], 'b:' .. fmt(before), before, now)
        elseif tat > after then
          local give = charge - (tat - after)
          if give > 0 then
            write_state(KEYS[i], 'b:' .. fmt(tat - give), tat - give, now)
          end
        end
      end
    end
    return reply(0, 0, {})
  end

  if mode == 'undo' then
    for i = 1, n do
      local key, alg, w, cost = KEYS[i], param(i, 1), param(i, 3), param(i, 5)
      local a, b = param(i, 6), param(i, 7)
      if alg == LEASE then
        redis.call('ZREM', key, id)
      elseif alg == LOG then
        local members = {}
        for u = 1, cost do
          members[#members + 1] = id .. ':' .. a .. ':' .. u
          if #members >= 1000 then
            redis.pcall('ZREM', key, unpack(members))
            members = {}
          end
        end
        if #members > 0 then
          redis.pcall('ZREM', key, unpack(members))
        end
      else
        local st = read_state(key, TAGS[alg])
        if st then
          if alg == TOKEN or alg == LEAKY then
            if st[1] == b then
              write_state(key, 'b:' .. fmt(a), a, now)
            end
          elseif alg == FIXED then
            if st[1] == a then
              write_limit(i, { st[1], max(st[2] - cost, 0) })
            end
          else
            if st[1] == a then
              st[3] = max(st[3] - cost, 0)
            elseif st[1] == a + w then
              st[2] = max(st[2] - cost, 0)
            end
            write_limit(i, st)
          end
        end
      end
    end
    return reply(0, 0, {})
  end

  if mode == 'pause' then
    local rows = {}
    for i = 1, n do
      local alg, limit, t = param(i, 1), param(i, 2), param(i, 3)
      if alg == TOKEN or alg == LEAKY then
        local target = now + arg4
        if alg == TOKEN then
          target = target + t * (limit - 1)
        end
        local tat = max(tat_of(i, false), target)
        write_state(KEYS[i], 'b:' .. fmt(tat), tat, now)
        rows[i] = { 1 }
      end
    end
    return reply(0, 0, rows)
  end

  return redis.error_reply('tollgate: unknown mode ' .. tostring(mode))
end
