"""The latest refusals of this process, for `/-/status` (docs/status-page.md).

A small ring in memory, fed where the guard refuses: bounded, so a flood of refused calls costs a
fixed amount of memory, and per process (a status page shows the instance that answered it). Only
what a refusal already tells its client is kept: key name (never the secret), scope, status, type
and message.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass
from typing import Any

from proxy.windows import format_ms

MAX_RECENT_REFUSALS = 50


@dataclass(frozen=True, slots=True)
class RecentRefusal:
    """One refusal as its client was told it (the status page lists these); not the store's
    `ScopeRefusal`, which is what reserve.lua answers before the guard words a refusal."""

    at_s: float
    key: str
    scope: str
    status: int
    error_type: str
    message: str
    request_id: str

    def as_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["at"] = format_ms(int(body.pop("at_s") * 1000))
        return body


class RecentRefusals:
    """The last `size` refusals, newest first when read."""

    def __init__(self, size: int = MAX_RECENT_REFUSALS) -> None:
        self.ring: collections.deque[RecentRefusal] = collections.deque(maxlen=size)
        self.count = 0  # since start, for "N refused, latest shown"

    def add(self, refusal: RecentRefusal) -> None:
        self.ring.append(refusal)
        self.count += 1

    def latest(self) -> list[RecentRefusal]:
        return list(reversed(self.ring))
