"""The price signature of an image or video call: what can change what ImageRouter charges for it.

Two calls with one signature are priced alike by ImageRouter, so the cost one of them was charged
says what the other will be (proxy/guard/observed.py learns it). The fields are read as
ImageRouter's validators read them (its zod schemas for images and videos):

- `quality`: `auto`, `low`, `medium` or `high`; absent is `auto`. Anything else is refused
  upstream (400, nothing charged) and reads `invalid`.
- `size`: `auto` (also when absent), or the string as sent when it is digits, one of `x X × *`
  and digits (a price function compares the string itself: `1024X1024` is not `1024x1024` to
  it); anything else reads `invalid`.
- `seconds` (video only; image routes never read it): `auto` when absent or `auto`, else the
  number `Number()` makes of it when it lies between 1 and 60 (`"8"`, `8`, `8.0` and `"0x8"` are
  all 8), else `invalid`.
- input images: the image files of a multipart body; a video call uses only the first.

The model is the id the call runs (aliases resolved), and its `stamp`: a digest of what
`/v2/models` publishes for its price, so a price change starts every signature of the model
afresh.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

from proxy.http.body import PriceFields

QUALITIES = frozenset({"auto", "low", "medium", "high"})
INVALID = "invalid"
_SIZE_FIELD = re.compile(r"[0-9]+[xX×*][0-9]+")  # the validators' rule: no spaces, ASCII digits
# PriceFields keeps at most this many characters of a field: a longer size may have been cut.
FIELD_CHARS = 64
MIN_SECONDS, MAX_SECONDS = 1, 60
SIGNED_KINDS = frozenset({"image", "video"})


@dataclass(frozen=True, slots=True)
class Signature:
    """One price signature: `text` names it (readable, bounded), `digest` keys it in the store."""

    kind: str
    model: str
    quality: str
    size: str
    seconds: str
    input_images: int
    stamp: str

    @property
    def text(self) -> str:
        return (
            f"{self.kind} {self.model} quality={self.quality} size={self.size} seconds={self.seconds} "
            f"images={self.input_images} price={self.stamp}"
        )

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:32]

    def as_json(self) -> dict[str, str | int]:
        return {
            "kind": self.kind,
            "model": self.model,
            "quality": self.quality,
            "size": self.size,
            "seconds": self.seconds,
            "input_images": self.input_images,
        }


def signature_of(kind: str, model: str, fields: PriceFields, stamp: str) -> Signature | None:
    """The signature of a call of route kind `kind` to `model` (resolved) with `fields`; None on
    a route kind that has none (text calls are priced from tokens)."""
    if kind not in SIGNED_KINDS:
        return None
    images = fields.input_images if kind == "image" else min(1, fields.input_images)
    return Signature(
        kind,
        model,
        quality_of(fields.quality),
        size_of(fields.size),
        seconds_of(fields.seconds, fields.seconds_number) if kind == "video" else "-",
        images,
        stamp,
    )


def quality_of(quality: str | None) -> str:
    if quality is None:
        return "auto"
    return quality if quality in QUALITIES else INVALID


def size_of(size: str | None) -> str:
    if size is None or size == "auto":
        return "auto"
    if len(size) >= FIELD_CHARS or not _SIZE_FIELD.fullmatch(size):
        return INVALID
    return size


def seconds_of(seconds: str | None, number: float | None) -> str:
    """`seconds` as zod's `'auto' | coerce.number().min(1).max(60)` leaves it, spelled as
    JavaScript prints the number (`8`, `7.5`)."""
    if seconds is None or seconds == "auto":
        return "auto"
    if number is None or not math.isfinite(number) or not MIN_SECONDS <= number <= MAX_SECONDS:
        return INVALID
    return str(int(number)) if number.is_integer() else repr(number)
