"""Instructions a call: the user-space instructions a server executes per request answered, counted
by valgrind's callgrind, for the passthrough, the proxy's unguarded and guarded routes, and with
`--beside DIR` another checkout's routes.

    python bench/instructions.py [--redis] [--beside DIR] [--seconds 15] [--connections 32]

On a shared box the calls/s of one commit move by up to 30 % between invocations (bench/RESULTS.md);
an instruction count moves by about 1 %, so it tells two commits apart where a few percent of CPU
is at stake. It counts what the server's own process runs (Python, its C extensions, libc), not
the kernel's time in its system calls nor the time a write takes to wake a peer: bench/run.py
measures those, as calls/s and CPU a call. A server runs under callgrind about fifty times
slower than natively, so each answers a few thousand calls in --seconds; timers (the sweep of
deadlines, the refresher) weigh more per call than at full speed, equally for two commits.

Needs valgrind (Debian: apt-get install -y valgrind) besides wrk and nginx. Each server starts
under callgrind with its instrumentation off (start-up and warm-up run faster so), is warmed up
by wrk, then has its counters switched on and zeroed; wrk drives each target for --seconds and
the counters are dumped: instructions / requests answered.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import upstream
import wrkdrive
from procs import Procs, free_port, start_redis
from run import (
    GUARDED_PATH,
    HERE,
    POLICY,
    UNGUARDED_PATH,
    check_route,
    child_env,
    proxy_command,
    run_reported,
    serve_argv,
    tools,
)
from tables import Report, ratio

READY_TIMEOUT_S = 240.0  # a Python server starts in 10-30 s under valgrind on a 2-core box
DUMP_TIMEOUT_S = 60.0
# run.py's policy without its refreshes: a refresh (credits, models, a snapshot written) within a
# count would be charged to that count's calls, one or two of them depending on when it fell.
QUIET_POLICY = POLICY.replace("refresh_s: 5,", "refresh_s: 600, models_refresh_s: 600,").replace(
    "max_staleness_s: 300", "max_staleness_s: 3600"
)
if "refresh_s: 600" not in QUIET_POLICY or "max_staleness_s: 3600" not in QUIET_POLICY:
    raise SystemExit("bench/instructions.py: run.py's POLICY no longer reads as QUIET_POLICY expects")
_TOTAL = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=15.0, help="wrk seconds a target, counted (default 15)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--redis", action="store_true", help="the proxies on a redis-server of the bench's own")
    p.add_argument("--beside", metavar="DIR", help="also count another checkout's proxy (both routes)")
    p.add_argument("--beside-python", default=sys.executable, help="the interpreter for --beside's proxy")
    p.add_argument("--keep", action="store_true", help="keep callgrind's dumps (for callgrind_annotate)")
    return p.parse_args(argv)


class Counted:
    """Servers under callgrind, each counted target by target."""

    def __init__(self, args: argparse.Namespace, found: dict[str, str], root: str, report: Report) -> None:
        self.args, self.root, self.report = args, root, report
        self.wrk, self.nginx = found["wrk"], found["nginx"]
        self.procs = Procs(root)
        self.env = child_env()
        self.script = wrkdrive.lua_script(os.path.join(root, "post.lua"), "POST", body=wrkdrive.BODY)
        self.nginx_url = ""
        self.redis_url = ""
        self.rows: list[list[object]] = []
        self.per_call: dict[str, float] = {}

    def run(self) -> None:
        port = free_port()
        self.procs.start("nginx", upstream.nginx_command(self.nginx, self.root, port), self.env)
        self.nginx_url = f"http://127.0.0.1:{port}"
        self.procs.wait_ready("nginx", self.nginx_url + "/v1/credits")
        if self.args.redis:
            self.redis_url = start_redis(self.procs, self.env)
        policy = os.path.join(self.root, "policy.yaml")
        Path(policy).write_text(QUIET_POLICY + "models: {holds: max}\n")

        port = free_port()
        passthrough = [sys.executable, str(HERE / "passthrough.py"), "--upstream", self.nginx_url, "--port", str(port)]
        self.count_server("passthrough", port, passthrough, self.env, "/v1/credits", [("passthrough", GUARDED_PATH)])
        # Both proxies count the same targets in the same order: each counts as the other.
        routes = [("unguarded", UNGUARDED_PATH), ("guarded", GUARDED_PATH)]
        proxies = [("proxy", None, "/0")] + ([("beside", self.args.beside, "/1")] if self.args.beside else [])
        for name, tree, database in proxies:
            command, env = proxy_command(self.env, tree, self.args.beside_python)
            redis_url = self.redis_url[: -len("/0")] + database if self.redis_url else None
            state_dir = os.path.join(self.root, f"state-{name}")
            port = free_port()
            argv = command + serve_argv(
                policy, self.nginx_url, port, 1, "info", redis_url=redis_url, state_dir=state_dir
            )
            self.count_server(name, port, argv, env, "/-/readyz", [(f"{name} {route}", path) for route, path in routes])
        self.summary()

    def count_server(
        self, name: str, port: int, argv: list[str], env: dict[str, str], ready: str, targets: list[tuple[str, str]]
    ) -> None:
        """Start `argv` (serving on `port`) under callgrind, warm it, and count each target."""
        out = os.path.join(self.root, f"callgrind-{name}.out")
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
        proc = self.procs.start(name, valgrind + argv, env)
        base = f"http://127.0.0.1:{port}"
        self.procs.wait_ready(name, base + ready, timeout_s=READY_TIMEOUT_S)
        for _, path in targets:
            check_route(name, base, path, guarded=None if name == "passthrough" else path == GUARDED_PATH)
        for _, path in targets:
            self.drive(base + path, 3.0)  # warm, uninstrumented: pools, first-use allocations
        self.control(proc.pid, "--instr=on")
        for _, path in targets:
            self.drive(base + path, 2.0)  # instrumented code is translated on its first run
        for target, path in targets:
            self.control(proc.pid, "-z")
            result = self.drive(base + path, self.args.seconds)
            instructions = self.dump(proc.pid, out, target)
            self.per_call[target] = per_call = instructions / max(1, result.requests)
            self.rows.append([target, result.requests, result.non_2xx + result.socket_errors, per_call])
        self.procs.stop(name)

    def drive(self, url: str, seconds: float) -> wrkdrive.Result:
        return wrkdrive.run(self.wrk, url, self.script, duration_s=seconds, connections=self.args.connections)

    def control(self, pid: int, option: str) -> None:
        done = subprocess.run(
            ["callgrind_control", option, str(pid)], capture_output=True, text=True, timeout=DUMP_TIMEOUT_S
        )
        if done.returncode != 0:
            raise RuntimeError(f"callgrind_control {option} {pid} failed: {done.stderr or done.stdout}")

    def dump(self, pid: int, out: str, target: str) -> int:
        """Dump the counters since the last zeroing and answer their total."""
        before = set(Path(self.root).glob(Path(out).name + "*"))
        self.control(pid, "-d")
        deadline = time.monotonic() + DUMP_TIMEOUT_S
        while time.monotonic() < deadline:
            for path in set(Path(self.root).glob(Path(out).name + "*")) - before:
                found = _TOTAL.search(path.read_text(errors="replace"))
                if found:  # written whole: the totals close the file
                    if self.args.keep:
                        kept = HERE / "results" / f"callgrind-{target.replace(' ', '-')}-{time.strftime('%H%M%S')}.out"
                        kept.parent.mkdir(exist_ok=True)
                        shutil.copyfile(path, kept)
                        self.report.line(f"  {target}: callgrind's dump kept in {kept.relative_to(HERE.parent)}")
                    path.unlink()
                    return int(found.group(1))
            time.sleep(0.2)  # polls the file system until valgrind has written the dump
        raise RuntimeError(f"no callgrind dump for {target} within {DUMP_TIMEOUT_S:g} s")

    def summary(self) -> None:
        r = self.report
        base = self.per_call.get("passthrough", float("nan"))
        r.line(
            f"== Instructions a call: callgrind, wrk -t1 -c{self.args.connections}, {self.args.seconds:g} s a target"
            f" ({'the bench' + chr(39) + 's redis-server' if self.redis_url else 'embedded stores'})"
        )
        r.table(
            ["target", "requests", "errors", "instructions a call", "x passthrough"],
            [row + [ratio(float(row[3]), base)] for row in self.rows],  # type: ignore[arg-type]
        )
        for route in ("unguarded", "guarded") if "beside guarded" in self.per_call else ():
            mine, theirs = self.per_call[f"proxy {route}"], self.per_call[f"beside {route}"]
            r.line(f"  proxy {route} / beside {route}: {ratio(mine, theirs):.3f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    found = tools()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("bench: valgrind not found. Install with:\n  apt-get install -y valgrind")
    report = Report()
    root = tempfile.mkdtemp(prefix="spend-guard-instructions-")
    counted = Counted(args, found, root, report)
    budget = int(5 * (READY_TIMEOUT_S + 4 * (args.seconds + 10)))
    return run_reported(counted.run, counted.procs, report, root, budget, "-instructions")


if __name__ == "__main__":
    sys.exit(main())
