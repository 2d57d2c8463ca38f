"""The exit statuses of `spend-guard`'s commands (docs/operations.md)."""

from __future__ import annotations

STARTUP_FAILURE = 3
NOTHING_DONE = 1  # `store recover` on a store that lost nothing
POLICY_INVALID = 2
