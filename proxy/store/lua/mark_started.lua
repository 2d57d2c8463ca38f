-- mark_started: record that the upstream answered these holds' calls (it pre-charges first).
-- Sent after the key binding (K, N_BASE: the fixed keys of SCRIPT_KEYS["mark_started"]) and
-- _common.lua (proxy/store/scripts.py); an error names the file and line it comes from.
-- KEYS: the account's (K)
-- ARGV[1] containment margin (ms)  ARGV[2..] pairs of hold_id, started_ms
-- A hold whose call started at least `margin` before the stored snapshot's fetch began, and
-- whose amount that snapshot's figures have risen by (figures_contain in _common.lua), is in that
-- snapshot already and leaves the upstream scopes' held sums at once; the others wait in the
-- `started` sorted set for the next snapshot (apply_snapshot.lua). Returns how many were marked.
local margin = tonumber(ARGV[1])
local PAIRS_FROM = 2
local fetched = tonumber(redis.call("HGET", K.snap, "fetched_ms") or "-1")
local marked = 0
local memo = {}
for i = PAIRS_FROM, #ARGV, 2 do
  local hold_id, started = ARGV[i], tonumber(ARGV[i + 1])
  local rec = redis.call("HGET", K.holds, hold_id)
  local h = rec and parse_hold(rec)
  if rec and h == nil then
    quarantine(hold_id, rec)
  elseif h and h.started == 0 and not h.contained then
    h.started = started
    if fetched >= 0 and started + margin <= fetched and figures_contain(memo, hold_id, h) then
      contain(hold_id, h)
    else
      redis.call("HSET", K.holds, hold_id, format_hold(h))
      redis.call("ZADD", K.started, int(started), hold_id)
    end
    marked = marked + 1
  end
end
return marked
