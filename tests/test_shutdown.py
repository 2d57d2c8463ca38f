"""How a proxy stops: SIGTERM and SIGINT exit 0 with one worker as with several, and a settle that
could not reach the store before the end is said to be abandoned. See docs/operations.md."""

from __future__ import annotations

import logging
import os
import signal

import pytest

from proxy.runtime import Pending
from tests.store.test_embedded import server_pids
from tests.support.policies import KEYS
from tests.support.served import ServedProxy, alice_policy, wait_until

FAKE = [pytest.param("fake", marks=pytest.mark.fake)]


@pytest.mark.parametrize("store_target", FAKE, indirect=True)
def test_a_settle_abandoned_at_shutdown_gets_an_error_line(make_proxy, up, store_target, caplog):
    p = make_proxy(KEYS)
    p.runtime.pending_settles.update({"hold-1": Pending(10_000), "hold-2": Pending(0)})
    store_target.server.connected = False  # the store is gone for good
    with caplog.at_level(logging.ERROR, logger="spend_guard"):
        p.client.__exit__(None, None, None)
    lines = [r.getMessage() for r in caplog.records if "abandoned" in r.getMessage()]
    assert lines == [
        "shutdown: 2 settle(s) the store did not take are abandoned (1 of them releases of refused calls); "
        "their holds end at their lease, charged in full: hold-1, hold-2"
    ]


@pytest.mark.embedded
@pytest.mark.system
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_exits_0_with_one_worker_as_with_several(tmp_path, up, state_home, workers, sig):
    policy = alice_policy(tmp_path, account="stop", budget_usd="5", shutdown_grace_s=5)
    with ServedProxy(policy, up.url, None, workers=workers) as proxy:
        assert proxy.proc is not None
        os.kill(proxy.proc.pid, sig)  # the parent alone, as a container runtime or systemd sends it
        assert proxy.proc.wait(30) == 0, proxy.output()[-3000:]
        wait_until(lambda: not server_pids(state_home / "spend-guard"), 10, "the embedded server to stop")
        assert "embedded store: the server exited" not in proxy.output()  # stopped, not restarted
