"""The guard: classify each request; identify, read, price and check a spending call, and
reserve its hold before it goes up (the reserve is proxy/guard/reserving.py's; forwarding and
the settle are proxy/guard/relay.py's).

A spending call is forwarded only after one Lua script has held its estimated cost against the
account floor, the key's upstream spend limit and every local budget, so two calls can never both
spend the last credit. Everything else streams through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import time

from proxy.errors import Rejected
from proxy.guard.callers import UNREGISTERED, identify_token
from proxy.guard.observed import price_call
from proxy.guard.recent_refusals import RecentRefusal, RecentRefusals
from proxy.guard.relay import Admitted, relay
from proxy.guard.reserving import fail_open_or_closed, record_would_refuse, reserve
from proxy.guard.verdicts import (
    Call,
    Verdicts,
    log_decision,
    permits,
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
from proxy.types import Receive, Scope, Send
from proxy.untrusted import excerpt

log = logging.getLogger("spend_guard.guard")

# Bodies above this are priced on a worker thread (parsing 64 MB of JSON takes ~0.2 s).
OFF_LOOP_BYTES = 1 << 20


class Guard:
    """Pure-ASGI handler for every proxied request (own endpoints are routed before it)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.body_pool = BodyPool(runtime.settings.max_buffered_bytes)
        self.refusals = RecentRefusals()  # the latest, for /-/status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = raw_path(scope)
        match = self.runtime.routes.classify(scope["method"], path)
        if match.kind is not None:
            await self.guarded(scope, receive, send, match, path)
            return
        if match.free:
            self.runtime.metrics.count_free_route(match.path)
        elif match.unknown and not self.pass_unknown_route(scope, match):
            await self.refuse_unknown_route(scope, receive, send, match)
            return
        await passthrough(self.runtime, scope, receive, send, path)

    # -- unknown routes ----------------------------------------------------------------------

    def pass_unknown_route(self, scope: Scope, match: Match) -> bool:
        """A method other than GET, HEAD, OPTIONS to a path `routes` does not list goes up without a
        hold only under `guard.unknown_routes: pass` (or in global shadow mode), counted and logged:
        it may be a spending route the table lacks (docs/policies.md#routes)."""
        policy = self.runtime.policy
        if policy.guard.unknown_routes != "pass" and policy.mode != "shadow":
            return False
        self.runtime.metrics.unguarded.labels("unknown_route").inc()
        log.warning(
            "UNGUARDED: forwarding %s %s without a hold: the policy's routes do not list it"
            " (guard.unknown_routes: %s%s)",
            excerpt(scope["method"]),
            excerpt(match.path),
            policy.guard.unknown_routes,
            ", mode: shadow" if policy.mode == "shadow" else "",
        )
        return True

    async def refuse_unknown_route(self, scope: Scope, receive: Receive, send: Send, match: Match) -> None:
        """403 `policy_violation`: nothing goes up (docs/refusals.md#policy-refusals-403)."""
        policy = self.runtime.policy
        call = open_call(scope, header_pairs(scope), match, policy)
        exc = Rejected(
            403,
            "policy_violation",
            f"{excerpt(scope['method'])} {excerpt(match.path)} is not a route the spend guard knows, and unknown "
            "routes are refused: list it in the policy's routes (kind: free, or its spending kind).",
            scope="policy",
        )
        if any(name in (b"content-length", b"transfer-encoding") for name, _ in scope["headers"]):
            call.headers.update(CLOSE)  # refused before its body is read, as in check_servable
        self.record_refusal(call, policy, exc)
        await exc.response(call.headers)(scope, receive, send)

    # -- guarded ---------------------------------------------------------------------------

    async def guarded(self, scope: Scope, receive: Receive, send: Send, match: Match, path: bytes) -> None:
        policy = self.runtime.policy
        headers = header_pairs(scope)
        call = open_call(scope, headers, match, policy)
        try:
            admitted = await self.admit(scope, receive, send, path, headers, match, policy, call)
        except Rejected as exc:
            self.record_refusal(call, policy, exc)
            await exc.response(call.headers)(scope, receive, send)
            return
        self.runtime.metrics.overhead.observe(time.perf_counter() - call.started)
        await relay(self.runtime, admitted)

    def record_refusal(self, call: Call, policy: Policy, exc: Rejected) -> None:
        """Count, keep (for /-/status) and log a call the guard refused or found invalid."""
        invalid = exc.status == 400 or exc.status == 413
        self.runtime.metrics.decisions.labels(
            "invalid" if invalid else "refused", exc.scope or "request", call.key_name
        ).inc()
        call.decision, call.scope = "refused", exc.scope or exc.error_type
        if not invalid:
            self.refusals.add(
                RecentRefusal(
                    self.runtime.clock(),
                    call.key_name,
                    call.scope,
                    exc.status,
                    exc.error_type,
                    exc.message,
                    call.request_id,
                )
            )
        log_decision(call, policy, error=exc.error_type)

    async def admit(
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
        # In global shadow mode a policy refusal is forwarded and counted, not enforced.
        verdicts = Verdicts(policy.mode == "shadow")
        self.check_servable(scope, match, call)
        key = self.identify(headers, policy, call, verdicts)
        if not match.enabled:
            verdicts.add(
                Rejected(403, "policy_violation", f"Route {match.path} is disabled by policy.", scope="policy")
            )
        verdicts.enforce()

        # Only now is the body read: every refusal above needed none. Its bytes count against
        # the process's bound until the call ends (relay) or is refused (here).
        lease = BodyLease(self.body_pool)
        try:
            body = await read_body(
                receive,
                header(headers, "content-length"),
                policy.guard.max_body_bytes,
                timeout_s=self.runtime.settings.body_timeout_s,
                lease=lease,
            )
            call.headers.pop("Connection", None)
            flight = await self.price_and_reserve(body, headers, match, policy, call, key, verdicts)
        except BaseException:
            lease.release()
            raise
        return Admitted(scope, receive, send, path, body, lease, flight, call, policy)

    def check_servable(self, scope: Scope, match: Match, call: Call) -> None:
        """Refuse what no policy could allow: an ambiguous path, any call while shutting down, or
        while the store counts this account under another name."""
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
        if self.runtime.draining:
            raise Rejected(
                503,
                "guard_unavailable",
                "The proxy is shutting down; retry on another instance.",
                scope="store",
                headers={"Retry-After": "1"},
            )
        if self.runtime.refresher.account_conflict is not None:
            # Found after start (the store did not answer then): the proxy's log and readyz say why.
            raise Rejected(
                503,
                "guard_unavailable",
                "Spend guard unavailable: its store counts this ImageRouter account under another "
                "account name, so its budgets cannot be enforced. The call was not forwarded.",
                scope="store",
                headers={"Retry-After": "60"},
            )

    def identify(
        self, headers: list[tuple[str, str]], policy: Policy, call: Call, verdicts: Verdicts
    ) -> KeyPolicy | None:
        """The policy's key for the caller's bearer secret (None: a key the policy does not name)."""
        secret = bearer(headers)
        if secret is None:
            raise Rejected(401, "unauthorized", "Authorization header must be provided as Bearer token.", scope="auth")
        key = identify_token(policy, fingerprint(secret), self.runtime.clock())
        del secret
        call.key = key
        call.key_name = key.name if key else "unknown"
        if key is None and policy.guard.unknown_keys == "reject":
            verdicts.add(Rejected(401, "unauthorized", UNREGISTERED, scope="auth"))
        if key is not None and key.virtual:
            call.upstream_auth = self.runtime.upstream_keys.authorization(key)
            if call.upstream_auth is None:
                raise Rejected(
                    503,
                    "guard_unavailable",
                    "Spend guard unavailable: the ImageRouter key this key's calls are sent with is not available "
                    "on the proxy (its log says why). The call was not forwarded.",
                    scope="store",
                )
        return key

    async def price_and_reserve(
        self,
        body: bytes,
        headers: list[tuple[str, str]],
        match: Match,
        policy: Policy,
        call: Call,
        key: KeyPolicy | None,
        verdicts: Verdicts,
    ) -> Flight | None:
        """Once the body is in: price the call, check model and hold against the policy, reserve
        the hold. None: forwarded without a hold (failed open)."""
        fields = await read_fields(body, headers, policy.guard.max_body_bytes, text=match.kind == "text")
        model = self.runtime.refresher.prices.resolve(fields.model)
        call.model = model
        self.check_model(model, fields.model, policy, key, verdicts)
        hold = await self.hold_for(match, fields, model, policy, verdicts, call)
        if hold is None:
            return None  # fail-open without a price table: forwarded unguarded, counted
        call.hold_micros = hold
        self.check_hold(hold, policy, key, verdicts, call.hold_basis)
        verdicts.enforce()
        flight = await reserve(self.runtime, call, policy, key, hold, verdicts)
        if verdicts.refusals:
            record_would_refuse(self.runtime, call, verdicts.refusals[0])
        return flight

    def check_model(self, model: str, asked: str, policy: Policy, key: KeyPolicy | None, verdicts: Verdicts) -> None:
        """The policy's and the key's model rules, applied to both spellings of the model."""
        for rules, whom in ((policy.models.rules, "any key"), (key.rules if key else None, "this key")):
            if rules is not None and not permits(rules, self.runtime.refresher.prices.names_of(asked)):
                verdicts.add(
                    Rejected(
                        403,
                        "policy_violation",
                        f"Model '{excerpt(model)}' is not allowed by policy for {whom}.",
                        scope="policy",
                    )
                )
                break

    def check_hold(self, hold: int, policy: Policy, key: KeyPolicy | None, verdicts: Verdicts, basis: str = "") -> None:
        """The hold against the guard's per-call maximum (raises) and the policy's per-request caps;
        a refusal names the hold and its `basis`."""
        caps = per_request_caps(policy, key)
        if hold <= MAX_CALL_MICROS and all(hold <= cap for cap, _ in caps):
            return  # most calls: nothing to say, so nothing formatted
        held = f"${format_usd(hold)}" + (f" (hold basis: {basis})" if basis else "")
        if hold > MAX_CALL_MICROS:
            raise Rejected(
                403,
                "policy_violation",
                f"This call may cost up to {held}, above the spend guard's per-call maximum "
                f"of ${format_usd(MAX_CALL_MICROS)}.",
                scope="policy",
            )
        for cap, where in caps:
            if hold > cap:
                verdicts.add(
                    Rejected(
                        403,
                        "policy_violation",
                        f"This call may cost up to {held}, above the per-request cap of ${format_usd(cap)} ({where}).",
                        scope="policy",
                    )
                )
                break

    async def hold_for(
        self, match: Match, fields: PriceFields, model: str, policy: Policy, verdicts: Verdicts, call: Call
    ) -> int | None:
        """The call's hold (proxy.guard.observed.price_call); None: forward unguarded (failed open)."""
        priced = await price_call(self.runtime, match.kind or "", match.path, fields, model, policy.models)
        call.hold_basis = priced.basis
        if priced.micros is None:
            verdicts.enforce()  # a model the policy refuses is refused, priced or not
            fail_open_or_closed(self.runtime, "no price table has been loaded from /v2/models yet", "no_prices")
            return None
        if priced.quote.unpriced and policy.guard.unknown_models == "reject":
            why = "matches no models.text_rates entry" if priced.basis == "text_default" else "has no published price"
            verdicts.add(
                Rejected(
                    403,
                    "policy_violation",
                    f"Model '{excerpt(model)}' {why} and unknown models are refused.",
                    scope="policy",
                )
            )
        call.signature = priced.signature
        return priced.micros


def open_call(scope: Scope, headers: list[tuple[str, str]], match: Match, policy: Policy) -> Call:
    """The decision record of a guarded request, with the headers every answer to it carries."""
    call = Call(request_id=request_id(headers), started=time.perf_counter(), route=match.path, kind=match.kind or "")
    client = scope.get("client")
    call.client = f"{client[0]}:{client[1]}" if client else None
    call.user_agent = header(headers, "user-agent")
    call.headers["X-Request-Id"] = call.request_id
    call.headers["X-Spend-Guard-Policy"] = policy.version
    return call


def per_request_caps(policy: Policy, key: KeyPolicy | None) -> list[tuple[int, str]]:
    """The per-request caps that apply to `key`'s calls, each with where the policy sets it."""
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


__all__ = ["Guard", "read_fields"]
