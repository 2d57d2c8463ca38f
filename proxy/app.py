"""The ASGI app: lifespan (clients, refresher, policy watcher) and routing to the guard or `/-/`.

Own endpoints live under `/-/` so they never shadow an upstream path.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from starlette.routing import Route, Router

from proxy import logs
from proxy.app_metrics import add_computed_metrics
from proxy.credits import Refresher
from proxy.errors import Rejected, StartupRefused, StoreAuthError, StoreError, error_response
from proxy.guard.guard import Guard
from proxy.guard.verdicts import budget_holds
from proxy.http.upstream import create_session
from proxy.money import format_usd
from proxy.ops.alerts import Alerts, start_alerts
from proxy.ops.endpoints import OwnEndpoints, own_path
from proxy.ops.gauges import LevelGauges
from proxy.ops.metrics import Metrics
from proxy.ops.outside import OutsideSpend, OutsideWatch
from proxy.policy.load import load_policy
from proxy.policy.model import Policy, default_policy
from proxy.policy.reload import PolicyHolder
from proxy.runtime import Runtime
from proxy.settings import Settings, account_key
from proxy.store.backends import redis_client
from proxy.store.embedded import default_state_dir
from proxy.store.redis import Store
from proxy.store.statedir import EpochRecord, StateDirs
from proxy.types import Clock, Receive, Scope, Send, StoreClock

log = logging.getLogger("spend_guard")
STARTUP_REFRESH_S = 5.0
SETTLE_RETRY_S = 1.0
MARK_STARTED_S = 0.5
MAX_LOOP_BACKOFF_S = 30.0
ALERTS_DRAIN_S = 2.0
# How often an instance not ready at startup checks whether it is, to log that it is.
READY_POLL_S = 1.0


class SpendGuardApp(OwnEndpoints):
    """Outer ASGI app. `runtime` exists between lifespan startup and shutdown."""

    def __init__(
        self,
        settings: Settings,
        policy: Policy,
        *,
        clock: Clock,
        redis_factory: Callable[[], aioredis.Redis],
    ) -> None:
        self.settings = settings
        self.initial_policy = policy
        self.clock = clock
        self.redis_factory = redis_factory
        self.metrics = Metrics()
        self.levels = LevelGauges()
        self.metrics.add_collector(self.levels)
        self.runtime: Runtime | None = None
        self.guard: Guard | None = None
        self.alerts: Alerts | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.announcer: asyncio.Task[None] | None = None
        self.outside_pending: list[OutsideSpend] = []
        self.router = Router(
            routes=[
                Route("/-/healthz", self.healthz),
                Route("/-/readyz", self.readyz),
                Route("/-/metrics", self.metrics_endpoint),
                Route("/-/me", self.me),
                Route("/-/quote", self.quote, methods=["GET", "POST"]),
                Route("/-/status", self.status_page),
                Route("/-/status.json", self.status_json),
            ],
            redirect_slashes=False,  # (starlette builds its redirects from the Host header)
        )

    @property
    def state_dir(self) -> str:
        """The embedded store's directory (without a Redis URL)."""
        return self.settings.state_dir or default_state_dir()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(scope, receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: ImageRouter has none
        own = own_path(scope)
        if own is not None:
            await self.own(scope, receive, send, own)
            return
        if self.guard is None:
            await error_response(503, "guard_unavailable", "The proxy is starting.")(scope, receive, send)
            return
        try:
            await self.guard(scope, receive, send)
        except Rejected as exc:  # raised after the guard's own handling, e.g. while reading a passthrough
            await exc.response()(scope, receive, send)

    async def lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        # Everything startup opens is closed by this stack, in reverse order, also when startup
        # fails halfway (starlette runs its lifespan inside `async with` the same way).
        async with contextlib.AsyncExitStack() as stack:
            try:
                await self.startup(stack)
            except StartupRefused as exc:
                log.error("startup refused: %s", exc)
                await send({"type": "lifespan.startup.failed", "message": ""})  # said once, above
                return
            except Exception as exc:
                log.exception("startup failed")
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
            assert message["type"] == "lifespan.shutdown"
            await self.shutdown()
        await send({"type": "lifespan.shutdown.complete"})

    async def startup(self, stack: contextlib.AsyncExitStack) -> None:
        policy = self.initial_policy
        stack.callback(self._drop_guard)
        stack.callback(self.metrics.close)
        store = Store(self.redis_factory(), policy.account.name)
        stack.push_async_callback(store.aclose)
        session = create_session()
        stack.push_async_callback(session.close)
        holder = PolicyHolder(self.settings.policy, policy, on_change=self._policy_changed)
        key = account_key(policy.account.api_key_env)
        if key is None:
            log.error(
                "no account key in %s: the credits snapshot cannot be fetched, so spending calls are "
                "refused (503) until it is set",
                policy.account.api_key_env,
            )
        refresher = Refresher(
            store,
            session,
            lambda: holder.policy,
            key,
            self.clock,
            upstream_url=lambda: self.runtime.upstream_url() if self.runtime else policy.upstream.base_url,
            on_failure=self._refresh_failed,
            on_crash=self.metrics.background_errors.labels("refresher").inc,
            epoch_record=None if self.settings.redis_url else EpochRecord(self.settings.state_dir),
        )
        state_dirs = None
        if not self.settings.redis_url and key is not None:
            # Is this account's embedded store kept in another state dir while this one is empty?
            state_dirs = StateDirs()
            refresher.store_elsewhere = state_dirs.elsewhere(key.value, self.state_dir)
        if self.settings.upstream:
            refresher.upstream_url = lambda: self.settings.upstream or ""
        refresher.outside = OutsideWatch(store, lambda: holder.policy, self.clock, self._outside_spend)
        self.runtime = Runtime(self.settings, holder, store, session, refresher, self.metrics, self.clock)
        self.guard = Guard(self.runtime)
        self.metrics.set_snapshot_age(self._snapshot_age)
        add_computed_metrics(self.metrics, holder, refresher, self.clock, self.settings)
        if not self.settings.redis_url:
            log.info(
                "store: embedded server, state dir %s (append-only file fsynced every second); "
                "shared by this proxy's workers only",
                self.settings.state_dir or "default",
            )
            if policy.has_local_budgets and not EpochRecord(self.settings.state_dir).read():
                # Where the state lives follows --state-dir or the environment ($XDG_STATE_HOME,
                # $HOME): a proxy started elsewhere than before starts here with empty budgets.
                log.warning(
                    "store: a first start in state dir %s (no store recorded there): local budgets count from "
                    "$0; if this proxy served before from another directory (another user or $HOME, "
                    "$XDG_STATE_HOME, a container without its volume), stop it and pass that one with --state-dir",
                    self.settings.state_dir or "default",
                )
        # Take calls only once the first refresh round (snapshot, prices) has run, so the first
        # calls after a start are guarded rather than refused for want of them; each worker
        # starts this way. Bounded: an unreachable upstream delays the start by STARTUP_REFRESH_S.
        try:
            first_delay = await asyncio.wait_for(refresher.tick(), STARTUP_REFRESH_S)
        except TimeoutError:
            log.warning("first credits/prices refresh took over %g s; starting without it", STARTUP_REFRESH_S)
            first_delay = 0.0
        if refresher.account_conflict is not None:
            raise StartupRefused(refresher.account_conflict)
        if state_dirs is not None and key is not None:
            state_dirs.record(key.value, self.state_dir)
        await self._adopt_name_counters(policy)
        loop = asyncio.get_running_loop()
        rt = self.runtime
        self.alerts = await start_alerts(stack, rt)  # closed after the tasks below stop
        if self.outside_pending:  # found by the first refresh, before the alert loop existed
            await self.alerts.outside_spend(self.outside_pending)
            self.outside_pending = []
        stack.push_async_callback(self._stop_tasks)
        self.tasks = [
            asyncio.create_task(refresher.run(first_delay), name="refresher"),
            asyncio.create_task(self.alerts.run(), name="alerts"),
            asyncio.create_task(self._every(SETTLE_RETRY_S, "settle-retry", rt.settle_pending), name="settle-retry"),
            asyncio.create_task(self._every(MARK_STARTED_S, "mark-started", rt.mark_started), name="mark-started"),
        ]
        if self.settings.policy:
            self.tasks.append(asyncio.create_task(holder.watch(), name="policy-watch"))
            with contextlib.suppress(RuntimeError, NotImplementedError, ValueError):
                holder.install_sighup(loop)
        problems, _ = await self._readiness(rt)
        # Not in self.tasks: it ends once ready, and readyz reports a finished task as a problem.
        self.announcer = asyncio.create_task(self._announce_ready(rt, problems), name="announce-ready")

    async def _adopt_name_counters(self, policy: Policy) -> None:
        """Key budgets used to be counted under the key's name; they are counted under its
        fingerprint now (renaming a key keeps its budget). Carry over this window's figures."""
        assert self.runtime is not None
        now_s = self.runtime.clock()
        moves = [
            (budget.id, hold)
            for key in policy.keys
            for budget, hold in zip(key.budgets, budget_holds(list(key.budgets), now_s), strict=True)
            if budget.counter != budget.id
        ]
        try:
            copied = await self.runtime.store.adopt_counters(moves)
        except StoreAuthError:
            return  # the refresher has said it, once
        except StoreError as exc:
            log.warning("could not carry name-keyed budget counters over: %s", exc)
            return
        if copied:
            log.warning("carried %d budget counter(s) kept under key names over to key fingerprints", copied)

    async def _outside_spend(self, found: list[OutsideSpend]) -> None:
        """Spend outside the guard (proxy/ops/outside.py): counted, logged, and alerted once per key
        and window."""
        for item in found:
            if item.key is None:
                self.metrics.account_outside_spend.inc(item.micros / 1e6)
            else:
                self.metrics.outside_spend.labels(item.key).inc(item.micros / 1e6)
            log.warning(
                "SPEND OUTSIDE THE GUARD: ImageRouter charged %s $%s that did not pass through the guard "
                "(it reports $%s, the guard accounted for $%s)",
                "the account" if item.key is None else f"key {item.key}",
                format_usd(item.micros),
                format_usd(item.reported_micros),
                format_usd(item.bound_micros),
            )
        if self.alerts is None:
            self.outside_pending += found
        else:
            await self.alerts.outside_spend(found)

    def _refresh_failed(self, message: str) -> None:
        self.metrics.refresh_failures.inc()
        log.warning("credits refresh failed: %s", message)

    def _policy_changed(self, policy: Policy) -> None:
        self.metrics.policy_reloads.labels("ok").inc()
        if policy.account.name != self.initial_policy.account.name:
            log.warning(
                "account.name changed to %r on reload; the store keeps using %r until a restart",
                policy.account.name,
                self.initial_policy.account.name,
            )

    def _snapshot_age(self) -> float:
        rt = self.runtime
        if rt is None or rt.refresher.state.last_ok_ms == 0:
            return float("nan")
        return max(0.0, rt.clock() - rt.refresher.state.last_ok_ms / 1000)

    async def _every(self, interval_s: float, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run `body` every `interval_s`, for ever: a store outage is waited out, anything
        unexpected is logged with its traceback and counted, and the loop goes on (backing off)."""
        delay = interval_s
        while True:
            await asyncio.sleep(delay)
            try:
                await body()
                delay = interval_s
            except StoreError as exc:
                log.debug("%s: %s", name, exc)
                delay = interval_s
            except Exception:
                self.metrics.background_errors.labels(name).inc()
                log.exception("background task %s failed; it continues", name)
                delay = min(MAX_LOOP_BACKOFF_S, delay * 2)

    async def shutdown(self) -> None:
        rt = self.runtime
        if rt is None:
            return
        rt.start_draining()
        await rt.wait_for_flights(rt.policy.guard.shutdown_grace_s)
        await rt.settle_open_flights()  # whatever is still open at the deadline
        with contextlib.suppress(Exception):
            await rt.settle_pending()
        if rt.pending_settles:
            # Nothing retries them after this: each hold ends at its lease, charged in full.
            pending = rt.pending_settles
            releases = sum(1 for p in pending.values() if p.cost_micros == 0)
            log.error(
                "shutdown: %d settle(s) the store did not take are abandoned (%d of them releases of refused "
                "calls); their holds end at their lease, charged in full: %s",
                len(pending),
                releases,
                ", ".join(sorted(pending)),
            )
        if self.alerts is not None:
            # Alerts for those last settles go out now if they can; unclaimed ones a sweep of
            # another instance (or the next start) sends, claimed ones get the deliveries' grace.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.alerts.drain(), ALERTS_DRAIN_S)
        # The lifespan's exit stack then stops the background tasks and closes the clients.

    async def _stop_tasks(self) -> None:
        if self.runtime is not None:
            self.runtime.refresher.stop()
        if self.announcer is not None:
            self.announcer.cancel()
        for task in self.tasks:
            task.cancel()
        # A cancel can be swallowed inside a driver's own timeout handling; the refresher also
        # watches its stop event, and nothing here waits forever.
        if self.announcer is not None:
            await asyncio.wait([self.announcer], timeout=5)
            self.announcer = None
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=5)
            for task in pending:
                log.warning("background task %s did not stop", task.get_name())
        self.tasks = []

    def _drop_guard(self) -> None:
        self.guard = None

    async def _announce_ready(self, rt: Runtime, problems: list[str]) -> None:
        """Log `spend guard ready` once this instance is ready (what /-/readyz says), and not
        before: at startup if it is, else when it becomes so, after saying what it waits for."""
        if problems:
            log.warning(
                "spend guard started, not ready yet (spending calls get 503 until it is): %s", "; ".join(problems)
            )
        while problems:
            await asyncio.sleep(READY_POLL_S)
            with contextlib.suppress(Exception):
                problems, _ = await self._readiness(rt)
        log.info("spend guard ready: policy %s, upstream %s", rt.policy.version, rt.upstream_url())


def create_app(
    settings: Settings | None = None,
    *,
    policy: Policy | None = None,
    clock: Clock | None = None,
    redis_factory: Callable[[], aioredis.Redis] | None = None,
) -> SpendGuardApp:
    """Build the app; with no arguments everything comes from `SPEND_GUARD_*` (uvicorn factory mode)."""
    served = settings is None
    if settings is None:
        settings = Settings.from_env()
        logs.configure_logging(settings.log_level, settings.log_format)
    if policy is None:
        policy = load_policy(settings.policy) if settings.policy else default_policy()
    factory = redis_factory or (lambda: redis_client(settings.redis_url, state_dir=settings.state_dir))
    # Served, every instance takes its time from the store; a test's injected clock is used as is.
    app = SpendGuardApp(settings, policy, clock=clock or StoreClock(), redis_factory=factory)
    if served:
        # What exists now (modules, policy, app) lives as long as the worker: keep it out of the
        # cyclic collector, which would otherwise rescan it on every full collection under load.
        gc.freeze()
        # A request allocates a few hundred short-lived objects, nearly none in cycles: collect
        # the young generation every 10,000 allocations, not 700. Under a guarded load the
        # collector took 4.2 % of the CPU at the default (1,365 young, 124 middle and 11 full
        # collections in 9.3 s of CPU).
        gc.set_threshold(10_000, 10, 10)
    return app
