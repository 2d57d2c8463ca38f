"""Fixtures of the store's tests (helpers are in tests/support/stores.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy.store.redis import Store
from tests.support.stores import StoreTarget

# The account a test's store counts, unless its module fixes another.
ACCOUNT = "acct"


@pytest.fixture
async def store(store_target: StoreTarget) -> AsyncIterator[Store]:
    """The store of ACCOUNT on each kind of server (a module may define its own `store`)."""
    client = store_target.client()
    yield Store(client, ACCOUNT)
    await client.aclose()
