"""The learned table of observed holds: per price signature, the highest cost ImageRouter charged
in a recent window and how many calls it has seen (docs/how-it-works.md#observed-holds).

Each signature is a hash of its own (`Keys.learned`) holding per-bucket maxima and counts, and
the index (`Keys.learned_index`) bounds how many signatures are kept at once. A write is
`lua/observe.lua`; a read is one HGETALL, summed here by the same rule the script uses: only the
buckets of the current window, counted in the current bucket width.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# A window is counted in this many buckets: the highest cost is looked for over the last
# `window` less up to one bucket (an eighth) of it.
BUCKETS = 8


@dataclass(frozen=True, slots=True)
class Window:
    """How far back a learned value looks, in whole buckets of `bucket_ms`."""

    bucket_ms: int

    @classmethod
    def of_days(cls, days: float) -> Window:
        return cls(max(1, -(-int(days * 86_400_000) // BUCKETS)))

    def current(self, now_ms: int) -> int:
        return now_ms // self.bucket_ms

    def oldest(self, now_ms: int) -> int:
        return self.current(now_ms) - BUCKETS + 1

    @property
    def span_ms(self) -> int:
        return self.bucket_ms * BUCKETS


@dataclass(frozen=True, slots=True)
class Learned:
    """What one signature has been charged within the window: the highest cost and how many calls
    settled with a cost. `full`: the table had no room for a new signature (nothing recorded)."""

    highest_micros: int = 0
    count: int = 0
    full: bool = False


NOTHING = Learned()


def learned_of(raw: Mapping[bytes | str, bytes | str], window: Window, now_ms: int) -> Learned:
    """A signature's hash as HGETALL returns it, summed over the current window."""
    fields = {_text(name): _text(value) for name, value in raw.items()}
    if fields.get("w") != str(window.bucket_ms):
        return NOTHING
    oldest = window.oldest(now_ms)
    highest = count = 0
    for name, value in fields.items():
        kind, _, bucket = name.partition(":")
        if kind not in ("m", "n") or not bucket.lstrip("-").isdigit() or int(bucket) < oldest:
            continue
        if kind == "m":
            highest = max(highest, int(value))
        else:
            count += int(value)
    return Learned(highest, count)


def observe_args(
    window: Window, now_ms: int, cost_micros: int, max_signatures: int, digest: str, text: str
) -> list[str | int]:
    """observe.lua's ARGV (its header names each)."""
    return [
        str(now_ms),
        str(window.bucket_ms),
        str(window.current(now_ms)),
        str(window.oldest(now_ms)),
        str(now_ms - window.span_ms),
        str(window.span_ms + window.bucket_ms),
        str(cost_micros),
        str(max_signatures),
        digest,
        text,
    ]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
