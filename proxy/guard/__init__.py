"""Deciding one spending call: classify it, identify the caller, read and price the request,
collect verdicts, reserve the hold, then relay the call upstream and settle it.
"""

from __future__ import annotations

from proxy.guard.guard import Guard

__all__ = ["Guard"]
