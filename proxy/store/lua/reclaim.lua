-- reclaim: charge the holds of instances that died mid-request (their lease expired): the
-- upstream may have billed them. Asked for by reserve.lua before it decides. At most 100 holds
-- a run.
-- Sent after the key binding (K, N_BASE: the fixed keys of SCRIPT_KEYS["reclaim"]) and
-- _common.lua (proxy/store/scripts.py); an error names the file and line it comes from.
-- KEYS: the account's (K), then budget counters
-- ARGV[1] now_ms  ARGV[2..] one spec ("<id>@<window start ms>") per budget counter in KEYS,
-- in the same order
-- Returns {count, micros, {quarantined hold ids}, {specs}}: the holds charged and what they
-- came to (micros), the unreadable records moved aside, and the counters still missing for holds
-- left alone (their budgets were not declared; the caller runs this again with them).
local now_ms = tonumber(ARGV[1])
local SPECS_FROM = 2
local counters = declared_counters(N_BASE + 1, SPECS_FROM)
local reclaimed, micros, quarantined, missing, seen = 0, 0, {}, {}, {}
for _, id in ipairs(redis.call("ZRANGEBYSCORE", K.leases, "-inf", now_ms, "LIMIT", 0, 100)) do
  local charged = settle_hold(counters, id, -1, now_ms, 0)
  if charged == "quarantined" then
    quarantined[#quarantined + 1] = id
  elseif charged == false then
    redis.call("ZREM", K.leases, id)  -- a lease without its hold
  elseif type(charged) == "table" then
    add_new(missing, seen, charged)
  else
    reclaimed, micros = reclaimed + 1, micros + charged
  end
end
return {reclaimed, micros, quarantined, missing}
