"""The reserve: a spending call's hold asked of the ledger in one script, and what its answer
becomes (a flight, a refusal, or a call failed open or closed under `guard.on_store_error`)."""

from __future__ import annotations

import logging
import os

from proxy.errors import Rejected, StoreError
from proxy.guard.verdicts import (
    REFUSAL_CODES,
    Call,
    Verdicts,
    budget_holds,
    budgets_for,
    rejection_for,
    stale_reason,
)
from proxy.money import format_usd
from proxy.policy.model import Budget, KeyPolicy, Policy
from proxy.runtime import Flight, Runtime
from proxy.store.records import Decision, ReserveRequest, counters_of, row_ref
from proxy.windows import window_starts_ms

log = logging.getLogger("spend_guard.guard")

# Releases kept for reserves that failed against the store (each ~120 bytes of memory; one
# EVALSHA each, ~8,000/s, once the store answers again).
MAX_PENDING_RELEASES = 10_000
# Routes whose calls ImageRouter pre-charges before it answers (its generation handler sends its
# 200 only once the pre-charge passed). Text calls are billed afterwards.
PRECHARGED_KINDS = frozenset({"image", "video"})


def record_would_refuse(runtime: Runtime, call: Call, refusal: Rejected) -> None:
    """Count and log a refusal that shadow mode lets through."""
    runtime.metrics.decisions.labels("would_refuse", refusal.scope or "policy", call.key_name).inc()
    call.decision, call.scope = "would_refuse", refusal.scope or "policy"
    log.info("shadow: would refuse %s (%s): %s", call.request_id, refusal.error_type, refusal.message)


def fail_open_or_closed(runtime: Runtime, reason: str, kind: str) -> None:
    """The guard cannot decide (`guard.on_store_error`): fail closed (raise 503) or open
    (count and log the call as unguarded, and return; the caller forwards it without a hold)."""
    if runtime.policy.guard.on_store_error == "open":
        runtime.metrics.unguarded.labels(kind).inc()
        log.warning("UNGUARDED: forwarding a spending call without a hold: %s", reason)
        return
    raise Rejected(
        503, "guard_unavailable", f"Spend guard unavailable: {reason}. The call was not forwarded.", scope="store"
    )


async def reserve(
    runtime: Runtime, call: Call, policy: Policy, key: KeyPolicy | None, hold: int, verdicts: Verdicts
) -> Flight | None:
    """Hold `hold` against the account, the key and its budgets in one script. Returns the
    flight, or None when the call goes up without a hold (failed open); raises the refusal
    (in global shadow mode it is recorded in `verdicts` instead)."""
    now_s = runtime.clock()
    budgets = budgets_for(policy, key)
    request = reserve_request(policy, key, hold, budgets, now_s)
    decision = await ask_ledger(runtime, request, budgets)
    if decision is None:
        return None
    if decision.reclaimed.count or decision.reclaimed.quarantined:
        runtime.note_reclaimed(decision.reclaimed)
    if not decision.allowed:
        refuse_or_fail(runtime, decision, call, policy, budgets, now_s, verdicts)
        return None
    if decision.refusal is not None:
        # The script only lets a refusal through when its scope is in shadow mode.
        would = rejection_for(decision.refusal, call, budgets, now_s, policy.account.min_remaining_micros)
        if verdicts.shadow:
            verdicts.add(would)  # recorded once, at the end of price_and_reserve
        else:
            record_would_refuse(runtime, call, would)
    add_remaining_headers(call, decision)
    return open_flight_for(runtime, call, request, decision)


async def ask_ledger(runtime: Runtime, request: ReserveRequest, budgets: list[Budget]) -> Decision | None:
    """Run the reserve against the ledger. A store error fails open (None) or closed (raises),
    and the hold's release is queued in case the script still runs."""
    try:
        decision = await runtime.ledger.reserve(request)
    except StoreError as exc:
        # Clients and /-/readyz get the kind of failure; the log keeps the detail (which may
        # name internal addresses).
        reason = type(exc.__cause__ or exc).__name__
        runtime.note_reserve_failed(reason)
        log.warning("reserve failed: %s", exc)
        if runtime.defer_release(request.hold_id, counters_of(request.budgets), MAX_PENDING_RELEASES):
            log.warning(
                "%d settles wait for the store; later failed reserves are left to their lease", MAX_PENDING_RELEASES
            )
        fail_open_or_closed(runtime, f"store error ({reason})", "store")
        return None
    if budgets:
        decision = decision.renamed({f"budget:{b.counter}": f"budget:{b.id}" for b in budgets})
    return decision


def refuse_or_fail(
    runtime: Runtime,
    decision: Decision,
    call: Call,
    policy: Policy,
    budgets: list[Budget],
    now_s: float,
    verdicts: Verdicts,
) -> None:
    """A reserve the store did not allow. A refusal is raised (recorded only, in global shadow
    mode); when the store could not decide, the call fails open (return) or closed (raise)."""
    assert decision.refusal is not None
    code = decision.refusal.code
    if code == "state_lost":
        raise state_lost_refusal(runtime)
    if code == "no_snapshot":
        runtime.refresher.kick()  # the store was emptied or is new: fetch now, not at the next round
    if code in ("no_snapshot", "stale"):
        fail_open_or_closed(runtime, stale_reason(decision.refusal, policy.account.max_staleness_s), code)
    elif code == "row_unreadable":
        fail_open_or_closed(
            runtime,
            f"ImageRouter's usage row for key '{call.key_name}' could not be read, so its spend limit "
            "cannot be checked (the proxy log says why)",
            "row_unreadable",
        )
    elif code not in REFUSAL_CODES:
        fail_open_or_closed(runtime, f"reserve answered {code!r}", "store")
    else:
        verdicts.add(rejection_for(decision.refusal, call, budgets, now_s, policy.account.min_remaining_micros))
        verdicts.enforce()  # raises unless in shadow mode


def state_lost_refusal(runtime: Runtime) -> Rejected:
    """The refusal while the store has lost its budget state. Never failed open: a budget
    counted from $0 again is no budget at all."""
    # The next refresh round runs now: it logs the loss (once) and lays a snapshot down for
    # the recovery.
    runtime.refresher.kick()
    return Rejected(
        503,
        "guard_unavailable",
        "Spend guard unavailable: the store lost its local budget state, so this key's budgets "
        "cannot be enforced until an operator recovers it. The call was not forwarded.",
        scope="store",
        headers={"Retry-After": "60"},
    )


def add_remaining_headers(call: Call, decision: Decision) -> None:
    """The tightest scope's room after this hold, on every answer to the call."""
    if decision.tight_scope:
        call.headers["X-Spend-Guard-Remaining"] = format_usd(decision.tight_remaining_micros)
        call.headers["X-Spend-Guard-Remaining-Scope"] = decision.tight_scope


def open_flight_for(runtime: Runtime, call: Call, request: ReserveRequest, decision: Decision) -> Flight:
    """The flight of a granted reserve, tracked by the runtime until it settles."""
    flight = Flight(
        request.hold_id,
        request.amount_micros,
        call.key_name,
        precharged=call.kind in PRECHARGED_KINDS,
        kind=call.kind,
        model=call.model or "",
        counters=counters_of(request.budgets),
        learn_as=None if call.signature is None else (call.signature.digest, call.signature.text),
    )
    runtime.open_flight(flight)
    if call.decision != "would_refuse":
        call.decision = "allowed"
        runtime.metrics.child(runtime.metrics.decisions, "allowed", decision.tight_scope or "none", call.key_name).inc()
    return flight


def reserve_request(
    policy: Policy, key: KeyPolicy | None, hold: int, budgets: list[Budget], now_s: float
) -> ReserveRequest:
    """What the reserve script is asked: the hold, the lease, the floor and every scope's window."""
    now_ms = int(now_s * 1000)
    return ReserveRequest(
        hold_id=os.urandom(16).hex(),  # 128 random bits (uuid4 has 122) at a fifth of its cost
        amount_micros=hold,
        now_ms=now_ms,
        lease_expiry_ms=now_ms + int(policy.guard.hold_ttl_s * 1000),
        floor_micros=policy.account.min_remaining_micros,
        max_staleness_ms=int(policy.account.max_staleness_s * 1000),
        row_ref=row_ref(key.api_key_id, key.api_key_name) if key else None,
        windows_ms=window_starts_ms(now_s),
        shadow=policy.mode == "shadow",
        budgets=budget_holds(budgets, now_s),
    )
