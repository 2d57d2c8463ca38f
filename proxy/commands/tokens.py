"""`spend-guard token new`: a proxy token for a virtual key (docs/policies.md#virtual-keys).

The token is printed once and never stored: the policy holds only its sha256, so the proxy can
tell it apart and a leaked policy file gives nothing away. What to paste is printed beside it: the
key's `key_sha256` list with the new token added, the tokens it has kept (rotation: both work
until the old one is removed or expires).
"""

from __future__ import annotations

import hashlib
import secrets
import sys
import time

import click

from proxy.commands.exits import POLICY_INVALID
from proxy.errors import PolicyError
from proxy.policy.load import load_policy
from proxy.policy.model import KeyPolicy, Token
from proxy.windows import format_ms

# Recognisable in a leaked log or repository (secret scanners match prefixes), unlike an
# ImageRouter key; 32 random bytes after it.
TOKEN_PREFIX = "sgt_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _item(token: Token) -> str:
    if token.expires_ms is None:
        return f"{{sha256: {token.sha256}}}"
    return f"{{sha256: {token.sha256}, expires_at: '{format_ms(token.expires_ms)}'}}"


def instructions(name: str, token: str, expires_ms: int | None, key: KeyPolicy | None) -> str:
    """What `token new` prints: the token, then the entry to paste into the policy."""
    fresh = Token(hashlib.sha256(token.encode()).hexdigest(), expires_ms)
    kept = list(key.credentials()) if key is not None and key.virtual else []
    lines = [
        f"New token for key '{name}' (shown this once; the policy holds only its sha256):",
        "",
        f"  {token}",
        "",
        f"Paste this as the key_sha256 of key '{name}' and reload the policy (SIGHUP, or save the file):",
        "",
        "    key_sha256:",
        *(f"      - {_item(t)}" for t in kept),
        f"      - {_item(fresh)}",
    ]
    if kept:
        lines += [
            "",
            "Every token listed works: remove the old ones (or give them an expires_at) once their clients use "
            "the new one.",
        ]
    if key is not None and not key.virtual:
        lines += [
            "",
            f"Key '{name}' is not virtual yet: give it `upstream_key_env: NAME` (the variable holding its ImageRouter "
            "key) or `upstream_key_file: PATH`, so the proxy sends that key upstream for this token.",
        ]
    return "\n".join(lines)


def new(key_name: str, policy_path: str | None, expires_in_days: float | None) -> None:
    """Print a fresh proxy token once, and the key_sha256 entry to paste into the policy."""
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
