"""The tests' ImageRouter stand-in: the one imitation the demo serves too, proxy/standin/.

Tests import it from here (`from tests.standin import StandIn, key_row`); its behaviours, the
`X-Standin` header and the ledger are documented in `proxy/standin/__init__.py`.
"""

from __future__ import annotations

from proxy.standin import (
    DEFAULT_ACCOUNT_KEY,
    DEFAULT_BALANCE_MICROS,
    GENERATION_ROUTES,
    IMAGE_ROUTES,
    TEXT_ROUTES,
    Plan,
    Recorded,
    StandIn,
    StandinError,
    b64_text,
    default_models,
    fingerprint,
    format_usd,
    key_row,
)

__all__ = [
    "DEFAULT_ACCOUNT_KEY",
    "DEFAULT_BALANCE_MICROS",
    "GENERATION_ROUTES",
    "IMAGE_ROUTES",
    "TEXT_ROUTES",
    "Plan",
    "Recorded",
    "StandIn",
    "StandinError",
    "b64_text",
    "default_models",
    "fingerprint",
    "format_usd",
    "key_row",
]
