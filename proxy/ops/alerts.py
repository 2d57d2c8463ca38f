"""Threshold alerts (docs/alerts.md): decided on the settle path, exactly once per (scope, window,
threshold) across every instance and restart, and sent by webhook (proxy/ops/webhooks.py).

`Runtime.settle` calls `touched(key name)` after the store took the charge: it adds the name to
a set (bounded by the policy's keys; a burst of settles collapses into one evaluation) and wakes
the background loop, so a settle never waits on alerts. The loop reads the touched scopes' levels
in one round trip (`ops.levels.read_levels`, the guard's own rules) and asks the store to claim the
marks the levels call for (`Store.alert_marks`); only a claimed mark becomes an event. Every
SWEEP_S the loop evaluates every scope, which sends what no settle triggers: a new window's
`budget.recovered`, credits topped up, a key nearing expiry, and what a reclaim or a deferred
settle charged. What each event says is proxy/ops/alert_events.py's.

Marks survive a loss of the store's state: each instance remembers the threshold marks of the
current windows (those it claimed, and, each sweep, those every instance claimed), claims nothing
while the store's local budget state is lost, and after a loss puts the marks it remembers back
before it claims anything, so an alert sent before the loss is not sent again.

Events:
- `budget.threshold`: a key's ImageRouter limit or a local budget has spent (charged; holds do not
  count) at least `threshold` x its limit in its window;

Every event carries the scope's `mode`: `shadow` for a shadow budget (or any scope while the whole
policy is in shadow mode), whose limit refuses nothing, else `enforce`.
- `budget.projected`: the spend rate of the last hour (spent now minus the oldest sample of the
  last hour, over its age, once that is 10 minutes or more) would reach the limit before the
  window resets; once per window;
- `budget.recovered`: a new window started for a scope that fired a threshold in the previous
  one; or, for scope `account`, credits back at or above `credits_below_usd` after `credits.low`;
- `credits.low`: the account's credits (last snapshot minus charges since) below
  `credits_below_usd`; once until they recover;
- `key.expiring`: a key's ImageRouter row expires within `key_expiry_days`; once per expiry date;
- `key.spend_outside_guard`: a credits refresh found ImageRouter charged a key (scope
  `key:<name>`) or the account (`account`) beyond what passed through the guard
  (proxy/ops/outside.py); once per key and window (the account: per day);
- `call.underheld`: the upstream charged a call more than the guard held for it (scope
  `key:<name>`); once per call, from the instance that settled it (Runtime.compare_to_hold).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import aiohttp

from proxy.deadlines import deadline_at
from proxy.errors import StoreError
from proxy.guard.verdicts import budgets_for
from proxy.money import format_usd
from proxy.ops.alert_events import PPM, alert_event, outside_event, scope_events, threshold_scopes, underheld_event
from proxy.ops.levels import ScopeLevel, read_levels
from proxy.ops.outside import OutsideSpend
from proxy.ops.webhooks import Deliveries, endpoints
from proxy.policy.model import Budget, KeyPolicy, Policy
from proxy.runtime import Underheld
from proxy.store.records import Levels, MarkRequest, RowLevel
from proxy.types import Period, as_period
from proxy.windows import format_ms, to_ms, window_end, window_start_ms

log = logging.getLogger("spend_guard.alerts")
SWEEP_S = 30.0
DAY_MS = 86_400_000
# How long a lifetime key's (or a scope without windows') spend-outside mark is kept.
OUTSIDE_LIFETIME_MARK_MS = 90 * DAY_MS


class Alerts:
    """The evaluation loop of one process; `evaluate` is also what tests call to run one round."""

    def __init__(self, runtime: Any, deliveries: Deliveries) -> None:
        self.rt = runtime
        self.deliveries = deliveries
        self.pending: set[str] = set()
        self.sweep_due = False
        self.wake = asyncio.Event()
        self.evaluating = False
        self.round_done = asyncio.Event()
        # Threshold marks of the current windows, by scope: (period, window start ms, expire at ms, marks).
        self.known: dict[str, tuple[Period | None, int, int, set[str]]] = {}
        self.loss_seen: str | None = None  # the store's lost-state marker last seen
        self.restore_due = False

    def touched(self, key_name: str | None) -> None:
        """A settle (or reclaim: None, every scope) changed what was spent. Never blocks or raises.
        Without webhooks there is nothing to evaluate: the loop is not woken (each wake cost a
        guarded call ~5 % of its CPU under load)."""
        if not self.rt.policy.alerts.webhooks:
            return
        if key_name is None:
            self.sweep_due = True
        else:
            self.pending.add(key_name)
        self.wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + SWEEP_S
        while True:
            with contextlib.suppress(TimeoutError):
                async with deadline_at(next_sweep):  # no task per wait, as wait_for makes
                    await self.wake.wait()
            self.wake.clear()
            names, self.pending = self.pending, set()
            sweep = self.sweep_due or loop.time() >= next_sweep
            if sweep:
                self.sweep_due, next_sweep = False, loop.time() + SWEEP_S
            self.evaluating = True
            try:
                await self.evaluate(None if sweep else names)
            except StoreError as exc:
                log.debug("alerts not evaluated: %s", exc)  # the next sweep catches up
            except Exception:
                self.rt.metrics.background_errors.labels("alerts").inc()
                log.exception("alert evaluation failed; it continues")
            finally:
                self.evaluating = False
                self.round_done.set()

    async def drain(self) -> None:
        """Wait until every settle told so far is evaluated and what it sent is delivered or
        given up (tests await this instead of sleeping)."""
        while self.pending or self.sweep_due or self.evaluating or self.wake.is_set():
            self.round_done.clear()
            await self.round_done.wait()
        if self.deliveries.tasks:
            await asyncio.wait(set(self.deliveries.tasks))

    async def evaluate(self, key_names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Evaluate the scopes of `key_names` (None: every scope) and send what the store lets this
        instance claim. Returns the events sent."""
        policy: Policy = self.rt.policy
        alerts = policy.alerts
        if not alerts.webhooks:
            return []
        now_s = self.rt.clock()
        lost = self.rt.refresher.state_lost
        if lost is not None and lost != self.loss_seen:
            self.loss_seen, self.restore_due = lost, True
        if lost is not None and policy.has_local_budgets:
            return []  # the marks may have gone with the budget state: claim nothing until it is recovered
        if self.restore_due:
            await self._restore(now_s)
            self.restore_due = False
        names = None if key_names is None else set(key_names)
        keys = [k for k in policy.keys if names is None or k.name in names]
        budgets: dict[str, Budget] = {b.id: b for key in keys for b in budgets_for(policy, key)}
        if names is None:
            budgets.update({b.id: b for group in policy.groups.values() for b in group.budgets})
        levels, refs = await read_levels(self.rt.ledger, policy, keys, list(budgets.values()), now_s)
        scopes = threshold_scopes(policy, keys, refs, levels, budgets.values())
        if names is None:
            await self._learn(scopes, now_s)
        found = await asyncio.gather(
            *(self._scope(policy, level, now_s) for level in scopes),
            self._credits(policy, levels, now_s),
            self._expiry(policy, keys, refs, levels, now_s),
        )
        events = [event for each in found for event in each]
        if events:
            to = endpoints(alerts.webhooks)
            for event in events:
                self.rt.metrics.alerts.labels(event["type"]).inc()
                log.info("alert %s %s: %s", event["type"], event["scope"], event["message"])
                self.deliveries.send(event, to)
        return events

    async def _scope(self, policy: Policy, level: ScopeLevel, now_s: float) -> list[dict[str, Any]]:
        crossed = [
            t
            for t in policy.alerts.thresholds
            if level.limit_micros > 0 and level.spent_micros * PPM >= round(t * PPM) * level.limit_micros
        ]
        start_ms = window_start_ms(level.period, now_s)
        end = window_end(level.period, now_s)
        end_ms = 0 if end is None else to_ms(end)
        request = MarkRequest(
            start_ms,
            end_ms + DAY_MS if end_ms else 0,
            int(now_s * 1000),
            level.spent_micros,
            level.limit_micros,
            end_ms,
            claim=[f"t:{t:g}" for t in crossed],
        )
        marks = await self.rt.store.alert_marks(level.scope, request)
        self._remember(level.scope, level.period, start_ms, request.expire_at_ms, marks.claimed)
        window = {
            "window_start": format_ms(start_ms) if start_ms else None,
            "resets_at": format_ms(end_ms) if end_ms else None,
        }
        return scope_events(policy, level, marks, now_s, window)

    def _remember(
        self, scope: str, period: Period | None, window_ms: int, expire_at_ms: int, marks: Iterable[str]
    ) -> None:
        known = self.known.get(scope)
        if known is None or known[1] < window_ms:
            known = self.known[scope] = (period, window_ms, expire_at_ms, set())
        if known[1] == window_ms:
            known[3].update(marks)

    async def _learn(self, scopes: list[ScopeLevel], now_s: float) -> None:
        """Remember the marks every instance claimed in the scopes' current windows."""
        windows = {level.scope: (level.period, window_start_ms(level.period, now_s)) for level in scopes}
        sent = await self.rt.store.alerts_sent([(scope, start) for scope, (_, start) in windows.items()])
        for scope, marks in sent.items():
            period, start_ms = windows[scope]
            end = window_end(period, now_s)
            self._remember(scope, period, start_ms, to_ms(end) + DAY_MS if end is not None else 0, marks)

    async def _restore(self, now_s: float) -> None:
        """Put back the marks remembered for windows that are still current: claimed again, not
        sent (only a mark claimed by an evaluation becomes an event)."""
        now_ms = int(now_s * 1000)
        restored = 0
        for scope, (period, window_ms, expire_at_ms, marks) in list(self.known.items()):
            if window_ms != window_start_ms(period, now_s):
                del self.known[scope]  # a window that ended: its marks no longer matter
                continue
            if marks:
                request = MarkRequest(window_ms, expire_at_ms, now_ms, claim=sorted(marks))
                await self.rt.store.alert_marks(scope, request)
                restored += 1
        if restored:
            log.info("alert marks of %d scope(s) put back after the store lost its state", restored)

    async def _credits(self, policy: Policy, levels: Levels, now_s: float) -> list[dict[str, Any]]:
        line = policy.alerts.credits_below_micros
        if line is None or levels.fetched_ms is None:
            return []
        credits = levels.remaining_micros - levels.account.charged_micros
        low = credits < line
        request = MarkRequest(0, 0, int(now_s * 1000), claim=("low",) if low else (), release=() if low else ("low",))
        marks = await self.rt.store.alert_marks("account", request)
        level = ScopeLevel("account", 0, levels.account.charged_micros, levels.account.held_micros, mode=policy.mode)
        extra = {"credits_usd": format_usd(credits), "threshold_usd": format_usd(line), "limit_usd": None}
        window = {"window_start": None, "resets_at": None}
        if "low" in marks.claimed:
            message = f"account credits are ${format_usd(credits)}, below ${format_usd(line)}"
            return [alert_event(policy, "credits.low", level, None, now_s, window, message, **extra)]
        if "low" in marks.released:
            message = f"account credits are ${format_usd(credits)} again, at or above ${format_usd(line)}"
            return [alert_event(policy, "budget.recovered", level, None, now_s, window, message, **extra)]
        return []

    async def _expiry(
        self, policy: Policy, keys: list[KeyPolicy], refs: dict[str, str | None], levels: Levels, now_s: float
    ) -> list[dict[str, Any]]:
        days = policy.alerts.key_expiry_days
        if days is None:
            return []
        now_ms = int(now_s * 1000)
        events = []
        for key in keys:
            row = levels.rows.get(refs.get(key.name) or "")
            if not isinstance(row, RowLevel) or row.expires_ms is None:
                continue
            # Warned from `days` before it expires until a day after (then its mark expires).
            if not now_ms - DAY_MS < row.expires_ms <= now_ms + days * DAY_MS:
                continue
            request = MarkRequest(0, row.expires_ms + DAY_MS, now_ms, claim=(f"exp:{row.expires_ms}",))
            if (await self.rt.store.alert_marks(f"key:{key.name}", request)).claimed:
                limit = row.limit_micros or 0
                period = as_period(row.period)
                level = ScopeLevel(f"key:{key.name}", limit, row.spent_micros, row.held_micros, period, policy.mode)
                expires = format_ms(row.expires_ms)
                verb = "expired" if row.expires_ms <= now_ms else "expires"
                message = f"ImageRouter key of {key.name} {verb} at {expires}"
                window = {"window_start": None, "resets_at": None}
                events.append(
                    alert_event(
                        policy,
                        "key.expiring",
                        level,
                        None,
                        now_s,
                        window,
                        message,
                        expires_at=expires,
                        threshold_days=days,
                        limit_usd=None if row.limit_micros is None else format_usd(limit),
                    )
                )
        return events

    async def outside_spend(self, found: list[OutsideSpend]) -> list[dict[str, Any]]:
        """`key.spend_outside_guard` for each key (and the account) ImageRouter charged beyond what
        passed through the guard: claimed once per key and window across every instance (the
        mark also shows on the status page, webhooks or not), sent when webhooks are configured."""
        policy: Policy = self.rt.policy
        now_s = self.rt.clock()
        now_ms = int(now_s * 1000)
        events = []
        for item in found:
            scope = "account" if item.key is None else f"key:{item.key}"
            end = window_end(as_period(item.period) if item.key is not None else "day", now_s)
            expire_ms = to_ms(end) + DAY_MS if end is not None else now_ms + OUTSIDE_LIFETIME_MARK_MS
            request = MarkRequest(0, expire_ms, now_ms, claim=(f"outside:{item.window_start_ms}",))
            if not (await self.rt.store.alert_marks(f"outside:{scope}", request)).claimed:
                continue
            events.append(outside_event(policy, item, scope, now_s, end))
        if events and policy.alerts.webhooks:
            to = endpoints(policy.alerts.webhooks)
            for event in events:
                self.rt.metrics.alerts.labels(event["type"]).inc()
                log.info("alert %s %s: %s", event["type"], event["scope"], event["message"])
                self.deliveries.send(event, to)
        return events

    def underheld(self, call: Underheld) -> None:
        """`call.underheld` for a call charged more than its hold: sent at once (each call is
        settled by one instance, so no mark is claimed). Never blocks or raises."""
        policy: Policy = self.rt.policy
        if not policy.alerts.webhooks:
            return
        event = underheld_event(policy, call, self.rt.clock())
        self.rt.metrics.alerts.labels(event["type"]).inc()
        log.info("alert %s %s: %s", event["type"], event["scope"], event["message"])
        self.deliveries.send(event, endpoints(policy.alerts.webhooks))


async def start_alerts(stack: contextlib.AsyncExitStack, runtime: Any) -> Alerts:
    """The alert loop's parts, closed by the lifespan's stack: a session of its own (a slow
    receiver never competes with upstream calls) and the deliveries; hooks `runtime.on_settled`.
    The session's pool has no cap of its own: each webhook's lane bounds its connections."""
    session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), connector=aiohttp.TCPConnector(limit=0))
    stack.push_async_callback(session.close)
    deliveries = Deliveries(session, runtime.metrics, runtime.clock)
    stack.push_async_callback(deliveries.aclose)
    alerts = Alerts(runtime, deliveries)
    runtime.notify_on_settle(alerts.touched)
    runtime.notify_on_underheld(alerts.underheld)
    return alerts
