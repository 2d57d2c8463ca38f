-- reserve: hold `amount` against every scope a request touches, all or nothing.
-- KEYS[1] snap    hash: fetched_ms, remaining, "r:<row_ref>" -> "active|expires_ms|limit|period|spend|period_start_ms"
-- KEYS[2] holds   KEYS[3] held   KEYS[4] leases   KEYS[5] chsum   (see settle_hold)
-- KEYS[5+i]       counter of local budget i in its current window (micro-dollars)
-- ARGV[1] now_ms  ARGV[2] hold_id  ARGV[3] amount (micros)  ARGV[4] lease_expiry_ms
-- ARGV[5] account floor (micros)  ARGV[6] max_staleness_ms  ARGV[7] row_ref ("" = none)
-- ARGV[8..10] day, week, month window starts (ms)  ARGV[11] shadow_all (0/1)  ARGV[12] n budgets
-- then per budget 5 values: id, limit (micros), shadow (0/1), window_start_ms, window_end_ms (0 = lifetime)
-- then the store epoch this instance adopted ("" = none yet; see Store.adopt_epoch)
-- Returns {1, tight_scope, tight_remaining, would_refuse_code, wr_scope, wr_limit, wr_spent, wr_held, R...}
--      or {0, code, scope, limit, spent, held, R...} with code in
--      no_snapshot, stale, key_inactive, key_expired, key_limit, credits, budget, cancelled, row_unreadable,
--      state_lost (the store lost its local budget state; only calls that touch a local budget)
-- where R... = reclaimed_count, reclaimed_micros, {quarantined hold ids}: expired leases this run
-- charged, and unreadable hold records it moved aside.
local prefix = string.sub(KEYS[1], 1, -5)
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

-- Reclaim leases of instances that died mid-request: charge the hold (the upstream may have billed).
local reclaimed, reclaimed_micros, quarantined = 0, 0, {}
local expired = redis.call("ZRANGEBYSCORE", KEYS[4], "-inf", now_ms, "LIMIT", 0, 100)
for _, id in ipairs(expired) do
  local charged = settle_hold(prefix, id, -1, now_ms, 0)
  if charged == "quarantined" then
    quarantined[#quarantined + 1] = id
  elseif charged == false then
    redis.call("ZREM", KEYS[4], id)  -- a lease without its hold
  else
    reclaimed, reclaimed_micros = reclaimed + 1, reclaimed_micros + charged
  end
end
local function reply(t)
  t[#t + 1] = reclaimed
  t[#t + 1] = reclaimed_micros
  t[#t + 1] = quarantined
  return t
end

-- A client that re-sends this script after a lost reply (Redis Cluster retries) finds its hold:
-- the first run already decided, so this one is allowed without holding twice.
if redis.call("HEXISTS", KEYS[2], hold_id) == 1 then
  return reply({1, "", -1, "", "", 0, 0, 0})
end
-- The proxy gave up on this reserve (its reply timed out) and asked for a release first.
if redis.call("EXISTS", prefix .. "tomb:" .. hold_id) == 1 then
  return reply({0, "cancelled", "store", 0, 0, 0})
end

-- Amnesia: the epoch this instance adopted is gone (a restart without persistence, FLUSHALL, a
-- failover to an empty replica) or replaced. Budget counters went with it, so local budgets
-- cannot be enforced until an operator runs `spend-guard store recover`.
local epoch_arg = ARGV[13 + n_budgets * 5] or ""
if epoch_arg ~= "" then
  local epoch = redis.call("GET", prefix .. "epoch")
  if epoch ~= epoch_arg then
    local why = "the store's state was emptied"
    if epoch then why = "the store's epoch changed" end
    redis.call("SET", prefix .. "lost", why .. "|" .. int(now_ms), "NX")
    if not epoch then redis.call("SET", prefix .. "epoch", epoch_arg) end
  end
end
if n_budgets > 0 and redis.call("EXISTS", prefix .. "lost") == 1 then
  return reply({0, "state_lost", "store", 0, 0, 0})
end

local snap = redis.call("HMGET", KEYS[1], "fetched_ms", "remaining")
if not snap[1] then
  return reply({0, "no_snapshot", "account", 0, 0, 0})
end
local fetched_ms = tonumber(snap[1])
if now_ms - fetched_ms > max_staleness_ms then
  return reply({0, "stale", "account", 0, 0, now_ms - fetched_ms})
end

local function held(field)
  return tonumber(redis.call("HGET", KEYS[3], field) or "0")
end
local function charged(field)
  return tonumber(redis.call("HGET", KEYS[5], field) or "0")
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
  local row = row_level(prefix, row_ref, windows, fetched_ms)
  if row == "!" then
    -- The snapshot had this key's row but could not read it: its limit cannot be checked.
    return reply({0, "row_unreadable", "key", 0, 0, 0})
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
  local spent = tonumber(redis.call("GET", KEYS[5 + i]) or "0")
  consider("budget", "budget:" .. id, limit, spent, held("b:" .. id), shadow or shadow_all)
  budget_specs[#budget_specs + 1] = id .. "@" .. ARGV[base + 4] .. "@" .. ARGV[base + 5]
end

if refusal ~= nil and not refusal.shadow then
  return reply({0, refusal.code, refusal.scope, refusal.limit, refusal.spent, refusal.held})
end

redis.call("HSET", KEYS[2], hold_id, format_hold({amount = amount, lease = lease_expiry_ms, row_ref = row_ref,
  row_win = int(row_win), budgets_text = table.concat(budget_specs, ","), started = 0, contained = false}))
redis.call("ZADD", KEYS[4], lease_expiry_ms, hold_id)
redis.call("HINCRBY", KEYS[3], "acct", ARGV[3])
if row_ref ~= "" then
  redis.call("HINCRBY", KEYS[3], "row:" .. row_ref, ARGV[3])
end
for i = 1, n_budgets do
  redis.call("HINCRBY", KEYS[3], "b:" .. ARGV[12 + (i - 1) * 5 + 1], ARGV[3])
end
if refusal ~= nil then
  return reply({1, tight_scope, tight_remaining, refusal.code, refusal.scope, refusal.limit, refusal.spent, refusal.held})
end
return reply({1, tight_scope, tight_remaining, "", "", 0, 0, 0})
