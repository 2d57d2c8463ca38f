"""Shared aliases and the one seam everything time-dependent goes through: the clock."""

from __future__ import annotations

import time
from typing import Literal, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "ASGIApp", "Message", "Receive", "Scope", "Send", "Clock", "SystemClock", "StoreClock", "Period", "Micros",
    "RouteKind",
]

Micros = int
Period = Literal["day", "week", "month"]


class Clock(Protocol):
    """Wall-clock time in seconds since the epoch (UTC). Injected so tests can stand on a boundary."""

    def __call__(self) -> float: ...


class SystemClock:
    def __call__(self) -> float:
        return time.time()


class StoreClock:
    """This machine's clock corrected by its offset to the store's (Redis `TIME`), so that every
    instance judges windows, leases, snapshot stamps and staleness on one time source: a skewed
    instance can neither freeze the snapshot, reclaim another's live hold, nor refuse correct
    calls. The offset is measured by `sync` (each refresh round) and starts at 0."""

    # A sample whose round trip took longer than this says too little about the offset.
    MAX_SAMPLE_RTT_S = 0.5

    def __init__(self, base: Clock | None = None) -> None:
        self.base: Clock = base or SystemClock()
        self.offset_s = 0.0
        self.synced = False

    def __call__(self) -> float:
        return self.base() + self.offset_s

    def update(self, before_s: float, store_s: float, after_s: float) -> None:
        """One sample: the store said `store_s` between our `before_s` and `after_s`."""
        if after_s - before_s <= self.MAX_SAMPLE_RTT_S:
            self.offset_s = store_s - (before_s + after_s) / 2
            self.synced = True

RouteKind = Literal["image", "video", "text"]
