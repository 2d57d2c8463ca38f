-- apply_snapshot: replace the credits snapshot, and forget charges the upstream now contains.
-- KEYS[1] snap  KEYS[2] chsum  KEYS[3] chlog  KEYS[4] chamt
-- ARGV[1] fetch start (ms)  ARGV[2] remaining (micros)  ARGV[3..] row field, row value pairs
-- Returns 1 when applied, 0 when ignored because the stored snapshot was fetched later.
local fetched_ms = tonumber(ARGV[1])
local stored = redis.call("HGET", KEYS[1], "fetched_ms")
if stored and tonumber(stored) >= fetched_ms then
  return 0
end
redis.call("DEL", KEYS[1])
redis.call("HSET", KEYS[1], "fetched_ms", ARGV[1], "remaining", ARGV[2])
for i = 3, #ARGV, 2 do
  redis.call("HSET", KEYS[1], ARGV[i], ARGV[i + 1])
end
-- Charges settled before the fetch started are in the upstream figures now.
local done = redis.call("ZRANGEBYSCORE", KEYS[3], "-inf", "(" .. ARGV[1])
for _, id in ipairs(done) do
  local rec = redis.call("HGET", KEYS[4], id)
  if rec then
    local amount, row_field = string.match(rec, "^(%d+)|(.*)$")
    for _, field in ipairs({"acct", row_field}) do
      if field ~= "" and redis.call("HINCRBY", KEYS[2], field, -tonumber(amount)) <= 0 then
        redis.call("HDEL", KEYS[2], field)
      end
    end
    redis.call("HDEL", KEYS[4], id)
  end
end
redis.call("ZREMRANGEBYSCORE", KEYS[3], "-inf", "(" .. ARGV[1])
return 1
