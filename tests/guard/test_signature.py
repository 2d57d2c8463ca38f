"""The price signature of a call, read as ImageRouter's validators read its fields."""

from __future__ import annotations

import json

import pytest

from proxy.guard.signature import INVALID, signature_of
from proxy.http.body import PriceFields, read_price_fields


def sig(kind: str = "image", body: dict | None = None, images: int = 0, stamp: str = "s1"):
    fields = read_price_fields(json.dumps({"model": "m", **(body or {})}).encode(), "application/json")
    if images:
        fields = PriceFields(**{**fields.__dict__, "input_images": images})
    return signature_of(kind, "m", fields, stamp)


@pytest.mark.parametrize(
    ("body", "quality"),
    [({}, "auto"), ({"quality": "auto"}, "auto"), ({"quality": "high"}, "high"), ({"quality": "HIGH"}, INVALID)],
)
def test_quality_is_the_validators_enum_and_absent_is_auto(body, quality):
    assert sig(body=body).quality == quality


@pytest.mark.parametrize(
    ("size", "read"),
    [
        (None, "auto"),
        ("auto", "auto"),
        ("1024x1024", "1024x1024"),
        ("1024X1024", "1024X1024"),  # a price function compares the string: not merged
        ("1024×1024", "1024×1024"),
        (" 1024x1024", INVALID),  # the validator's pattern has no spaces
        ("1024 x 1024", INVALID),
        ("large", INVALID),
        ("9" * 70 + "x1", INVALID),  # longer than the reader keeps: never taken for another size
    ],
)
def test_size_is_kept_as_sent_when_the_validator_accepts_it(size, read):
    assert sig(body={} if size is None else {"size": size}).size == read


@pytest.mark.parametrize(
    ("seconds", "read"),
    [(None, "auto"), ("auto", "auto"), (8, "8"), ("8", "8"), (8.0, "8"), ("0x8", "8"), (7.5, "7.5"), (0, INVALID)],
)
def test_video_seconds_are_numbers_as_zod_coerces_them(seconds, read):
    body = {} if seconds is None else {"seconds": seconds}
    assert sig("video", body).seconds == read
    assert sig("video", {"seconds": 61}).seconds == INVALID


def test_an_image_route_never_reads_seconds_and_a_video_uses_one_input_image():
    assert sig("image", {"seconds": 8}) == sig("image", {"seconds": 4})
    assert sig("video", images=3).input_images == 1 and sig("image", images=3).input_images == 3


def test_the_same_call_has_one_signature_and_a_new_price_stamp_another():
    assert sig(body={"quality": "low"}).digest == sig(body={"quality": "low"}).digest
    assert sig(body={"quality": "low"}).digest != sig(body={"quality": "medium"}).digest
    assert sig(stamp="s1").digest != sig(stamp="s2").digest
    assert signature_of("text", "m", PriceFields("m"), "s1") is None
