"""The guard: classify each request; identify, read, price and check a spending call, and
reserve its hold before it goes up (forwarding and the settle are proxy/guard/relay.py's).

A spending call is forwarded only after one Lua script has held its estimated cost against the
account floor, the key's upstream spend limit and every local budget (DESIGN §1, §3). Everything
else streams through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from proxy.errors import Rejected, StoreError
from proxy.guard.pricing import quote_hold
from proxy.guard.refusals import RecentRefusals, Refusal
from proxy.guard.relay import Admitted, relay
from proxy.guard.verdicts import (
    REFUSAL_CODES,
    Call,
    Verdicts,
    budget_holds,
    budgets_for,
    log_decision,
    permits,
    refusal,
    stale_reason,
)
from proxy.http.body import PriceFields, decode_content, read_price_fields
from proxy.http.passthrough import passthrough
from proxy.http.request import (
    CLOSE,
    BodyLease,
    BodyPool,
    bearer,
    fingerprint,
    header,
    header_pairs,
    raw_path,
    read_body,
    request_id,
)
from proxy.http.routing import Match
from proxy.money import MAX_CALL_MICROS, format_usd
from proxy.policy.model import KeyPolicy, Policy
from proxy.runtime import Flight, Runtime
from proxy.store.records import Decision, ReserveRequest, counters_of, row_ref
from proxy.types import Receive, Scope, Send
from proxy.untrusted import echo
from proxy.windows import window_start_ms

log = logging.getLogger("spend_guard.guard")

# Releases kept for reserves that failed against the store (each ~120 bytes of memory; one
# EVALSHA each, ~8,000/s, once the store answers again).
MAX_PENDING_RELEASES = 10_000
# Bodies above this are priced on a worker thread (parsing 64 MB of JSON takes ~0.2 s).
OFF_LOOP_BYTES = 1 << 20
# Routes whose calls ImageRouter pre-charges before it answers (reference §4: the generation
# handler flushes its 200 only once the pre-charge passed). Text calls are billed afterwards.
PRECHARGED_KINDS = frozenset({"image", "video"})


class Guard:
    """Pure-ASGI handler for every proxied request (own endpoints are routed before it)."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.bodies = BodyPool(runtime.settings.max_buffered_bytes)
        self.refusals = RecentRefusals()  # the latest, for /-/status
        self.state_lost_logged = False  # the error that the store lost its budget state, once

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = raw_path(scope)
        match = self.rt.routes.classify(scope["method"], path)
        if match.kind is None:
            await passthrough(self.rt, scope, receive, send, path)
        else:
            await self.guarded(scope, receive, send, match, path)

    # -- guarded ---------------------------------------------------------------------------

    async def guarded(self, scope: Scope, receive: Receive, send: Send, match: Match, path: bytes) -> None:
        rt = self.rt
        policy = rt.policy
        headers = header_pairs(scope)
        call = Call(
            request_id=request_id(headers), started=time.perf_counter(), route=match.path, kind=match.kind or ""
        )
        client = scope.get("client")
        call.client = f"{client[0]}:{client[1]}" if client else None
        call.user_agent = header(headers, "user-agent")
        call.headers["X-Request-Id"] = call.request_id
        call.headers["X-Spend-Guard-Policy"] = policy.version
        try:
            admitted = await self.prepare(scope, receive, send, path, headers, match, policy, call)
        except Rejected as exc:
            rt.metrics.decisions.labels(
                "refused" if exc.status != 400 and exc.status != 413 else "invalid",
                exc.scope or "request",
                call.key_name,
            ).inc()
            call.decision, call.scope = "refused", exc.scope or exc.error_type
            if exc.status not in (400, 413):
                self.refusals.add(
                    Refusal(
                        rt.clock(), call.key_name, call.scope, exc.status, exc.error_type, exc.message, call.request_id
                    )
                )
            log_decision(call, policy, error=exc.error_type)
            await exc.response(call.headers)(scope, receive, send)
            return
        rt.metrics.overhead.observe(time.perf_counter() - call.started)
        await relay(rt, admitted)

    async def prepare(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        path: bytes,
        headers: list[tuple[str, str]],
        match: Match,
        policy: Policy,
        call: Call,
    ) -> Admitted:
        """Everything before forwarding: identify, read, price, reserve. Raises `Rejected`."""
        rt = self.rt
        # In global shadow mode a policy refusal is forwarded and counted, not enforced.
        verdicts = Verdicts(policy.mode == "shadow")

        if any(name in (b"content-length", b"transfer-encoding") for name, _ in scope["headers"]):
            # Refused before its body is read: close the connection rather than read the rest of
            # the upload into the void (kept until the body is in).
            call.headers.update(CLOSE)
        if match.ambiguous:
            raise Rejected(
                400,
                "invalid_request_error",
                "Path contains an encoded '/' or '\\', or is still percent-encoded after one decode; "
                "spell the route plainly.",
                scope="request",
            )
        if rt.draining:
            raise Rejected(
                503,
                "guard_unavailable",
                "The proxy is shutting down; retry on another instance.",
                scope="store",
                headers={"Retry-After": "1"},
            )
        secret = bearer(headers)
        if secret is None:
            raise Rejected(401, "unauthorized", "Authorization header must be provided as Bearer token.", scope="auth")
        key = policy.key_for(fingerprint(secret))
        del secret
        call.key = key
        call.key_name = key.name if key else "unknown"
        if key is None and policy.guard.unknown_keys == "reject":
            verdicts.add(
                Rejected(401, "unauthorized", "This API key is not registered with the spend guard.", scope="auth")
            )
        if not match.enabled:
            verdicts.add(
                Rejected(403, "policy_violation", f"Route {match.path} is disabled by policy.", scope="policy")
            )
        verdicts.enforce()

        # Only now is the body read: every refusal above needed none. Its bytes count against
        # the process's bound until the call ends (relay) or is refused (here).
        lease = BodyLease(self.bodies)
        try:
            raw = await read_body(
                receive,
                header(headers, "content-length"),
                policy.guard.max_body_bytes,
                timeout_s=rt.settings.body_timeout_s,
                lease=lease,
            )
            call.headers.pop("Connection", None)
            flight = await self.priced(raw, headers, match, policy, call, key, verdicts)
        except BaseException:
            lease.release()
            raise
        return Admitted(scope, receive, send, path, raw, lease, flight, call, policy)

    async def priced(
        self,
        raw: bytes,
        headers: list[tuple[str, str]],
        match: Match,
        policy: Policy,
        call: Call,
        key: KeyPolicy | None,
        verdicts: Verdicts,
    ) -> Flight | None:
        """The rest of `prepare` once the body is in: price, check, reserve."""
        rt = self.rt
        fields = await read_fields(raw, headers, policy.guard.max_body_bytes, text=match.kind == "text")
        prices = rt.refresher.prices
        model = prices.resolve(fields.model)
        call.model = model
        for rules in (policy.models.rules, key.rules if key else None):
            if rules is not None and not permits(rules, {model, fields.model}):
                verdicts.add(
                    Rejected(
                        403,
                        "policy_violation",
                        f"Model '{echo(model)}' is not allowed by policy for this key.",
                        scope="policy",
                    )
                )
                break
        hold = self.hold_for(match, fields, model, policy, verdicts)
        if hold is None:
            return None  # fail-open without a price table: forwarded unguarded, counted
        call.hold_micros = hold
        if hold > MAX_CALL_MICROS:
            raise Rejected(
                403,
                "policy_violation",
                f"This call may cost up to ${format_usd(hold)}, above the spend guard's per-call maximum "
                f"of ${format_usd(MAX_CALL_MICROS)}.",
                scope="policy",
            )
        for cap, where in self.caps(policy, key):
            if hold > cap:
                verdicts.add(
                    Rejected(
                        403,
                        "policy_violation",
                        f"This call may cost up to ${format_usd(hold)}, above the per-request cap of "
                        f"${format_usd(cap)} ({where}).",
                        scope="policy",
                    )
                )
                break
        verdicts.enforce()
        flight = await self.reserve(call, policy, key, hold, verdicts)
        if verdicts.refusals:
            self.would_refuse(call, verdicts.refusals[0])
        return flight

    def would_refuse(self, call: Call, refusal: Rejected) -> None:
        self.rt.metrics.decisions.labels("would_refuse", refusal.scope or "policy", call.key_name).inc()
        call.decision, call.scope = "would_refuse", refusal.scope or "policy"
        log.info("shadow: would refuse %s (%s): %s", call.request_id, refusal.error_type, refusal.message)

    def hold_for(self, match: Match, fields: PriceFields, model: str, policy: Policy, verdicts: Verdicts) -> int | None:
        """The call's hold (proxy.guard.pricing.quote_hold); None: forward unguarded (failed open)."""
        quote = quote_hold(match.kind or "", match.path, fields, model, self.rt.refresher.prices, policy.models)
        if quote.micros is None:
            self.unavailable("no price table has been loaded from /v2/models yet", "no_prices")
            return None
        if quote.unpriced and policy.guard.unknown_models == "reject":
            why = "matches no models.text_rates entry" if quote.basis == "text_default" else "has no published price"
            verdicts.add(
                Rejected(
                    403,
                    "policy_violation",
                    f"Model '{echo(model)}' {why} and unknown models are refused.",
                    scope="policy",
                )
            )
        return quote.micros

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

    def unavailable(self, reason: str, kind: str) -> None:
        """Fail closed (raise 503) or open (return; the caller forwards without a hold)."""
        if self.rt.policy.guard.on_store_error == "open":
            self.rt.metrics.unguarded.labels(kind).inc()
            log.warning("UNGUARDED: forwarding a spending call without a hold: %s", reason)
            return
        raise Rejected(
            503, "guard_unavailable", f"Spend guard unavailable: {reason}. The call was not forwarded.", scope="store"
        )

    async def reserve(
        self, call: Call, policy: Policy, key: KeyPolicy | None, hold: int, verdicts: Verdicts
    ) -> Flight | None:
        rt = self.rt
        now_s = rt.clock()
        now_ms = int(now_s * 1000)
        budgets = budgets_for(policy, key)
        request = ReserveRequest(
            hold_id=os.urandom(16).hex(),  # 128 random bits (uuid4 has 122) at a fifth of its cost
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
            decision = await rt.ledger.reserve(request)
            rt.note_reserve_succeeded()
            if budgets:
                decision = decision.renamed({f"budget:{b.counter}": f"budget:{b.id}" for b in budgets})
        except StoreError as exc:
            # Clients and /-/readyz get the kind of failure; the log keeps the detail (which may
            # name internal addresses).
            reason = type(exc.__cause__ or exc).__name__
            rt.note_reserve_failed(reason)
            log.warning("reserve failed: %s", exc)
            if rt.defer_release(request.hold_id, counters_of(request.budgets), MAX_PENDING_RELEASES):
                log.warning(
                    "%d settles wait for the store; later failed reserves are left to their lease", MAX_PENDING_RELEASES
                )
            self.unavailable(f"store error ({reason})", "store")
            return None
        if decision.reclaimed.count or decision.reclaimed.quarantined:
            rt.note_reclaimed(decision.reclaimed)
        if not decision.allowed:
            assert decision.refusal is not None
            if decision.refusal.code == "state_lost":
                rt.refresher.kick()  # the snapshot went with the rest: have one ready for the recovery
                # Never failed open: a budget counted from $0 again is no budget at all.
                if not self.state_lost_logged:
                    self.state_lost_logged = True
                    log.error(
                        "STORE LOST ITS BUDGET STATE: calls that touch a local budget are refused (503) "
                        "until an operator runs `spend-guard store recover`"
                    )
                raise Rejected(
                    503,
                    "guard_unavailable",
                    "Spend guard unavailable: the store lost its local budget state, so this key's budgets "
                    "cannot be enforced until an operator recovers it. The call was not forwarded.",
                    scope="store",
                    headers={"Retry-After": "60"},
                )
            if decision.refusal.code == "no_snapshot":
                rt.refresher.kick()  # the store was emptied or is new: fetch now, not at the next round
            if decision.refusal.code in ("no_snapshot", "stale"):
                self.unavailable(stale_reason(decision.refusal, policy.account.max_staleness_s), decision.refusal.code)
                return None
            if decision.refusal.code == "row_unreadable":
                self.unavailable(
                    f"ImageRouter's usage row for key '{call.key_name}' could not be read, so its spend limit "
                    "cannot be checked (the proxy log says why)",
                    "row_unreadable",
                )
                return None
            if decision.refusal.code not in REFUSAL_CODES:
                self.unavailable(f"reserve answered {decision.refusal.code!r}", "store")
                return None
            verdicts.add(refusal(decision.refusal, call, budgets, now_s, policy.account.min_remaining_micros))
            verdicts.enforce()  # raises unless in shadow mode
            return None
        if decision.refusal is not None:
            # The script only lets a refusal through when its scope is in shadow mode.
            would = refusal(decision.refusal, call, budgets, now_s, policy.account.min_remaining_micros)
            if verdicts.shadow:
                verdicts.add(would)  # recorded once, at the end of prepare
            else:
                self.would_refuse(call, would)
        self.remaining_headers(call, decision)
        flight = Flight(
            request.hold_id,
            hold,
            call.key_name,
            precharged=call.kind in PRECHARGED_KINDS,
            kind=call.kind,
            model=call.model or "",
            counters=counters_of(request.budgets),
        )
        rt.open_flight(flight)
        if call.decision != "would_refuse":
            call.decision = "allowed"
            rt.metrics.decisions.labels("allowed", decision.tight_scope or "none", call.key_name).inc()
        return flight

    def remaining_headers(self, call: Call, decision: Decision) -> None:
        if decision.tight_scope:
            call.headers["X-Spend-Guard-Remaining"] = format_usd(decision.tight_remaining_micros)
            call.headers["X-Spend-Guard-Remaining-Scope"] = decision.tight_scope


async def read_fields(raw: bytes, headers: list[tuple[str, str]], max_bytes: int, *, text: bool = False) -> PriceFields:
    """The price fields of a body; a large one is decoded and parsed on a worker thread, so the
    event loop keeps serving (json's C parser still holds the GIL for its longest single step).
    `text`: a text route's call, whose input size bounds its hold."""

    def read() -> PriceFields:
        decoded = decode_content(raw, header(headers, "content-encoding"), max_bytes, header(headers, "content-type"))
        return read_price_fields(decoded, header(headers, "content-type"), text=text)

    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(read)
    return read()


__all__ = ["Guard"]
