"""Shared aliases (the periods, the route kinds) and the one seam everything time-dependent goes
through: the clock."""

from __future__ import annotations

import time
from typing import Literal, Protocol, TypeGuard, get_args

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "ASGIApp",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "Clock",
    "SystemClock",
    "StoreClock",
    "Micros",
    "Period",
    "PERIODS",
    "is_period",
    "as_period",
    "RouteKind",
    "ROUTE_KINDS",
]

Micros = int

# A spend-limit window, as ImageRouter resets them (proxy/windows.py). Where a period is optional,
# None is a lifetime limit; policies and the reserve script's scopes spell that "lifetime".
Period = Literal["day", "week", "month"]
PERIODS: tuple[Period, ...] = get_args(Period)

# What a spending route bills: an image, a video or tokens of text (docs/how-it-works.md).
RouteKind = Literal["image", "video", "text"]
ROUTE_KINDS: tuple[RouteKind, ...] = get_args(RouteKind)


def is_period(value: object) -> TypeGuard[Period]:
    """Whether `value` names a period ("lifetime" and None do not)."""
    return isinstance(value, str) and value in PERIODS


def as_period(value: str | None) -> Period | None:
    """`value` as a period; None (a lifetime) for None, "lifetime" or anything else."""
    return value if is_period(value) else None


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
