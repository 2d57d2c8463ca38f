"""Real processes for tests: `spend-guard serve` subprocesses and a private redis-server.

Everything listens on 127.0.0.1 on a free port and is stopped by the context manager.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.constants import KEY_A
from tests.support.policies import budget, flow, key_entry, policy_yaml
from tests.support.standin import DEFAULT_ACCOUNT_KEY


def alice_policy(
    directory: Path, *, account: str, budget_usd: str, refresh_s: float = 1, shutdown_grace_s: float = 10
) -> Path:
    """A policy file for served proxies: key alice with one lifetime budget."""
    path = directory / "policy.yaml"
    path.write_text(
        policy_yaml(
            account=flow(name=account, refresh_s=refresh_s, max_staleness_s=300),
            guard=flow(shutdown_grace_s=shutdown_grace_s),
            keys=[key_entry(budgets=[budget(budget_usd, None)])],
        )
    )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check, timeout: float, what: str) -> None:
    """Poll an external process's state (there is no event to await across processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def init_store(url: str, policy: Path) -> None:
    """What `spend-guard store init` does, for a test's fresh or flushed store: a shared store
    without an epoch is otherwise taken for one that lost its state (see docs/state.md)."""
    import redis

    from proxy.policy.load import load_policy
    from proxy.store.keyspace import Keys

    key = Keys(load_policy(str(policy)).account.name)("epoch")
    if url.startswith("redis+cluster://"):
        with redis.RedisCluster.from_url("redis://" + url.removeprefix("redis+cluster://")) as cluster:
            cluster.set(key, os.urandom(8).hex(), nx=True)
    else:
        with redis.Redis.from_url(url) as client:
            client.set(key, os.urandom(8).hex(), nx=True)


class RedisServer:
    """A private redis-server, so a test can stop and restart it without touching the shared one."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.mkdtemp(prefix="sg-redis-")

    # What the server keeps on disk, and how long it may take to start (loading what it kept).
    PERSISTENCE: tuple[str, ...] = ("--appendonly", "no")
    START_S = 10.0

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        argv = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", *self.PERSISTENCE]
        self.proc = subprocess.Popen([*argv, "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, self.START_S, "redis-server to start (and load what it kept)")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class ServedProxy:
    """`python -m proxy serve` in a subprocess, ready (snapshot and prices loaded) on enter."""

    def __init__(
        self,
        policy: Path,
        upstream: str,
        redis_url: str | None,
        *,
        workers: int = 1,
        ready: bool = True,
        args: tuple[str, ...] = (),
        wrap: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        init: bool = True,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.policy, self.upstream, self.redis_url = policy, upstream, redis_url
        self.workers, self.ready = workers, ready
        self.args = args  # more `serve` options
        self.wrap, self.extra_env = wrap, env or {}  # e.g. ("faketime", "-f", "+20m")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="sg-proxy-", suffix=".log", delete=False)
        self.init_store = init  # declare a shared store new before the first start

    def start(self) -> None:
        if self.redis_url and self.init_store:
            init_store(self.redis_url, self.policy)
            self.init_store = False  # a restart finds the store as the test left it
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPEND_GUARD_")}
        env["IMAGEROUTER_API_KEY"] = DEFAULT_ACCOUNT_KEY
        env.update(self.extra_env)
        cmd = [
            *self.wrap,
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--policy",
            str(self.policy),
            "--upstream",
            self.upstream,
            "--workers",
            str(self.workers),
        ]
        if self.redis_url:
            cmd += ["--redis-url", self.redis_url]
        cmd += self.args
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._up if not self.ready else self._ready, 30, f"proxy on {self.url} ({self.log.name})")

    def _probe(self, path: str) -> int:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {self.proc.returncode}: {self.output()}")
        try:
            return httpx.get(self.url + path, timeout=1).status_code
        except httpx.HTTPError:
            return 0

    def _up(self) -> bool:
        return self._probe("/-/healthz") == 200

    def _ready(self) -> bool:
        # With several workers, /-/readyz answers from whichever worker accepts: every worker
        # must have logged that it is ready, or calls queue behind one still starting.
        if self._probe("/-/readyz") != 200:
            return False
        return self.workers == 1 or self.output().count("spend guard ready") >= self.workers

    def wait_for_upstream_requests(self, up: object, n: int, timeout: float = 30) -> None:
        """`up.wait_for_requests(n)`, naming this proxy's log when they do not all arrive (a
        multi-worker start under a loaded CI box has been seen to stall some calls for 10 s)."""
        try:
            up.wait_for_requests(n, timeout=timeout)  # type: ignore[attr-defined]
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; proxy log:\n{self.output()[-4000:]}") from exc

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        code = self.proc.returncode
        self.proc = None
        return code

    def __enter__(self) -> ServedProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log.close()
        os.unlink(self.log.name)


class PersistentRedisServer(RedisServer):
    """A private redis-server whose data survives `stop()` (SIGKILL) and `start()` on the same
    port and directory: an append-only file fsynced on every write (`appendfsync always`)."""

    PERSISTENCE = ("--appendonly", "yes", "--appendfsync", "always")
    START_S = 30.0


# -- talking to a served proxy ---------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {KEY_A}"}


def spent(proxy: ServedProxy) -> str:
    me = httpx.get(proxy.url + "/-/me", headers=AUTH, timeout=5).json()
    return next(s for s in me["scopes"] if s["scope"] == "budget:key:alice:lifetime")["spent_usd"]


def generate(base: str, standin: str = "", model: str = "openai/gpt-image-1", timeout: float = 30) -> httpx.Response:
    headers = dict(AUTH)
    if standin:
        headers["X-Standin"] = standin
    return httpx.post(
        base + "/v1/openai/images/generations", json={"model": model, "prompt": "x"}, headers=headers, timeout=timeout
    )


def scraped(proxy: ServedProxy, name: str, **labels: str) -> float:
    """One scrape on a new connection (so any worker may answer): the sum of `name`'s samples
    whose labels include `labels`."""
    text = httpx.get(proxy.url + "/-/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def worker_pids(proxy: ServedProxy) -> list[int]:
    """The uvicorn workers: processes spawned by the proxy's supervisor process."""
    assert proxy.proc is not None
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == proxy.proc.pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found
