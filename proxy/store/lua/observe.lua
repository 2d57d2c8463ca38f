-- observe: record the cost ImageRouter charged one call of a price signature, so later calls of
-- that signature hold the highest cost of a recent window (proxy/guard/observed.py). The highest
-- cost and the count are kept per bucket of the window (a window is `buckets` buckets of
-- `bucket_ms`); buckets older than the window are dropped here, and the hash expires with it.
-- The index bounds how many signatures an account learns at once: a signature not written
-- within the window leaves it, and a new one that finds it full is not recorded (its calls keep
-- the conservative hold).
-- Sent alone: nothing is prepended.
-- KEYS[1] the signature's hash: "w" = bucket_ms its buckets were counted in, "sig" = its text,
--         "m:<bucket>" = highest cost (micros), "n:<bucket>" = calls settled with a cost
-- KEYS[2] the index (sorted set: signature digest by when it was last written, ms)
-- ARGV[1] now ms   ARGV[2] bucket_ms   ARGV[3] the current bucket (now // bucket_ms)
-- ARGV[4] the oldest bucket of the window   ARGV[5] index entries written before this (ms) leave
-- ARGV[6] the hash's time to live (ms)   ARGV[7] cost micros (>= 0)   ARGV[8] max signatures
-- ARGV[9] the signature's digest (its index member)   ARGV[10] its text
-- Numbers go back to Redis as the strings they came in (a Lua number may print as 1e+12).
-- Returns {highest cost in the window, calls in the window} after the write; {-1, 0} when the
-- index is full and the signature is not in it.
local sig, index = KEYS[1], KEYS[2]
local current = ARGV[3]
local oldest = tonumber(ARGV[4])
local cost = tonumber(ARGV[7])
local max_sigs = tonumber(ARGV[8])

redis.call("ZREMRANGEBYSCORE", index, "-inf", "(" .. ARGV[5])
if not redis.call("ZSCORE", index, ARGV[9]) and redis.call("ZCARD", index) >= max_sigs then
  return {-1, 0}
end
if redis.call("HGET", sig, "w") ~= ARGV[2] then
  redis.call("DEL", sig) -- counted in other buckets (the window was changed): start afresh
end
local highest = redis.call("HGET", sig, "m:" .. current)
if not highest or cost > tonumber(highest) then
  redis.call("HSET", sig, "m:" .. current, ARGV[7])
end
redis.call("HINCRBY", sig, "n:" .. current, 1)
redis.call("HSET", sig, "w", ARGV[2], "sig", ARGV[10])

local top, count = 0, 0
local fields = redis.call("HGETALL", sig)
for i = 1, #fields, 2 do
  local name, value = fields[i], fields[i + 1]
  local kind, bucket = string.match(name, "^([mn]):(%-?%d+)$")
  if kind then
    if tonumber(bucket) < oldest then
      redis.call("HDEL", sig, name)
    elseif kind == "m" then
      top = math.max(top, tonumber(value))
    else
      count = count + tonumber(value)
    end
  end
end
redis.call("PEXPIRE", sig, ARGV[6])
redis.call("ZADD", index, ARGV[1], ARGV[9])
return {top, count}
