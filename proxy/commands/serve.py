"""`spend-guard serve`: the proxy under uvicorn, with the embedded store when there is no Redis URL,
and `serve --demo` in front of the stand-in."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from types import FrameType

import click

from proxy.commands.exits import POLICY_INVALID, STARTUP_FAILURE
from proxy.errors import PolicyError
from proxy.logs import LogFormat, configure_logging
from proxy.policy.load import load_policy
from proxy.policy.model import Policy
from proxy.settings import MULTIPROCESS_DIR_ENV, Settings
from proxy.store.embedded import EmbeddedServer, EmbeddedStoreError, default_state_dir

WORKER_READY_S = 20


class _Stopped(Exception):
    """A stop signal that arrived outside uvicorn's own handling (before it started, or re-raised
    by it once it has shut down)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stopped(signum: int, frame: object) -> None:
    raise _Stopped(signum)


def serve_demo(
    host: str,
    port: int,
    policy_path: str | None,
    redis_url: str | None,
    state_dir: str | None,
    embedded_server: str | None,
    workers: int,
    log_level: str,
    log_format: LogFormat,
) -> None:
    """`serve --demo`: the demo upstream and its policy, or `policy_path`'s (proxy/commands/demo.py),
    then the proxy as usual. Its temporary directory goes on exit, SIGTERM included: once the
    proxy serves, a stop returns from `run` (exit 0); a SIGTERM before that becomes an exception
    here, so the directory is removed before the process ends as SIGTERM ends it."""
    from proxy.commands.demo import Demo

    policy = None
    if policy_path is not None:
        try:
            policy = load_policy(policy_path)
        except PolicyError as exc:
            click.echo(f"spend-guard: invalid policy, not starting:\n{exc}", err=True)
            sys.exit(POLICY_INVALID)
    signal.signal(signal.SIGTERM, _stopped)
    try:
        with Demo(os.path.abspath(state_dir) if state_dir else None, policy_path, policy) as demo:
            settings = Settings(
                host,
                port,
                demo.policy_path,
                demo.upstream_url,
                redis_url,
                workers,
                log_level,
                state_dir=demo.state_dir,
                log_format=log_format,
            )
            shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
            click.echo(demo.banner(f"http://{shown}:{port}"), err=True)
            run(settings, policy or load_policy(demo.policy_path), embedded_server=embedded_server)
    except _Stopped as stop:
        signal.signal(stop.signum, signal.SIG_DFL)
        os.kill(os.getpid(), stop.signum)


def run(settings: Settings, policy: Policy, *, embedded_server: str | None = None) -> None:
    # This process's own lines (the embedded store, the worker supervisor) in the chosen format
    # too; each worker sets up its own the same way (app.create_app).
    configure_logging(settings.log_level, settings.log_format)
    os.environ.update(settings.to_env())
    # Before prometheus_client is imported (it reads this once): set but empty means unset.
    if not os.environ.get(MULTIPROCESS_DIR_ENV):
        os.environ.pop(MULTIPROCESS_DIR_ENV, None)
    metrics_dir = None
    if settings.workers > 1 and MULTIPROCESS_DIR_ENV not in os.environ:
        # Each worker writes its metrics here and a scrape of any worker sums them all.
        metrics_dir = tempfile.mkdtemp(prefix="spend-guard-metrics-")
        os.environ[MULTIPROCESS_DIR_ENV] = metrics_dir
    try:
        # Without a Redis URL the store is a private server, shared by every worker (proxy/store/embedded.py).
        with _embedded_store(settings, embedded_server):
            _serve(settings, policy)
    except EmbeddedStoreError as exc:
        click.echo(f"spend-guard: {exc}", err=True)
        sys.exit(STARTUP_FAILURE)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _embedded_store(settings: Settings, binary: str | None) -> contextlib.AbstractContextManager[object]:
    if settings.redis_url:
        return contextlib.nullcontext()
    return EmbeddedServer(settings.state_dir or default_state_dir(), binary)


def _serve(settings: Settings, policy: Policy) -> None:
    import uvicorn

    from proxy.http.bounds import raise_fd_limit
    from proxy.http.protocol import log_config
    from proxy.http.supervisor import Supervisor

    raise_fd_limit(settings.max_connections)
    config = uvicorn.Config(
        "proxy.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        log_config=log_config(settings.log_format),
        access_log=False,
        server_header=False,
        date_header=False,
        # httptools with a deadline for request heads and a cap on open connections.
        http="proxy.http.protocol:GuardedHttpProtocol",
        timeout_graceful_shutdown=int(policy.guard.shutdown_grace_s),
        timeout_keep_alive=30,
        # A new worker runs its first refresh (up to 5 s) before it is ready; uvicorn's default
        # of 5 s would abort a SIGHUP rolling restart whenever ImageRouter answers slowly.
        timeout_worker_healthcheck=WORKER_READY_S,
        # The guard never reads client addresses; don't rewrite them from X-Forwarded-* either.
        proxy_headers=False,
    )
    server = uvicorn.Server(config)

    # uvicorn raises the stop signal again once it has drained; with SIGTERM's default action this
    # process would die of it (status -15) before the embedded store is stopped and the metrics
    # directory removed. A stop that was asked for exits 0, with one worker as with several.
    def stopped(signum: int, frame: FrameType | None) -> None:
        if not server.started and not server.should_exit:  # before uvicorn took the signal over
            server.handle_exit(signum, frame)

    signal.signal(signal.SIGTERM, stopped)
    supervisor = None
    try:
        if settings.workers > 1:
            # uvicorn's supervisor, except that SIGTERM never waits behind a rolling restart.
            supervisor = Supervisor(config, sockets=[config.bind_socket()])
            supervisor.run()
        else:
            server.run()
    except KeyboardInterrupt:
        pass
    if supervisor.startup_failed if supervisor is not None else not server.started:
        sys.exit(STARTUP_FAILURE)
