"""The `--workers N` parent: uvicorn's supervisor, with SIGTERM that never waits behind a restart.

uvicorn's `Multiprocess` handles signals from its main loop, one at a time. SIGHUP runs a rolling
restart there (for each worker: start a replacement, wait until it is ready, SIGTERM the old one
and wait while it drains its calls for up to `shutdown_grace_s`), so a SIGTERM that arrived
meanwhile waited for every remaining worker to be replaced and drained in turn: up to N grace
periods. Here SIGTERM and SIGINT also raise a flag the restart checks between
steps and while it waits: the restart stops where it is, and every worker (a draining old one
included) drains in parallel, so a stop takes at most one `shutdown_grace_s` (plus exit time).

Each worker dies with the parent (proxy/lifeline.py): a parent killed with SIGKILL sends its
workers SIGTERM, so they stop listening and drain instead of holding the port, and the next
`serve` binds it.
"""

from __future__ import annotations

import logging
import os
import signal
from socket import socket
from types import FrameType

from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import SIGNALS, Multiprocess, Process

from proxy.lifeline import die_with_parent

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


class Worker(Process):
    """A worker process that gets SIGTERM when its parent dies."""

    def __init__(self, config: Config, sockets: list[socket]) -> None:
        self.parent_pid = os.getpid()
        super().__init__(config, sockets)

    def target(self, sockets: list[socket] | None = None) -> None:
        die_with_parent(self.parent_pid)
        super().target(sockets)


class Supervisor(Multiprocess):
    """`Multiprocess` whose rolling restart (SIGHUP) gives way to SIGTERM / SIGINT at once."""

    def __init__(self, config: Config, sockets: list[socket]) -> None:
        super().__init__(config, sockets)
        self.stop = _StopFlag()
        self.retiring: list[Process] = []  # old workers told to drain, not yet exited
        self.startup_failed = False  # a worker failed before it served: `serve` exits 3, as with one
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.signal_queue.append(sig)
        if sig in STOP_SIGNALS:
            self.stop.stopping = True

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            worker = Worker(self.config, self.sockets)
            worker.start()
            self.processes.append(worker)

    def keep_subprocess_alive(self) -> None:
        """uvicorn's: replace a worker that died or hangs, and stop if one failed at startup."""
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung: kill it
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                # The app, the socket or the policy is broken: every restart would fail the same way.
                log.error("Child process [%s] failed to start, stopping the parent process.", process.pid)
                self.startup_failed = True
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.info("Child process [%s] died", process.pid)
            worker = Worker(self.config, self.sockets)
            worker.start()
            self.processes[idx] = worker

    def restart_all(self) -> None:
        """Replace each worker: its replacement serves before the old one drains and exits."""
        for idx, old in enumerate(self.processes):
            if self.stop.is_set():
                return
            new = Worker(self.config, self.sockets)
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
