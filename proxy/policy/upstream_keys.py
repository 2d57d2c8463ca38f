"""Virtual keys' real ImageRouter keys (docs/policies.md#virtual-keys).

A virtual key's clients authenticate with a proxy token; the proxy sends the key's real ImageRouter
key upstream instead, read from the variable (`upstream_key_env`) or file (`upstream_key_file`)
its policy entry names. They are read whenever a policy is applied (start, reload), held as
`Secret`s, and only ever written into the Authorization header of the upstream request: never
logged, stored, put in a metric or sent to a client. A key whose secret cannot be read gets 503
for its calls (the log says why, naming the variable or file, never a value).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping

from proxy.policy.model import KeyPolicy, Policy, Token
from proxy.settings import Secret

log = logging.getLogger("spend_guard")
# A key file larger than this is not a key.
MAX_KEY_FILE_BYTES = 4096
AUTHORIZATION = b"authorization"
BEARER = b"bearer "


class UpstreamKeys:
    """The real key of each virtual key of the applied policy, by key name."""

    def __init__(self) -> None:
        self._keys: dict[str, Secret] = {}
        self.problems: dict[str, str] = {}  # key name -> why its real key is unavailable
        self.any = False  # the policy has a virtual key

    def load(self, policy: Policy, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        keys: dict[str, Secret] = {}
        problems: dict[str, str] = {}
        for key in policy.keys:
            if not key.virtual:
                continue
            value, problem = _read(key, env)
            if value:
                keys[key.name] = Secret(value)
            else:
                problems[key.name] = problem
                log.error(
                    "virtual key %s: its ImageRouter key is unavailable (%s); its calls get 503", key.name, problem
                )
        self._keys, self.problems, self.any = keys, problems, policy.has_virtual_keys

    def authorization(self, key: KeyPolicy) -> Secret | None:
        """The Authorization value the upstream gets for `key`'s calls; None when unavailable."""
        secret = self._keys.get(key.name)
        return None if secret is None else Secret(f"Bearer {secret.value}")

    def __repr__(self) -> str:
        return f"UpstreamKeys({sorted(self._keys)!r}, problems={sorted(self.problems)!r})"


def _read(key: KeyPolicy, env: Mapping[str, str]) -> tuple[str, str]:
    """(the key, "") or ("", why not): never the value in the reason."""
    if key.upstream_key_env is not None:
        value = env.get(key.upstream_key_env, "").strip()
        return (value, "") if value else ("", f"{key.upstream_key_env} is not set")
    assert key.upstream_key_file is not None
    try:
        with open(key.upstream_key_file, "rb") as file:
            raw = file.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        return "", f"cannot read {key.upstream_key_file}: {exc.strerror}"
    try:
        value = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        value = ""
    if len(raw) > MAX_KEY_FILE_BYTES or not value or not value.isprintable() or any(c.isspace() for c in value):
        return "", f"{key.upstream_key_file} does not hold one key on one line"
    return value, ""


def expired(token: Token, now_s: float | None = None) -> bool:
    """Whether `token` is past its `expires_at`."""
    if token.expires_ms is None:
        return False
    return token.expires_ms <= int((time.time() if now_s is None else now_s) * 1000)


def bearer_value(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The bearer token of raw ASGI headers, when there is exactly one Authorization header."""
    found = None
    for name, value in headers:
        if name.lower() == AUTHORIZATION:
            if found is not None:
                return None
            found = value
    if found is None or found[:7].lower() != BEARER:
        return None
    return found[7:].strip() or None
