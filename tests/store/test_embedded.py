"""The embedded store, as `spend-guard serve` without a Redis URL runs it: a private Valkey server
with an append-only file in the state dir. Budgets survive restarts and crashes, the server never
outlives its proxy, one proxy owns a state dir, and startup failures are one clear line."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from proxy.store.embedded import SOCKET_NAME, EmbeddedServer, server_binary
from tests.support.constants import KEY_A
from tests.support.policies import budget, flow, key_entry, policy_yaml
from tests.support.served import ServedProxy, alice_policy, free_port, wait_until

AUTH = {"Authorization": f"Bearer {KEY_A}"}
pytestmark = [pytest.mark.embedded, pytest.mark.system]


def day_budget_policy(directory: Path, limit_usd: str) -> Path:
    path = directory / "policy.yaml"
    path.write_text(
        policy_yaml(
            account=flow(name="emb", refresh_s=1, max_staleness_s=300),
            guard=flow(shutdown_grace_s=10),
            keys=[key_entry(budgets=[budget(limit_usd, "day")])],
        )
    )
    return path


def generate(base: str, standin: str = "") -> httpx.Response:
    headers = dict(AUTH, **({"X-Standin": standin} if standin else {}))
    body = {"model": "openai/gpt-image-1", "prompt": "x"}  # held at its price.max, $0.30
    return httpx.post(base + "/v1/openai/images/generations", json=body, headers=headers, timeout=30)


def budget_spent(proxy: ServedProxy) -> str:
    me = httpx.get(proxy.url + "/-/me", headers=AUTH, timeout=5).json()
    return next(s for s in me["scopes"] if s["scope"].startswith("budget:key:alice"))["spent_usd"]


def server_pids(state_dir: Path) -> list[int]:
    """Processes whose command line names this state dir's socket: its embedded servers."""
    needle = str(state_dir / SOCKET_NAME).encode()
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if needle in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def answers(socket_file: str) -> bool:
    try:
        return bool(redis.Redis(unix_socket_path=socket_file).ping())
    except redis.ConnectionError:
        return False


def serve_once(*args: str) -> subprocess.CompletedProcess[str]:
    """`spend-guard serve` expected to fail before it listens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPEND_GUARD_")}
    argv = [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", str(free_port()), *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("restart", ["sigterm", "sigkill"])
def test_a_day_budget_survives_a_restart_of_serve_without_redis(tmp_path, up, state_home, restart):
    # $0.50 a day; one $0.30 call spent leaves $0.20, less than the next call's $0.30 hold.
    path = day_budget_policy(tmp_path, "0.50")
    state_dir = state_home / "spend-guard"
    proxy = ServedProxy(path, up.url, None)
    with proxy:
        assert generate(proxy.url, "cost=0.3").status_code == 200
        wait_until(lambda: budget_spent(proxy) == "0.3000", 10, "the call to settle")
        server = server_pids(state_dir)
        assert len(server) == 1
        if restart == "sigkill":
            # A crash of everything at once: the proxy and its server, neither can flush anything.
            assert proxy.proc is not None
            os.killpg(proxy.proc.pid, signal.SIGKILL)
            os.kill(server[0], signal.SIGKILL)
        assert proxy.stop() is not None
        wait_until(lambda: not server_pids(state_dir), 10, "the embedded server to stop with its proxy")
        proxy.start()  # same state dir: the default one under XDG_STATE_HOME
        assert budget_spent(proxy) == "0.3000"
        refused = generate(proxy.url)
        assert refused.status_code == 402, refused.text
        assert refused.json()["error"]["type"] == "spend_limit_exceeded"
        assert len(up.generation_requests) == 1


def test_the_server_stops_when_its_proxy_is_killed(tmp_path, up, state_home):
    path = alice_policy(tmp_path, account="emb", budget_usd="5")
    with ServedProxy(path, up.url, None) as proxy:
        assert len(server_pids(state_home / "spend-guard")) == 1
        assert proxy.proc is not None
        os.killpg(proxy.proc.pid, signal.SIGKILL)  # no cleanup code runs in the proxy
        wait_until(lambda: not server_pids(state_home / "spend-guard"), 10, "the orphaned server to exit")


def test_a_second_proxy_on_the_same_state_dir_fails_with_one_line(tmp_path, up, state_home):
    path = alice_policy(tmp_path, account="emb", budget_usd="5")
    with ServedProxy(path, up.url, None) as proxy:
        second = serve_once("--policy", str(path), "--upstream", up.url, "--state-dir", str(state_home / "spend-guard"))
        assert second.returncode == 3
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "is in use by another spend-guard" in lines[0], second.stderr
        assert generate(proxy.url, "cost=0.1").status_code == 200  # the first one is untouched
        assert budget_spent(proxy) == "0.1000"


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--embedded-server", "/nonexistent/valkey-server"],
            "server binary /nonexistent/valkey-server does not exist",
        ),
        (["--state-dir", "{file}/state"], "cannot use state dir {file}/state: Not a directory"),
        (["--state-dir", "{dir}/" + "d" * 120], "is too long a path for the server's unix socket"),
    ],
    ids=["binary-missing", "state-dir-unwritable", "state-dir-too-long"],
)
def test_startup_failures_are_one_clear_line_and_exit_3(tmp_path, state_home, args, message):
    a_file = tmp_path / "plain-file"
    a_file.write_text("")
    result = serve_once(*[a.format(file=a_file, dir=tmp_path) for a in args])
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spend-guard: embedded store: "), result.stderr
    assert message.format(file=a_file) in lines[0]


def test_a_server_that_cannot_load_its_file_is_one_line_quoting_its_log(tmp_path):
    state_dir = tmp_path / "state"
    with EmbeddedServer(str(state_dir)) as server:
        redis.Redis.from_url(server.url).set("spent", "300000")
    manifest = state_dir / "appendonlydir" / "appendonly.aof.manifest"
    manifest.write_text("this is not a manifest\n")  # a damaged disk, a bad copy
    result = serve_once("--state-dir", str(state_dir))
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    # the server's own last words, without its log prefix, then where its whole log is
    assert lines[0].startswith("spend-guard: embedded store: server exited with status 1: Invalid AOF manifest")
    assert lines[0].endswith(f"(log: {state_dir}/valkey.log)")


def test_two_workers_share_the_embedded_store_exactly(tmp_path, up, state_home):
    # 3.00 / 0.30 per hold = room for exactly 10 calls in flight, whichever worker takes them.
    path = alice_policy(tmp_path, account="emb", budget_usd="3.00")
    with ServedProxy(path, up.url, None, workers=2) as proxy:
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            futures = [pool.submit(generate, proxy.url, "gate=w,cost=0.3") for _ in range(40)]
            up.wait_for_requests(10)
            wait_until(lambda: sum(f.done() for f in futures) == 30, 30, "30 refusals")
            up.release("w")
            statuses = sorted(f.result().status_code for f in futures)
        assert statuses == [200] * 10 + [402] * 30
        assert len(up.generation_requests) == 10


def test_a_server_left_behind_on_the_state_dir_is_stopped_and_its_data_kept(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    socket_file = str(state_dir / SOCKET_NAME)
    # A server whose proxy vanished without taking it along (no PR_SET_PDEATHSIG on that path).
    leftover = subprocess.Popen(
        [server_binary(), "--port", "0", "--unixsocket", socket_file, "--dir", str(state_dir), "--appendonly", "yes"],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: answers(socket_file) and redis.Redis(unix_socket_path=socket_file).set("kept", "1"),
            10,
            "the leftover server",
        )
        with EmbeddedServer(str(state_dir)) as server:
            assert leftover.wait(10) == 0  # shut down cleanly (SHUTDOWN fsyncs its append-only file)
            assert server.proc is not None and server_pids(state_dir) == [server.proc.pid]
            assert redis.Redis.from_url(server.url).get("kept") == b"1"
    finally:
        leftover.kill()
        leftover.wait()


def test_the_embedded_server_listens_on_its_socket_only(tmp_path):
    with EmbeddedServer(str(tmp_path / "state")) as server:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("port") == {"port": "0"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert oct((tmp_path / "state" / SOCKET_NAME).stat().st_mode & 0o777) == "0o700"
        assert server_binary().endswith("valkey-server")
