"""The store contract (proxy/store/contract.py): a layer put in front of the store as `Runtime.ledger`
sees every reserve, settle and level read of the money path, and its answers are what clients
get. This is the seam batching and the degraded mode plug into."""

from __future__ import annotations

from typing import Any

from proxy.store.contract import Ledger, SnapshotStore, StatusStore
from proxy.store.records import Decision, ScopeRefusal
from tests.support.constants import KEY_A
from tests.support.policies import KEYS
from tests.support.proxies import open_holds, spent


class Recording:
    """A Ledger in front of another: records each call, refuses when told to."""

    def __init__(self, inner: Ledger) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self.refuse = False

    async def reserve(self, req: Any) -> Decision:
        self.calls.append("reserve")
        if self.refuse:
            return Decision(False, ScopeRefusal.of("budget", "budget:key:alice:lifetime", 1_000_000, 1_000_000, 0))
        return await self.inner.reserve(req)

    async def settle(
        self, hold_id: str, cost_micros: int | None, now_ms: int, started_ms: int = 0, counters: Any = ()
    ) -> int | None:
        self.calls.append("settle")
        return await self.inner.settle(hold_id, cost_micros, now_ms, started_ms, counters)

    async def mark_started(self, started: Any) -> int:
        self.calls.append("mark_started")
        return await self.inner.mark_started(started)

    async def levels(self, row_refs: Any, budgets: Any, windows_ms: Any) -> Any:
        self.calls.append("levels")
        return await self.inner.levels(row_refs, budgets, windows_ms)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_the_store_meets_every_contract(make_proxy):
    store = make_proxy(KEYS).runtime.store
    assert isinstance(store, Ledger) and isinstance(store, StatusStore) and isinstance(store, SnapshotStore)
    assert isinstance(Recording(store), Ledger)


def test_a_ledger_in_front_of_the_store_sees_the_money_path_and_decides_it(make_proxy, up):
    p = make_proxy(KEYS)
    layer = Recording(p.runtime.store)
    p.runtime.ledger = layer
    assert p.generate(standin="cost=0.25").status_code == 200
    assert layer.calls[:1] == ["reserve"] and "settle" in layer.calls
    assert spent(p, "budget:key:alice:lifetime") == "0.2500"  # /-/me read through the layer
    assert layer.calls[-1] == "levels"
    layer.refuse = True
    forwarded = len(up.generation_requests)
    r = p.generate(standin="cost=0.25")
    assert r.status_code == 402 and r.json()["error"]["type"] == "spend_limit_exceeded", r.text
    assert r.json()["error"]["message"].startswith("Budget 'key:alice:lifetime' of $1.0000 per lifetime"), r.text
    assert len(up.generation_requests) == forwarded  # the layer's refusal stopped the call
    assert open_holds(p) == 0
    assert p.client.get("/-/me", headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200
