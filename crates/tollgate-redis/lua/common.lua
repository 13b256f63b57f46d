-- tollgate: helpers shared by every algorithm. The files of this directory are joined into one
-- source (common, token_bucket, fast_path, the other algorithms, then tollgate.lua) that serves
-- two ways: as an EVAL script, whose chunk runs on every call and ends by calling the entry
-- points with KEYS and ARGV, and as a function library, whose chunk runs once at FUNCTION LOAD
-- and registers them; see src/script.rs. So no code here reads the KEYS/ARGV globals (a library
-- has none): the entry points take them as arguments and pass them on.
--
-- Times are integer microseconds. Every value computed stays below 2^53, so Lua's doubles hold it
-- exactly (quotas are validated for that in tollgate-core).

local ALLOW, DENY, NEVER = 0, 1, 2

-- floor(a / b) for non-negative integers, exact even where a / b rounds up to an integer.
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

local function max(a, b) if a > b then return a end return b end
local function min(a, b) if a < b then return a end return b end

-- The start of the aligned window containing `now`.
local function window_start(now, w)
  return idiv(now, w) * w
end

local function decision(outcome, limit, remaining, reset, retry, delay)
  return { outcome, limit, remaining, reset, retry, delay }
end

-- An integer as decimal digits (every value the scripts write is an integer below 2^53; '%d'
-- formats Lua's double as a 64-bit integer, at half the cost of '%.0f').
local function fmt(n)
  return string.format('%d', n)
end

-- Reads a string state 'tag:a:b:...' as a list of numbers; nil when the key is absent, holds
-- another algorithm's state (other tag) or another type (a sorted set).
local function read_state(key, tag)
  local v = redis.pcall('GET', key)
  if type(v) ~= 'string' then
    return nil
  end
  local parts = {}
  for p in string.gmatch(v, '[^:]+') do
    parts[#parts + 1] = p
  end
  if parts[1] ~= tag then
    return nil
  end
  local out = {}
  for i = 2, #parts do
    local n = tonumber(parts[i])
    if n == nil then
      return nil
    end
    out[#out + 1] = n
  end
  return out
end

-- Added to every TTL when the caller supplies the time (test-vector replays): their clock runs
-- apart from real time, and a key kept longer never changes a decision (an outdated state reads
-- as fresh), while one expiring early would. Set by call_time(), which every entry point calls
-- first: in a function library this chunk's locals live as long as the library, so the value of
-- one call must not leak into the next.
local TTL_PAD_MS = 0

-- The time of the call in µs: argv[2] when the caller supplies it (test-vector replays, whose
-- keys then get TTL_PAD_MS more), else Redis' own clock, so every process decides on one clock.
local function call_time(argv)
  if argv[2] ~= '' then
    TTL_PAD_MS = 60000
    return tonumber(argv[2])
  end
  TTL_PAD_MS = 0
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- What a lease key's TTL adds to its newest lease's: the key never expires before a lease it
-- holds, and a key whose leases have all expired carries no information (they are dropped on the
-- next 'lease' call anyway).
local LEASE_KEY_MARGIN_MS = 1000

-- The TTL, in ms rounded up, of a state that stops mattering `span` µs from now.
local function ttl_ms(span)
  return fmt(math.ceil(span / 1000) + TTL_PAD_MS)
end

-- The script's reply: its values (status, now, wait, then 8 per limit) as little-endian 64-bit
-- integers in one bulk string. The client then reads one string instead of an array of 3 + 8n
-- integers, which its RESP parser took longer to read than the rest of a call cost it; for
-- Redis the two replies cost the same.
--
-- The format strings are built once per length (once per library load, as a function library).
local PACK_FORMATS = {}

local function packed(out)
  local n = #out
  local format = PACK_FORMATS[n]
  if format == nil then
    format = '<' .. string.rep('i8', n)
    PACK_FORMATS[n] = format
  end
  return struct.pack(format, unpack(out))
end

-- The status of a call that arrived too late: its deadline, argv[6] (µs on this server's clock, as
-- the client reckons it from earlier replies; 0 for none), had passed when it ran, so the client
-- had given up on it and applied its failure policy. Such a call writes nothing: a decision the
-- client no longer waits for must not charge anyone.
local LATE = 4

-- The reply of a late call over n keys: status LATE, no rows (zeros in their place).
local function late_reply(now, n)
  local out = { LATE, now, 0 }
  for _ = 1, 8 * n do
    out[#out + 1] = 0
  end
  return packed(out)
end

-- The reply of a late call (status LATE, no rows), or nil when the call is in time.
local function late(now, keys, argv)
  local deadline = tonumber(argv[6])
  if deadline == nil or deadline == 0 or now <= deadline then
    return nil
  end
  return late_reply(now, #keys)
end

-- Writes a string state that stops mattering at `expires` (µs); a state already fresh is deleted.
-- The TTL is rounded up to the millisecond, so a key never expires while it still matters.
local function write_state(key, value, expires, now)
  if expires <= now then
    redis.call('DEL', key)
  else
    redis.call('SET', key, value, 'PX', ttl_ms(expires - now))
  end
end
