"""Credits answers into snapshots, and the refresher against the stand-in (fake and real Redis)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import aiohttp
import pytest

from proxy.credits import PRICE_KICK_INTERVAL_S, Refresher
from proxy.policy.model import Policy, default_policy
from proxy.prices import PriceTable
from proxy.settings import Secret
from proxy.snapshot import CreditsError, parse_credits
from proxy.store.keyspace import ACCOUNTS
from proxy.store.records import RowState, row_ref
from proxy.store.redis import LOCK_MODELS, LOCK_REFRESH, Store
from proxy.windows import parse_timestamp_ms
from tests.support.standin import key_row

USD = 1_000_000
T0 = 1_800_000_000.0  # a fixed wall clock for the refresher, in seconds


def credits_doc(rows: Any = (), remaining: Any = "25.5000", **extra: Any) -> bytes:
    document = {"remaining_credits": remaining, "credit_usage": "4.5000", "total_deposits": "30.0000", **extra}
    if rows is not None:
        document["usage_by_api_key"] = list(rows) if isinstance(rows, (list, tuple)) else rows
    return json.dumps(document).encode()


def by_id(key_id: str) -> str:
    ref = row_ref(key_id, None)
    assert ref is not None
    return ref


def by_name(name: str) -> str:
    ref = row_ref(None, name)
    assert ref is not None
    return ref


# -- parse_credits --------------------------------------------------------------------------


def test_parse_credits_on_realistic_rows():
    rows = [
        key_row("k-life", "lifetime", spend_limit="10", period=None, period_spend="3.2500", credit_usage="3.2500"),
        key_row(
            "k-day",
            "daily",
            spend_limit="0.0001",
            period="day",
            period_spend="0.0001",
            period_start="2026-11-25T00:00:00.000Z",
        ),
        key_row("k-open", "no-limit", credit_usage="12.0000"),
        key_row("k-old", "expired", spend_limit="5", period="month", expires_at="2026-01-01T00:00:00Z"),
        key_row("k-off", "inactive", is_active=False),
    ]
    snapshot = parse_credits(credits_doc(rows), 1234)
    assert snapshot.fetched_ms == 1234
    assert snapshot.remaining_micros == 25_500_000
    life = RowState(True, None, 10 * USD, None, 3_250_000, None)
    assert snapshot.rows[by_id("k-life")] == life
    assert snapshot.rows[by_name("lifetime")] == life
    day = snapshot.rows[by_id("k-day")]
    assert (day.limit_micros, day.period, day.spend_micros) == (100, "day", 100)
    assert day.period_start_ms == parse_timestamp_ms("2026-11-25T00:00:00Z")
    assert snapshot.rows[by_id("k-open")].limit_micros is None
    assert snapshot.rows[by_id("k-old")].expires_ms == parse_timestamp_ms("2026-01-01T00:00:00Z")
    assert snapshot.rows[by_id("k-off")].active is False
    assert len(snapshot.rows) == 10  # each row by id and by name


def test_lifetime_row_without_period_spend_uses_credit_usage():
    life = key_row("k1", "a", spend_limit="10", credit_usage="7.0000")
    life["period_spend"] = None
    daily = key_row("k2", "b", spend_limit="10", period="day", credit_usage="7.0000")
    daily["period_spend"] = None
    snapshot = parse_credits(credits_doc([life, daily]), 1)
    assert snapshot.rows[by_id("k1")].spend_micros == 7 * USD
    assert snapshot.rows[by_id("k2")].spend_micros == 0


def test_duplicate_key_name_drops_the_name_reference_but_keeps_the_ids():
    rows = [key_row("k1", "Deleted Key", spend_limit="1"), key_row("k2", "Deleted Key"), key_row("k3", "unique")]
    snapshot = parse_credits(credits_doc(rows), 1)
    assert by_name("Deleted Key") not in snapshot.rows
    assert by_id("k1") in snapshot.rows and by_id("k2") in snapshot.rows
    assert snapshot.rows[by_name("unique")] == snapshot.rows[by_id("k3")]


def test_row_without_id_or_name_is_validated_but_unreachable():
    row = key_row("x", "y")
    row["api_key_id"], row["api_key_name"] = None, ""
    assert parse_credits(credits_doc([row]), 1).rows == {}


def test_missing_breakdown_gives_an_account_only_snapshot():
    snapshot = parse_credits(credits_doc(None), 1)
    assert snapshot.rows == {} and snapshot.remaining_micros == 25_500_000


def test_negative_remaining_credits_are_kept():
    assert parse_credits(credits_doc(remaining="-0.5000"), 1).remaining_micros == -500_000


@pytest.mark.parametrize("remaining", ["1e3", None, "abc", 1.5e300, True, "25.50001234"])
def test_bad_remaining_credits_is_refused_naming_the_field(remaining):
    with pytest.raises(CreditsError, match="remaining_credits"):
        parse_credits(credits_doc(remaining=remaining), 1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("spend_limit", "abc"),
        ("spend_limit", "1e3"),
        ("spend_limit", "-1.0000"),
        ("period_spend", "1,5"),
        ("expires_at", "next week"),
        ("period_start", "2026-13-01"),
        ("spend_limit_period", "weekly"),
        ("is_active", "yes"),
    ],
)
def test_a_malformed_row_disables_only_that_row_naming_the_row_and_field(field, value):
    row = key_row("k1", "a", spend_limit="5", period="day")
    row[field] = value
    snap = parse_credits(credits_doc([key_row("k0", "fine"), row]), 1)
    assert set(snap.rows) == {"id:k0", row_ref(None, "fine")}  # the readable row and the account apply
    assert set(snap.bad_rows) == {"id:k1", row_ref(None, "a")}
    reason = snap.bad_rows["id:k1"]
    assert "usage_by_api_key[1]" in reason and field in reason


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("spend_limit", "abc"),
        ("spend_limit", "1e3"),
        ("period_spend", "0.00001234"),
        ("expires_at", "soon"),
        ("is_active", 1),
    ],
)
def test_a_malformed_row_is_kept_as_unreadable(field, value):
    row = key_row("k1", "a", spend_limit="5", period="day")
    row[field] = value
    snap = parse_credits(credits_doc([row]), 1)
    assert snap.rows == {} and "usage_by_api_key[0]" in snap.bad_rows["id:k1"]


def test_a_new_period_value_or_unknown_fields_do_not_reject_the_snapshot():
    year = key_row("k1", "a", spend_limit="5", period="day")
    year["spend_limit_period"] = "year"
    extra = key_row("k2", "b", spend_limit="5", period="day")
    extra["new_field"] = {"anything": [1, 2]}
    snap = parse_credits(credits_doc([year, extra], remaining="7.0000"), 1)
    assert snap.remaining_micros == 7_000_000
    assert "id:k2" in snap.rows and "id:k1" in snap.bad_rows


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"not json", "not JSON"),
        (b"", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[]", "not an object"),
        (b'"25.5000"', "not an object"),
        (credits_doc({"k1": {}}), "usage_by_api_key is not a list"),
        (credits_doc("rows"), "usage_by_api_key is not a list"),
    ],
)
def test_unusable_credits_answer_is_refused(document, message):
    with pytest.raises(CreditsError, match=message):
        parse_credits(document, 1)


# -- the refresher --------------------------------------------------------------------------


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def policy_with(**account: Any) -> Policy:
    base = default_policy()
    return dataclasses.replace(base, account=dataclasses.replace(base.account, **account))


POLICY = policy_with(refresh_s=30.0, models_refresh_s=3600.0)


@pytest.fixture
async def env(store_target, up):
    """Builds stores, sessions and refreshers inside the test's loop, and closes them after."""

    class Env:
        def __init__(self) -> None:
            self.clients: list[Any] = []
            self.sessions: list[aiohttp.ClientSession] = []
            self.clock = Clock()
            self.failures: list[str] = []

        def store(self) -> Store:
            client = store_target.client()
            self.clients.append(client)
            return Store(client, "main")

        def refresher(self, store: Store | None = None, key: str | None = None, policy: Policy = POLICY) -> Refresher:
            session = aiohttp.ClientSession()
            self.sessions.append(session)
            secret = Secret(up.account_key if key is None else key)
            return Refresher(
                store or self.store(),
                session,
                lambda: policy,
                secret,
                self.clock,
                upstream_url=lambda: up.url,
                on_failure=self.failures.append,
            )

    e = Env()
    yield e
    for session in e.sessions:
        await session.close()
    for client in e.clients:
        await client.aclose()


async def test_refresh_stores_the_snapshot_with_its_fetch_start(env, up):
    up.credits_remaining_micros = 12_345_600
    up.key_rows = [key_row("k1", "alice", spend_limit="2", period="day", period_spend="0.5000")]
    r = env.refresher()
    assert await r.refresh_credits()
    snapshot = await r.store.read_snapshot()
    assert snapshot is not None
    assert snapshot.fetched_ms == int(T0 * 1000)
    assert snapshot.remaining_micros == 12_345_600
    assert snapshot.rows[by_id("k1")].limit_micros == 2 * USD
    assert snapshot.rows[by_id("k1")].spend_micros == 500_000
    assert r.state.last_ok_ms == int(T0 * 1000) and r.state.failures == 0
    assert up.credits_calls == 1


async def test_401_marks_auth_failed_and_stores_nothing(env, up):
    r = env.refresher(key="sk-wrong-" + "x" * 55)
    assert await r.refresh_credits() is False
    assert r.state.auth_failed
    assert r.state.failures == 1 and "401" in r.state.last_error
    assert await r.store.read_snapshot() is None
    assert up.credits_calls == 1 and env.failures == [r.state.last_error]


async def test_missing_account_key_fails_without_calling_upstream(env, up):
    r = env.refresher()
    r.api_key = None
    assert await r.refresh_credits() is False
    assert r.state.auth_failed and "IMAGEROUTER_API_KEY" in r.state.last_error
    assert up.credits_calls == 0


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (500, None, "HTTP 500"),
        (503, b"<html>bad gateway</html>", "HTTP 503"),
        (200, b"{not json", "not JSON"),
        (200, credits_doc(remaining="1e3"), "remaining_credits"),
        (200, credits_doc("rows", remaining="5.0000"), "usage_by_api_key"),
    ],
)
async def test_failed_refresh_keeps_the_last_good_snapshot_and_counts_the_failure(env, up, status, body, error):
    r = env.refresher()
    assert await r.refresh_credits()
    good = await r.store.read_snapshot()
    assert good is not None

    up.credits_status, up.credits_body = status, body
    up.credits_remaining_micros = 3 * USD
    env.clock.t += 60
    assert await r.refresh_credits() is False
    assert await r.refresh_credits() is False
    assert await r.store.read_snapshot() == good
    assert r.state.failures == 2 and r.state.failures_total == 2
    assert error in r.state.last_error and not r.state.auth_failed
    assert len(env.failures) == 2

    up.credits_status, up.credits_body = 200, None
    assert await r.refresh_credits()
    fresh = await r.store.read_snapshot()
    assert fresh is not None and fresh.remaining_micros == 3 * USD and fresh.fetched_ms == int((T0 + 60) * 1000)
    assert r.state.failures == 0 and r.state.failures_total == 2


async def test_two_refreshers_racing_make_one_credits_call_per_interval(env, up, store_target):
    r1, r2 = env.refresher(), env.refresher()  # two stores on two clients, two sessions
    up.credits_delay_s = 0.05  # both ticks are in flight while the first fetch runs
    for _ in range(3):
        delays = await asyncio.gather(r1.tick(), r2.tick())
        assert list(delays) == [POLICY.account.refresh_s] * 2
    up.credits_delay_s = 0.0
    assert up.credits_calls == 1
    assert up.models_calls == 1

    # the lock lives as long as one interval ...
    ttl = await r1.store.client.pttl(r1.store.key(LOCK_REFRESH))
    assert 0 < ttl <= POLICY.account.refresh_s * 1000
    # ... and once it has passed, the next tick of either instance fetches again
    await r1.store.client.delete(r1.store.key(LOCK_REFRESH))
    for _ in range(3):
        await asyncio.gather(r1.tick(), r2.tick())
    assert up.credits_calls == 2
    assert up.models_calls == 1  # the models lock has its own, longer interval

    keys = [k.decode() for k in await r1.store.client.keys("*")]
    # the account's keys, and the one record of which name counts which account (no key in it)
    assert keys and all(k.startswith("sg:{main}:") or k == ACCOUNTS for k in keys)
    assert all(up.account_key not in k for k in keys)
    registry = await r1.store.client.hgetall(ACCOUNTS)
    assert list(registry.values()).count(b"main") == 1
    assert all(up.account_key.encode() not in field + value for field, value in registry.items())


async def test_lock_ttl_is_the_refresh_interval(env, up):
    r = env.refresher(policy=policy_with(refresh_s=0.2, models_refresh_s=5.0))
    await r.tick()
    refresh_ttl = await r.store.client.pttl(r.store.key(LOCK_REFRESH))
    models_ttl = await r.store.client.pttl(r.store.key(LOCK_MODELS))
    assert 0 < refresh_ttl <= 200
    assert 200 < models_ttl <= 5000


async def test_a_failed_fetch_releases_the_lock_so_another_instance_can_retry(env, up):
    r1, r2 = env.refresher(), env.refresher()
    up.credits_status = 500
    await r1.tick()
    assert up.credits_calls == 1
    assert await r1.store.client.exists(r1.store.key(LOCK_REFRESH)) == 0
    assert await r1.store.read_snapshot() is None

    up.credits_status = 200
    assert await r2.tick() == POLICY.account.refresh_s
    assert up.credits_calls == 2
    assert await r2.store.read_snapshot() is not None
    assert await r1.store.client.exists(r1.store.key(LOCK_REFRESH)) == 1


async def test_a_401_also_releases_the_lock(env, up):
    r = env.refresher(key="sk-revoked-" + "r" * 53)
    await r.tick()
    assert r.state.auth_failed
    assert await r.store.client.exists(r.store.key(LOCK_REFRESH)) == 0


async def test_release_lock_only_drops_its_own_lock(env, up):
    store = env.store()
    assert await store.acquire_lock(LOCK_REFRESH, "a", 60_000)
    assert not await store.acquire_lock(LOCK_REFRESH, "b", 60_000)
    await store.release_lock(LOCK_REFRESH, "b")
    assert await store.client.exists(store.key(LOCK_REFRESH)) == 1
    await store.release_lock(LOCK_REFRESH, "a")
    assert await store.acquire_lock(LOCK_REFRESH, "b", 60_000)


async def test_models_refresh_is_shared_with_other_instances(env, up):
    r1, r2 = env.refresher(), env.refresher()
    await r1.tick()
    assert up.models_calls == 1
    assert r1.prices.hold_for("openai/gpt-image-1") == 300_000
    assert not r2.prices.loaded

    await r2.tick()  # does not fetch (r1 holds the models lock) but reads what r1 stored
    assert up.models_calls == 1
    assert r2.prices.loaded
    assert dict(r2.prices.holds) == dict(r1.prices.holds)
    assert r2.prices.hold_for("gemini-2.5-flash-image") == 39_000

    r3 = env.refresher()
    await r3.load_prices()
    assert r3.prices.fetched_at_ms == int(T0 * 1000)


@pytest.mark.parametrize("as_array", [False, True])
async def test_models_as_array_or_object(env, up, as_array):
    up.models_as_array = as_array
    up.models["vendor/seven"] = {
        "id": "vendor/seven",
        "price": {"min": 0.07, "average": 0.07, "max": 0.07},
        "aliases": ["seven"],
    }
    r = env.refresher()
    assert await r.refresh_models()
    stored = await r.store.load_prices()
    assert stored is not None
    for table in (r.prices, stored):
        assert table.hold_for("google/veo-3.1") == 3_200_000
        assert table.hold_for("seven") == 70_100
        assert table.resolve("gemini-2.5-flash-image") == "google/gemini-2.5-flash"


async def test_failed_models_refresh_keeps_the_stored_table_and_frees_its_lock(env, up):
    r = env.refresher()
    assert await r.refresh_models()
    before = await r.store.load_prices()
    up.models = {}
    env.clock.t += 10
    await r.tick()
    assert r.models_failures == 1
    assert await r.store.load_prices() == before
    assert await r.store.client.exists(r.store.key(LOCK_MODELS)) == 0
    assert r.prices.hold_for("openai/gpt-image-1") == 300_000


async def test_load_prices_keeps_a_newer_table(env, up):
    r = env.refresher()
    await r.store.save_prices(PriceTable({"a": 1}, {}, 5))
    r.prices = PriceTable({"b": 2}, {}, 10)
    await r.load_prices()
    assert dict(r.prices.holds) == {"b": 2}
    await r.store.save_prices(PriceTable({"c": 3}, {}, 11))
    await r.load_prices()
    assert dict(r.prices.holds) == {"c": 3}


async def test_refresh_status_is_recorded_in_the_store(env, up):
    r = env.refresher()
    assert await r.refresh_credits()
    assert await r.store.client.hget(r.store.key("status"), "last_ok_ms") == str(int(T0 * 1000)).encode()


def test_a_row_that_is_not_an_object_is_reported_not_fatal():
    snap = parse_credits(credits_doc(["row", key_row("k0", "fine")]), 1)
    assert "id:k0" in snap.rows
    assert snap.bad_rows == {"#0": "usage_by_api_key[0] is not an object"}


async def test_refresh_prices_now_fetches_the_models_in_the_next_round_lock_or_not(env, up):
    r1, r2 = env.refresher(), env.refresher()
    await r1.tick()
    assert up.models_calls == 1  # r1 holds the models lock for models_refresh_s
    r2.refresh_prices_now()  # a call cost more than its hold
    await r2.tick()
    assert up.models_calls == 2
    await r2.tick()
    assert up.models_calls == 2  # once per request, not every round after
    r2.refresh_prices_now()
    await r2.tick()
    assert up.models_calls == 2  # within PRICE_KICK_INTERVAL_S of the last: no second fetch
    env.clock.t += PRICE_KICK_INTERVAL_S
    r2.refresh_prices_now()
    await r2.tick()
    assert up.models_calls == 3
