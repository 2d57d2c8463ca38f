"""Child processes of the bench: start each in its own process group, wait for it, stop it for sure."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Self

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Procs:
    """Every process started here; `stop_all()` ends them, process group by process group."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start `argv` with exactly `env`, output to `<log_dir>/<name>.log`."""
        with open(os.path.join(self.log_dir, f"{name}.log"), "wb") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: uvicorn workers go with it
            )
        self.running[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.log_dir, f"{name}.log"), "rb") as f:
            return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")
        return ""

    def wait_ready(self, name: str, url: str, *, timeout_s: float = READY_TIMEOUT_S, successes: int = 1) -> None:
        """Poll `url` until it answers 200 `successes` times in a row; raise with the log tail if not."""
        proc = self.running[name]
        deadline = time.monotonic() + timeout_s
        streak = 0
        last = "no answer"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    streak = streak + 1 if resp.status == 200 else 0
                    last = str(resp.status)
            except urllib.error.HTTPError as exc:
                streak, last = 0, f"{exc.code} {exc.read()[:200]!r}"
            except (OSError, urllib.error.URLError) as exc:
                streak, last = 0, type(exc).__name__
            if streak >= successes:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready at {url} after {timeout_s:.0f} s (last: {last}):\n{self.log_tail(name)}")

    def stop(self, name: str) -> None:
        proc = self.running.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT_S)
        # A worker left behind by a parent that died first still sits in the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in reversed(list(self.running)):
            self.stop(name)


def rss_kib(pid: int) -> int | None:
    """VmRSS of `pid` in KiB, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores) since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) * _TICK_S


def _group_cpu_s(pgids: set[int], pids: set[int]) -> dict[int, float]:
    """CPU seconds (user + system) per process group in `pgids`; `pids` are counted under key 0."""
    out: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pgrp, ticks = int(rest[2]), int(rest[11]) + int(rest[12])
        key = pgrp if pgrp in pgids else 0 if int(entry) in pids else None
        if key is not None:
            out[key] = out.get(key, 0.0) + ticks * _TICK_S
    return out


def start_redis(procs: Procs, env: dict[str, str], name: str = "redis") -> str:
    """A redis-server of the bench's own on a free port of 127.0.0.1 (nothing saved, no AOF), started
    through `procs` (stopped with the rest); returns its URL once it answers PING. Never a Redis
    someone else runs: a shared host's database is theirs to keep."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found (Debian: apt-get install -y redis-server)")
    port = free_port()
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = procs.start(name, argv, env)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{procs.log_tail(name)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            if conn.recv(16).startswith(b"+PONG"):
                return f"redis://127.0.0.1:{port}/0"
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not answer PING on port {port}:\n{procs.log_tail(name)}")


class CpuMeter:
    """CPU used during a span, in cores: by each bench process group, and by everything else.

    `other_cores` is the machine's busy time minus the bench's (its children, its redis-server
    included, wrk, and any `pids` given): someone else's load on the same cores, the usual cause of
    noise.
    """

    def __init__(self, pgids: set[int], pids: set[int]) -> None:
        self.pgids, self.pids = pgids, pids
        self.cores: dict[int, float] = {}
        self.other_cores = 0.0

    def __enter__(self) -> Self:
        self.t0, self.busy0 = time.monotonic(), _busy_s()
        self.groups0 = _group_cpu_s(self.pgids, self.pids)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.children0 = usage.ru_utime + usage.ru_stime
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = max(1e-6, time.monotonic() - self.t0)
        groups = _group_cpu_s(self.pgids, self.pids)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        waited = usage.ru_utime + usage.ru_stime - self.children0  # wrk, once it has exited
        self.cores = {k: (v - self.groups0.get(k, 0.0)) / elapsed for k, v in groups.items()}
        ours = sum(self.cores.values()) + waited / elapsed
        self.other_cores = max(0.0, (_busy_s() - self.busy0) / elapsed - ours)
