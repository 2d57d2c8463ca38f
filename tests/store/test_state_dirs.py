"""Where each account's embedded store is kept is recorded outside every state dir: a proxy started
on an empty state dir while its account's store is kept in another one (another --state-dir, a
relative one from another working directory) treats the empty store as a loss, not as new. See
docs/state.md."""

from __future__ import annotations

import hashlib
import signal

import httpx
import pytest

from proxy.store.statedir import EpochRecord, StateDirs
from tests.store.test_embedded import day_budget_policy, generate
from tests.store.test_identity import lost
from tests.support.served import ServedProxy, wait_until

KEY, OTHER_KEY = "sk-account-one", "sk-account-two"


def test_an_account_whose_store_is_kept_elsewhere_is_told_where(tmp_path):
    home, first, second = tmp_path / "home", tmp_path / "first", tmp_path / "second"
    dirs = StateDirs(str(home))
    assert dirs.elsewhere(KEY, str(second)) is None  # nothing recorded yet
    first.mkdir()
    EpochRecord(str(first)).write("e1")
    dirs.record(KEY, str(first))
    assert dirs.elsewhere(KEY, str(second)) == str(first)
    assert dirs.elsewhere(KEY, str(first)) is None  # the same place
    assert dirs.elsewhere(OTHER_KEY, str(second)) is None  # another account: its own store
    second.mkdir()
    EpochRecord(str(second)).write("e2")
    assert dirs.elsewhere(KEY, str(second)) is None  # a store kept there too: not a first start
    (first / EpochRecord.NAME).unlink()
    assert dirs.elsewhere(KEY, str(tmp_path / "third")) is None  # the recorded one keeps nothing now
    text = dirs.path.read_text()
    assert KEY not in text and hashlib.sha256(KEY.encode()).hexdigest() not in text


def test_a_home_that_cannot_be_written_only_loses_the_check(tmp_path):
    home = tmp_path / "home"
    home.write_text("a file where the directory would be")
    dirs = StateDirs(str(home))
    dirs.record(KEY, str(tmp_path / "first"))  # no error
    assert dirs.elsewhere(KEY, str(tmp_path / "second")) is None


@pytest.mark.embedded
@pytest.mark.system
def test_a_proxy_started_on_an_empty_state_dir_while_its_store_is_elsewhere_is_a_loss(tmp_path, up, state_home):
    path = day_budget_policy(tmp_path, "1.00")
    usual = state_home / "spend-guard"
    proxy = ServedProxy(path, up.url, None)
    with proxy:
        assert generate(proxy.url, "cost=0.3").status_code == 200
    other = tmp_path / "other"  # e.g. a relative --state-dir from another working directory
    moved = ServedProxy(path, up.url, None, args=("--state-dir", str(other)), ready=False)
    with moved:
        wait_until(lambda: lost(moved), 10, "the proxy to take the empty store for a loss")
        why = f"the embedded store's state dir is new, and this account's store is kept in {usual}"
        assert why in httpx.get(moved.url + "/-/readyz", timeout=5).text
        assert generate(moved.url, "cost=0.3").status_code == 503
        assert moved.stop(signal.SIGTERM) == 0
    back = ServedProxy(path, up.url, None)  # the usual place again: as it was
    with back:
        assert generate(back.url, "cost=0.3").status_code == 200
        assert httpx.get(back.url + "/-/readyz", timeout=5).status_code == 200
    assert len(up.generation_requests) == 2
