-- identity: is this still the store this instance has been counting in? Every instance asks each
-- refresh round, with or without traffic, so a store that lost its state is noticed everywhere
-- within one round, not only by the next reserve that touches a local budget.
-- Sent after the key binding (K, N_BASE: the fixed keys of SCRIPT_KEYS["identity"]) and
-- _common.lua (proxy/store/scripts.py); an error names the file and line it comes from.
-- KEYS: the account's (K) only
-- ARGV[1] the epoch this instance holds ("" = none yet: its first look)
-- ARGV[2] a fresh epoch, written when the store has none
-- ARGV[3] now_ms
-- ARGV[4] "1" when a store without an epoch is provably new (nothing was counted anywhere yet),
--         else "0": then a store without an epoch is a loss
-- An epoch that vanished or changed under this instance, or a missing one not provably new,
-- sets the lost marker (the reason LOST_* and when; reserve.lua refuses local budgets while it
-- is set). The loss recorded, the instance holds the store's epoch from then on, so a recovery
-- (which lifts the marker) ends it for every instance.
-- Returns {the store's epoch, the lost marker ("<why>|<ms>") or false}.
local LOST_EMPTIED = "the store's state was emptied"
local LOST_CHANGED = "the store's epoch changed"
local LOST_UNKNOWN = "the store has no epoch and nothing shows it is new"
local mine, fresh, now_ms, new_is_safe = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == "1"

local stored = redis.call("GET", K.epoch)
local why = nil
if stored then
  if mine ~= "" and stored ~= mine then why = LOST_CHANGED end
elseif mine ~= "" then
  why = LOST_EMPTIED
elseif not new_is_safe then
  why = LOST_UNKNOWN
end
if why then
  redis.call("SET", K.lost, why .. "|" .. int(now_ms), "NX")
end
if not stored then
  redis.call("SET", K.epoch, fresh)
  stored = fresh
end
return {stored, redis.call("GET", K.lost) or false}
