"""The refresher: keeps the account's credits snapshot and the price table current in the store.

Only one instance fetches per interval (a `SET NX PX` lock); every instance reads the result.
A failed fetch keeps the last good snapshot, backs off with jitter and is counted; a 401 means
the account key is wrong, which makes the proxy unready and is logged loudly
(docs/failure-modes.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from proxy.errors import StoreAuthError, StoreError
from proxy.ops.outside import OutsideWatch
from proxy.policy.model import Policy
from proxy.prices import PriceTable, PriceTableError, parse_models
from proxy.settings import Secret
from proxy.snapshot import CreditsError, parse_credits
from proxy.store.contract import SnapshotStore
from proxy.store.identity import LOST_UNKNOWN
from proxy.store.redis import LOCK_MODELS, LOCK_REFRESH
from proxy.store.statedir import EpochRecord
from proxy.types import Clock, StoreClock

log = logging.getLogger("spend_guard.credits")
MAX_BACKOFF_S = 60.0
CLOCK_SKEW_WARN_S = 2.0  # past this, /-/readyz and the log say the machine's clock is off
KICK_INTERVAL_S = 0.5  # at most this often does a missing snapshot start a round early
# `/v1/credits` and `/v2/models` are read up to this size; a larger answer fails the round unread
# (ImageRouter's are tens of KB; a credits answer grows ~300 bytes per API key).
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
# At most this often (per process) does a call charged above its hold fetch /v2/models early.
PRICE_KICK_INTERVAL_S = 5.0


class DocumentTooLarge(Exception):
    """An answer past MAX_DOCUMENT_BYTES: read no further."""

    def __str__(self) -> str:
        return f"larger than {MAX_DOCUMENT_BYTES} bytes, not read further"


@dataclass
class RefreshState:
    last_ok_ms: int = 0
    failures: int = 0  # consecutive
    failures_total: int = 0
    auth_failed: bool = False
    last_error: str = ""


class Refresher:
    """Background task: credits every `refresh_s`, prices every `models_refresh_s` (and at once
    after a call cost more than its hold; docs/state.md#the-credits-refresher)."""

    def __init__(
        self,
        store: SnapshotStore,
        session: aiohttp.ClientSession,
        policy: Callable[[], Policy],
        api_key: Secret | None,
        clock: Clock,
        *,
        upstream_url: Callable[[], str],
        on_failure: Callable[[str], None] | None = None,
        on_crash: Callable[[], None] | None = None,
        epoch_record: EpochRecord | None = None,
    ) -> None:
        self.store = store
        self.session = session
        self.policy = policy
        self.api_key = api_key
        self.clock = clock
        self.upstream_url = upstream_url
        self.on_failure = on_failure
        self.on_crash = on_crash
        # Where the store's epoch is kept outside it (the embedded store's state dir), if anywhere.
        self.epoch_record = epoch_record
        # Another state dir that keeps this account's embedded store while this one is empty
        # (StateDirs in proxy/store/embedded.py): then an empty store here is a loss. Set by the app.
        self.store_elsewhere: str | None = None
        # Unreadable rows of the latest snapshot: each is logged when it first appears.
        self.bad_rows_logged: set[str] = set()
        self.owner = uuid.uuid4().hex
        self.state = RefreshState()
        self.prices = PriceTable()
        self.prices_loaded = asyncio.Event()  # set once a price table is in
        self.models_failures = 0
        self._stopped = asyncio.Event()
        self._wake = asyncio.Event()
        self._kicked_at = 0.0
        self._prices_kicked_at = float("-inf")
        self._prices_due = False  # fetch /v2/models in the next round, lock or not
        self.skew_logged = False
        self.state_lost: str | None = None  # the store's lost-state marker, as of the last round
        # Compares each new snapshot with what passed the guard (proxy/ops/outside.py); set by the app.
        self.outside: OutsideWatch | None = None
        self.loss_logged: str | None = None  # the last lost-state marker logged (once each)
        self.evicting: str | None = None  # the store's maxmemory-policy, when it can evict the guard's keys
        self.store_auth_failed = False  # the store refused our credentials in the last round
        # The store counts this ImageRouter account under another account.name (claim_account):
        # the message to refuse with, or None. Checked until the store first answers.
        self.account_conflict: str | None = None
        self.account_claimed = False
        self.serving = False  # the app started: rounds run from `run()`, not the one at start

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def kick(self) -> None:
        """Run the next round now (a reserve found no snapshot: the store was emptied or is new).
        Still one fetch across instances: the round takes the refresh lock first."""
        now = self.clock()
        if now - self._kicked_at >= KICK_INTERVAL_S:
            self._kicked_at = now
            self._wake.set()

    def refresh_prices_now(self) -> None:
        """Fetch `/v2/models` in a round that starts now, whatever `models_refresh_s` says: a call
        cost more than its hold, so its price may have risen upstream. At most once per
        PRICE_KICK_INTERVAL_S per process, so a model that is always underheld cannot turn every
        call into a fetch."""
        now = self.clock()
        if now - self._prices_kicked_at >= PRICE_KICK_INTERVAL_S:
            self._prices_kicked_at = now
            self._prices_due = True
            self._wake.set()

    async def run(self, first_delay: float = 0.0) -> None:
        self.serving = True
        delay = first_delay
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            if self._stopped.is_set():
                return
            try:
                delay = await self.tick()
            except Exception:
                # Never die: a driver bug or an unexpected answer is logged, counted, retried.
                log.exception("credits refresh round failed unexpectedly; retrying")
                if self.on_crash:
                    self.on_crash()
                delay = self._backoff(self.policy().account.refresh_s)

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()

    async def tick(self) -> float:
        """One round: fetch what is due (if this instance holds the lock), load prices. Returns the delay."""
        account = self.policy().account
        delay = account.refresh_s
        try:
            if isinstance(self.clock, StoreClock):
                await self.sync_clock(self.clock)
            await self.check_identity()
            await self.check_account()
            await self.check_eviction()
            if await self.store.acquire_lock(LOCK_REFRESH, self.owner, int(account.refresh_s * 1000)):
                if not await self.refresh_credits():
                    await self.store.release_lock(LOCK_REFRESH, self.owner)
                    delay = self._backoff(account.refresh_s)
            prices_due, self._prices_due = self._prices_due, False
            models_lock = await self.store.acquire_lock(LOCK_MODELS, self.owner, int(account.models_refresh_s * 1000))
            if models_lock or prices_due:
                if not await self.refresh_models():
                    await self.store.release_lock(LOCK_MODELS, self.owner)
                    delay = min(delay, self._backoff(account.refresh_s))
            await self.load_prices()
        except StoreAuthError as exc:
            # One clear line for a setup error, not a warning every round: readyz keeps saying it.
            if not self.store_auth_failed:
                log.error(
                    "STORE REJECTED THE PROXY'S CREDENTIALS (%s): fix the password (or user) in the Redis URL; "
                    "spending calls are refused (503) until then",
                    str(exc.__cause__ or exc).rstrip("."),
                )
            self.store_auth_failed = True
            delay = min(delay, 1.0)
        except StoreError as exc:
            log.warning("refresh skipped: %s", exc)
            delay = min(delay, 1.0)
        else:
            self.store_auth_failed = False
        return delay

    async def check_identity(self) -> None:
        """Every round, with or without traffic: is the store still the one this instance counts
        in (its epoch, and the lost marker)? A store without an epoch is taken as new only when
        that is provably safe: the policy counts no local budget, or a record outside the store
        (the embedded store's state dir) shows this is its first start."""
        record = self.epoch_record
        if not self.store.epoch and record is not None:
            self.store.epoch = record.read()
        new_is_safe = (record is not None and self.store_elsewhere is None) or not self.policy().has_local_budgets
        why = LOST_UNKNOWN
        if self.store_elsewhere is not None:
            elsewhere = self.store_elsewhere.replace("|", "%7C")  # "|" ends the marker's reason
            why = f"the embedded store's state dir is new, and this account's store is kept in {elsewhere}"
        lost = await self.store.check_identity(self._now_ms(), new_is_safe=new_is_safe, not_new_why=why)
        if lost and lost != self.loss_logged:
            self.loss_logged = lost
            why, _, _ = lost.partition("|")
            log.error(
                "STORE LOST ITS BUDGET STATE (%s): calls that touch a local budget are refused (503) until an "
                "operator runs `spend-guard store recover`%s",
                why,
                " (or `spend-guard store init`, if it is a new store)" if why == LOST_UNKNOWN else "",
            )
        self.state_lost = lost
        if record is not None:
            record.write(self.store.epoch)

    async def check_account(self) -> None:
        """Once per process, when the store first answers: is the ImageRouter account whose key
        this proxy holds already counted in this store under another `account.name`? Two names
        for one account keep two sets of budgets, each allowing its whole limit, so this one is
        refused (at start: the proxy does not start; later: spending calls get 503)."""
        if self.account_claimed or self.api_key is None:
            return
        name = self.policy().account.name
        other = await self.store.claim_account(self.api_key.value)
        self.account_claimed = True
        if other is not None:
            self.account_conflict = (
                f"this store already counts the ImageRouter account of {self.policy().account.api_key_env} "
                f"as account.name '{other}', and this policy names it '{name}': its budgets would be counted "
                f"twice, each allowing its whole limit; set account.name: {other} (or give this account "
                "its own store)"
            )
            if self.serving:  # at start the proxy refuses to start instead, saying why
                log.error("STORE COUNTS THIS ACCOUNT UNDER ANOTHER NAME: %s", self.account_conflict)

    async def check_eviction(self) -> None:
        """Every round: can the store evict the guard's keys? Under any `maxmemory-policy` but
        `noeviction` a full Redis evicts budget counters (they carry a TTL) or the loss marker, and
        a budget counts from $0 again without anything noticing: the proxy says so loudly (readyz,
        a metric, one ERROR line) while the policy counts local budgets."""
        if not self.policy().has_local_budgets:
            self.evicting = None
            return
        policy = await self.store.eviction_policy()
        evicting = policy if policy not in (None, "noeviction") else None
        if evicting and evicting != self.evicting:
            log.error(
                "STORE CAN EVICT BUDGET COUNTERS: its maxmemory-policy is %s; set it to noeviction "
                "(a full store then refuses writes, which the guard waits out, instead of forgetting spend)",
                evicting,
            )
        self.evicting = evicting

    async def sync_clock(self, clock: StoreClock) -> None:
        before = clock.base()
        store_s = await self.store.time_s()
        clock.update(before, store_s, clock.base())
        if abs(clock.offset_s) > CLOCK_SKEW_WARN_S and not self.skew_logged:
            self.skew_logged = True
            log.warning(
                "this machine's clock is %.1f s off the store's; the proxy uses the store's time (fix NTP)",
                -clock.offset_s,
            )

    def _backoff(self, refresh_s: float) -> float:
        base = min(MAX_BACKOFF_S, refresh_s, 0.5 * 2 ** min(self.state.failures, 10))
        return float(base * random.uniform(0.5, 1.5))

    def _fail(self, message: str) -> bool:
        self.state.failures += 1
        self.state.failures_total += 1
        self.state.last_error = message
        if self.on_failure:
            self.on_failure(message)
        return False

    async def _get(self, path: str, auth: bool) -> tuple[int, bytes]:
        upstream = self.policy().upstream
        headers = {"Accept": "application/json"}
        if auth and self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key.value}"
        timeout = aiohttp.ClientTimeout(total=60, connect=upstream.connect_timeout_s)
        async with self.session.get(self.upstream_url() + path, headers=headers, timeout=timeout) as resp:
            if (resp.content_length or 0) > MAX_DOCUMENT_BYTES:
                raise DocumentTooLarge
            chunks, size = [], 0
            async for chunk in resp.content.iter_any():
                size += len(chunk)
                if size > MAX_DOCUMENT_BYTES:
                    raise DocumentTooLarge
                chunks.append(chunk)
            return resp.status, b"".join(chunks)

    async def refresh_credits(self) -> bool:
        """Fetch and apply one snapshot. False on any failure (nothing stored)."""
        if self.api_key is None:
            env = self.policy().account.api_key_env
            self.state.auth_failed = True
            return self._fail(f"no account key: set {env} so the proxy can read the account's credits")
        started_ms = self._now_ms()
        try:
            status, body = await self._get("/v1/credits?by_api_key=true", auth=True)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return self._fail(f"credits fetch failed: {type(exc).__name__}")
        except DocumentTooLarge as exc:
            return self._fail(f"credits answer rejected: {exc}")
        if status == 401:
            if not self.state.auth_failed:
                log.error(
                    "CREDITS REFRESH REJECTED (401): the account key in %s is wrong or revoked; "
                    "spending calls are refused until it is fixed",
                    self.policy().account.api_key_env,
                )
            self.state.auth_failed = True
            return self._fail("credits fetch: 401 unauthorized (wrong account key)")
        if status != 200:
            return self._fail(f"credits fetch: HTTP {status}")
        try:
            snapshot = parse_credits(body, started_ms)
        except CreditsError as exc:
            return self._fail(f"credits answer rejected: {exc}")
        reasons = set(snapshot.bad_rows.values())  # one reason per row of the answer
        for reason in reasons - self.bad_rows_logged:
            refs = ", ".join(sorted(ref for ref, why in snapshot.bad_rows.items() if why == reason))
            log.error(
                "credits snapshot: a row is unreadable (%s), its key's upstream limit is not checked: %s", refs, reason
            )
        self.bad_rows_logged = reasons
        # The guard's bound is read now, after the fetch and before the snapshot replaces it.
        check = await self.outside.before(snapshot) if self.outside is not None else None
        applied = await self.store.apply_snapshot(snapshot, self._now_ms())
        if check is not None and applied:
            try:
                await check()
            except Exception:  # noqa: BLE001 - a report that fails never fails the refresh
                log.exception("spend outside the guard: the comparison failed; the snapshot is applied")
        self.state = RefreshState(last_ok_ms=self._now_ms(), failures_total=self.state.failures_total)
        await self.store.set_status(last_ok_ms=self.state.last_ok_ms)
        return True

    async def refresh_models(self) -> bool:
        try:
            status, body = await self._get("/v2/models", auth=False)
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.models_failures += 1
            log.warning("models fetch failed: %s", type(exc).__name__)
            return False
        except DocumentTooLarge as exc:
            self.models_failures += 1
            log.warning("models answer rejected: %s", exc)
            return False
        try:
            if status != 200:
                raise PriceTableError(f"HTTP {status}")
            table = parse_models(body, self._now_ms())
        except PriceTableError as exc:
            self.models_failures += 1
            log.warning("models answer rejected: %s", exc)
            return False
        await self.store.save_prices(table)
        self._use_prices(table)
        return True

    async def load_prices(self) -> None:
        table = await self.store.load_prices()
        if table is not None and table.fetched_at_ms > self.prices.fetched_at_ms:
            self._use_prices(table)

    def _use_prices(self, table: PriceTable) -> None:
        self.prices = table
        self.prices_loaded.set()
