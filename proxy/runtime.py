"""What one running proxy process holds: policy, store, upstream session, prices, open holds.

Built in the app's lifespan (clients must live on the server's event loop) and handed to the
guard and the own endpoints.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import aiohttp

from proxy.credits import Refresher
from proxy.forward import Upstream
from proxy.metrics import Metrics
from proxy.policy import Policy
from proxy.reload import PolicyHolder
from proxy.routing import RouteTable
from proxy.settings import Settings
from proxy.store import Store
from proxy.types import Clock

log = logging.getLogger("spend_guard")


@dataclass
class Flight:
    """A reservation this process holds until its response is settled."""

    hold_id: str
    amount_micros: int
    key_name: str
    settled: bool = False


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
    routes: RouteTable = field(init=False)
    flights: dict[str, Flight] = field(default_factory=dict)
    pending_settles: dict[str, int | None] = field(default_factory=dict)
    pending_full_logged: bool = False  # the warning that pending_settles is full, once per outage
    draining: bool = False
    _policy_seen: Policy | None = None

    def __post_init__(self) -> None:
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

    def upstream_url(self, policy: Policy | None = None) -> str:
        return self.settings.upstream or (policy or self.holder.policy).upstream.base_url

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def wait_for_flights(self, timeout_s: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.flights and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
