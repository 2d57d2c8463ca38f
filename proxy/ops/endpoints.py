"""The own endpoints under `/-/`: which paths they are however spelled, and their handlers
(`/-/healthz`, `/-/readyz`, `/-/metrics`, `/-/me`, `/-/quote`, `/-/status`, `/-/status.json`).

`OwnEndpoints` is mixed into `SpendGuardApp` (proxy/app.py), whose lifespan sets what the handlers
read; they are never forwarded upstream, so they never shadow an upstream path.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Router

from proxy.credits import CLOCK_SKEW_WARN_S
from proxy.deadlines import deadline
from proxy.errors import Rejected, StoreAuthError, error_response
from proxy.http.request import raw_path
from proxy.http.routing import canonical_path
from proxy.ops.gauges import LevelGauges
from proxy.ops.levels import me_report
from proxy.ops.metrics import Metrics
from proxy.ops.quote import quote_report
from proxy.ops.statuspage import authorize, authorize_metrics, page_response, status_data
from proxy.policy.model import Policy
from proxy.settings import Settings
from proxy.store.identity import LOST_UNKNOWN
from proxy.types import Receive, Scope, Send

if TYPE_CHECKING:
    from proxy.guard.guard import Guard
    from proxy.runtime import Runtime

OWN_PREFIX = "/-/"
STATUS_PAGE = "/-/status"
OWN_PATHS = frozenset({"/-/healthz", "/-/readyz", "/-/metrics", "/-/me", "/-/quote", STATUS_PAGE, "/-/status.json"})
# After a reserve failed, /-/readyz says so for this long (a success since does not end it: a
# flapping store stays unready); then it lets traffic try again, so a recovered store is noticed
# even behind a load balancer.
RESERVE_FAILURE_UNREADY_S = 10.0
# /-/healthz asks the embedded store for a PONG within this (the image's probe gives up after 2 s).
HEALTH_STORE_TIMEOUT_S = 1.0


class OwnEndpoints:
    """The handlers of the own endpoints, on the app's state (set by its lifespan)."""

    settings: Settings
    initial_policy: Policy
    metrics: Metrics
    levels: LevelGauges
    runtime: Runtime | None
    guard: Guard | None
    tasks: list[asyncio.Task[None]]
    router: Router

    async def own(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        """An own endpoint, by the canonical form of its path: never forwarded, however spelled."""
        if path == STATUS_PAGE and scope["path"].endswith("/"):
            # The page finds its data beside its own URL: send it to the one without the slash,
            # relative to what the client asked (never built from the Host header).
            await RedirectResponse("../status", status_code=307)(scope, receive, send)
            return
        if scope["path"] != path:
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.router(scope, receive, send)

    async def healthz(self, request: Request) -> Response:
        """Liveness: 503 when this process can no longer serve spending calls at all, whatever
        other instances or a later retry do: the store it runs itself (the embedded one) does not
        answer, or a background loop it needs stopped. A shared Redis that is down is readiness
        (`/-/readyz`): restarting this process would not bring it back."""
        rt = self.runtime
        problems = []
        if rt is not None:
            if not self.settings.redis_url:
                try:
                    async with deadline(HEALTH_STORE_TIMEOUT_S):
                        await rt.store.ping()
                except Exception as exc:  # noqa: BLE001 - any failure to answer is the problem
                    # The kind of failure only: the detail may name internal paths (the log has it).
                    reason = exc if isinstance(exc, TimeoutError) else exc.__cause__ or exc
                    problems.append(f"embedded store: not answering ({type(reason).__name__})")
            problems += [f"background task {t.get_name()} is not running" for t in self.tasks if t.done()]
        if problems:
            return JSONResponse({"status": "failing", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        rt = self.runtime
        if rt is None:
            return JSONResponse({"ready": False, "problems": ["starting"]}, status_code=503)
        problems, age_s = await self._readiness(rt)
        state = rt.refresher.state
        warnings = []
        if (failure := rt.holder.last_failure) is not None:
            # Still ready: the previous policy is enforced in full. Said until a reload succeeds.
            warnings.append(failure.describe(rt.policy.version))
        for name, problem in sorted(rt.upstream_keys.problems.items()):
            warnings.append(f"virtual key {name}: its ImageRouter key is unavailable ({problem}); its calls get 503")
        clock_offset_s = getattr(rt.clock, "offset_s", 0.0)
        if abs(clock_offset_s) > CLOCK_SKEW_WARN_S:
            warnings.append(
                f"clock: this machine's clock is {-clock_offset_s:+.1f} s off the store's; the store's is used"
            )
        body = {
            "ready": not problems,
            "problems": problems,
            "warnings": warnings,
            "clock_offset_s": round(clock_offset_s, 3),
            "snapshot_age_s": None if age_s is None else round(age_s, 1),
            "refresh_failures": state.failures,
            "last_refresh_error": state.last_error or None,
            "policy_version": rt.policy.version,
            "policy_file_version": rt.holder.file_version(),
        }
        return JSONResponse(body, status_code=200 if not problems else 503)

    async def _readiness(self, rt: Runtime) -> tuple[list[str], float | None]:
        """What keeps this instance from guarding calls (empty: ready), and the snapshot's age."""
        problems = []
        age_s: float | None = None
        try:
            fetched = await rt.store.snapshot_fetched_ms()
            if fetched is None:
                problems.append("snapshot: no credits snapshot fetched yet")
            else:
                age_s = max(0.0, rt.clock() - fetched / 1000)
                if age_s > rt.policy.account.max_staleness_s:
                    problems.append(
                        f"snapshot: {age_s:.0f} s old, max_staleness_s={rt.policy.account.max_staleness_s:g}"
                    )
        except StoreAuthError:
            problems.append("store: it refused the proxy's credentials (the password in the Redis URL)")
        except Exception as exc:  # noqa: BLE001 - any store failure means not ready
            problems.append(f"store: {type(exc).__name__}")
        if rt.reserve_failed_at and rt.clock() - rt.reserve_failed_at < RESERVE_FAILURE_UNREADY_S:
            problems.append(f"store: reserves are failing: {rt.reserve_failure}")
        lost = rt.refresher.state_lost
        if rt.policy.has_local_budgets:
            with contextlib.suppress(Exception):  # an unreachable store is reported above
                lost = rt.refresher.state_lost = await rt.store.state_lost()
        if lost and rt.policy.has_local_budgets:
            why, _, at_ms = lost.partition("|")
            fix = "`spend-guard store init` if it is new, else `spend-guard store recover`"
            problems.append(
                f"store: local budget state was lost ({why}); run "
                + (fix if why == LOST_UNKNOWN else "`spend-guard store recover`")
            )
        if rt.refresher.account_conflict is not None:
            problems.append(f"store: {rt.refresher.account_conflict}")
        if rt.refresher.evicting and rt.policy.has_local_budgets:
            problems.append(
                f"store: its maxmemory-policy {rt.refresher.evicting} can evict budget counters; set noeviction"
            )
        state = rt.refresher.state
        if state.auth_failed:
            problems.append(f"credits: {state.last_error}")
        if not rt.refresher.prices.loaded:
            problems.append("prices: no price table loaded from /v2/models yet")
        for task in self.tasks:
            if task.done():
                problems.append(f"background task {task.get_name()} is not running")
        return problems, age_s

    async def metrics_endpoint(self, request: Request) -> Response:
        policy = self.runtime.policy if self.runtime is not None else self.initial_policy
        if (denied := authorize_metrics(policy, request.headers.getlist("authorization"))) is not None:
            return denied
        if self.runtime is not None:
            await self.levels.refresh(self.runtime.ledger, self.runtime.policy, self.runtime.clock())
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def me(self, request: Request) -> Response:
        if self.runtime is None:
            return error_response(503, "guard_unavailable", "The proxy is starting.")
        try:
            report = await me_report(self.runtime, request.headers.getlist("authorization"))
        except Rejected as exc:
            return exc.response()
        return JSONResponse(report)

    async def quote(self, request: Request) -> Response:
        """What a call would hold, asked before it is sent (proxy/ops/quote.py)."""
        if self.runtime is None or self.guard is None:
            return error_response(503, "guard_unavailable", "The proxy is starting.")
        try:
            answer = await quote_report(self.runtime, self.guard, request)
        except Rejected as exc:
            return exc.response()
        return JSONResponse(answer, headers={"Cache-Control": "no-store"})

    async def status_page(self, request: Request) -> Response:
        """The status page (proxy/ops/statuspage.py): a shell that fetches /-/status.json."""
        if self.runtime is None:
            return error_response(503, "guard_unavailable", "The proxy is starting.")
        return authorize(self.runtime.policy, request.headers.getlist("authorization")) or page_response()

    async def status_json(self, request: Request) -> Response:
        rt, guard = self.runtime, self.guard
        if rt is None or guard is None:
            return error_response(503, "guard_unavailable", "The proxy is starting.")
        policy = rt.policy
        if (denied := authorize(policy, request.headers.getlist("authorization"))) is not None:
            return denied
        failure = rt.holder.last_failure
        body = await status_data(
            rt.store,
            policy,
            guard.refusals,
            rt.clock(),
            file_version=rt.holder.file_version(),
            reload_error=None if failure is None else failure.describe(policy.version),
        )
        return JSONResponse(body, headers={"Cache-Control": "no-store"})


def own_path(scope: Scope) -> str | None:
    """The canonical path of a request for an own endpoint, however spelled (`//-/status.json`,
    `/x/../-/status.json`, `/%2D/status.json`: what the route table reads alike), else None."""
    if scope["path"] in OWN_PATHS:
        return str(scope["path"])
    raw = raw_path(scope)
    if b"-" not in raw and b"%2" not in raw:
        return None  # (no spelling of `/-` without either)
    canonical = canonical_path(raw)
    return canonical if canonical == "/-" or canonical.startswith(OWN_PREFIX) else None
