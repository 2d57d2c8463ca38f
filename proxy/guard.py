"""The guard: classify each request, reserve before forwarding, stream, settle exactly once.

A spending call is forwarded only after one Lua script has held its estimated cost against the
account floor, the key's upstream spend limit and every local budget (DESIGN §1, §3). Everything
else streams through untouched.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp

from proxy.body import PriceFields, decode_content, read_price_fields
from proxy.errors import Rejected, StoreError, UpstreamError
from proxy.forward import response_headers
from proxy.money import format_usd
from proxy.observers import observer_for
from proxy.policy import Budget, KeyPolicy, ModelRules, Policy
from proxy.request import (
    bearer,
    fingerprint,
    header,
    header_pairs,
    raw_path,
    read_body,
    request_id,
    stream_body,
)
from proxy.routing import Match
from proxy.runtime import Flight, Runtime
from proxy.scanner import Outcome
from proxy.store import BudgetHold, Decision, Refusal, ReserveRequest, row_ref
from proxy.types import Receive, Scope, Send
from proxy.windows import format_ms, to_ms, window_end, window_start, window_start_ms

log = logging.getLogger("spend_guard.guard")
access_log = logging.getLogger("spend_guard.access")



@dataclass
class Call:
    """One guarded request on its way through; the fields feed the decision log line."""

    request_id: str
    started: float
    route: str
    key: KeyPolicy | None = None
    key_name: str = "unknown"
    model: str | None = None
    hold_micros: int = 0
    decision: str = "refused"
    scope: str = ""
    cost_micros: int | None = None
    upstream_status: int | None = None
    outcome: str = ""
    client_gone: bool = False
    headers: dict[str, str] = field(default_factory=dict)


def budgets_for(policy: Policy, key: KeyPolicy | None) -> list[Budget]:
    if key is None:
        return []
    group = policy.group_of(key)
    return list(key.budgets) + (list(group.budgets) if group else [])


def budget_holds(budgets: list[Budget], now_s: float) -> list[BudgetHold]:
    holds = []
    for b in budgets:
        start, end = window_start(b.period, now_s), window_end(b.period, now_s)
        holds.append(
            BudgetHold(b.id, b.limit_micros, b.shadow, 0 if start is None else to_ms(start), 0 if end is None else to_ms(end))
        )
    return holds


Refuse = Callable[[Rejected], None]
# What reserve.lua refuses for; anything else it says is treated as the store being unavailable.
REFUSAL_CODES = frozenset({"key_inactive", "key_expired", "key_limit", "credits", "budget"})
# Unguarded request bodies up to this size are read whole and sent with their length; larger
# ones (and chunked ones) stream through.
SMALL_REQUEST_BYTES = 256 * 1024


class Guard:
    """Pure-ASGI handler for every proxied request (own endpoints are routed before it)."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = self.rt.routes.classify(scope["method"], raw_path(scope))
        if match.kind is None:
            await self.passthrough(scope, receive, send)
        else:
            await self.guarded(scope, receive, send, match)

    # -- unguarded -------------------------------------------------------------------------

    async def passthrough(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = header_pairs(scope)
        length = header(headers, "content-length")
        chunked = header(headers, "transfer-encoding") is not None
        body_done = asyncio.Event()
        body: bytes | AsyncIterator[bytes] | None = None
        if not chunked and length is not None and length.strip().isdigit() and int(length) <= SMALL_REQUEST_BYTES:
            body = await read_body(receive, headers, SMALL_REQUEST_BYTES)
            body_done.set()
        elif chunked or length is not None:
            body = stream_body(receive, body_done)  # large uploads stream through
        else:
            body_done.set()
        try:
            resp = await self.rt.upstream.open(scope["method"], raw_path(scope), scope.get("query_string", b""), headers, body)
        except UpstreamError as exc:
            await exc.response()(scope, receive, send)
            return

        async def watch_disconnect() -> None:
            # A client that goes away on an unguarded route closes the upstream at once.
            await body_done.wait()
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    resp.close()
                    return

        watcher: asyncio.Task[None] | None = None
        try:
            await send({"type": "http.response.start", "status": resp.status, "headers": response_headers(resp)})
            if not resp.content.is_eof():
                # Only a response still arriving needs watching; most arrive whole with the headers.
                watcher = asyncio.create_task(watch_disconnect())
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if watcher is None or not watcher.done():
                # The upstream broke mid-body: abort the client's connection too, so it sees a cut.
                raise UpstreamBroken() from exc
        finally:
            if watcher is not None:
                watcher.cancel()
            resp.release()

    # -- guarded ---------------------------------------------------------------------------

    async def guarded(self, scope: Scope, receive: Receive, send: Send, match: Match) -> None:
        rt = self.rt
        policy = rt.policy
        headers = header_pairs(scope)
        call = Call(request_id=request_id(headers), started=time.perf_counter(), route=match.path)
        call.headers["X-Request-Id"] = call.request_id
        call.headers["X-Spend-Guard-Policy"] = policy.version
        try:
            prepared = await self.prepare(scope, receive, headers, match, policy, call)
        except Rejected as exc:
            rt.metrics.decisions.labels("refused" if exc.status != 400 and exc.status != 413 else "invalid", exc.scope or "request", call.key_name).inc()
            call.decision, call.scope = "refused", exc.scope or exc.error_type
            self.log_call(call, policy, error=exc.error_type)
            await exc.response(call.headers)(scope, receive, send)
            return
        body, flight = prepared
        rt.metrics.overhead.observe(time.perf_counter() - call.started)
        await self.forward(scope, receive, send, headers, body, flight, call, policy)

    async def prepare(
        self, scope: Scope, receive: Receive, headers: list[tuple[str, str]], match: Match, policy: Policy, call: Call
    ) -> tuple[bytes, Flight | None]:
        """Everything before forwarding: identify, read, price, reserve. Raises `Rejected`."""
        rt = self.rt
        shadow_refusals: list[Rejected] = []

        def refuse(exc: Rejected) -> None:
            # In global shadow mode a policy refusal is forwarded and counted, not enforced.
            if policy.mode == "shadow":
                shadow_refusals.append(exc)
            else:
                raise exc

        if match.ambiguous:
            raise Rejected(400, "invalid_request_error", "Path contains an encoded '/' or '\\'; spell the route plainly.", scope="request")
        if rt.draining:
            raise Rejected(503, "guard_unavailable", "The proxy is shutting down; retry on another instance.", scope="store", headers={"Retry-After": "1"})
        secret = bearer(headers)
        if secret is None:
            raise Rejected(401, "unauthorized", "Authorization header must be provided as Bearer token.", scope="auth")
        key = policy.key_for(fingerprint(secret))
        del secret
        call.key = key
        call.key_name = key.name if key else "unknown"
        if key is None and policy.guard.unknown_keys == "reject":
            refuse(Rejected(401, "unauthorized", "This API key is not registered with the spend guard.", scope="auth"))
        if not match.enabled:
            refuse(Rejected(403, "policy_violation", f"Route {match.path} is disabled by policy.", scope="policy"))

        raw = await read_body(receive, headers, policy.guard.max_body_bytes)
        decoded = decode_content(raw, header(headers, "content-encoding"), policy.guard.max_body_bytes)
        fields = read_price_fields(decoded, header(headers, "content-type"))
        prices = rt.refresher.prices
        model = prices.resolve(fields.model)
        call.model = model
        for rules in (policy.models.rules, key.rules if key else None):
            if rules is not None and not _permits(rules, {model, fields.model}):
                refuse(Rejected(403, "policy_violation", f"Model '{model}' is not allowed by policy for this key.", scope="policy"))
                break
        hold = self.hold_for(match, fields, model, policy, refuse)
        if hold is None:
            return raw, None  # fail-open without a price table: forwarded unguarded, counted
        call.hold_micros = hold
        for cap, where in self.caps(policy, key):
            if hold > cap:
                refuse(
                    Rejected(
                        403,
                        "policy_violation",
                        f"This call may cost up to ${format_usd(hold)}, above the per-request cap of ${format_usd(cap)} ({where}).",
                        scope="policy",
                    )
                )
                break
        flight = await self.reserve(call, policy, key, hold, refuse)
        if shadow_refusals:
            self.would_refuse(call, shadow_refusals[0])
        return raw, flight

    def would_refuse(self, call: Call, refusal: Rejected) -> None:
        self.rt.metrics.decisions.labels("would_refuse", refusal.scope or "policy", call.key_name).inc()
        call.decision, call.scope = "would_refuse", refusal.scope or "policy"
        log.info("shadow: would refuse %s (%s): %s", call.request_id, refusal.error_type, refusal.message)

    def hold_for(self, match: Match, fields: PriceFields, model: str, policy: Policy, refuse: Refuse) -> int | None:
        models = policy.models
        override = models.overrides.get(model, models.overrides.get(fields.model))
        if override is not None:
            return override
        if match.kind == "text":
            return models.text_hold_micros
        prices = self.rt.refresher.prices
        if not prices.loaded:
            self.unavailable("no price table has been loaded from /v2/models yet")
            return None
        price = prices.hold_for(model)
        if price is not None:
            return price
        if policy.guard.unknown_models == "reject":
            refuse(Rejected(403, "policy_violation", f"Model '{model}' has no published price and unknown models are refused.", scope="policy"))
        return models.default_hold_micros

    def caps(self, policy: Policy, key: KeyPolicy | None) -> list[tuple[int, str]]:
        caps = []
        if policy.models.max_request_micros is not None:
            caps.append((policy.models.max_request_micros, "models.max_request_usd"))
        if key is not None:
            if key.max_request_micros is not None:
                caps.append((key.max_request_micros, f"key {key.name}"))
            group = policy.group_of(key)
            if group is not None and group.max_request_micros is not None:
                caps.append((group.max_request_micros, f"group {group.name}"))
        return caps

    def unavailable(self, reason: str) -> None:
        """Fail closed (raise 503) or open (return; the caller forwards without a hold)."""
        if self.rt.policy.guard.on_store_error == "open":
            self.rt.metrics.unguarded.labels(reason.split(" ")[0]).inc()
            log.warning("UNGUARDED: forwarding a spending call without a hold: %s", reason)
            return
        raise Rejected(503, "guard_unavailable", f"Spend guard unavailable: {reason}. The call was not forwarded.", scope="store")

    async def reserve(self, call: Call, policy: Policy, key: KeyPolicy | None, hold: int, refuse: Refuse) -> Flight | None:
        rt = self.rt
        now_s = rt.clock()
        now_ms = int(now_s * 1000)
        budgets = budgets_for(policy, key)
        request = ReserveRequest(
            hold_id=uuid.uuid4().hex,
            amount_micros=hold,
            now_ms=now_ms,
            lease_expiry_ms=now_ms + int(policy.guard.hold_ttl_s * 1000),
            floor_micros=policy.account.min_remaining_micros,
            max_staleness_ms=int(policy.account.max_staleness_s * 1000),
            row_ref=row_ref(key.api_key_id, key.api_key_name) if key else None,
            windows_ms=(window_start_ms("day", now_s), window_start_ms("week", now_s), window_start_ms("month", now_s)),
            shadow=policy.mode == "shadow",
            budgets=budget_holds(budgets, now_s),
        )
        try:
            decision = await rt.store.reserve(request)
        except StoreError as exc:
            rt.store_ok = False
            # The script may still run once Redis wakes up: release that hold (or tombstone it)
            # from the settle retry loop, so a call we never forwarded holds nothing.
            rt.pending_settles[request.hold_id] = 0
            self.unavailable(f"store error ({exc})")
            return None
        rt.store_ok = True
        if not decision.allowed:
            assert decision.refusal is not None
            if decision.refusal.code in ("no_snapshot", "stale"):
                self.unavailable(self.stale_reason(decision.refusal))
                return None
            if decision.refusal.code not in REFUSAL_CODES:
                self.unavailable(f"reserve answered {decision.refusal.code!r}")
                return None
            refuse(self.refusal(decision.refusal, call, budgets, now_s))  # raises unless shadow
            return None
        if decision.refusal is not None:
            # The script only lets a refusal through when its scope is in shadow mode.
            would = self.refusal(decision.refusal, call, budgets, now_s)
            if policy.mode == "shadow":
                refuse(would)
            else:
                self.would_refuse(call, would)
        self.remaining_headers(call, decision)
        flight = Flight(request.hold_id, hold, call.key_name)
        rt.flights[flight.hold_id] = flight
        rt.metrics.inflight.set(len(rt.flights))
        rt.metrics.usd.labels("held", call.key_name).inc(hold / 1e6)
        if call.decision != "would_refuse":
            call.decision = "allowed"
            rt.metrics.decisions.labels("allowed", decision.tight_scope or "none", call.key_name).inc()
        return flight

    def stale_reason(self, refusal: Refusal) -> str:
        if refusal.code == "no_snapshot":
            return "no credits snapshot has been fetched from ImageRouter yet"
        return (
            f"the credits snapshot is {refusal.held_micros // 1000} s old "
            f"(max_staleness_s={self.rt.policy.account.max_staleness_s:g})"
        )

    def refusal(self, r: Refusal, call: Call, budgets: list[Budget], now_s: float) -> Rejected:
        spent, held, limit = format_usd(r.spent_micros), format_usd(r.held_micros), format_usd(r.limit_micros)
        this = format_usd(call.hold_micros)
        key = f"Key '{call.key_name}'" if call.key else "This key"
        if r.code == "key_inactive":
            return Rejected(403, "key_inactive", f"{key} is inactive at ImageRouter.", scope="key")
        if r.code == "key_expired":
            return Rejected(403, "key_expired", f"{key} has expired at ImageRouter.", scope="key")
        if r.code == "credits":
            floor = self.rt.policy.account.min_remaining_micros
            return Rejected(
                402,
                "insufficient_credits",
                f"Account credits would drop below the floor of ${format_usd(floor)}: available above the floor "
                f"${limit}, settled since the last snapshot ${spent}, held by calls in flight ${held}, "
                f"this call holds up to ${this}. Top up the ImageRouter account.",
                scope="account",
            )
        period: str | None = None
        if r.code == "key_limit":
            period = r.scope.split(":", 1)[1]
            what = f"{key}'s ImageRouter spend limit of ${limit} per {period}"
        else:
            budget_id = r.scope.split(":", 1)[1]
            budget = next((b for b in budgets if b.id == budget_id), None)
            period = (budget.period if budget else None) or "lifetime"
            what = f"Budget '{budget_id}' of ${limit} per {period}"
        message = f"{what} would be exceeded: spent ${spent}, held by calls in flight ${held}, this call holds up to ${this}."
        headers = {}
        reset = window_end(period if period in ("day", "week", "month") else None, now_s)  # type: ignore[arg-type]
        if reset is not None:
            message += f" The window resets at {format_ms(to_ms(reset))}."
            headers["Retry-After"] = str(max(1, int(reset.timestamp() - now_s) + 1))
        else:
            message += " This is a lifetime limit; it does not reset."
        return Rejected(402, "spend_limit_exceeded", message, scope=r.scope, headers=headers)

    def remaining_headers(self, call: Call, decision: Decision) -> None:
        if decision.tight_scope:
            call.headers["X-Spend-Guard-Remaining"] = format_usd(decision.tight_remaining_micros)
            call.headers["X-Spend-Guard-Remaining-Scope"] = decision.tight_scope

    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: list[tuple[str, str]],
        body: bytes,
        flight: Flight | None,
        call: Call,
        policy: Policy,
    ) -> None:
        rt = self.rt
        if flight is None and call.decision != "would_refuse":
            call.decision = "unguarded"
        sent_headers = [(n, v) for n, v in headers if n.lower() != "x-request-id"] + [("X-Request-Id", call.request_id)]
        outcome = Outcome("unknown")
        forwarded_at = time.perf_counter()
        resp: aiohttp.ClientResponse | None = None
        try:
            try:
                resp = await rt.upstream.open(scope["method"], raw_path(scope), scope.get("query_string", b""), sent_headers, body)
            except UpstreamError as exc:
                # Nothing was received from ImageRouter. A connect failure never reached it
                # (release); a timeout or broken connection might have been billed (charge the hold).
                cause = exc.__cause__
                if isinstance(cause, aiohttp.ClientConnectorError):
                    outcome = Outcome("error")
                call.upstream_status, call.outcome = exc.status, "upstream_error"
                await exc.response(call.headers)(scope, receive, send)
                return
            call.upstream_status = resp.status
            observer = observer_for(resp.headers.get("Content-Type"), resp.headers.get("Content-Encoding"))
            out_headers = response_headers(resp) + [(k.lower().encode(), v.encode()) for k, v in call.headers.items()]
            await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
            try:
                async for chunk in resp.content.iter_any():
                    observer.feed(chunk)
                    # After a client disconnect uvicorn drops these sends; we keep reading to the
                    # end so the call settles with ImageRouter's real cost.
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                outcome = observer.finish(False)
                call.outcome = "upstream_broken"
                raise UpstreamBroken() from exc
            outcome = observer.finish(True)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if resp is not None:
                resp.release()
            rt.metrics.upstream_latency.observe(time.perf_counter() - forwarded_at)
            if flight is not None:
                await asyncio.shield(self.settle(flight, outcome, call))
            self.log_call(call, policy)

    async def settle(self, flight: Flight, outcome: Outcome, call: Call) -> None:
        """Exactly once per reservation: error -> release, cost -> charge it, else charge the hold."""
        rt = self.rt
        if flight.settled:
            return
        flight.settled = True
        cost = 0 if outcome.kind == "error" else outcome.cost_micros if outcome.kind == "cost" else None
        call.outcome = call.outcome or outcome.kind
        try:
            charged = await rt.store.settle(flight.hold_id, cost, rt.now_ms())
        except StoreError as exc:
            # Keep it and retry in the background; the lease is the last resort.
            rt.pending_settles[flight.hold_id] = cost
            rt.metrics.settle_retries.inc()
            log.warning("settle of %s deferred: %s", call.request_id, exc)
            charged = flight.amount_micros if cost is None else cost
        finally:
            rt.flights.pop(flight.hold_id, None)
            rt.metrics.inflight.set(len(rt.flights))
        call.cost_micros = charged
        if charged is not None:
            rt.metrics.usd.labels("charged", flight.key_name).inc(charged / 1e6)
            rt.metrics.usd.labels("released", flight.key_name).inc(max(0, flight.amount_micros - charged) / 1e6)

    def log_call(self, call: Call, policy: Policy, error: str | None = None) -> None:
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "request_id": call.request_id,
            "decision": call.decision,
            "scope": call.scope or None,
            "key": call.key_name,
            "route": call.route,
            "model": call.model,
            "hold_usd": format_usd(call.hold_micros) if call.hold_micros else None,
            "cost_usd": None if call.cost_micros is None else format_usd(call.cost_micros),
            "outcome": call.outcome or None,
            "upstream_status": call.upstream_status,
            "latency_ms": round((time.perf_counter() - call.started) * 1000, 1),
            "policy_version": policy.version,
        }
        if error:
            record["error"] = error
        access_log.info(json.dumps(record, separators=(",", ":")))


class UpstreamBroken(Exception):
    """Raised after the response started, so the server aborts the client's connection."""


async def settle_pending(runtime: Runtime) -> None:
    """Retry settles that failed while the store was down (runs in the lifespan)."""
    for hold_id, cost in list(runtime.pending_settles.items()):
        try:
            await runtime.store.settle(hold_id, cost, runtime.now_ms())
        except StoreError:
            return
        runtime.pending_settles.pop(hold_id, None)


def _permits(rules: ModelRules, names: set[str]) -> bool:
    """Deny wins if any spelling (alias or resolved id) matches; an allow list needs one match."""
    if any(fnmatch.fnmatchcase(n, g) for n in names for g in rules.deny):
        return False
    return not rules.allow or any(fnmatch.fnmatchcase(n, g) for n in names for g in rules.allow)


__all__ = ["Guard", "UpstreamBroken", "settle_pending"]
