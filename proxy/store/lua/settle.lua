-- settle: end one hold exactly once (settle_hold in _common.lua).
-- Sent after the key binding (K, N_BASE: the fixed keys of SCRIPT_KEYS["settle"]) and
-- _common.lua (proxy/store/scripts.py); an error names the file and line it comes from.
-- KEYS: the account's (K), then KEYS[N_BASE + 1] the hold's tombstone, then budget counters
-- ARGV[1] hold_id  ARGV[2] cost (micros; -1 = charge the hold, 0 = release)  ARGV[3] now_ms
-- ARGV[4] started_ms: when the upstream answered (0 = it did not, or unknown)
-- ARGV[5] the settling instance's id ("" = none)  ARGV[6] how many of its settles it has seen
--   the store take: fewer found there is a rollback (check_sequence in _common.lua)
-- ARGV[7..] one spec ("<id>@<window start ms>") per budget counter in KEYS, in the same order
-- A settle that ends its hold (a charge or a release) counts in K.seq for its instance.
-- Returns the amount charged (micros, >= 0), or (proxy/store/scripts.py names the same codes):
--   GONE (-1): the hold was already settled or reclaimed (or is not there yet: see the
--     tombstone below)
--   QUARANTINED (-2): its record was unreadable and has been moved aside
--   {specs}: charging it needs budget counters it was not given (nothing changed: call again
--     with them)
local GONE, QUARANTINED = -1, -2
local hold_id = ARGV[1]
local cost = tonumber(ARGV[2])
local now_ms = tonumber(ARGV[3])
local started_ms = tonumber(ARGV[4])
local instance, seen = ARGV[5], tonumber(ARGV[6])
local SPECS_FROM = 7
local tomb = KEYS[N_BASE + 1]
local counters = declared_counters(N_BASE + 2, SPECS_FROM)
local charged = settle_hold(counters, hold_id, cost, now_ms, started_ms)
if type(charged) == "number" and instance ~= "" then
  -- this settle counted, the count checked in the same call (check_sequence's rule)
  if redis.call("HINCRBY", K.seq, instance, 1) <= seen then
    mark_lost(LOST_ROLLED_BACK, now_ms)
    redis.call("HSET", K.seq, instance, int(seen + 1))
  end
else
  check_sequence(instance, seen, now_ms)
end
if charged == "quarantined" then
  return QUARANTINED
end
if type(charged) == "table" then
  return charged
end
if charged == false then
  if cost == 0 then
    -- Releasing a hold that is not there yet: its reserve may still be queued behind a stalled
    -- Redis. Leave a tombstone so that reserve, when it runs, holds nothing.
    redis.call("SET", tomb, "1", "PX", 86400000)
  end
  return GONE
end
return charged
