-- reserve: hold `amount` against every scope a request touches, all or nothing.
-- KEYS: the account's (K), then KEYS[N_BASE + 1] this hold's tombstone, then KEYS[N_BASE + 1 + i]
-- the counter of local budget i in its current window (micro-dollars)
-- ARGV[1] now_ms  ARGV[2] hold_id  ARGV[3] amount (micros)  ARGV[4] lease_expiry_ms
-- ARGV[5] account floor (micros)  ARGV[6] max_staleness_ms  ARGV[7] row_ref ("" = none)
-- ARGV[8..10] day, week, month window starts (ms)  ARGV[11] shadow_all (0/1)  ARGV[12] n budgets
-- then per budget 5 values: id, limit (micros), shadow (0/1), window_start_ms, window_end_ms (0 = lifetime)
-- then the store epoch this instance adopted ("" = none yet; see Store.adopt_epoch)
-- then "1" to look for expired leases first, "0" not to (the caller has just reclaimed them)
-- Returns {1, tight_scope, tight_remaining, would_refuse_code, wr_scope, wr_limit, wr_spent, wr_held}
--      or {0, code, scope, limit, spent, held} with code in
--      no_snapshot, stale, key_inactive, key_expired, key_limit, credits, budget, cancelled, row_unreadable,
--      state_lost (the store lost its local budget state; only calls that touch a local budget)
--      or {2, {specs}}: leases of instances that died mid-request have expired; nothing changed.
--      The caller reclaims them (reclaim.lua, with the budget counters named by specs) and asks
--      again, so this decision sees what they held freed.
local now_ms = tonumber(ARGV[1])
local hold_id = ARGV[2]
local amount = tonumber(ARGV[3])
local lease_expiry_ms = ARGV[4]
local floor = tonumber(ARGV[5])
local max_staleness_ms = tonumber(ARGV[6])
local row_ref = ARGV[7]
local windows = {day = tonumber(ARGV[8]), week = tonumber(ARGV[9]), month = tonumber(ARGV[10])}
local shadow_all = ARGV[11] == "1"
local n_budgets = tonumber(ARGV[12])
local tomb = KEYS[N_BASE + 1]
local function counter_key(i)
  return KEYS[N_BASE + 1 + i]
end

if ARGV[14 + n_budgets * 5] == "1" then
  local expired = redis.call("ZRANGEBYSCORE", K.leases, "-inf", now_ms, "LIMIT", 0, 100)
  if #expired > 0 then
    local specs, seen = {}, {}
    for _, id in ipairs(expired) do
      local rec = redis.call("HGET", K.holds, id)
      local h = rec and parse_hold(rec)
      if h then add_new(specs, seen, missing_counters(h, seen)) end
    end
    return {2, specs}
  end
end

-- A client that re-sends this script after a lost reply (Redis Cluster retries) finds its hold:
-- the first run already decided, so this one is allowed without holding twice.
if redis.call("HEXISTS", K.holds, hold_id) == 1 then
  return {1, "", -1, "", "", 0, 0, 0}
end
-- The proxy gave up on this reserve (its reply timed out) and asked for a release first.
if redis.call("EXISTS", tomb) == 1 then
  return {0, "cancelled", "store", 0, 0, 0}
end

-- Amnesia: the epoch this instance adopted is gone (a restart without persistence, FLUSHALL, a
-- failover to an empty replica) or replaced. Budget counters went with it, so local budgets
-- cannot be enforced until an operator runs `spend-guard store recover`.
local epoch_arg = ARGV[13 + n_budgets * 5] or ""
if epoch_arg ~= "" then
  local epoch = redis.call("GET", K.epoch)
  if epoch ~= epoch_arg then
    local why = "the store's state was emptied"
    if epoch then why = "the store's epoch changed" end
    redis.call("SET", K.lost, why .. "|" .. int(now_ms), "NX")
    if not epoch then redis.call("SET", K.epoch, epoch_arg) end
  end
end
if n_budgets > 0 and redis.call("EXISTS", K.lost) == 1 then
  return {0, "state_lost", "store", 0, 0, 0}
end

local snap = redis.call("HMGET", K.snap, "fetched_ms", "remaining")
if not snap[1] then
  return {0, "no_snapshot", "account", 0, 0, 0}
end
local fetched_ms = tonumber(snap[1])
if now_ms - fetched_ms > max_staleness_ms then
  return {0, "stale", "account", 0, 0, now_ms - fetched_ms}
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
if row_ref ~= "" then
  local row = row_level(row_ref, windows, fetched_ms)
  if row == "!" then
    -- The snapshot had this key's row but could not read it: its limit cannot be checked.
    return {0, "row_unreadable", "key", 0, 0, 0}
  end
  if row then
    if not row.active then
      refusal = {code = "key_inactive", scope = "key", limit = 0, spent = 0, held = 0, shadow = shadow_all}
    elseif row.expires_ms >= 0 and row.expires_ms <= now_ms then
      refusal = {code = "key_expired", scope = "key", limit = 0, spent = 0, held = 0, shadow = shadow_all}
    end
    row_win = row.win
    if row.limit >= 0 then
      local scope = "key:lifetime"
      if row_win > 0 then scope = "key:" .. row.period end
      consider("key_limit", scope, row.limit, row.spent, row.held, shadow_all)
    end
  end
end

consider("credits", "account", tonumber(snap[2]) - floor, charged("acct"), held("acct"), shadow_all)

local budget_specs = {}
for i = 1, n_budgets do
  local base = 12 + (i - 1) * 5
  local id, limit, shadow = ARGV[base + 1], tonumber(ARGV[base + 2]), ARGV[base + 3] == "1"
  local spent = tonumber(redis.call("GET", counter_key(i)) or "0")
  consider("budget", "budget:" .. id, limit, spent, held("b:" .. id), shadow or shadow_all)
  budget_specs[#budget_specs + 1] = id .. "@" .. ARGV[base + 4] .. "@" .. ARGV[base + 5]
end

if refusal ~= nil and not refusal.shadow then
  return {0, refusal.code, refusal.scope, refusal.limit, refusal.spent, refusal.held}
end

redis.call("HSET", K.holds, hold_id, format_hold({amount = amount, lease = lease_expiry_ms, row_ref = row_ref,
  row_win = int(row_win), budgets_text = table.concat(budget_specs, ","), started = 0, contained = false}))
redis.call("ZADD", K.leases, lease_expiry_ms, hold_id)
redis.call("HINCRBY", K.held, "acct", ARGV[3])
if row_ref ~= "" then
  redis.call("HINCRBY", K.held, "row:" .. row_ref, ARGV[3])
end
for i = 1, n_budgets do
  redis.call("HINCRBY", K.held, "b:" .. ARGV[12 + (i - 1) * 5 + 1], ARGV[3])
end
if refusal ~= nil then
  return {1, tight_scope, tight_remaining, refusal.code, refusal.scope, refusal.limit, refusal.spent, refusal.held}
end
return {1, tight_scope, tight_remaining, "", "", 0, 0, 0}
