-- reserve: hold `amount` against every scope a request touches, all or nothing.
-- Sent after the key binding (K, N_BASE: the fixed keys of SCRIPT_KEYS["reserve"]) and
-- _common.lua (proxy/store/scripts.py); an error names the file and line it comes from.
-- KEYS: the account's (K), then KEYS[N_BASE + 1] this hold's tombstone, then KEYS[N_BASE + 1 + i]
-- the counter of local budget i in its current window (micro-dollars)
-- ARGV[1] now_ms  ARGV[2] hold_id  ARGV[3] amount (micros)  ARGV[4] lease_expiry_ms
-- ARGV[5] account floor (micros)  ARGV[6] max_staleness_ms  ARGV[7] row_ref ("" = none)
-- ARGV[8..10] day, week, month window starts (ms)  ARGV[11] shadow_all (0/1)
-- ARGV[12] the store epoch this instance adopted ("" = none yet; see Store.adopt_epoch)
-- ARGV[13] "1" to look for expired leases first, "0" not to (the caller has just reclaimed them)
-- ARGV[14..] five values per local budget, in the order of their counters in KEYS: id,
--   limit (micros), shadow (0/1), window_start_ms, window_end_ms (0 = lifetime)
-- Returns, by its first element (proxy/store/scripts.py names the same codes):
--   {REFUSED (0), code, scope, limit, spent, held} with code in
--      no_snapshot, stale, key_inactive, key_expired, key_limit, credits, budget, cancelled, row_unreadable,
--      state_lost (the store lost its local budget state, found here when the epoch changed or
--      a counter charged in this window is gone; only calls that touch a local budget)
--   {ALLOWED (1), tight_scope, tight_remaining, code, scope, limit, spent, held}: the last five are
--      the refusal a shadow scope would have made (code "" = none)
--   {RECLAIM_FIRST (2), {specs}}: leases of instances that died mid-request have expired; nothing
--      changed. The caller reclaims them (reclaim.lua, with the budget counters named by specs)
--      and asks again, so this decision sees what they held freed.
-- Amounts (limit, spent, held, tight_remaining) are micros; "stale" gives the snapshot's age (ms)
-- as held.
local REFUSED, ALLOWED, RECLAIM_FIRST = 0, 1, 2
local now_ms = tonumber(ARGV[1])
local hold_id = ARGV[2]
local amount = tonumber(ARGV[3])
local lease_expiry_ms = ARGV[4]
local floor = tonumber(ARGV[5])
local max_staleness_ms = tonumber(ARGV[6])
local row_ref = ARGV[7]
local windows = {day = tonumber(ARGV[8]), week = tonumber(ARGV[9]), month = tonumber(ARGV[10])}
local shadow_all = ARGV[11] == "1"
local epoch_arg = ARGV[12]
local reclaim_first = ARGV[13] == "1"
local BUDGETS_FROM, BUDGET_FIELDS = 14, 5
local budgets = {}
for at = BUDGETS_FROM, #ARGV, BUDGET_FIELDS do
  local i = #budgets + 1
  budgets[i] = {id = ARGV[at], limit = tonumber(ARGV[at + 1]), shadow = ARGV[at + 2] == "1",
                win = ARGV[at + 3], win_end = ARGV[at + 4], counter = KEYS[N_BASE + 1 + i]}
end
local tomb = KEYS[N_BASE + 1]

-- The first lease to expire, read once a run; nothing expired while now_ms is before it.
if reclaim_first and ONCE.first_lease == nil then
  local first = redis.call("ZRANGE", K.leases, 0, 0, "WITHSCORES")
  ONCE.first_lease = first[2] and tonumber(first[2]) or math.huge
end
if reclaim_first and ONCE.first_lease <= now_ms then
  local expired = redis.call("ZRANGEBYSCORE", K.leases, "-inf", now_ms, "LIMIT", 0, 100)
  if #expired > 0 then
    local specs, seen = {}, {}
    for _, id in ipairs(expired) do
      local rec = redis.call("HGET", K.holds, id)
      local h = rec and parse_hold(rec)
      if h then add_new(specs, seen, missing_counters(h, seen)) end
    end
    return {RECLAIM_FIRST, specs}
  end
end

-- A client that re-sends this script after a lost reply (Redis Cluster retries) finds its hold:
-- the first run already decided, so this one is allowed without holding twice.
if redis.call("HEXISTS", K.holds, hold_id) == 1 then
  return {ALLOWED, "", -1, "", "", 0, 0, 0}
end
-- The proxy gave up on this reserve (its reply timed out) and asked for a release first.
if redis.call("EXISTS", tomb) == 1 then
  return {REFUSED, "cancelled", "store", 0, 0, 0}
end

-- Amnesia: the epoch this instance adopted is gone (a restart without persistence, FLUSHALL, a
-- failover to an empty replica) or replaced. Budget counters went with it, so local budgets
-- cannot be enforced until an operator runs `spend-guard store recover`.
if epoch_arg ~= "" and ONCE.epoch ~= epoch_arg then
  local epoch = redis.call("GET", K.epoch)
  if epoch ~= epoch_arg then
    local why = LOST_EMPTIED
    if epoch then why = LOST_CHANGED end
    mark_lost(why, now_ms)
    if not epoch then
      redis.call("SET", K.epoch, epoch_arg)
      epoch = epoch_arg
    end
  end
  if epoch == epoch_arg then ONCE.epoch = epoch_arg end
end
-- Eviction: a counter that is gone although it was charged in this very window (K.counted
-- says so) took that window's spend with it.
for _, b in ipairs(budgets) do
  b.spent = redis.call("GET", b.counter)
  if not b.spent and redis.call("HGET", K.counted, b.id) == b.win then
    mark_lost(LOST_VANISHED, now_ms)
  end
end
if #budgets > 0 then
  if ONCE.lost == nil then ONCE.lost = redis.call("EXISTS", K.lost) == 1 end
  if ONCE.lost then return {REFUSED, "state_lost", "store", 0, 0, 0} end
end

local snap = redis.call("HMGET", K.snap, "fetched_ms", "remaining", "usage")
if not snap[1] then
  return {REFUSED, "no_snapshot", "account", 0, 0, 0}
end
local fetched_ms = tonumber(snap[1])
if now_ms - fetched_ms > max_staleness_ms then
  return {REFUSED, "stale", "account", 0, 0, now_ms - fetched_ms}
end

local function held(field)
  return tonumber(redis.call("HGET", K.held, field) or "0")
end
local function charged(field)
  return tonumber(redis.call("HGET", K.chsum, field) or "0")
end

local tight_scope, tight_remaining = "", -1
local refusal = nil
local function consider(code, scope, limit, spent, in_hold, shadow)
  local remaining = limit - spent - in_hold - amount
  if remaining < 0 then
    if refusal == nil or (refusal.shadow and not shadow) then
      refusal = {code = code, scope = scope, limit = limit, spent = spent, held = in_hold, shadow = shadow}
    end
  elseif not shadow and (tight_remaining < 0 or remaining < tight_remaining) then
    tight_scope, tight_remaining = scope, remaining
  end
end

local row_win = 0
local row_base = ""  -- the key row's figure this call is admitted against (a row not listed: 0)
if row_ref ~= "" then
  row_base = "0"
  local row = row_level(row_ref, windows, fetched_ms)
  if row == "!" then
    -- The snapshot had this key's row but could not read it: its limit cannot be checked.
    return {REFUSED, "row_unreadable", "key", 0, 0, 0}
  end
  if row then
    if not row.active then
      refusal = {code = "key_inactive", scope = "key", limit = 0, spent = 0, held = 0, shadow = shadow_all}
    elseif row.expires_ms >= 0 and row.expires_ms <= now_ms then
      refusal = {code = "key_expired", scope = "key", limit = 0, spent = 0, held = 0, shadow = shadow_all}
    end
    row_win, row_base = row.win, int(row.counted)
    if row.limit >= 0 then
      local scope = "key:lifetime"
      if row_win > 0 then scope = "key:" .. row.period end
      consider("key_limit", scope, row.limit, row.spent, row.held, shadow_all)
    end
  end
end

consider("credits", "account", tonumber(snap[2]) - floor, charged("acct"), held("acct"), shadow_all)

local budget_specs = {}
for _, b in ipairs(budgets) do
  local spent = tonumber(b.spent or "0")
  consider("budget", "budget:" .. b.id, b.limit, spent, held("b:" .. b.id), b.shadow or shadow_all)
  budget_specs[#budget_specs + 1] = b.id .. "@" .. b.win .. "@" .. b.win_end
end

if refusal ~= nil and not refusal.shadow then
  return {REFUSED, refusal.code, refusal.scope, refusal.limit, refusal.spent, refusal.held}
end

-- The figures a snapshot must rise above before it contains this call (figures_contain in _common.lua).
local figures = ""
if snap[3] or row_base ~= "" then figures = ";" .. (snap[3] or "") .. ";" .. row_base end
redis.call("HSET", K.holds, hold_id, format_hold({amount = amount, lease = lease_expiry_ms, row_ref = row_ref,
  row_win = int(row_win), budgets_text = table.concat(budget_specs, ","), started = 0, contained = false,
  figures = figures}))
redis.call("ZADD", K.leases, lease_expiry_ms, hold_id)
local lease_ms = tonumber(lease_expiry_ms)
if ONCE.first_lease ~= nil and lease_ms < ONCE.first_lease then ONCE.first_lease = lease_ms end
redis.call("HINCRBY", K.held, "acct", ARGV[3])
if row_ref ~= "" then
  redis.call("HINCRBY", K.held, "row:" .. row_ref, ARGV[3])
end
for _, b in ipairs(budgets) do
  redis.call("HINCRBY", K.held, "b:" .. b.id, ARGV[3])
end
if refusal ~= nil then
  return {ALLOWED, tight_scope, tight_remaining, refusal.code, refusal.scope, refusal.limit, refusal.spent, refusal.held}
end
return {ALLOWED, tight_scope, tight_remaining, "", "", 0, 0, 0}
