"""Deadlines for the hot path, at a fraction of `asyncio.timeout`'s cost.

`asyncio.timeout` arms a loop timer on entry and cancels it on exit (~4.6 us under uvloop); a
guarded call used four of them (body, reserve, settle, the response) and an unguarded one two,
which cost the proxy 10-20 % of its throughput. Here one timer per event loop sweeps every
`RESOLUTION_S` while any deadline is open and cancels the tasks whose deadline has passed, so
entering and leaving a deadline is a dict insert and a pop. A deadline fires up to
`RESOLUTION_S` late, which the timeouts it serves (bodies, store operations, upstream calls:
seconds) do not notice.

    async with deadline_at(loop.time() + 2.0):   # or deadline(2.0)
        ...                                       # TimeoutError once it has passed

The semantics are `asyncio.timeout`'s: the task is cancelled, and the CancelledError becomes
TimeoutError at the block's exit; a cancellation from elsewhere passes through untouched.
`watch(entry, when)` puts any object with an `expire()` method under the same sweep (the
server's request-head deadlines, proxy/http/protocol.py).
"""

from __future__ import annotations

import asyncio
import weakref
from types import TracebackType
from typing import Protocol

RESOLUTION_S = 0.1


class _Sweeper:
    """The open deadlines of one event loop, checked every RESOLUTION_S while there are any."""

    __slots__ = ("loop", "open", "handle", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.open: dict[Expiring, float] = {}  # entry -> when
        self.handle: asyncio.TimerHandle | None = None

    def add(self, entry: Expiring, when: float) -> None:
        self.open[entry] = when
        if self.handle is None:
            self.handle = self.loop.call_later(RESOLUTION_S, self.sweep)

    def sweep(self) -> None:
        self.handle = None
        now = self.loop.time()
        for entry in [e for e, when in self.open.items() if when <= now]:
            del self.open[entry]
            entry.expire()
        if self.open:
            self.handle = self.loop.call_later(RESOLUTION_S, self.sweep)


_SWEEPERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Sweeper] = weakref.WeakKeyDictionary()
_last: _Sweeper | None = None


class Expiring(Protocol):
    def expire(self) -> None: ...


def watch(entry: Expiring, when: float, loop: asyncio.AbstractEventLoop) -> None:
    """Call `entry.expire()` once `loop`'s clock passes `when` (up to RESOLUTION_S late), unless
    `unwatch(entry, loop)` comes first."""
    _sweeper(loop).add(entry, when)


def unwatch(entry: Expiring, loop: asyncio.AbstractEventLoop) -> None:
    _sweeper(loop).open.pop(entry, None)


def _sweeper(loop: asyncio.AbstractEventLoop) -> _Sweeper:
    global _last
    if _last is not None and _last.loop is loop:
        return _last  # a process serves from one loop: skip the weak dictionary's lookup
    found = _SWEEPERS.get(loop)
    if found is None:
        found = _SWEEPERS[loop] = _Sweeper(loop)
    _last = found
    return found


class Deadline:
    """An async context manager: the block is cancelled once the loop's clock passes `when`."""

    __slots__ = ("when", "task", "expired", "sweeper", "cancelling")

    def __init__(self, when: float | None) -> None:
        self.when = when
        self.expired = False

    async def __aenter__(self) -> Deadline:
        if self.when is not None:
            task = asyncio.current_task()
            if task is None:
                raise RuntimeError("a deadline must be used inside a task")
            self.task = task
            self.cancelling = task.cancelling()
            self.sweeper = _sweeper(asyncio.get_running_loop())
            self.sweeper.add(self, self.when)
        return self

    def expire(self) -> None:
        self.expired = True
        self.task.cancel()

    def fire(self) -> None:
        """End the block now, as if its deadline had passed (TimeoutError at its exit)."""
        if self.when is not None and not self.expired:
            self.sweeper.open.pop(self, None)
            self.expire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.when is None:
            return
        if not self.expired:
            self.sweeper.open.pop(self, None)
            return
        # Ours fired: take our cancellation back; if it is what ended the block, it is a timeout.
        if self.task.uncancel() <= self.cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc


def deadline_at(when: float | None) -> Deadline:
    """A deadline at `when` on the running loop's clock (None: none)."""
    return Deadline(when)


def deadline(delay_s: float | None) -> Deadline:
    """A deadline `delay_s` from now (None: none)."""
    return Deadline(None if delay_s is None else asyncio.get_running_loop().time() + delay_s)
