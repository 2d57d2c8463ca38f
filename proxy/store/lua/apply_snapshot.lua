-- apply_snapshot: replace the credits snapshot, and forget charges and holds the upstream now contains.
-- Sent after the key binding (K, N_BASE: the fixed keys of SCRIPT_KEYS["apply_snapshot"]) and
-- _common.lua (proxy/store/scripts.py); an error names the file and line it comes from.
-- KEYS: the account's (K)
-- ARGV[1] fetch start (ms, store clock)  ARGV[2] remaining (micros)  ARGV[3] containment margin (ms)
-- ARGV[4] now (ms, store clock)  ARGV[5] the account's credit_usage (micros, "" = not given)
-- ARGV[6..] pairs of row field ("r:<row_ref>"), row value (RowState.encode in
-- proxy/store/records.py, or "!" for a row that could not be read)
-- Returns 1 when applied, 0 when ignored because the stored snapshot was fetched later.
--
-- The rule (docs/state.md, "The credits refresher"): a charge, or the hold of a call still in
-- flight, leaves the upstream scopes' sums only when both hold:
--   - timing: its call was answered before the fetch began (a hold: at least `margin` before,
--     since the upstream pre-charges a call before it answers it), and
--   - figures: the account's credit_usage and, for a call on a key row, that row's period_spend
--     have risen by at least the amount since the call started (figures_contain in _common.lua).
-- A credits endpoint that lags (serves figures without the calls it has pre-charged) fails the
-- second: those charges and holds stay counted until a snapshot whose figures hold them.
-- The calls are taken oldest first; one the figures do not cover waits for the next snapshot.
local fetched_ms = tonumber(ARGV[1])
local margin = tonumber(ARGV[3])
local now_ms = tonumber(ARGV[4])
local ROWS_FROM = 6
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

-- The candidates, oldest first: charges logged before the fetch began, and holds of calls in
-- flight the upstream answered at least `margin` before it.
local due = {}
local logged = redis.call("ZRANGEBYSCORE", K.chlog, "-inf", "(" .. ARGV[1], "WITHSCORES")
for i = 1, #logged, 2 do
  due[#due + 1] = {id = logged[i], at = tonumber(logged[i + 1]), charge = true}
end
local started = redis.call("ZRANGEBYSCORE", K.started, "-inf", int(fetched_ms - margin), "WITHSCORES")
for i = 1, #started, 2 do
  due[#due + 1] = {id = started[i], at = tonumber(started[i + 1]), charge = false}
end
table.sort(due, function(a, b)
  if a.at ~= b.at then return a.at < b.at end
  if a.charge ~= b.charge then return a.charge end
  return a.id < b.id
end)

local scopes = {}
for _, d in ipairs(due) do
  local id = d.id
  if d.charge then
    local rec = redis.call("HGET", K.chamt, id)
    local amount, row_field = nil, ""
    if rec then amount, row_field = string.match(rec, "^(%d+)|(.*)$") end
    if not amount then
      -- no amount to forget
      redis.call("HDEL", K.chamt, id)
      redis.call("ZREM", K.chlog, id)
      redis.call("HDEL", K.base, id)
    else
      local row_ref = string.match(row_field, "^row:(.*):%-?%d+$") or ""
      if figures_contain(scopes, tonumber(amount), base_of(id), row_ref) then
        for _, field in ipairs({"acct", row_field}) do
          if field ~= "" then decr(K.chsum, field, tonumber(amount)) end
        end
        redis.call("HDEL", K.chamt, id)
        redis.call("ZREM", K.chlog, id)
        redis.call("HDEL", K.base, id)
      end
    end
  else
    local rec = redis.call("HGET", K.holds, id)
    local h = rec and parse_hold(rec)
    if h and not h.contained then
      if figures_contain(scopes, h.amount, base_of(id), h.row_ref) then
        contain(id, h)
      end
    elseif rec and h == nil then
      quarantine(id, rec)
    else
      redis.call("ZREM", K.started, id)
    end
  end
end

-- Figures recorded for a call this store no longer tracks (one a release that does not keep
-- them settled) are dropped.
for _, id in ipairs(redis.call("HKEYS", K.base)) do
  if redis.call("HEXISTS", K.holds, id) == 0 and redis.call("HEXISTS", K.chamt, id) == 0 then
    redis.call("HDEL", K.base, id)
  end
end
return 1
