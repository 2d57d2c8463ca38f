-- alert_marks: the exactly-once decisions behind alert events for one scope. A mark is claimed
-- with HSETNX, so whichever instance asks first sends the event and nobody else ever does,
-- across instances and restarts. Marks live for one window: a newer window clears them (and
-- reports `recovered` when a threshold had fired in the old one); a reader still in an older
-- window changes nothing.
-- Sent alone: nothing is prepended (it touches no account key and uses nothing of _common.lua).
-- KEYS[1] the scope's marks hash (field "win" = the window its marks belong to)
-- KEYS[2] the scope's spend samples (sorted set, score = ms, member "<ms>:<spent>"), for projection
-- ARGV[1] window start ms (0: lifetime, or no window)   ARGV[2] expire the marks at (ms; 0: never)
-- ARGV[3] now ms   ARGV[4] spent micros   ARGV[5] limit micros (0: no projection)
-- ARGV[6] window end ms (0: none, no projection)   ARGV[7] minimum sample span for a rate (ms)
-- ARGV[8] rate horizon (ms, an hour)   ARGV[9] sample spacing (ms)
-- ARGV[10] n: how many of the names that follow are marks to claim
-- ARGV[11..10+n] the marks to claim; ARGV[11+n..] the marks to release
-- Projection: rate = (spent - oldest sample within the horizon) / its age, once that age is at
-- least ARGV[7]; the mark "projected" is claimed when spent + rate * (window end - now) >= limit.
-- Returns {claimed names, released names, recovered (0/1)}; {{}, {}, 0} to a stale reader.
local marks, samples = KEYS[1], KEYS[2]
local win = tonumber(ARGV[1])
local expire_at = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local spent = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])
local window_end = tonumber(ARGV[6])
local min_span = tonumber(ARGV[7])
local horizon = tonumber(ARGV[8])
local spacing = tonumber(ARGV[9])
local n_claim = tonumber(ARGV[10])
local CLAIMS_FROM = 11
local RELEASES_FROM = CLAIMS_FROM + n_claim

local stored = tonumber(redis.call("HGET", marks, "win") or "-1")
if stored > win then
  return {{}, {}, 0}
end
local recovered = 0
if stored >= 0 and stored < win then
  for _, name in ipairs(redis.call("HKEYS", marks)) do
    if string.sub(name, 1, 2) == "t:" then
      recovered = 1
      break
    end
  end
  redis.call("DEL", marks, samples)
end
if stored ~= win then
  redis.call("HSET", marks, "win", win)
end
if expire_at > 0 then
  redis.call("PEXPIREAT", marks, expire_at)
end

local claimed = {}
for i = CLAIMS_FROM, RELEASES_FROM - 1 do
  local name = ARGV[i]
  if redis.call("HSETNX", marks, name, now) == 1 then
    claimed[#claimed + 1] = name
  end
end
local released = {}
for i = RELEASES_FROM, #ARGV do
  local name = ARGV[i]
  if redis.call("HDEL", marks, name) == 1 then
    released[#released + 1] = name
  end
end

if limit > 0 and window_end > now and spent < limit then
  local newest = redis.call("ZREVRANGE", samples, 0, 0, "WITHSCORES")
  if #newest == 0 or now - tonumber(newest[2]) >= spacing then
    redis.call("ZADD", samples, now, now .. ":" .. spent)
    redis.call("ZREMRANGEBYSCORE", samples, "-inf", "(" .. (now - horizon - spacing))
    redis.call("PEXPIRE", samples, horizon + spacing)
  end
  local oldest = redis.call("ZRANGEBYSCORE", samples, now - horizon, "+inf", "WITHSCORES", "LIMIT", 0, 1)
  if #oldest > 0 then
    local t0 = tonumber(oldest[2])
    local s0 = tonumber(string.match(oldest[1], ":(%d+)$"))
    if now - t0 >= min_span and spent > s0 then
      local projected = spent + (spent - s0) * (window_end - now) / (now - t0)
      if projected >= limit and redis.call("HSETNX", marks, "projected", now) == 1 then
        claimed[#claimed + 1] = "projected"
      end
    end
  end
end
return {claimed, released, recovered}
