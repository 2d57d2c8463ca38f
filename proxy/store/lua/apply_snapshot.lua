-- apply_snapshot: replace the credits snapshot, and forget charges and holds the upstream now contains.
-- Sent after the key binding (K, N_BASE: the fixed keys of SCRIPT_KEYS["apply_snapshot"]) and
-- _common.lua (proxy/store/scripts.py); an error names the file and line it comes from.
-- KEYS: the account's (K)
-- ARGV[1] fetch start (ms, store clock)  ARGV[2] remaining (micros)  ARGV[3] containment margin (ms)
-- ARGV[4] now (ms, store clock)  ARGV[5] the account's credit_usage (micros, "" = not given)
-- ARGV[6] containment horizon (ms)  ARGV[7..] pairs of row field ("r:<row_ref>"), row value
-- (RowState.encode in proxy/store/records.py, or "!" for a row that could not be read)
-- Returns 1 when applied, 0 when ignored because the stored snapshot was fetched later.
--
-- A charge, or the hold of a call in flight, leaves an upstream scope when both hold:
--   - timing: its call was answered before the fetch began (a hold: at least `margin` before,
--     since the upstream pre-charges a call before it answers it), and
--   - figures: the scope's figure has risen by it since the call was admitted (figures_contain
--     and K.pend in _common.lua). A credits endpoint that lags leaves such charges counted.
-- A charge the figures have not shown within `horizon` of passing the timing test leaves anyway.
local fetched_ms = tonumber(ARGV[1])
local margin = tonumber(ARGV[3])
local now_ms = tonumber(ARGV[4])
local horizon = tonumber(ARGV[6])
local ROWS_FROM = 7
local SWEEP_COUNT = 64
local stored = redis.call("HGET", K.snap, "fetched_ms")
if stored and tonumber(stored) >= fetched_ms then
  -- A stamp from the future (written by an instance whose clock ran ahead) must not freeze the
  -- snapshot: it is replaced.
  if tonumber(stored) <= now_ms + 5000 then
    return 0
  end
end
redis.call("DEL", K.snap)
redis.call("HSET", K.snap, "fetched_ms", ARGV[1], "remaining", ARGV[2])
if ARGV[5] ~= "" then
  redis.call("HSET", K.snap, "usage", ARGV[5])
end
for i = ROWS_FROM, #ARGV, 2 do
  redis.call("HSET", K.snap, ARGV[i], ARGV[i + 1])
end
local memo = {}
local slot_ms = math.max(1, math.floor(horizon / 10))
local slot = fetched_ms - fetched_ms % slot_ms

-- Charges of calls the upstream answered before the fetch started pass the timing test. One
-- without a baseline, or on the account while it has no credit_usage, leaves now; the others
-- join their scope's pending sum for this slot. Read and removed a chunk at a time.
local gone, joined = {}, {}
local function pend(field, amount, b)
  if b == nil or field == "acct" and figure_of(memo, field) == nil then
    gone[field] = (gone[field] or 0) + amount
    return
  end
  local j = joined[field]
  if j == nil then
    joined[field] = {amount = amount, b = b}
  else
    j.amount = j.amount + amount
    if b > j.b then j.b = b end
  end
end
local CHUNK = 500
local done = redis.call("ZRANGEBYSCORE", K.chlog, "-inf", "(" .. ARGV[1])
for from = 1, #done, CHUNK do
  local entries = {unpack(done, from, math.min(from + CHUNK - 1, #done))}
  local recs = redis.call("HMGET", K.chamt, unpack(entries))
  for i = 1, #entries do
    local amount, row_field = nil, ""
    if recs[i] then amount, row_field = string.match(recs[i], "^(%d+)|(.*)$") end
    if amount then
      local _, b = charge_of(entries[i])
      pend("acct", tonumber(amount), b.acct)
      if row_field ~= "" then pend(row_field, tonumber(amount), b.row) end
    end
  end
  redis.call("HDEL", K.chamt, unpack(entries))
end
redis.call("ZREMRANGEBYSCORE", K.chlog, "-inf", "(" .. ARGV[1])
for field, amount in pairs(gone) do
  decr(K.chsum, field, amount)
end
for field, j in pairs(joined) do
  local key = field .. "|" .. int(slot)
  local rec = redis.call("HGET", K.pend, key)
  local a, top = nil, nil
  if rec then a, top = string.match(rec, "^(%d+)|(%-?%d+)$") end
  if a then
    j.amount = j.amount + tonumber(a)
    if tonumber(top) > j.b then j.b = tonumber(top) end
  end
  redis.call("HSET", K.pend, key, int(j.amount) .. "|" .. int(j.b))
end

-- Pending sums leave their scope as far as its figure has risen, oldest first, or whole once
-- past the horizon.
local by_field = {}
local pending = redis.call("HGETALL", K.pend)
for i = 1, #pending, 2 do
  local field, at = string.match(pending[i], "^(.*)|(%-?%d+)$")
  local a, top = string.match(pending[i + 1], "^(%d+)|(%-?%d+)$")
  if field and a then
    by_field[field] = by_field[field] or {}
    table.insert(by_field[field], {key = pending[i], at = tonumber(at), amount = tonumber(a), b = tonumber(top)})
  else
    redis.call("HDEL", K.pend, pending[i])
  end
end
for field, list in pairs(by_field) do
  table.sort(list, function(x, y) return x.at < y.at end)
  local timing_only = field == "acct" and figure_of(memo, field) == nil
  for _, p in ipairs(list) do
    local d = 0
    if timing_only or p.at + slot_ms <= fetched_ms - horizon then
      d = p.amount
    else
      local floor
      d, floor = covered(memo, field, p.b, p.amount)
      if d ~= nil and d > 0 then redis.call("HSET", K.wm, field, int(floor + d)) end
      d = d or 0
    end
    if d > 0 then
      decr(K.chsum, field, d)
      if d < p.amount then
        redis.call("HSET", K.pend, p.key, int(p.amount - d) .. "|" .. int(p.b))
      else
        redis.call("HDEL", K.pend, p.key)
      end
    end
  end
end

-- The pre-charges of calls still in flight that the upstream answered before it, once the
-- figures show them; the others are looked at again by the next snapshot.
local started = redis.call("ZRANGEBYSCORE", K.started, "-inf", int(fetched_ms - margin))
for _, id in ipairs(started) do
  local rec = redis.call("HGET", K.holds, id)
  local h = rec and parse_hold(rec)
  if h and not h.contained then
    if figures_contain(memo, id, h) then contain(id, h) end
  elseif rec and h == nil then
    quarantine(id, rec)
  else
    redis.call("ZREM", K.started, id)
  end
end

-- A watermark matters while its scope has something the figures may yet show.
for _, field in ipairs(redis.call("HKEYS", K.wm)) do
  if field ~= "sweep" and not by_field[field] then
    local scope = field
    if field ~= "acct" then scope = string.match(field, "^(.*):%-?%d+$") or field end
    if not redis.call("HGET", K.chsum, field) and not redis.call("HGET", K.held, scope) then
      redis.call("HDEL", K.wm, field)
    end
  end
end
-- Records of calls gone (settled by a release that does not remove them), a few a run.
local cursor = redis.call("HGET", K.wm, "sweep") or "0"
local scan = redis.call("HSCAN", K.base, cursor, "COUNT", SWEEP_COUNT)
for i = 1, #scan[2], 2 do
  local id = scan[2][i]
  if redis.call("HEXISTS", K.holds, id) == 0 then
    redis.call("HDEL", K.base, id)
  end
end
if scan[1] == "0" then
  redis.call("HDEL", K.wm, "sweep")
else
  redis.call("HSET", K.wm, "sweep", scan[1])
end
return 1
