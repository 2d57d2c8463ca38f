"""Every key a Lua script touches arrives in KEYS (proxy/store/keyspace.py builds them all).

Redis enforces none of this on one node, so each script runs here behind a shim that fails it
on the first command naming a key it was not given, while the store's operations take every
path of every script: reserve (allowed, refused, cancelled, state lost, a vanished counter,
reclaim first), reclaim (charged, quarantined, counters missing), settle (charge, release,
tombstone, counters missing, rollback), mark_started, apply_snapshot (containment), levels,
identity (rollback) and alert marks.
"""

from __future__ import annotations

import pytest

from proxy.errors import HoldQuarantined, StoreScriptError
from proxy.store.keyspace import BASE, SCRIPT_KEYS, Keys
from proxy.store.records import MarkRequest
from proxy.store.redis import Store
from proxy.store.scripts import Part, Script
from tests.store.test_store import NOW_MS, REF, USD, budget, req, row, snap, windows

# Wraps redis.call for the rest of the chunk: commands whose keys are all their arguments (DEL,
# EXISTS) are checked whole, every other command's first argument is its key.
SHIM = """
local declared = {}
for _, k in ipairs(KEYS) do declared[k] = true end
local real_redis = redis
local function checked(cmd, ...)
  local args = {...}
  local n = 1
  if string.upper(cmd) == "DEL" or string.upper(cmd) == "EXISTS" then n = #args end
  for i = 1, n do
    if not declared[args[i]] then error("undeclared key " .. tostring(args[i]) .. " in " .. cmd) end
  end
  return real_redis.call(cmd, ...)
end
local redis = setmetatable({call = checked}, {__index = real_redis})
"""


def shimmed(script: Script) -> Script:
    return Script(script.client, Part("shim", SHIM), *script.parts)


@pytest.fixture
async def store(store_target):
    client = store_target.client()
    s = Store(client, "acct")
    for name, value in list(vars(s).items()):
        if isinstance(value, Script):
            setattr(s, name, shimmed(value))
    yield s
    await client.aclose()


async def test_the_shim_fails_a_script_on_an_undeclared_key(store):
    probe = shimmed(Script(store.client, Part("probe.lua", 'return redis.call("GET", "sg:{acct}:elsewhere")')))
    with pytest.raises(StoreScriptError, match="undeclared key sg:{acct}:elsewhere"):
        await store._call(lambda: probe(keys=["sg:{acct}:snap"], args=[]))
    probe = shimmed(Script(store.client, Part("probe.lua", 'return redis.call("EXISTS", KEYS[1], "sg:{acct}:other")')))
    with pytest.raises(StoreScriptError, match="undeclared key sg:{acct}:other"):
        await store._call(lambda: probe(keys=["sg:{acct}:snap"], args=[]))


def test_each_script_is_bound_to_the_fixed_keys_it_is_passed_in_order():
    keys = Keys("a")
    for script, names in SCRIPT_KEYS.items():
        binding = Keys.lua_binding(script)
        bound = ", ".join(f"{name} = KEYS[{i}]" for i, name in enumerate(names, 1))
        assert binding.startswith(f"local K = {{{bound}}}") and f"local N_BASE = {len(names)}" in binding
        assert keys.fixed(script) == tuple(f"sg:{{a}}:{name}".encode() for name in names)
        assert set(names) <= set(BASE)
    # all of one account's keys share its hash tag: one cluster slot
    others = (keys.budget("b", 0), keys.tomb("h"), keys.alert("s"), keys.alert_rate("s"))
    for key in (*(keys(name) for name in BASE), *others):
        assert key.startswith("sg:{a}:")


async def test_every_script_path_touches_only_declared_keys(store):
    day, month = budget("day", 10 * USD), budget("month", 100 * USD, "month")
    budgets = (day, month)
    # reserve refused: no snapshot; then one applied
    d = await store.reserve(req("h0", USD, row=REF, budgets=budgets))
    assert not d.allowed and d.refusal is not None and d.refusal.code == "no_snapshot"
    assert await store.apply_snapshot(snap(rows={REF: row(limit=50 * USD, period="day")}), NOW_MS)

    # reserve allowed (row and two budgets), refused by a budget, refused by the key row
    assert (await store.reserve(req("h1", 3 * USD, row=REF, budgets=budgets))).allowed
    d = await store.reserve(req("hx", 8 * USD, row=REF, budgets=budgets))
    assert d.refusal is not None and (d.refusal.code, d.refusal.scope) == ("budget", "budget:day")
    d = await store.reserve(req("hy", 48 * USD, row=REF))
    assert d.refusal is not None and d.refusal.code == "key_limit"

    # mark_started, then a later snapshot contains the started call
    assert await store.mark_started([("h1", NOW_MS + 10)]) == 1
    assert await store.apply_snapshot(snap(NOW_MS + 5_000, rows={REF: row(limit=50 * USD, period="day")}), NOW_MS)

    # settle with the counters given (one round trip) charges both budgets
    assert await store.settle("h1", 2 * USD, NOW_MS + 6_000, 0, [(b.id, b.window_start_ms) for b in budgets]) == 2 * USD
    # settle without them: the script names the counters it needs, the store runs it again
    assert (await store.reserve(req("h2", USD, NOW_MS + 6_000, budgets=budgets))).allowed
    assert await store.settle("h2", USD // 2, NOW_MS + 7_000) == USD // 2
    levels = await store.levels([REF], list(budgets), windows(NOW_MS))
    assert levels.budgets["day"].charged_micros == 2 * USD + USD // 2
    assert levels.budgets["month"].charged_micros == 2 * USD + USD // 2
    assert levels.rows[REF] is not None

    # a release of a hold not there yet leaves a tombstone; its reserve is then cancelled
    assert await store.settle("h9", 0, NOW_MS + 7_000) is None
    d = await store.reserve(req("h9", USD, NOW_MS + 7_000, budgets=budgets))
    assert d.refusal is not None and d.refusal.code == "cancelled"

    # an expired lease is reclaimed before the next reserve decides, its budgets charged
    assert (await store.reserve(req("h3", USD, NOW_MS + 8_000, lease_ms=1_000, budgets=budgets))).allowed
    d = await store.reserve(req("h4", USD, NOW_MS + 20_000, lease_ms=60_000))
    assert d.allowed and (d.reclaimed.count, d.reclaimed.micros) == (1, USD)
    levels = await store.levels([], list(budgets), windows(NOW_MS))
    assert levels.budgets["day"].charged_micros == 3 * USD + USD // 2

    # unreadable records: moved aside by reclaim, settle and mark_started alike
    await store.client.hset(store.keys("holds"), mapping={"bad1": "junk", "bad2": "junk", "bad3": "junk"})
    await store.client.zadd(store.keys("leases"), {"bad1": 0})
    d = await store.reserve(req("h5", USD, NOW_MS + 21_000))
    assert d.allowed and d.reclaimed.quarantined == ("bad1",)
    with pytest.raises(HoldQuarantined):
        await store.settle("bad2", USD, NOW_MS + 21_000)
    assert await store.mark_started([("bad3", NOW_MS)]) == 0
    assert await store.client.hlen(store.keys("quarantine")) == 3

    # a reclaim run without the counters its holds need charges them on its second run
    assert (await store.reserve(req("h6", USD, NOW_MS + 22_000, lease_ms=1_000, budgets=budgets))).allowed
    r = await store.reclaim(NOW_MS + 30_000)
    assert (r.count, r.micros) == (1, USD)

    # the store lost its state: a reserve touching a budget is refused, and says why
    await store.adopt_epoch()
    await store.client.delete(store.keys("epoch"))
    d = await store.reserve(req("h7", USD, NOW_MS + 31_000, budgets=budgets))
    assert d.refusal is not None and d.refusal.code == "state_lost"

    # identity: a rollback the settle count shows (the settle and the round both check it)
    await store.client.delete(store.keys("lost"))
    assert await store.check_identity(NOW_MS + 32_000, new_is_safe=False) is None
    await store.client.hset(store.keys("seq"), store.instance, 0)
    assert await store.settle("gone", 0, NOW_MS + 32_000) is None
    assert (await store.check_identity(NOW_MS + 33_000, new_is_safe=False) or "").startswith("the store went back")

    # a budget counter that vanished in its window
    await store.client.delete(store.keys("lost"))
    await store.client.delete(store.budget_key(day.id, day.window_start_ms))
    d = await store.reserve(req("h8", USD, NOW_MS + 34_000, budgets=budgets))
    assert d.refusal is not None and d.refusal.code == "state_lost"
    assert (await store.state_lost() or "").startswith("a budget counter vanished")

    # alert marks
    marks = await store.alert_marks(
        "budget:day", MarkRequest(day.window_start_ms, 0, NOW_MS, 9 * USD, 10 * USD, day.window_end_ms, ("t:80",))
    )
    assert marks.claimed == ("t:80",)
