"""Who is calling: the policy entry a bearer token's fingerprint names, and what its calls send
upstream (docs/policies.md#virtual-keys)."""

from __future__ import annotations

from proxy.errors import Rejected
from proxy.policy.model import KeyPolicy, Policy
from proxy.policy.upstream_keys import expired
from proxy.windows import format_ms

UNREGISTERED = "This API key is not registered with the spend guard."


def identify_token(policy: Policy, fingerprint: str, now_s: float) -> KeyPolicy | None:
    """The key whose token has `fingerprint`; None for a token the policy does not list (the
    caller applies `guard.unknown_keys`). Raises 401 for a token past its `expires_at`, and for an
    unlisted token when any key is virtual: its clients hold proxy tokens, so an unlisted one is
    either made up or a real ImageRouter key trying to go around the budgets. Neither is
    forwarded, in shadow mode too."""
    found = policy.token_for(fingerprint)
    if found is None:
        if policy.has_virtual_keys:
            raise Rejected(401, "unauthorized", UNREGISTERED, scope="auth")
        return None
    key, token = found
    if token.expires_ms is not None and expired(token, now_s):
        raise Rejected(
            401,
            "unauthorized",
            f"This token of key '{key.name}' expired at {format_ms(token.expires_ms)}; ask for a new one.",
            scope="auth",
        )
    return key
