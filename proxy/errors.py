"""Exceptions, and the one place that renders ImageRouter's error envelope.

SpendGuardError
 ├── PolicyError           a policy file failed validation (lists every problem)
 ├── StoreError            Redis (or the embedded store) did not answer
 │    ├── StoreScriptError     it answered, refusing an operation (a script fault)
 │    └── StoreAuthError       it refused this proxy's credentials (the Redis URL's password)
 ├── HoldQuarantined       a hold record could not be read; it was moved aside
 ├── EmbeddedStoreError    the embedded store's server could not start (store/embedded.py)
 ├── StartupRefused        the proxy will not serve this store (one line, no traceback)
 └── Rejected              a request refused by the guard: status, type, message, headers
      └── UpstreamError        ImageRouter unreachable (502) or timed out (504)
           └── UpstreamNotSent     the connection never opened: nothing can have been billed
UpstreamBroken             raised on purpose after a response started, to cut the client
ValueError
 ├── MoneyError            an amount that does not convert exactly (money.py)
 ├── CreditsError          a credits answer that is not stored (snapshot.py)
 ├── PriceTableError       a /v2/models answer that is not stored (prices.py)
 ├── SettingsError         a SPEND_GUARD_* value that does not parse (settings.py)
 └── RecoveryError         a `store recover` seed or log line to fix (commands/recover.py)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from starlette.responses import Response


class SpendGuardError(Exception):
    """Base class of every error the proxy raises on purpose."""


class PolicyError(SpendGuardError):
    """One or more policy problems, each naming file, location and value."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class StoreError(SpendGuardError):
    """The store did not answer; the guard fails closed or open by `on_store_error`."""


class StoreScriptError(StoreError):
    """Redis ran the operation and refused it: a fault of this one call, not an outage."""


class StoreAuthError(StoreError):
    """The store refused this proxy's credentials: a wrong password is a setup error to fix, not
    an outage to wait out (calls get 503 the same)."""


class HoldQuarantined(SpendGuardError):
    """A hold's record could not be read; the store moved it to its quarantine hash."""

    def __init__(self, hold_id: str) -> None:
        super().__init__(f"hold {hold_id} was unreadable and has been quarantined")
        self.hold_id = hold_id


class StartupRefused(SpendGuardError):
    """The proxy found at start that it must not serve (the store counts its account under another
    name): the message is the one line the log shows."""


class Rejected(SpendGuardError):
    """A refusal rendered as the error envelope (`render_envelope`) with `status`."""

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        scope: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.scope = scope
        self.headers = dict(headers or {})

    def response(self, extra_headers: Mapping[str, str] | None = None) -> Response:
        headers = dict(self.headers)
        if self.scope is not None:
            headers["X-Spend-Guard-Scope"] = self.scope
        if extra_headers:
            headers.update(extra_headers)
        return error_response(self.status, self.error_type, self.message, headers)


class UpstreamError(Rejected):
    """ImageRouter could not be reached (502) or did not answer in time (504)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, "upstream_error", message)


class UpstreamNotSent(UpstreamError):
    """The connection to ImageRouter never opened: the call cannot have been billed."""


class UpstreamBroken(Exception):
    """Raised after the response started, so the server aborts the client's connection."""


def render_envelope(error_type: str, message: str) -> bytes:
    """ImageRouter's error envelope, `{"error": {"message": ..., "type": ...}}`, as the JSON bytes
    a client receives: every error the proxy answers itself is spelled here."""
    return json.dumps({"error": {"message": message, "type": error_type}}).encode()


def error_response(status: int, error_type: str, message: str, headers: Mapping[str, str] | None = None) -> Response:
    body = render_envelope(error_type, message)
    return Response(body, status_code=status, headers=dict(headers or {}), media_type="application/json")
