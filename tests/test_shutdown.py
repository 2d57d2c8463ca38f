"""How a proxy stops: SIGTERM and SIGINT exit 0 with one worker as with several, and a settle that
could not reach the store before the end is said to be abandoned. See docs/operations.md."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.http.protocol import RETIRING_FIRST_BYTE_S
from proxy.runtime import Pending
from tests.store.test_embedded import server_pids
from tests.support.policies import KEYS
from tests.support.served import ServedProxy, alice_policy, wait_until
from tests.support.sockets import connect, read_until_closed

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


def accepted(pid: int, client: socket.socket) -> bool:
    """Whether process `pid` holds the server side of `client`'s connection (it has accepted it)."""
    server_port, client_port = client.getpeername()[1], client.getsockname()[1]
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            inodes.add(fields[9])
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) in {f"socket:[{inode}]" for inode in inodes}:
                return True
    return False


@contextlib.contextmanager
def stopped_beside_a_connection(policy: Path, up) -> Iterator[tuple[ServedProxy, socket.socket]]:
    """A served proxy sent SIGTERM just after it accepted a connection that has sent nothing yet."""
    with ServedProxy(policy, up.url, None) as proxy, connect(proxy.port) as client:
        assert proxy.proc is not None
        pid = proxy.proc.pid
        wait_until(lambda: accepted(pid, client), 10, "the proxy to accept the connection")
        os.kill(pid, signal.SIGTERM)
        yield proxy, client
        assert proxy.proc.wait(30) == 0, proxy.output()[-3000:]


@pytest.mark.embedded
@pytest.mark.system
def test_a_connection_accepted_as_the_server_stops_is_answered_and_then_closed(tmp_path, up, state_home):
    # A rolling restart retires a worker that may have just accepted a client's connection: the
    # request that client sends next gets its answer (Connection: close), not a dropped connection.
    policy = alice_policy(tmp_path, account="stop-accepted", budget_usd="5", shutdown_grace_s=10)
    with stopped_beside_a_connection(policy, up) as (proxy, client):
        wait_until(lambda: "Shutting down" in proxy.output(), 10, "the shutdown to begin")
        client.sendall(b"GET /-/healthz HTTP/1.1\r\nHost: guard\r\n\r\n")
        reply, closed = read_until_closed(client, 10)
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]
        assert b"\r\nconnection: close\r\n" in reply.lower()
        assert closed


@pytest.mark.embedded
@pytest.mark.system
def test_a_connection_that_sends_nothing_does_not_hold_up_the_stop(tmp_path, up, state_home):
    # The shape next to it: an accepted connection that stays silent is closed unanswered within
    # RETIRING_FIRST_BYTE_S, not kept for the head deadline (10 s) or the grace period (30 s).
    policy = alice_policy(tmp_path, account="stop-silent", budget_usd="5", shutdown_grace_s=30)
    with stopped_beside_a_connection(policy, up) as (_, client):
        reply, closed = read_until_closed(client, RETIRING_FIRST_BYTE_S + 5)
        assert (reply, closed) == (b"", True)
