"""alert_marks.lua over fake, real and embedded Redis: each alert mark is claimed exactly once per
scope and window, whichever instance asks; a new window clears marks and says so; projection."""

from __future__ import annotations

import asyncio
import datetime as dt

from proxy.store.records import MarkRequest
from proxy.store.redis import Store
from proxy.windows import to_ms

UTC = dt.UTC
MINUTE_MS = 60_000
DAY_MS = 86_400_000
# Redis expires marks on its own clock: the instants here lie in the future.
DAY = to_ms(dt.datetime.combine(dt.datetime.now(UTC).date() + dt.timedelta(days=5), dt.time(), UTC))
NOW = DAY + 15 * 3_600_000
SCOPE = "budget:key:alice:day"


def request(now: int = NOW, window: int = DAY, **kw) -> MarkRequest:
    return MarkRequest(window, window + 2 * DAY_MS, now, **kw)


async def test_each_mark_is_claimed_once_across_instances(store_target):
    one, two = Store(store_target.client(), "acct"), Store(store_target.client(), "acct")
    try:
        claims = [s.alert_marks(SCOPE, request(claim=("t:0.5", "t:0.8"))) for _ in range(10) for s in (one, two)]
        results = await asyncio.gather(*claims)
        claimed = [name for marks in results for name in marks.claimed]
        assert sorted(claimed) == ["t:0.5", "t:0.8"]
        assert not any(marks.recovered for marks in results)
        # The marks expire a day after their window ends.
        assert await one.client.execute_command("PEXPIRETIME", one.key(f"alert:{SCOPE}")) == DAY + 2 * DAY_MS
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_new_window_clears_the_marks_and_reports_recovery(store_target):
    store = Store(store_target.client(), "acct")
    try:
        assert (await store.alert_marks(SCOPE, request(claim=("t:0.5",)))).claimed == ("t:0.5",)
        tomorrow = request(NOW + DAY_MS, DAY + DAY_MS, claim=())
        first = await store.alert_marks(SCOPE, tomorrow)
        assert first.recovered and first.claimed == ()
        assert not (await store.alert_marks(SCOPE, tomorrow)).recovered  # reported once
        # An instance still reading yesterday's levels changes nothing.
        stale = await store.alert_marks(SCOPE, request(claim=("t:0.8",)))
        assert stale.claimed == () and not stale.recovered
        again = await store.alert_marks(SCOPE, request(NOW + DAY_MS, DAY + DAY_MS, claim=("t:0.5",)))
        assert again.claimed == ("t:0.5",)
        # A window in which no threshold fired recovers from nothing.
        quiet = Store(store_target.client(), "acct")
        await quiet.alert_marks("budget:key:bob:day", request(claim=("projected",)))
        assert not (await quiet.alert_marks("budget:key:bob:day", tomorrow)).recovered
        await quiet.aclose()
    finally:
        await store.aclose()


async def test_a_released_mark_is_released_once_and_can_be_claimed_again(store_target):
    store = Store(store_target.client(), "acct")
    try:
        flat = MarkRequest(0, 0, NOW, claim=("low",))
        assert (await store.alert_marks("account", flat)).claimed == ("low",)
        assert (await store.alert_marks("account", flat)).claimed == ()
        release = MarkRequest(0, 0, NOW, release=("low",))
        assert (await store.alert_marks("account", release)).released == ("low",)
        assert (await store.alert_marks("account", release)).released == ()
        assert (await store.alert_marks("account", flat)).claimed == ("low",)
        assert await store.client.pttl(store.key("alert:account")) == -1  # no window: no expiry
    finally:
        await store.aclose()


async def test_projection_from_the_last_hours_spend_rate(store_target):
    store = Store(store_target.client(), "acct")
    end = DAY + DAY_MS  # 9 h after NOW
    usd = 1_000_000
    try:

        async def at(minutes: int, spent: int):
            req = request(NOW + minutes * MINUTE_MS, spent_micros=spent, limit_micros=10 * usd, window_end_ms=end)
            return (await store.alert_marks(SCOPE, req)).claimed

        assert await at(0, 1 * usd) == ()
        # $1 more in 5 minutes would exhaust $10 long before the reset, but 5 minutes say too little.
        assert await at(5, 2 * usd) == ()
        # $0.05 in 20 minutes: $0.15/h, $1.40 more by the reset: not exhausted.
        assert await at(20, int(1.05 * usd)) == ()
        # $2 in 30 minutes from the oldest sample: $4/h for 8.5 h: exhausted.
        assert await at(30, 3 * usd) == ("projected",)
        assert await at(31, 4 * usd) == ()  # once per window
        # A sample older than the hour says nothing about the last hour's rate.
        other = "budget:group:design:day"
        await store.alert_marks(other, request(NOW, spent_micros=0, limit_micros=10 * usd, window_end_ms=end))
        late = request(NOW + 70 * MINUTE_MS, spent_micros=6 * usd, limit_micros=10 * usd, window_end_ms=end)
        assert (await store.alert_marks(other, late)).claimed == ()
    finally:
        await store.aclose()
