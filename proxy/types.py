"""Shared aliases and the one seam everything time-dependent goes through: the clock."""

from __future__ import annotations

import time
from typing import Literal, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "ASGIApp", "Message", "Receive", "Scope", "Send", "Clock", "SystemClock", "Period", "Micros", "RouteKind",
]

Micros = int
Period = Literal["day", "week", "month"]


class Clock(Protocol):
    """Wall-clock time in seconds since the epoch (UTC). Injected so tests can stand on a boundary."""

    def __call__(self) -> float: ...


class SystemClock:
    def __call__(self) -> float:
        return time.time()

RouteKind = Literal["image", "video", "text"]
