"""The `--workers N` parent: uvicorn's supervisor, with SIGTERM that never waits behind a restart.

uvicorn's `Multiprocess` handles signals from its main loop, one at a time. SIGHUP runs a rolling
restart there (for each worker: start a replacement, wait until it is ready, SIGTERM the old one
and wait while it drains its calls for up to `shutdown_grace_s`), so a SIGTERM that arrived
meanwhile waited for every remaining worker to be replaced and drained in turn: up to N grace
periods. Here SIGTERM and SIGINT also raise a flag the restart checks between
steps and while it waits: the restart stops where it is, and every worker (a draining old one
included) drains in parallel, so a stop takes at most one `shutdown_grace_s` (plus exit time).
"""

from __future__ import annotations

import logging
import signal
from socket import socket
from types import FrameType

from uvicorn.config import Config
from uvicorn.supervisors.multiprocess import SIGNALS, Multiprocess, Process

log = logging.getLogger("uvicorn.error")
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
JOIN_POLL_S = 0.2


class _StopFlag:
    """What `Process.wait_until_ready` polls: set by a stop signal, without taking a lock (an
    `Event.set()` inside a signal handler can deadlock on the lock the main thread holds)."""

    def __init__(self) -> None:
        self.stopping = False

    def is_set(self) -> bool:
        return self.stopping


class Supervisor(Multiprocess):
    """`Multiprocess` whose rolling restart (SIGHUP) gives way to SIGTERM / SIGINT at once."""

    def __init__(self, config: Config, sockets: list[socket]) -> None:
        super().__init__(config, sockets)
        self.stop = _StopFlag()
        self.retiring: list[Process] = []  # old workers told to drain, not yet exited
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.signal_queue.append(sig)
        if sig in STOP_SIGNALS:
            self.stop.stopping = True

    def restart_all(self) -> None:
        """Replace each worker: its replacement serves before the old one drains and exits."""
        for idx, old in enumerate(self.processes):
            if self.stop.is_set():
                return
            new = Process(self.config, self.sockets)
            new.start()
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.stop):  # type: ignore[arg-type]
                new.kill()
                new.join()
                if not self.stop.is_set():
                    log.error(
                        "New worker [%s] was not ready in time; keeping [%s] and aborting the restart.",
                        new.pid,
                        old.pid,
                    )
                return
            self.processes[idx] = new
            old.terminate()
            self.retiring.append(old)
            # Wait for it to drain, unless a stop arrives: then everything drains at once.
            while old.process.is_alive() and not self.stop.is_set():
                old.process.join(JOIN_POLL_S)
            if not old.process.is_alive():
                self.retiring.remove(old)

    def join_all(self) -> None:
        for process in self.retiring + self.processes:
            process.join()
        self.retiring.clear()
