"""The store: the only code that talks to Redis (or the embedded Valkey).

`contract` names what the rest of the proxy may ask of it (`Ledger`, `SnapshotStore`,
`StatusStore`); `redis` implements it with one Lua script per atomic operation (`lua/`), which
`scripts` assembles, runs and reads the replies of; `Store` there builds on `identity` (which
store this is, and whether it still holds the local budget state) and `connection` (each
operation's deadline and slot, driver errors as `StoreError`); `keyspace` builds every key;
`records` holds the typed values that cross the seam; `backends` maps a URL scheme to a client,
`embedded` runs the private server used when no URL is given, and `statedir` keeps what is
recorded about it outside it.
"""

from __future__ import annotations

from proxy.store.backends import redis_client
from proxy.store.contract import Ledger, SnapshotStore, StatusStore
from proxy.store.redis import Store

__all__ = ["Ledger", "SnapshotStore", "StatusStore", "Store", "redis_client"]
