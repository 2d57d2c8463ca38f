-- settle: end one hold exactly once (see settle_hold above).
-- KEYS: the account's (K), then KEYS[N_BASE + 1] the hold's tombstone, then budget counters
-- ARGV[1] hold_id  ARGV[2] cost (micros; -1 = charge the hold, 0 = release)  ARGV[3] now_ms
-- ARGV[4] started_ms: when the upstream answered (0 = it did not, or unknown)
-- ARGV[5..] one spec ("<id>@<window start ms>") per budget counter in KEYS
-- Returns the amount charged; -1 if the hold was already settled or reclaimed (or not there
-- yet: see the tombstone below); -2 if its record was unreadable and has been quarantined;
-- {specs} when charging it needs budget counters it was not given (nothing changed: call again
-- with them).
local tomb = KEYS[N_BASE + 1]
local counters = declared_counters(N_BASE + 2, 5)
local charged = settle_hold(counters, ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
if charged == "quarantined" then
  return -2
end
if type(charged) == "table" then
  return charged
end
if charged == false then
  if tonumber(ARGV[2]) == 0 then
    -- Releasing a hold that is not there yet: its reserve may still be queued behind a stalled
    -- Redis. Leave a tombstone so that reserve, when it runs, holds nothing.
    redis.call("SET", tomb, "1", "PX", 86400000)
  end
  return -1
end
return charged
