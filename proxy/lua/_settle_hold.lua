-- Shared by reserve.lua (to reclaim expired leases) and settle.lua: settle one hold.
-- A hold record is "amount|lease_expiry_ms|row_ref|row_window_ms|budgets" where budgets is
-- "id@window_start_ms@window_end_ms" joined by ",". cost < 0 charges the full hold (the upstream
-- may have billed); cost = 0 releases it. Returns the amount charged, or false if no such hold.
local function settle_hold(prefix, hold_id, cost, now_ms)
  local holds, held, leases = prefix .. "holds", prefix .. "held", prefix .. "leases"
  local rec = redis.call("HGET", holds, hold_id)
  if not rec then
    return false
  end
  local f = {}
  for part in string.gmatch(rec .. "|", "([^|]*)|") do
    f[#f + 1] = part
  end
  local amount, row_ref, row_win, budgets = tonumber(f[1]), f[3], f[4], f[5]
  local charge = cost
  if charge < 0 then
    charge = amount
  end
  local function unhold(field)
    if redis.call("HINCRBY", held, field, -amount) <= 0 then
      redis.call("HDEL", held, field)
    end
  end
  unhold("acct")
  if row_ref ~= "" then
    unhold("row:" .. row_ref)
  end
  if charge > 0 then
    local chsum, chlog, chamt = prefix .. "chsum", prefix .. "chlog", prefix .. "chamt"
    local row_field = ""
    redis.call("HINCRBY", chsum, "acct", charge)
    if row_ref ~= "" then
      row_field = "row:" .. row_ref .. ":" .. row_win
      redis.call("HINCRBY", chsum, row_field, charge)
    end
    redis.call("ZADD", chlog, now_ms, hold_id)
    redis.call("HSET", chamt, hold_id, charge .. "|" .. row_field)
  end
  for spec in string.gmatch(budgets, "([^,]+)") do
    local id, win, win_end = string.match(spec, "^(.*)@(%-?%d+)@(%-?%d+)$")
    unhold("b:" .. id)
    if charge > 0 then
      local counter = prefix .. "b:" .. id .. ":" .. win
      redis.call("INCRBY", counter, charge)
      if tonumber(win_end) > 0 then
        -- keep a finished window a day past its end, for `status` and audits
        redis.call("PEXPIREAT", counter, tonumber(win_end) + 86400000)
      end
    end
  end
  redis.call("HDEL", holds, hold_id)
  redis.call("ZREM", leases, hold_id)
  return charge
end
