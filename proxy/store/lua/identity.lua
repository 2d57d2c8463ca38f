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
-- ARGV[5] this instance's id ("" = none: nothing of the rollback check)
-- ARGV[6] how many of its settles this instance has seen the store take (check_sequence in
--         _common.lua): fewer found there means the store went back to an earlier copy
-- ARGV[7] the reason recorded for a store without an epoch that is not provably new
--         (LOST_UNKNOWN when not given)
-- An epoch that vanished or changed under this instance, a missing one not provably new, or fewer
-- of this instance's settles than it has seen taken sets the lost marker (the reason, LOST_* in
-- _common.lua, and when; reserve.lua refuses local budgets while it is set). The loss recorded,
-- the instance holds the store's epoch (and its settle count) from then on, so a recovery
-- (which lifts the marker) ends it for every instance.
-- Returns {the store's epoch, the lost marker ("<why>|<ms>") or false}.
local mine, fresh, now_ms, new_is_safe = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == "1"
local instance, seen = ARGV[5], tonumber(ARGV[6])
local not_new_why = ARGV[7] or LOST_UNKNOWN
-- An instance that has not checked in for this long is gone: its settle count is dropped.
local SEQ_FORGET_MS = 7 * 86400000

local stored = redis.call("GET", K.epoch)
local why = nil
if stored then
  if mine ~= "" and stored ~= mine then why = LOST_CHANGED end
elseif mine ~= "" then
  why = LOST_EMPTIED
elseif not new_is_safe then
  why = not_new_why
end
if why then
  mark_lost(why, now_ms)
end
if not stored then
  redis.call("SET", K.epoch, fresh)
  stored = fresh
end
if instance ~= "" then
  check_sequence(instance, seen, now_ms)
  redis.call("ZADD", K.seqseen, int(now_ms), instance)
  local forget_before = int(now_ms - SEQ_FORGET_MS)
  for _, gone in ipairs(redis.call("ZRANGEBYSCORE", K.seqseen, "-inf", forget_before, "LIMIT", 0, 100)) do
    redis.call("HDEL", K.seq, gone)
    redis.call("ZREM", K.seqseen, gone)
  end
end
return {stored, redis.call("GET", K.lost) or false}
