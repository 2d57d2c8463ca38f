"""The server edge: the bare passthrough (bench/passthrough.py's app) under each candidate server,
measured for throughput and against the hostile shapes the proxy bounds itself.

    python bench/edge.py [--rounds 3] [--duration 5]

Needs `wrk`, `nginx` and the candidate servers importable by this Python (uvicorn with
httptools and h11; granian and hypercorn are optional: a missing one is skipped). Targets, all on
127.0.0.1, alternated within each round: uvicorn-httptools (the stack the proxy builds on),
uvicorn-h11, uvicorn with the proxy's own protocol (httptools plus its head, pipeline and
connection bounds), hypercorn (asyncio), granian (asgi, 1 worker). Hostile probes, one connection each, against
every server: a head streamed past 64 KiB (is it cut, and where), 2 MB of pipelined GETs that
are never read (the server's RSS growth), a 64 KiB URL.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import upstream
import wrkdrive
from procs import Procs, free_port, rss_kib
from tables import median

HERE = Path(__file__).resolve().parent
PATH = "/v1/openai/images/generations"
APP = "passthrough_app:app"


def app_module(root: str, upstream_url: str) -> None:
    """A module exposing bench/passthrough.py's app for servers that import an app by name."""
    Path(root, "passthrough_app.py").write_text(
        f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom passthrough import Passthrough\n"
        f"app = Passthrough({upstream_url!r})\n"
    )


def commands(port: int) -> dict[str, list[str]]:
    py = sys.executable

    def uvicorn(http: str) -> list[str]:
        return [py, "-m", "uvicorn", APP, "--port", str(port), "--http", http, "--loop", "uvloop",
                "--log-level", "warning", "--no-access-log"]  # fmt: skip

    found = {"uvicorn-httptools": uvicorn("httptools"), "uvicorn-h11": uvicorn("h11")}
    if importlib.util.find_spec("proxy"):
        # The proxy's own protocol: httptools with the head, pipeline and connection bounds.
        found["uvicorn-guarded"] = uvicorn("proxy.http.protocol:GuardedHttpProtocol")
    if importlib.util.find_spec("hypercorn"):
        found["hypercorn"] = [py, "-m", "hypercorn", APP, "--bind", f"127.0.0.1:{port}", "--log-level", "warning"]
    if importlib.util.find_spec("granian"):
        found["granian"] = [
            py,
            "-m",
            "granian",
            "--interface",
            "asgi",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--log-level",
            "warning",
            APP,
        ]
    return found


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def streamed_head(port: int) -> str:
    """Send header lines until 1 MiB or the server answers or closes; what happened, and where."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        sent = 0
        try:
            while sent < 1 << 20:
                sock.sendall(b"X-Pad-%d: " % sent + b"a" * 1000 + b"\r\n")
                sent += 1000
                sock.settimeout(0.001)
                try:
                    data = sock.recv(200)
                except (BlockingIOError, TimeoutError):
                    continue
                finally:
                    sock.settimeout(5)
                return f"{data.split(b' ')[1].decode() if data else 'closed'} after {sent // 1024} KiB"
        except OSError:
            return f"reset after {sent // 1024} KiB"
    return "not cut at 1 MiB"


def pipelined(port: int, pid: int) -> str:
    """2 MB of pipelined GETs never read; the server's RSS growth after 1 s."""
    before = rss_kib(pid) or 0
    request = b"GET /v2/models HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            sock.settimeout(2)
            for _ in range(2_000_000 // len(request)):
                sock.sendall(request)
        except OSError:
            pass
        time.sleep(1)  # the server's parsing of what it accepted (an external process: no event)
        after = rss_kib(pid) or 0
    return f"+{(after - before) / 1024:.0f} MiB"


def long_url(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /" + b"a" * 65536 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            data = sock.recv(200)
        except OSError:
            return "reset"
    return data.split(b" ")[1].decode() if data else "closed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    wrk, nginx = shutil.which("wrk"), shutil.which("nginx")
    if not wrk or not nginx:
        sys.exit("bench/edge.py needs wrk and nginx (apt-get install -y wrk nginx-light)")
    with tempfile.TemporaryDirectory(prefix="sg-edge-") as root:
        procs = Procs(root)
        try:
            measure(args, wrk, nginx, root, procs)
        finally:
            procs.stop_all()


def measure(args: argparse.Namespace, wrk: str, nginx: str, root: str, procs: Procs) -> None:
    up_port = free_port()
    procs.start("nginx", upstream.nginx_command(nginx, root, up_port), env=dict(os.environ))
    wait_port(up_port)
    app_module(root, f"http://127.0.0.1:{up_port}")
    script = wrkdrive.lua_script(os.path.join(root, "post.lua"), "POST", body='{"model":"test/bench","prompt":"x"}')
    env = {**os.environ, "PYTHONPATH": root}
    rps: dict[str, list[float]] = {}
    probes: dict[str, tuple[str, str, str]] = {}
    names = list(commands(0))
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            port = free_port()
            proc = procs.start(name, commands(port)[name], env=env)
            try:
                wait_port(port)
                wrkdrive.run(wrk, f"http://127.0.0.1:{port}{PATH}", script, duration_s=1, connections=32)
                result = wrkdrive.run(
                    wrk, f"http://127.0.0.1:{port}{PATH}", script, duration_s=args.duration, connections=32
                )
                rps.setdefault(name, []).append(result.rps)
                if round_ == 0:
                    probes[name] = (streamed_head(port), pipelined(port, proc.pid), long_url(port))
            finally:
                procs.stop(name)
    base = median(rps["uvicorn-httptools"])
    print(f"{'server':<18} {'rps':>7} {'x httptools':>11}  {'head streamed':<24} {'pipelined 2 MB':<14} 64 KiB URL")
    for name in names:
        head, pipe, url = probes[name]
        print(f"{name:<18} {median(rps[name]):>7.0f} {median(rps[name]) / base:>11.2f}  {head:<24} {pipe:<14} {url}")


if __name__ == "__main__":
    main()
