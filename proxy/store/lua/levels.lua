-- levels: every scope's limit, spent and held for many keys, in one round trip, by the rules
-- reserve.lua enforces (row_level in _common.lua; budgets are their window's counter plus their
-- holds).
-- Sent after the key binding (K, N_BASE: the fixed keys of SCRIPT_KEYS["levels"]) and
-- _common.lua (proxy/store/scripts.py); an error names the file and line it comes from.
-- KEYS: the account's (K), then KEYS[N_BASE + i] the counter of budget i in its window
-- ARGV[1..3] day, week, month window starts (ms)  ARGV[4] n: how many row refs follow
-- ARGV[5..4+n] the row refs, then one budget id per budget counter, in KEYS order
-- Returns {fetched_ms (-1: no snapshot), remaining, account charged, account held, {row...}, {budget...}}
-- with row = {status, active (0/1), expires_ms (-1: never), limit (-1: none), period ("-":
-- lifetime), window start ms (0: lifetime), spent, held}, status one of ROW_NONE ("none"),
-- ROW_UNREADABLE ("unreadable"), ROW_OK ("ok") (proxy/store/scripts.py names the same), and
-- budget = {spent, held}. Amounts are micros.
local ROW_NONE, ROW_UNREADABLE, ROW_OK = "none", "unreadable", "ok"
local windows = {day = tonumber(ARGV[1]), week = tonumber(ARGV[2]), month = tonumber(ARGV[3])}
local n_rows = tonumber(ARGV[4])
local ROWS_FROM = 5
local BUDGET_IDS_FROM = ROWS_FROM + n_rows
local snap = redis.call("HMGET", K.snap, "fetched_ms", "remaining")
local fetched_ms = tonumber(snap[1] or "-1")
local acct_charged = tonumber(redis.call("HGET", K.chsum, "acct") or "0")
local acct_held = tonumber(redis.call("HGET", K.held, "acct") or "0")
local rows = {}
for i = 1, n_rows do
  local level = nil
  if fetched_ms >= 0 then level = row_level(ARGV[ROWS_FROM + i - 1], windows, fetched_ms) end
  if level == nil then
    rows[i] = {ROW_NONE, 0, -1, -1, "-", 0, 0, 0}
  elseif level == "!" then
    rows[i] = {ROW_UNREADABLE, 0, -1, -1, "-", 0, 0, 0}
  else
    local active = 0
    if level.active then active = 1 end
    rows[i] = {ROW_OK, active, level.expires_ms, level.limit, level.period, level.win, level.spent, level.held}
  end
end
local budgets = {}
for i = 1, #KEYS - N_BASE do
  local id = ARGV[BUDGET_IDS_FROM + i - 1]
  budgets[i] = {tonumber(redis.call("GET", KEYS[N_BASE + i]) or "0"),
                    tonumber(redis.call("HGET", K.held, "b:" .. id) or "0")}
end
return {fetched_ms, tonumber(snap[2] or "0"), acct_charged, acct_held, rows, budgets}
