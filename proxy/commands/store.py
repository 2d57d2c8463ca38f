"""`spend-guard store init` and `spend-guard store recover`: declaring a new store, and letting calls
touching local budgets through again after it lost its state (the figures: proxy/commands/recover.py).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click

from proxy.commands.exits import NOTHING_DONE, POLICY_INVALID, STARTUP_FAILURE
from proxy.errors import PolicyError
from proxy.policy.load import load_policy
from proxy.policy.model import Policy, default_policy


def _load(path: str | None) -> Policy:
    return load_policy(path) if path else default_policy()


def init(policy_path: str | None, redis_url: str | None, state_dir: str | None) -> None:
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


def recover(
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
    from proxy.commands.recover import Plan, Recovery, RecoveryError, from_access_log, from_seeds
    from proxy.commands.recover import recover as recover_store
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
            return await recover_store(target, plan, force=force, thresholds=policy.alerts.thresholds)
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
