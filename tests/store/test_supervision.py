"""What `serve` runs besides the app is supervised: the embedded store's server is started again
when it dies (budgets intact, counted, logged), `/-/healthz` fails while the proxy cannot serve
spending calls at all, and workers die with their parent. See docs/failure-modes.md."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.store.test_embedded import budget_spent, day_budget_policy, generate, server_pids
from tests.support.served import ServedProxy, wait_until

pytestmark = [pytest.mark.embedded, pytest.mark.system]


def port_taken(port: int) -> bool:
    """Whether anything still accepts connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_killed_embedded_server_is_restarted_with_its_budgets(tmp_path, up, state_home):
    # $0.70 a day: $0.30 spent before the kill; after it one more $0.30 call fits, a third does not.
    path = day_budget_policy(tmp_path, "0.70")
    state_dir = state_home / "spend-guard"
    with ServedProxy(path, up.url, None) as proxy:
        assert generate(proxy.url, "cost=0.3").status_code == 200
        wait_until(lambda: budget_spent(proxy) == "0.3000", 10, "the call to settle")
        [server] = server_pids(state_dir)
        os.kill(server, signal.SIGKILL)
        killed = time.monotonic()
        while (r := generate(proxy.url, "cost=0.3")).status_code == 503 and time.monotonic() - killed < 10:
            time.sleep(0.05)
        serving_after_s = time.monotonic() - killed
        assert r.status_code == 200, r.text
        assert serving_after_s < 5, serving_after_s
        print(f"serving again {serving_after_s:.2f} s after the embedded server's kill -9")
        assert server_pids(state_dir) not in ([], [server])
        wait_until(lambda: budget_spent(proxy) == "0.6000", 10, "the second call to settle")
        over = generate(proxy.url, "cost=0.3")
        assert over.status_code == 402, over.text  # the budget came back with the server
        assert len(up.generation_requests) == 2
        metrics = httpx.get(proxy.url + "/-/metrics", timeout=5).text
        assert "spend_guard_embedded_store_restarts_total 1.0" in metrics
        log = proxy.output()
        assert log.count("embedded store: the server exited (killed by SIGKILL") == 1, log
        assert httpx.get(proxy.url + "/-/healthz", timeout=5).status_code == 200


def test_healthz_fails_while_the_embedded_store_does_not_answer(tmp_path, up, state_home):
    path = day_budget_policy(tmp_path, "5")
    with ServedProxy(path, up.url, None) as proxy:
        assert httpx.get(proxy.url + "/-/healthz", timeout=5).status_code == 200
        [server] = server_pids(state_home / "spend-guard")
        os.kill(server, signal.SIGSTOP)  # alive but silent: nothing restarts it, nothing can be served
        try:
            r = httpx.get(proxy.url + "/-/healthz", timeout=5)
            assert r.status_code == 503, r.text
            assert r.json()["problems"] == ["embedded store: not answering (TimeoutError)"], r.text
        finally:
            os.kill(server, signal.SIGCONT)
        wait_until(lambda: httpx.get(proxy.url + "/-/healthz", timeout=5).status_code == 200, 10, "healthz again")


def test_workers_die_with_a_killed_parent_so_a_restart_binds_the_port(tmp_path, up, state_home):
    path = day_budget_policy(tmp_path, "5")
    proxy = ServedProxy(path, up.url, None, workers=2)
    with proxy:
        assert generate(proxy.url, "cost=0.1").status_code == 200
        wait_until(lambda: budget_spent(proxy) == "0.1000", 10, "the call to settle")
        assert proxy.proc is not None
        parent = proxy.proc.pid
        workers = [pid for pid in children(parent) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2, workers
        os.kill(parent, signal.SIGKILL)  # the parent alone: no cleanup code of it runs
        proxy.proc.wait(10)
        killed = time.monotonic()
        wait_until(lambda: not any(alive(pid) for pid in workers), 10, "the orphaned workers to exit")
        wait_until(lambda: not port_taken(proxy.port), 10, "the port to be free")
        print(f"workers gone and port free {time.monotonic() - killed:.2f} s after the parent's kill -9")
        proxy.start()  # same port, same state dir
        assert budget_spent(proxy) == "0.1000"
        assert generate(proxy.url, "cost=0.1").status_code == 200
