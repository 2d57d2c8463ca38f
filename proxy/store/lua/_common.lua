-- _common: what every ledger script shares: exact integer text, hold records, settle_hold and
-- the key row level. Not run alone: proxy/store/scripts.py sends each ledger script as
--   1. the run's memo, `local ONCE = {}` (below),
--   2. its key binding, `local K = {snap = KEYS[1], ...}` and `local N_BASE = <n>` (the account's
--      fixed keys that script receives first: proxy/store/keyspace.py SCRIPT_KEYS),
--   3. this file,
--   4. the script's own file.
-- An error names the file and its own line (`_common.lua:126`), not the line of the whole text.
--
-- ONCE (a table, declared before the key binding) is what one run of Redis has learned of state
-- that only this run can change, kept so that the operations of one run read it once: a batch
-- (proxy/store/batch.py) runs several operations in one run and shares one ONCE among them. A
-- script that changes such state here says so in ONCE in the same step (mark_lost, reserve.lua).
--   ONCE.lost         whether K.lost exists (nil: not read yet)
--   ONCE.epoch        an epoch K.epoch was found to hold (or was set to)
--   ONCE.first_lease  no lease in K.leases expires before it (ms; nil: not read yet)
--
-- Keys: a script touches only keys it received in KEYS. K names the account's fixed keys
-- (KEYS[1..N_BASE]); a script's own keys follow (each script's header says which).
--
-- Redis runs Lua 5.1, where every number is a double and `tostring`/`..` print with "%.14g":
-- 10^14 becomes "1e+14" and -0 becomes "-0", which INCRBY/HINCRBY refuse. Every amount written
-- to Redis goes through int(); amounts are bounded in Python (money.MAX_ABS_MICROS = 10^15,
-- below 2^53, so doubles hold them exactly).
local function int(x)
  return string.format("%d", x)
end

-- A hold record (the value of K.holds[hold_id]) is version 2:
--   "amount|lease_expiry_ms|row_ref|row_win|budgets|started_ms|contained"
-- amount in micro-dollars; lease_expiry_ms when the hold may be reclaimed; row_ref the key row
-- ("" = none) and row_win its window start (ms, 0 = lifetime); budgets "id@window_start_ms@
-- window_end_ms" joined by ","; started_ms when the upstream answered (it pre-charges before
-- answering; 0 = not yet); contained "1" once a credits snapshot fetched after started_ms holds
-- the call's pre-charge: from then on the hold no longer counts against the upstream scopes
-- (account, key row), only against local budgets. Not contained, it may carry the figures of the
-- snapshot the call was admitted against, "0;<credit_usage>;<key row spend>" ("" = not known;
-- figures_contain below): a release that reads only "1" as contained reads that as "0".
--
-- The forms read, by version:
--   "v2|" then the seven fields: version 2 tagged, read but not written yet. A form's reader
--     ships one release before its writer: a rolling deploy runs two releases on one store, and
--     a release quarantines a record it cannot read. The tag tells any later form apart.
--   the seven fields untagged: version 2, as format_hold writes it.
--   the first five fields alone: version 1 (legacy), written before started_ms and contained
--     existed. Only a hold taken by a release that old can have one, and every hold ends by its
--     settle or, once its lease (the policy's hold_ttl_s) has expired, by the next reserve's
--     reclaim. So once a fleet has run releases that write version 2 for longer than
--     hold_ttl_s with calls coming in, none is left, and the version 1 reader goes in the
--     release after that; a record still left then is quarantined, never misread.
-- Any other shape is unreadable (nil): the caller quarantines it.
local HOLD_TAG = "v2|"
local HOLD_V1_FIELDS, HOLD_V2_FIELDS = 5, 7
local function parse_hold(rec)
  local tagged = string.sub(rec, 1, #HOLD_TAG) == HOLD_TAG
  if tagged then rec = string.sub(rec, #HOLD_TAG + 1) end
  local f = {}
  for part in string.gmatch(rec .. "|", "([^|]*)|") do
    f[#f + 1] = part
  end
  if #f ~= HOLD_V2_FIELDS and (tagged or #f ~= HOLD_V1_FIELDS) then return nil end
  if not string.match(f[1], "^%d+$") or not string.match(f[2], "^%-?%d+$")
    or not string.match(f[4], "^%-?%d+$") then
    return nil
  end
  local budgets = {}
  for spec in string.gmatch(f[5], "([^,]+)") do
    local id, win, win_end = string.match(spec, "^(.*)@(%-?%d+)@(%-?%d+)$")
    if not id then return nil end
    budgets[#budgets + 1] = {id = id, win = win, win_end = tonumber(win_end)}
  end
  local started, contained, figures = 0, false, ""
  if #f == HOLD_V2_FIELDS then
    if not string.match(f[6], "^%d+$") then return nil end
    started, contained = tonumber(f[6]), f[7] == "1"
    figures = string.match(f[7], "^0(;%-?%d*;%-?%d*)$") or ""
  end
  return {amount = tonumber(f[1]), lease = f[2], row_ref = f[3], row_win = f[4], budgets_text = f[5],
          budgets = budgets, started = started, contained = contained, figures = figures}
end

-- Writes version 2, untagged (parse_hold says why); a version 1 record rewritten (mark_started,
-- contain) becomes version 2.
local function format_hold(h)
  local contained = "0" .. (h.figures or "")
  if h.contained then contained = "1" end
  return int(h.amount) .. "|" .. h.lease .. "|" .. h.row_ref .. "|" .. h.row_win .. "|" .. h.budgets_text
    .. "|" .. int(h.started) .. "|" .. contained
end

-- Why the store lost its local budget state, as the marker K.lost records it ("<why>|<ms>",
-- the first reason found; proxy/store/identity.py names the same as LOST_*).
local LOST_EMPTIED = "the store's state was emptied"
local LOST_CHANGED = "the store's epoch changed"
local LOST_UNKNOWN = "the store has no epoch and nothing shows it is new"
local LOST_ROLLED_BACK = "the store went back to an earlier copy of itself, without charges it had taken"
local LOST_VANISHED = "a budget counter vanished during its window (evicted?)"

local function mark_lost(why, now_ms)
  redis.call("SET", K.lost, why .. "|" .. int(now_ms), "NX")
  ONCE.lost = true
end

-- The rollback check. K.seq counts, per instance, the settles the store took from it; an
-- instance that has seen the store take `seen` of its settles finds at least that many there,
-- unless the store went back to an earlier copy of itself (a failover to a replica that missed
-- them, a restore from an older file), which lost the charges of those settles too. Only that
-- instance's own settles raise its count, so other instances' traffic cannot hide the gap. The
-- loss recorded, the count is raised to `seen`: one rollback is recorded once.
local function check_sequence(instance, seen, now_ms)
  if instance == "" or seen <= 0 then return end
  if tonumber(redis.call("HGET", K.seq, instance) or "0") < seen then
    mark_lost(LOST_ROLLED_BACK, now_ms)
    redis.call("HSET", K.seq, instance, int(seen))
  end
end

local function decr(key, field, amount)
  if redis.call("HINCRBY", key, field, int(0 - amount)) <= 0 then
    redis.call("HDEL", key, field)
  end
end

-- Take a hold out of the upstream scopes' held sums (account, key row): a snapshot now holds it.
local function contain(hold_id, h)
  decr(K.held, "acct", h.amount)
  if h.row_ref ~= "" then
    decr(K.held, "row:" .. h.row_ref, h.amount)
  end
  h.contained = true
  redis.call("HSET", K.holds, hold_id, format_hold(h))
  redis.call("ZREM", K.started, hold_id)
end

-- A record that cannot be read is moved aside, never left where every reserve would trip on it.
local function quarantine(hold_id, rec)
  redis.call("HSET", K.quarantine, hold_id, rec)
  redis.call("HDEL", K.holds, hold_id)
  redis.call("ZREM", K.leases, hold_id)
  redis.call("ZREM", K.started, hold_id)
  redis.call("HDEL", K.base, hold_id)
end

-- A key row's period spend that counts in the window starting at `win` (0 = lifetime), from its
-- snapshot fields (RowState.encode): a row whose period began before that window (or, with no
-- period start, a snapshot fetched before it) counts as zero.
local function row_counted(f, win, fetched_ms)
  local spend, period_start_ms = tonumber(f[5]), tonumber(f[6])
  if win > 0 then
    if period_start_ms >= 0 then
      if period_start_ms < win then return 0 end
    elseif fetched_ms < win then
      return 0
    end
  end
  return spend
end

local function split_row(row)
  local f = {}
  for part in string.gmatch(row .. "|", "([^|]*)|") do
    f[#f + 1] = part
  end
  return f
end

-- Containment by figures (docs/state.md, "The credits refresher"). A snapshot takes a charge, or
-- the hold of a pre-charged call in flight, off an upstream scope only once the scope's figure has
-- risen by at least it since the call was admitted: the account's `credit_usage` (snap field
-- "usage") for "acct", a key row's period spend in the charge's window for "row:<ref>:<win>".
--   figures ";<acct>;<row>": the figures of the snapshot the call was admitted against ("" = not
--           known), carried by its hold record and then by its charge's id in K.chlog and K.chamt
--           ("<hold_id>;<acct>;<row>"); that snapshot was fetched before the call was sent.
--   K.pend  "<field>|<slot>" -> "<amount>|<baseline>": charges past the timing test whose figure
--           has not yet risen by them, summed per scope field and per slot (a tenth of the
--           horizon) of the snapshot that found them due; the baseline is the highest among them.
--   K.wm    field -> how far up that scope's figure is spoken for by what has left it, so that one
--           rise never contains two calls, across snapshots too.
--   K.base  hold_id -> "<acct>|<row>", "1" where containing the call in flight used that figure's
--           rise, until it settles.
-- A scope takes min(amount, figure - max(watermark, baseline)) off a pending sum, oldest first,
-- and moves its watermark up by that much. Pending sums the figures have not reached within the
-- horizon leave by the timing rule alone. Charges and holds without figures (admitted against a
-- snapshot without `credit_usage`, or by a release that did not record them) and the account
-- while the snapshot has no `credit_usage` keep the timing rule.
local function parse_figures(text)
  local acct, row = string.match(text, "^;(%-?%d*);(%-?%d*)$")
  if not acct then return {} end
  return {acct = tonumber(acct), row = tonumber(row)}
end

-- A charge's entry in K.chlog and K.chamt: its hold id and the figures its call was admitted against.
local function charge_of(entry)
  local hold_id, figures = string.match(entry, "^([^;]*)(;%-?%d*;%-?%d*)$")
  if not hold_id then return entry, {} end
  return hold_id, parse_figures(figures)
end

-- The stored snapshot's figure for a scope field, or nil when it has none (no `credit_usage`; a
-- key row missing or unreadable). `memo` caches them for one script run.
local function figure_of(memo, field)
  if memo[field] ~= nil then return memo[field] or nil end
  local fig = nil
  if field == "acct" then
    fig = tonumber(redis.call("HGET", K.snap, "usage") or "")
  else
    local ref, win = string.match(field, "^row:(.*):(%-?%d+)$")
    local row = ref and redis.call("HGET", K.snap, "r:" .. ref)
    if row and row ~= "!" then
      fig = row_counted(split_row(row), tonumber(win), tonumber(redis.call("HGET", K.snap, "fetched_ms")))
    end
  end
  memo[field] = fig or false
  return fig
end

-- How much of `amount` (baseline `b`) the scope's figure has risen by and no other call took.
local function covered(memo, field, b, amount)
  local fig = figure_of(memo, field)
  if fig == nil then return nil end
  local w = tonumber(redis.call("HGET", K.wm, field) or "")
  local floor = b
  if w ~= nil and w > floor then floor = w end
  local room = fig - floor
  if room <= 0 then return 0, floor end
  if room < amount then return room, floor end
  return amount, floor
end

-- Whether the stored snapshot contains hold h (hold_id) in flight: the account's and its key row's
-- figures have both risen by its amount. If so, their watermarks move up and the record says so.
local function figures_contain(memo, hold_id, h)
  local b = parse_figures(h.figures)
  local used, moves = {"", ""}, {}
  local scopes = {{"acct", b.acct, 1}}
  if h.row_ref ~= "" then scopes[2] = {"row:" .. h.row_ref .. ":" .. h.row_win, b.row, 2} end
  for _, s in ipairs(scopes) do
    local field, base, slot = s[1], s[2], s[3]
    if base ~= nil and (field ~= "acct" or figure_of(memo, field) ~= nil) then
      local d, floor = covered(memo, field, base, h.amount)
      if d == nil or d < h.amount then return false end
      moves[#moves + 1] = {field, floor + h.amount}
      used[slot] = "1"
    end
  end
  for _, m in ipairs(moves) do
    redis.call("HSET", K.wm, m[1], int(m[2]))
  end
  if #moves > 0 then redis.call("HSET", K.base, hold_id, used[1] .. "|" .. used[2]) end
  return true
end

-- The budget counters a script received: KEYS[first_key..] with their specs ("<id>@<window
-- start ms>", keyspace.spec() in Python) in ARGV[first_arg..], in the same order.
local function declared_counters(first_key, first_arg)
  local counters = {}
  for i = first_key, #KEYS do
    counters[ARGV[first_arg + i - first_key]] = KEYS[i]
  end
  return counters
end

-- Append to `list` each of `items` not yet in `seen` (a set of the same strings).
local function add_new(list, seen, items)
  for _, s in ipairs(items) do
    if not seen[s] then
      seen[s] = true
      list[#list + 1] = s
    end
  end
end

-- The counters charging hold h needs that are not among those given, as specs ({} = none).
local function missing_counters(h, counters)
  local missing = {}
  for _, b in ipairs(h.budgets) do
    local s = b.id .. "@" .. b.win
    if not counters[s] then missing[#missing + 1] = s end
  end
  return missing
end

-- Settle one hold. cost < 0 charges the full hold (the upstream may have billed); cost = 0
-- releases it. started_ms (0 = unknown) is when the upstream answered; a charge is logged at
-- that instant, so the first snapshot fetched after it drops the charge (it contains it).
-- counters: the budget counter keys the caller declared, by spec (declared_counters).
-- Returns the amount charged; false if there is no such hold; "quarantined" for a bad record;
-- a table of specs when a charge needs counters it was not given (then nothing changed).
local function settle_hold(counters, hold_id, cost, now_ms, started_ms)
  local rec = redis.call("HGET", K.holds, hold_id)
  if not rec then
    return false
  end
  local h = parse_hold(rec)
  if h == nil then
    quarantine(hold_id, rec)
    return "quarantined"
  end
  local charge = cost
  if charge < 0 then
    charge = h.amount
  end
  if charge > 0 then
    local missing = missing_counters(h, counters)
    if #missing > 0 then return missing end
  end
  if started_ms <= 0 then
    started_ms = h.started
  end
  if not h.contained then
    decr(K.held, "acct", h.amount)
    if h.row_ref ~= "" then
      decr(K.held, "row:" .. h.row_ref, h.amount)
    end
    if charge > 0 then
      local row_field, entry = "", hold_id .. h.figures
      redis.call("HINCRBY", K.chsum, "acct", int(charge))
      if h.row_ref ~= "" then
        row_field = "row:" .. h.row_ref .. ":" .. h.row_win
        redis.call("HINCRBY", K.chsum, row_field, int(charge))
      end
      local at = now_ms
      if started_ms > 0 and started_ms < now_ms then at = started_ms end
      redis.call("ZADD", K.chlog, int(at), entry)
      redis.call("HSET", K.chamt, entry, int(charge) .. "|" .. row_field)
    end
  end
  for _, b in ipairs(h.budgets) do
    decr(K.held, "b:" .. b.id, h.amount)
    if charge > 0 then
      local counter = counters[b.id .. "@" .. b.win]
      if redis.call("INCRBY", counter, int(charge)) == charge then
        -- its first charge in this window: a reserve that finds the counter gone knows it vanished
        redis.call("HSET", K.counted, b.id, b.win)
      end
      if b.win_end > 0 then
        -- keep a finished window a day past its end, for `status` and audits
        redis.call("PEXPIREAT", counter, int(b.win_end + 86400000))
      end
    end
  end
  redis.call("HDEL", K.holds, hold_id)
  redis.call("ZREM", K.leases, hold_id)
  if h.contained then
    -- Containing it took its amount off the figures' rise; the upstream charged `charge` (and
    -- refunds the rest), so those scopes' watermarks move by the difference.
    local used = redis.call("HGET", K.base, hold_id)
    if used then
      local fields = {}
      if string.match(used, "^1|") then fields[#fields + 1] = "acct" end
      if string.match(used, "|1$") then fields[#fields + 1] = "row:" .. h.row_ref .. ":" .. h.row_win end
      for _, field in ipairs(fields) do
        if charge ~= h.amount and redis.call("HEXISTS", K.wm, field) == 1 then
          redis.call("HINCRBY", K.wm, field, int(charge - h.amount))
        end
      end
      redis.call("HDEL", K.base, hold_id)
    end
  end
  if h.started > 0 and not h.contained then
    -- only mark_started puts a hold in `started`, and contain() takes it out
    redis.call("ZREM", K.started, hold_id)
  end
  return charge
end

-- The level of a key row's upstream spend limit, by the one rule reserve.lua and levels.lua share.
-- Returns nil when the snapshot has no such row, "!" when the row was unreadable, else
-- {active, expires_ms (-1 = never), limit (-1 = none), period ("-" = lifetime), win (window start
-- ms, 0 = lifetime), spent, held}: spent is the snapshot's period spend that still counts in the
-- current window (a snapshot from before the window started counts as zero) plus the charges
-- settled here since; held is what calls in flight hold against it.
local function row_level(row_ref, windows, fetched_ms)
  local row = redis.call("HGET", K.snap, "r:" .. row_ref)
  if not row then return nil end
  if row == "!" then return "!" end
  local f = split_row(row)
  local period = f[4]
  local win = windows[period] or 0
  local counted = row_counted(f, win, fetched_ms)
  local charged = tonumber(redis.call("HGET", K.chsum, "row:" .. row_ref .. ":" .. win) or "0")
  local held = tonumber(redis.call("HGET", K.held, "row:" .. row_ref) or "0")
  return {active = f[1] == "1", expires_ms = tonumber(f[2]), limit = tonumber(f[3]), period = period,
          win = win, spent = counted + charged, held = held, counted = counted}
end
