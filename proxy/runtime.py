"""What one running proxy process holds: policy, store, upstream session, prices, open holds.

Built in the app's lifespan (clients must live on the server's event loop) and handed to the
guard and the own endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp

from proxy.credits import Refresher
from proxy.errors import HoldQuarantined, StoreError, StoreScriptError
from proxy.http.routing import RouteTable
from proxy.http.upstream import Upstream
from proxy.money import MAX_CALL_MICROS, format_usd
from proxy.ops.metrics import Metrics
from proxy.policy.model import Policy
from proxy.policy.reload import PolicyHolder
from proxy.policy.upstream_keys import UpstreamKeys, bearer_value, expired
from proxy.settings import Settings
from proxy.store.batch import BatchedLedger
from proxy.store.contract import Ledger
from proxy.store.records import Reclaimed
from proxy.store.redis import Store
from proxy.types import Clock
from proxy.untrusted import excerpt

log = logging.getLogger("spend_guard")


@dataclass(slots=True)
class Flight:
    """A reservation this process holds until its response is settled."""

    hold_id: str
    amount_micros: int
    key_name: str
    settled: bool = False
    # When the upstream answered (it pre-charges first), on the store's clock; 0 = not yet.
    started_ms: int = 0
    # Whether the upstream pre-charges this route's calls before answering (images, videos), so
    # the started time is worth telling the store (see Store.mark_started).
    precharged: bool = False
    start_marked: bool = False  # the store was told `started_ms` (Runtime.mark_started)
    reclaimed: bool = False  # its lease expired first: another reserve charged the hold
    # Route kind (image, video, text) and model, for the settle's hold-vs-bill metrics.
    kind: str = ""
    model: str = ""
    # The budget counters it holds against, (budget id, window start ms): the settle's keys.
    counters: tuple[tuple[str, int], ...] = ()
    # The price signature a reported cost is learned under, (digest, text); None: not learned.
    learn_as: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Pending:
    """A settle the store did not take; retried in the background."""

    cost_micros: int | None  # None: charge the hold; 0: release
    started_ms: int = 0
    counters: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Underheld:
    """A call the upstream charged more than its hold (`Runtime.compare_to_hold`)."""

    hold_id: str
    key_name: str
    kind: str
    model: str
    hold_micros: int
    cost_micros: int


@dataclass
class Runtime:
    settings: Settings
    holder: PolicyHolder
    store: Store
    session: aiohttp.ClientSession
    refresher: Refresher
    metrics: Metrics
    clock: Clock
    upstream: Upstream = field(init=False)
    # The money path: reserves, settles and level reads go through it. The store behind its
    # batcher (proxy/store/batch.py: what is issued while a round trip is in flight goes to the
    # store as one), or another layer (see proxy/store/contract.py); everything else uses `store`.
    ledger: Ledger = field(init=False)
    routes: RouteTable = field(init=False)
    # The fields below change only through the methods further down (open_flight, settle,
    # defer_release, note_reserve_failed ...), so each change has one place to hook into.
    flights: dict[str, Flight] = field(default_factory=dict)
    pending_settles: dict[str, Pending] = field(default_factory=dict)
    # A failed reserve's release was dropped at its bound since the last retry round got through
    # (the guard warns once per outage).
    releases_dropped: bool = False
    draining: bool = False
    # The last reserve that failed against the store (clock seconds, reason): /-/readyz reports it.
    reserve_failed_at: float = 0.0
    reserve_failure: str = ""
    # Told the key name of each charge the store took (None: any scope may have changed), at once
    # and without waiting: the alert loop (proxy/ops/alerts.py) evaluates in the background.
    on_settled: Callable[[str | None], None] | None = None
    # Virtual keys' real ImageRouter keys, read when a policy is applied (proxy/policy/upstream_keys.py).
    upstream_keys: UpstreamKeys = field(default_factory=UpstreamKeys)
    # Per model, the highest cost seen above its hold, for the life of this process: the guard
    # holds at least that for the model's next calls (docs/how-it-works.md#calculated-prices).
    # Kept in memory on each instance; only a model the upstream billed gets an entry.
    hold_floors: dict[str, int] = field(default_factory=dict)
    # Told each underheld call, at once and without waiting (the alert loop sends `call.underheld`).
    on_underheld: Callable[[Underheld], None] | None = None
    # The learned holds table was found full (logged once per process).
    learned_full_logged: bool = False
    # Per price signature digest, what this process last wrote to the learned table: (bucket,
    # highest cost written in it, the signature's count then); see proxy.guard.observed.learn.
    learned_written: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    _policy_seen: Policy | None = None

    def __post_init__(self) -> None:
        self.ledger = BatchedLedger(self.store)
        self.apply_policy(self.holder.policy)

    @property
    def policy(self) -> Policy:
        current = self.holder.policy
        if current is not self._policy_seen:
            self.apply_policy(current)
        return current

    def apply_policy(self, policy: Policy) -> None:
        """Rebuild what derives from the policy: the route table and upstream target/timeouts."""
        self._policy_seen = policy
        self.routes = RouteTable((r.path, r.kind, r.enabled) for r in policy.routes)
        self.upstream = Upstream(
            self.session,
            self.upstream_url(policy),
            policy.upstream.timeout_s,
            policy.upstream.connect_timeout_s,
        )
        self.upstream_keys.load(policy)

    def upstream_authorization(self, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """For a call that spends nothing: the real key's Authorization value when the bearer is a
        live token of a virtual key (None: forward the request's own). Spending calls are
        authenticated by the guard, which refuses what this lets pass as it came."""
        if not self.upstream_keys.any:
            return None
        token = bearer_value(headers)
        found = None if token is None else self.policy.token_for(hashlib.sha256(token).hexdigest())
        if found is None or not found[0].virtual or expired(found[1], self.clock()):
            return None
        auth = self.upstream_keys.authorization(found[0])
        return None if auth is None else auth.value

    def upstream_url(self, policy: Policy | None = None) -> str:
        return self.settings.upstream or (policy or self.holder.policy).upstream.base_url

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def start_draining(self) -> None:
        """Shutdown has begun: the guard refuses new spending calls (503) from now on."""
        self.draining = True

    def notify_on_settle(self, callback: Callable[[str | None], None]) -> None:
        """Tell `callback` the key name of each charge the store takes (None: any scope)."""
        self.on_settled = callback

    def notify_on_underheld(self, callback: Callable[[Underheld], None]) -> None:
        """Tell `callback` each call charged more than its hold."""
        self.on_underheld = callback

    def hold_floor(self, model: str) -> int:
        """The least the guard holds for `model`: the highest cost seen above one of its holds."""
        return self.hold_floors.get(model, 0)

    def note_reserve_failed(self, reason: str) -> None:
        """A reserve failed against the store; /-/readyz reports `reason` for RESERVE_FAILURE_UNREADY_S
        (proxy/ops/endpoints.py), a success meanwhile included: a flapping store stays unready."""
        self.reserve_failed_at, self.reserve_failure = self.clock(), reason

    def defer_release(self, hold_id: str, counters: tuple[tuple[str, int], ...], max_pending: int) -> bool:
        """Release `hold_id` from the settle retry loop: its reserve failed against the store, yet
        the script may still run once Redis wakes up, and a call never forwarded holds nothing.
        Bounded by `max_pending` waiting settles, as a retry loop against a dead Redis adds one per
        call; past it the release is dropped and a hold that did land is left to its lease.
        Returns True for the first release dropped since a retry round last got through."""
        if len(self.pending_settles) < max_pending:
            self.pending_settles[hold_id] = Pending(0, counters=counters)
            return False
        first_dropped = not self.releases_dropped
        self.releases_dropped = True
        return first_dropped

    def open_flight(self, flight: Flight) -> None:
        """Track a reservation the store granted until `settle` ends it."""
        self.flights[flight.hold_id] = flight
        self.metrics.inflight.set(len(self.flights))
        self.metrics.child(self.metrics.usd, "held", flight.key_name).inc(flight.amount_micros / 1e6)

    async def settle(self, flight: Flight, cost_micros: int | None) -> int | None:
        """The one way a flight ends (request path and shutdown alike): charge `cost_micros`
        (None: the whole hold; 0: release) exactly once. Returns what was charged: None when
        the hold was gone (reclaimed) or quarantined; the assumed amount when the store did
        not answer and the settle was deferred to the retry loop."""
        if flight.settled:
            return None
        flight.settled = True
        if cost_micros is not None and cost_micros > MAX_CALL_MICROS:
            log.error(
                "upstream reported a cost of $%s for hold %s, above the per-call maximum; charging $%s",
                format_usd(cost_micros),
                flight.hold_id,
                format_usd(MAX_CALL_MICROS),
            )
            cost_micros = MAX_CALL_MICROS
        charged: int | None
        # Only a pre-charged call is in a snapshot fetched after it started; a text call is
        # billed when it ends, so its charge is logged at the settle.
        started_ms = flight.started_ms if flight.precharged else 0
        try:
            charged = await self.ledger.settle(flight.hold_id, cost_micros, self.now_ms(), started_ms, flight.counters)
            if charged is None:
                # Its lease expired and a reserve reclaimed it, charging the whole hold (counted
                # there, in spend_guard_reclaimed_holds_total).
                flight.reclaimed = True
                log.warning(
                    "hold %s was reclaimed before it settled: charged its hold of $%s",
                    flight.hold_id,
                    format_usd(flight.amount_micros),
                )
        except HoldQuarantined as exc:
            self.note_quarantined(exc.hold_id)
            charged = None
        except StoreError as exc:
            # Keep it and retry in the background; the lease is the last resort.
            self.pending_settles[flight.hold_id] = Pending(cost_micros, started_ms, flight.counters)
            self.metrics.settle_retries.inc()
            log.warning("settle of hold %s deferred: %s", flight.hold_id, exc)
            charged = flight.amount_micros if cost_micros is None else cost_micros
        except asyncio.CancelledError:
            # The call's task was cancelled mid-settle (a stop past its grace): whether or not
            # the script ran, the settle is retried as after a store error (the shutdown retries
            # once more), so the hold still ends at this cost, not at its lease.
            self.pending_settles[flight.hold_id] = Pending(cost_micros, started_ms, flight.counters)
            self.metrics.settle_retries.inc()
            raise
        finally:
            self.flights.pop(flight.hold_id, None)
            self.metrics.inflight.set(len(self.flights))
        if self.on_settled is not None and (charged or flight.reclaimed) and flight.hold_id not in self.pending_settles:
            self.on_settled(flight.key_name)
        if charged is not None:
            self.metrics.child(self.metrics.usd, "charged", flight.key_name).inc(charged / 1e6)
            self.metrics.child(self.metrics.usd, "released", flight.key_name).inc(
                max(0, flight.amount_micros - charged) / 1e6
            )
            if charged > 0:
                # Only a billed call names its model: a client's made-up names never become series.
                self.metrics.child(self.metrics.charged_by_model, excerpt(flight.model or "unknown")).inc(charged / 1e6)
        self.compare_to_hold(flight, cost_micros, charged)
        return charged

    def note_reclaimed(self, reclaimed: Reclaimed) -> None:
        """Holds a reserve ended on the way (reclaim.lua): expired leases charged in full, and
        unreadable records moved aside. Counted and told to the alerts like any settle."""
        if reclaimed.count:
            self.metrics.reclaimed.inc(reclaimed.count)
            self.metrics.usd.labels("charged", "reclaimed").inc(reclaimed.micros / 1e6)
            log.warning(
                "reclaimed %d hold(s) whose lease expired, charged $%s in full",
                reclaimed.count,
                format_usd(reclaimed.micros),
            )
            if self.on_settled is not None:
                self.on_settled(None)  # whose scopes the reclaimed holds were charged to is not known here
        for hold_id in reclaimed.quarantined:
            self.note_quarantined(hold_id)

    def compare_to_hold(self, flight: Flight, cost_micros: int | None, charged: int | None) -> None:
        """How the hold compared with the bill, so an operator sees a rate that is too low before it
        costs money: charged / held per route kind, held / cost per route kind and model, and a call
        whose real cost exceeded its hold (the hold bounded nothing then) logged once at WARNING,
        counted and summed per model,
        told to the alerts (`call.underheld`), and its cost made the model's least hold from now
        on (`hold_floor`)."""
        if charged is None and flight.reclaimed:
            charged = flight.amount_micros  # the reclaiming reserve charged the hold
        if charged is not None and flight.amount_micros > 0:
            self.metrics.child(self.metrics.held_ratio, flight.kind or "unknown").observe(
                charged / flight.amount_micros
            )
        if cost_micros is not None and cost_micros > 0:
            # Only a billed call names its model: a client's made-up names never become series.
            self.metrics.child(
                self.metrics.hold_to_cost, flight.kind or "unknown", excerpt(flight.model or "unknown")
            ).observe(flight.amount_micros / cost_micros)
        if cost_micros is not None and cost_micros > flight.amount_micros:
            model = excerpt(flight.model or "unknown")
            self.metrics.underheld.labels(model).inc()
            self.metrics.underheld_usd.labels(model).inc((cost_micros - flight.amount_micros) / 1e6)
            if flight.model:
                self.hold_floors[flight.model] = max(self.hold_floor(flight.model), cost_micros)
            # Its price may have risen upstream: the next calls hold the new one.
            self.refresher.refresh_prices_now()
            log.warning(
                "UNDERHELD: a %s call to model %s cost $%s, above its hold of $%s (hold %s); raise its rate or hold",
                flight.kind or "guarded",
                model,
                format_usd(cost_micros),
                format_usd(flight.amount_micros),
                flight.hold_id,
            )
            if self.on_underheld is not None:
                self.on_underheld(
                    Underheld(
                        flight.hold_id,
                        flight.key_name,
                        flight.kind or "guarded",
                        model,
                        flight.amount_micros,
                        cost_micros,
                    )
                )

    async def settle_pending(self) -> None:
        """Retry settles the store did not take. An outage stops the round (the next one
        retries); a fault of one record never holds back the others."""
        for hold_id, pending in list(self.pending_settles.items()):
            try:
                await self.ledger.settle(
                    hold_id, pending.cost_micros, self.now_ms(), pending.started_ms, pending.counters
                )
            except HoldQuarantined:
                self.note_quarantined(hold_id)
            except StoreScriptError as exc:
                log.error("deferred settle of hold %s dropped, the store refused it: %s", hold_id, exc)
                self.metrics.settle_failures.inc()
            except StoreError:
                return
            self.pending_settles.pop(hold_id, None)
            if self.on_settled is not None:
                self.on_settled(None)
        self.releases_dropped = False

    async def mark_started(self) -> None:
        """Tell the store when the upstream answered calls still in flight, so a snapshot fetched
        after that no longer counts them twice (their pre-charge is in it)."""
        due = [f for f in self.flights.values() if f.precharged and f.started_ms and not f.start_marked]
        if not due:
            return
        await self.ledger.mark_started([(f.hold_id, f.started_ms) for f in due])
        for f in due:
            f.start_marked = True

    def note_quarantined(self, hold_id: str) -> None:
        self.metrics.quarantined.inc()
        log.error("hold %s had an unreadable record: moved to the store's quarantine, charged nothing", hold_id)

    async def wait_for_flights(self, timeout_s: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.flights and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    async def settle_open_flights(self) -> None:
        """Charge every flight still open its hold (shutdown): never left to its lease."""
        for flight in list(self.flights.values()):
            with contextlib.suppress(Exception):
                await self.settle(flight, None)
