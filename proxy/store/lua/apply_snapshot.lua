-- apply_snapshot: replace the credits snapshot, and forget charges and holds the upstream now contains.
-- Sent after the key binding (K, N_BASE: the fixed keys of SCRIPT_KEYS["apply_snapshot"]) and
-- _common.lua (proxy/store/scripts.py); an error names the file and line it comes from.
-- KEYS: the account's (K)
-- ARGV[1] fetch start (ms, store clock)  ARGV[2] remaining (micros)  ARGV[3] containment margin (ms)
-- ARGV[4] now (ms, store clock)  ARGV[5..] pairs of row field ("r:<row_ref>"), row value
-- (RowState.encode in proxy/store/records.py, or "!" for a row that could not be read)
-- Returns 1 when applied, 0 when ignored because the stored snapshot was fetched later.
local fetched_ms = tonumber(ARGV[1])
local margin = tonumber(ARGV[3])
local now_ms = tonumber(ARGV[4])
local ROWS_FROM = 5
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
for i = ROWS_FROM, #ARGV, 2 do
  redis.call("HSET", K.snap, ARGV[i], ARGV[i + 1])
end
-- Charges of calls the upstream answered before the fetch started are in its figures now.
local done = redis.call("ZRANGEBYSCORE", K.chlog, "-inf", "(" .. ARGV[1])
for _, id in ipairs(done) do
  local rec = redis.call("HGET", K.chamt, id)
  if rec then
    local amount, row_field = string.match(rec, "^(%d+)|(.*)$")
    if amount then
      for _, field in ipairs({"acct", row_field}) do
        if field ~= "" then decr(K.chsum, field, tonumber(amount)) end
      end
    end
    redis.call("HDEL", K.chamt, id)
  end
end
redis.call("ZREMRANGEBYSCORE", K.chlog, "-inf", "(" .. ARGV[1])
-- So are the pre-charges of calls still in flight that the upstream answered before it.
local started = redis.call("ZRANGEBYSCORE", K.started, "-inf", int(fetched_ms - margin))
for _, id in ipairs(started) do
  local rec = redis.call("HGET", K.holds, id)
  local h = rec and parse_hold(rec)
  if h and not h.contained then
    contain(id, h)
  elseif rec and h == nil then
    quarantine(id, rec)
  else
    redis.call("ZREM", K.started, id)
  end
end
return 1
