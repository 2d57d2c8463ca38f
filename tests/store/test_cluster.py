"""The store's scripts, unchanged, on a real 3-node Redis Cluster of local `redis-server`s
(`redis+cluster://host:port`; every key of an account shares one hash tag, so every script
touches one slot: docs/state.md), and a served proxy guarding a call end to end on it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from redis.crc import key_slot

from proxy.prices import PriceTable
from proxy.store.backends import redis_client
from proxy.store.records import BudgetHold, ReserveRequest, RowState, Snapshot
from proxy.store.redis import LOCK_REFRESH, Store
from tests.support.constants import KEY_A
from tests.support.served import ServedProxy, alice_policy, free_port, wait_until

pytestmark = [pytest.mark.real, pytest.mark.system]

AUTH = {"Authorization": f"Bearer {KEY_A}"}
DAY_MS = 86_400_000


class Cluster:
    """Three cluster-enabled redis-servers on 127.0.0.1, each in its own temp dir, slots spread by
    `redis-cli --cluster create`, no replicas."""

    def __init__(self, size: int = 3) -> None:
        self.ports: list[int] = []
        while len(self.ports) < size:
            port = free_port()
            if port not in self.ports:
                self.ports.append(port)
        self.bus_ports = [free_port() for _ in self.ports]
        self.dirs = [tempfile.mkdtemp(prefix=f"sg-cluster-{p}-") for p in self.ports]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)

    def start_node(self, i: int) -> subprocess.Popen[bytes]:
        """Start node `i` on its port, bus port and dir (nothing persisted but its nodes-<port>.conf)."""
        server = shutil.which("redis-server")
        assert server
        port = self.ports[i]
        argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes"]
        argv += ["--cluster-config-file", f"nodes-{port}.conf", "--cluster-port", str(self.bus_ports[i])]
        argv += ["--save", "", "--appendonly", "no", "--dir", self.dirs[i]]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> None:
        cli = shutil.which("redis-cli")
        assert cli
        for i in range(len(self.ports)):
            self.procs.append(self.start_node(i))  # one by one: stop() ends those that started
        for port in self.ports:
            wait_until(lambda p=port: self._ping(p), 10, f"cluster node {port} to start")
        created = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *[f"127.0.0.1:{p}" for p in self.ports],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        output = created.stdout.decode(errors="replace") + created.stderr.decode(errors="replace")
        assert created.returncode == 0, output
        wait_until(self._all_ok, 30, "cluster_state:ok on every node")

    def _ping(self, port: int) -> bool:
        try:
            return bool(self.node(port).ping())
        except redis.RedisError:
            return False

    def _all_ok(self) -> bool:
        try:
            return all(
                self.node(p).execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") >= 0
                for p in self.ports
            )
        except redis.RedisError:
            return False

    def owner(self, key: str) -> int:
        """Port of the node serving `key`'s slot (from CLUSTER SLOTS)."""
        slot = key_slot(key.encode())
        for start, end, primary, *_ in self.node(self.ports[0]).execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
        raise AssertionError(f"slot {slot} is not covered")

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait(10)
        self.procs = []
        for where in self.dirs:
            shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not shutil.which("redis-server") or not shutil.which("redis-cli"):
        pytest.skip("redis-server / redis-cli are not installed")
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def flushed(cluster: Cluster) -> Cluster:
    for port in cluster.ports:
        cluster.node(port).flushall()
    return cluster


def two_accounts_on_different_nodes(cluster: Cluster) -> tuple[str, str]:
    first = "acct"
    home = cluster.owner(f"sg:{{{first}}}:holds")
    for i in range(1000):
        other = f"acct{i}"
        if cluster.owner(f"sg:{{{other}}}:holds") != home:
            return first, other
    raise AssertionError("no account name on another node")


def request(
    hold_id: str, amount: int, now_ms: int, *, lease_ms: int = 60_000, budgets=(), ref="id:key-a"
) -> ReserveRequest:
    day = now_ms - now_ms % DAY_MS
    return ReserveRequest(
        hold_id=hold_id,
        amount_micros=amount,
        now_ms=now_ms,
        lease_expiry_ms=now_ms + lease_ms,
        floor_micros=1_000_000,
        max_staleness_ms=300_000,
        row_ref=ref,
        windows_ms=(day, day, day),
        budgets=tuple(budgets),
    )


async def test_every_store_operation_runs_unchanged_on_a_cluster(flushed):
    client = redis_client(flushed.url)
    assert type(client).__name__ == "RedisCluster"
    store = Store(client, "acct")
    now = int(time.time() * 1000)
    try:
        await store.ping()
        rows = {"id:key-a": RowState(True, None, 5_000_000, None, 1_000_000, None)}
        assert await store.apply_snapshot(Snapshot(now - 1000, 20_000_000, rows)) is True
        assert await store.apply_snapshot(Snapshot(now - 2000, 1, {})) is False  # older: ignored
        assert (await store.read_snapshot()) == Snapshot(now - 1000, 20_000_000, rows)
        assert await store.snapshot_fetched_ms() == now - 1000

        budget = BudgetHold("key:alice:lifetime", 2_000_000, False, 0, 0)
        d = await store.reserve(request("h1", 300_000, now, budgets=[budget]))
        assert d.allowed, d
        assert await store.open_holds() == 1
        # the key's lifetime limit leaves 5.00 - 1.00 spent: 4.00; the budget 2.00 is tighter
        assert d.tight_scope == "budget:key:alice:lifetime" and d.tight_remaining_micros == 1_700_000
        assert await store.settle("h1", 123_400, now + 10) == 123_400
        assert await store.settle("h1", 123_400, now + 20) is None  # exactly once
        usage = await store.usage(["acct", "row:id:key-a:0"], [budget])
        assert usage["acct"].charged_micros == 123_400 and usage["acct"].held_micros == 0
        assert usage["row:id:key-a:0"].charged_micros == 123_400
        assert usage["b:key:alice:lifetime"].charged_micros == 123_400

        # all or nothing: the budget refuses, and nothing is held anywhere
        refused = await store.reserve(request("h2", 1_900_000, now + 30, budgets=[budget]))
        assert not refused.allowed and refused.refusal is not None and refused.refusal.code == "budget"
        assert await store.open_holds() == 0

        # lease reclaim: a hold whose instance died is charged by the next reserve after its lease
        assert (await store.reserve(request("dead", 200_000, now + 40, lease_ms=100, budgets=[budget]))).allowed
        assert (await store.reserve(request("h3", 100_000, now + 1000, budgets=[budget]))).allowed
        assert await store.open_holds() == 1
        assert await store.settle("dead", 0, now + 1001) is None  # already reclaimed (charged)
        assert await store.settle("h3", 0, now + 1002) == 0
        usage = await store.usage(["acct"], [budget])
        assert usage["acct"].charged_micros == 323_400 and usage["acct"].held_micros == 0
        assert usage["b:key:alice:lifetime"].charged_micros == 323_400

        # a snapshot fetched after the charges drops them: the upstream figures contain them now
        assert await store.apply_snapshot(Snapshot(now + 5000, 19_676_600, {}))
        assert (await store.usage(["acct"], []))["acct"].charged_micros == 0

        # the refresher's lock and the shared price table
        assert await store.acquire_lock(LOCK_REFRESH, "me", 5000) is True
        assert await store.acquire_lock(LOCK_REFRESH, "other", 5000) is False
        await store.release_lock(LOCK_REFRESH, "other")  # not the owner: kept
        assert await store.acquire_lock(LOCK_REFRESH, "other", 5000) is False
        await store.release_lock(LOCK_REFRESH, "me")
        assert await store.acquire_lock(LOCK_REFRESH, "other", 5000) is True
        table = PriceTable({"openai/gpt-image-1": 300_000}, {"gpt-image-1": "openai/gpt-image-1"}, now)
        await store.save_prices(table)
        assert await store.load_prices() == table
        await store.set_status(last_ok_ms=now)
    finally:
        await client.aclose()
    # every key of the account lives in one slot
    keys = [k.decode() for p in flushed.ports for k in flushed.node(p).keys("*")]
    assert keys and {key_slot(k.encode()) for k in keys} == {key_slot(b"sg:{acct}:holds")}, keys


async def test_two_accounts_on_different_nodes_are_independent(flushed):
    a, b = two_accounts_on_different_nodes(flushed)
    client = redis_client(flushed.url)
    now = int(time.time() * 1000)
    try:
        stores = {name: Store(client, name) for name in (a, b)}
        for store in stores.values():
            assert await store.apply_snapshot(Snapshot(now, 2_000_000, {}))
        # 1.00 above a 1.00 floor each: three 0.30 holds fit, the fourth does not, per account
        names = [(name, f"{name}-{i}") for name in (a, b) for i in range(4)]
        results = await asyncio.gather(
            *[stores[name].reserve(request(hold, 300_000, now, ref=None)) for name, hold in names]
        )
        for name, store in stores.items():
            mine = [(hold, r) for (owner, hold), r in zip(names, results, strict=True) if owner == name]
            assert sorted(r.allowed for _, r in mine) == [False, True, True, True], mine
            assert all(r.refusal is not None and r.refusal.code == "credits" for _, r in mine if not r.allowed)
            for hold, r in mine:
                if r.allowed:
                    assert await store.settle(hold, 100_000, now + 1) == 100_000
            assert (await store.usage(["acct"], []))["acct"].charged_micros == 300_000
            assert await store.open_holds() == 0
    finally:
        await client.aclose()
    homes = {name: flushed.owner(f"sg:{{{name}}}:holds") for name in (a, b)}
    assert homes[a] != homes[b]
    for name, port in homes.items():
        assert flushed.node(port).exists(f"sg:{{{name}}}:snap") == 1  # really stored on that node
        assert flushed.node(port).exists(f"sg:{{{name}}}:chsum") == 1


def test_served_proxy_guards_a_call_end_to_end_on_a_cluster(tmp_path: Path, up, flushed):
    path = alice_policy(tmp_path, account="clu", budget_usd="0.60", refresh_s=1)
    with ServedProxy(path, up.url, flushed.url) as p1, ServedProxy(path, up.url, flushed.url) as p2:

        def call(proxy: ServedProxy, standin: str) -> httpx.Response:
            return httpx.post(
                proxy.url + "/v1/openai/images/generations",
                json={"model": "openai/gpt-image-1"},
                headers={**AUTH, "X-Standin": standin},
                timeout=30,
            )

        ok = call(p1, "heartbeat=3,interval=0.01,cost=0.1234")
        assert ok.status_code == 200 and ok.json()["cost"] == 0.1234, ok.text
        assert ok.headers["x-spend-guard-remaining-scope"] == "budget:key:alice:lifetime"
        assert call(p2, "error").status_code == 200  # refunded upstream: released here
        assert call(p2, "nocost").status_code == 200  # no cost reported: charged the 0.30 hold
        refused = call(p1, "cost=0.01")  # 0.60 - 0.4234 spent leaves less than a 0.30 hold
        assert refused.status_code == 402 and refused.headers["x-spend-guard-scope"] == "budget:key:alice:lifetime"

        def ledger(proxy: ServedProxy) -> tuple[str, str]:
            me = httpx.get(proxy.url + "/-/me", headers=AUTH, timeout=5).json()
            scope = next(s for s in me["scopes"] if s["scope"] == "budget:key:alice:lifetime")
            return scope["spent_usd"], scope["held_usd"]

        # a settle may land just after the last byte reached the client
        wait_until(lambda: ledger(p1) == ledger(p2) == ("0.4234", "0.0000"), 10, "the settles")
        assert len(up.generation_requests) == 3
        assert up.charged_by_key[up.fingerprint(KEY_A)] == 423_400
        # the refresher took its SET NX PX lock and stored the snapshot and prices in the cluster
        owner = flushed.node(flushed.owner("sg:{clu}:snap"))
        assert owner.exists("sg:{clu}:snap", "sg:{clu}:prices") == 2
        assert owner.hlen("sg:{clu}:holds") == 0


def queued_bytes(port: int) -> int:
    """Bytes that reached a node's accepted connections and wait, unread, in their receive queues
    (Linux /proc/net/tcp and tcp6: ESTABLISHED sockets whose local port is `port`, column
    `tx_queue:rx_queue` in hex). Non-zero while the node is stopped means a command has arrived."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                local, _, state, queues = row.split()[1:5]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                    total += int(queues.split(":")[1], 16)
    return total


def resp_length(args: list[str]) -> int:
    """Length of a command as the client sends it (RESP array of bulk strings)."""
    return len(f"*{len(args)}\r\n") + sum(len(f"${len(a.encode())}\r\n{a}\r\n".encode()) for a in args)


class ScriptFeed:
    """The reserve and settle scripts one node runs, read from its MONITOR feed. Opened before
    the node is paused, so nothing it runs after it resumes is missed; each entry is
    `(unix time, "reserve" | "settle", hold id, cost micros (settle) or None, the command's args)`."""

    def __init__(self, port: int, account: str) -> None:
        probe = Store(None, account)  # type: ignore[arg-type]  # only for the scripts' SHA1s
        self.kinds = {probe.lua_reserve.sha: "reserve", probe.lua_settle.sha: "settle"}
        # Reads block until the node runs something: a long timeout is the test's deadline.
        self.client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=20)
        self.monitor = self.client.monitor()
        self.seen: list[tuple[float, str, str, int | None, list[str]]] = []

    def __enter__(self) -> ScriptFeed:
        self.monitor.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.monitor.__exit__()
        self.client.close()

    def of(self, hold_id: str) -> list[tuple[float, str, int | None]]:
        return [(at, kind, cost) for at, kind, hold, cost, _ in self.seen if hold == hold_id]

    def reserves(self) -> list[str]:
        return [hold for _, kind, hold, _, _ in self.seen if kind == "reserve"]

    def wait_for(self, done, what: str) -> None:
        """Read the feed until `done(self)` holds."""
        while not done(self):
            try:
                command = self.monitor.next_command()
            except redis.TimeoutError as exc:
                raise TimeoutError(f"the node ran nothing more in 20 s, waiting for {what}; ran {self.seen}") from exc
            args = command["command"].split(" ")
            if command["client_type"] == "lua" or args[0].upper() != "EVALSHA" or args[1] not in self.kinds:
                continue
            kind, n_keys = self.kinds[args[1]], int(args[2])
            argv = args[3 + n_keys :]
            if kind == "reserve":  # ARGV[1] now_ms, ARGV[2] hold_id
                self.seen.append((command["time"], kind, argv[1], None, args))
            else:  # ARGV[1] hold_id, ARGV[2] cost
                self.seen.append((command["time"], kind, argv[0], int(argv[1]), args))


class PausedNode:
    """A served proxy whose account lives on a node other than the startup node (so the client
    can rediscover the layout while that node is paused), after one call that loaded the scripts
    and opened the connections; `pause()` stops that node with SIGSTOP while a feed of the
    scripts it runs is open, and makes sure it is resumed."""

    def __init__(self, tmp_path: Path, cluster: Cluster, up) -> None:
        self.name = next(f"dup{i}" for i in range(1000) if cluster.owner(f"sg:{{dup{i}}}:holds") != cluster.ports[0])
        self.port = cluster.owner(f"sg:{{{self.name}}}:holds")
        self.proc = cluster.procs[cluster.ports.index(self.port)]
        self.node = cluster.node(self.port)
        self.policy = alice_policy(tmp_path, account=self.name, budget_usd="50", refresh_s=60)
        self.up, self.cluster_url = up, cluster.url

    @contextlib.contextmanager
    def serving(self) -> Iterator[ServedProxy]:
        if not Path("/proc/net/tcp").exists():
            pytest.skip("needs Linux /proc/net/tcp to see the reserve reach the paused node")
        with ServedProxy(self.policy, self.up.url, self.cluster_url) as proxy:
            self.proxy = proxy
            assert self.call().status_code == 200
            wait_until(lambda: self.holds() == 0, 10, "the first call to settle")
            assert budget_ledger(proxy) == ("0.0100", "0.0000")
            yield proxy

    def call(self) -> httpx.Response:
        return httpx.post(
            self.proxy.url + "/v1/openai/images/generations",
            json={"model": "openai/gpt-image-1"},
            headers={**AUTH, "X-Standin": "cost=0.01"},
            timeout=60,
        )

    def holds(self) -> int:
        return int(self.node.hlen(f"sg:{{{self.name}}}:holds"))

    @contextlib.contextmanager
    def pause(self) -> Iterator[ScriptFeed]:
        with ScriptFeed(self.port, self.name) as feed:
            self.proc.send_signal(signal.SIGSTOP)
            try:
                yield feed
            finally:
                self.proc.send_signal(signal.SIGCONT)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def wait_for_the_reserve_to_arrive(self) -> int:
        """Wait until bytes wait in the paused node's receive queue; returns how many."""
        wait_until(lambda: queued_bytes(self.port) > 0, 10, "the reserve to reach the paused node")
        return queued_bytes(self.port)


def budget_ledger(proxy: ServedProxy) -> tuple[str, str]:
    me = httpx.get(proxy.url + "/-/me", headers=AUTH, timeout=5).json()
    scope = next(s for s in me["scopes"] if s["scope"] == "budget:key:alice:lifetime")
    return scope["spent_usd"], scope["held_usd"]


def test_a_reserve_stalled_past_the_store_timeout_is_a_503_and_holds_nothing_once_the_node_resumes(
    tmp_path: Path, up, flushed
):
    """A node paused for good: the reserve reaches it and waits. At STORE_TIMEOUT_S (2 s) the
    proxy answers 503 without forwarding; when the node resumes, the queued reserve runs, and the
    release the guard queued in its settle retry loop (or its tombstone) leaves no hold."""
    paused = PausedNode(tmp_path, flushed, up)
    with paused.serving() as proxy:
        with paused.pause() as feed, concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(paused.call)
            paused.wait_for_the_reserve_to_arrive()
            response = pending.result(30)  # the node is still paused
            paused.resume()
            assert response.status_code == 503, (response.status_code, response.text)
            assert response.json() == {
                "error": {
                    "message": "Spend guard unavailable: store error (TimeoutError). The call was not forwarded.",
                    "type": "guard_unavailable",
                }
            }
            assert response.headers["x-spend-guard-scope"] == "store"
            # The queued reserve ran once the node resumed, and so did a release of its hold.
            feed.wait_for(lambda f: f.reserves(), "the queued reserve to run")
            (hold_id,) = feed.reserves()
            feed.wait_for(lambda f: any(kind == "settle" for _, kind, _ in f.of(hold_id)), "the release of its hold")
        # Released, never charged: run after the reserve, the release deleted the hold; run
        # before it (both queued in the paused node), it left a tombstone the reserve obeyed.
        runs = feed.of(hold_id)
        assert [kind for _, kind, _ in runs].count("reserve") == 1, runs
        assert {cost for _, kind, cost in runs if kind == "settle"} == {0}, runs
        tombstone = paused.node.exists(f"sg:{{{paused.name}}}:tomb:{hold_id}") == 1
        assert tombstone == (runs[0][1] == "settle"), (runs, tombstone)
        assert paused.holds() == 0
        assert budget_ledger(proxy) == ("0.0100", "0.0000")  # nothing charged, nothing held
    assert len(up.generation_requests) == 1  # the refused call never reached ImageRouter


def test_a_reserve_that_reached_a_paused_node_completes_once_it_resumes(tmp_path: Path, up, flushed):
    """The node is paused until the reserve has reached it (its bytes wait in the node's receive
    queue), then resumed well within STORE_TIMEOUT_S: the reserve runs once, the call is
    forwarded and answered 200, its cost is charged and no hold is left."""
    paused = PausedNode(tmp_path, flushed, up)
    with paused.serving() as proxy:
        with paused.pause() as feed, concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(paused.call)
            arrived = paused.wait_for_the_reserve_to_arrive()
            resumed_at = time.time()
            paused.resume()
            response = pending.result(30)
            assert response.status_code == 200, (response.status_code, response.text)
            assert response.json()["cost"] == 0.01
            feed.wait_for(lambda f: f.reserves(), "the reserve to run")
            (hold_id,) = feed.reserves()
            feed.wait_for(lambda f: any(kind == "settle" for _, kind, _ in f.of(hold_id)), "the settle")
        # What waited in the paused node's queue was exactly the reserve, run after the resume.
        reserve_at, _, _, _, reserve_args = feed.seen[0]
        assert arrived == resp_length(reserve_args) and reserve_at >= resumed_at, (arrived, feed.seen)
        assert [(kind, cost) for _, kind, cost in feed.of(hold_id)] == [("reserve", None), ("settle", 10_000)]
        assert paused.holds() == 0
        assert budget_ledger(proxy) == ("0.0200", "0.0000")
    assert len(up.generation_requests) == 2


def restart_node(c: Cluster, port: int) -> None:
    """Kill one node (SIGKILL, it keeps nothing: no persistence) and start it again on its port;
    its nodes-<port>.conf brings it back into the cluster with its slots."""
    i = c.ports.index(port)
    c.procs[i].kill()
    c.procs[i].wait(10)
    c.procs[i] = c.start_node(i)
    wait_until(lambda: c._ping(port), 10, f"node {port} to restart")


def test_a_flapping_slot_owner_never_gets_a_500_and_the_proxy_recovers_by_itself(tmp_path: Path, up):
    """The account's node killed and restarted three times under load: redis-py's cluster client
    raised RuntimeError/AttributeError (500s), and the refresher and settle-retry loops died, so
    the proxy stayed down until restarted. Now every answer is 200 or 503, and calls work again
    within a few seconds of the cluster being healthy."""
    flap = Cluster()
    flap.start()
    try:
        name = next(f"flap{i}" for i in range(1000) if flap.owner(f"sg:{{flap{i}}}:holds") != flap.ports[0])
        port = flap.owner(f"sg:{{{name}}}:holds")
        path = tmp_path / "policy.yaml"
        # No local budget: a node that restarts empty loses nothing the upstream snapshot can't restore.
        path.write_text(
            f"account: {{name: {name}, refresh_s: 2, max_staleness_s: 300}}\n"
            f"keys:\n  - {{name: alice, key_sha256: {hashlib.sha256(KEY_A.encode()).hexdigest()}}}\n"
        )
        statuses: list[int] = []
        with ServedProxy(path, up.url, flap.url) as proxy:

            def call() -> int:
                try:
                    return httpx.post(
                        proxy.url + "/v1/openai/images/generations",
                        json={"model": "openai/gpt-image-1"},
                        headers={**AUTH, "X-Standin": "cost=0.01"},
                        timeout=30,
                    ).status_code
                except httpx.HTTPError:
                    return 0

            stop = time.monotonic() + 60
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                load = [
                    pool.submit(lambda: [statuses.append(call()) for _ in range(400) if time.monotonic() < stop])
                    for _ in range(16)
                ]
                for _ in range(3):
                    restart_node(flap, port)
                    wait_until(flap._all_ok, 30, "cluster_state:ok after the restart")
                stop = time.monotonic()  # the load threads finish their current call and stop
                for job in load:
                    job.result(60)
            assert statuses and set(statuses) <= {200, 503}, sorted(set(statuses))
            # Healthy again: calls work within a few seconds, without restarting the proxy.
            deadline = time.monotonic() + 10
            while call() != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert call() == 200
            # Ready again once 10 s passed since the last reserve that failed.
            wait_until(lambda: httpx.get(proxy.url + "/-/readyz", timeout=5).json()["ready"], 12, "readyz")
            ready = httpx.get(proxy.url + "/-/readyz", timeout=5).json()
            assert "is not running" not in " ".join(ready["problems"])
    finally:
        flap.stop()
