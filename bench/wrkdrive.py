"""Running wrk: the Lua script that shapes each request, and the numbers read back from its output."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

MODEL = "test/bench"
BODY = f'{{"model":"{MODEL}","prompt":"x"}}'
API_KEY = "bench-key-0001"
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_DURATION = r"([\d.]+)(us|ms|s|m|h)"


@dataclass(frozen=True)
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int


def lua_script(path: str, method: str, *, body: str | None = None, delay_ms: int | None = None) -> str:
    """Write a wrk script: method, JSON body with the bench key, optional per-connection pause."""
    lines = [f'wrk.method = "{method}"']
    if body is not None:
        lines += [
            f"wrk.body = '{body}'",
            'wrk.headers["Content-Type"] = "application/json"',
            f'wrk.headers["Authorization"] = "Bearer {API_KEY}"',
        ]
    if delay_ms is not None:
        # wrk waits this long after each response before the connection's next request.
        lines += ["function delay()", f"  return {int(delay_ms)}", "end"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def to_ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse(output: str) -> Result:
    """Read rps, p50/p99 (any unit wrk chose), request count and failures from `wrk --latency`."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s*50(?:\.000)?%\s+" + _DURATION, output, re.MULTILINE)
    p99 = re.search(r"^\s*99(?:\.000)?%\s+" + _DURATION, output, re.MULTILINE)
    total = re.search(r"(\d+) requests in", output)
    if not (rps and p50 and p99 and total):
        raise ValueError(f"unexpected wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return Result(
        rps=float(rps.group(1)),
        p50_ms=to_ms(*p50.groups()),
        p99_ms=to_ms(*p99.groups()),
        requests=int(total.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in sock.groups()) if sock else 0,
    )


def run(wrk: str, url: str, script: str, *, duration_s: float, connections: int, threads: int = 1) -> Result:
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        script,
        url,
    ]
    done = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=duration_s + 30, start_new_session=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse(done.stdout)


def scripts(root: str) -> dict[str, str]:
    """The fixed scripts: a guarded-shaped POST (used on every POST target) and a plain GET."""
    return {
        "post": lua_script(os.path.join(root, "post.lua"), "POST", body=BODY),
        "get": lua_script(os.path.join(root, "get.lua"), "GET"),
    }
