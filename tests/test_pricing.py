"""The price table from `/v2/models`: both shapes, aliases, holds rounded up like ImageRouter does."""

from __future__ import annotations

import json

import pytest

from proxy.pricing import PriceTable, PriceTableError, parse_models
from tests.standin import default_models


def doc(value: object) -> bytes:
    return json.dumps(value).encode()


def test_object_form_keyed_by_id():
    table = parse_models(doc(default_models()), 1234)
    assert table.hold_for("openai/gpt-image-1") == 300_000
    assert table.hold_for("google/veo-3.1") == 3_200_000
    assert table.hold_for("google/gemini-2.5-flash") == 39_000
    assert table.hold_for("test/test") == 0
    assert table.fetched_at_ms == 1234 and table.loaded


def test_array_form_gives_the_same_table():
    models = default_models()
    as_object = parse_models(doc(models), 1)
    as_array = parse_models(doc(list(models.values())), 1)
    assert dict(as_array.holds) == dict(as_object.holds)
    assert dict(as_array.aliases) == dict(as_object.aliases)


def test_data_wrapper_is_unwrapped():
    table = parse_models(doc({"data": list(default_models().values())}), 1)
    assert table.hold_for("openai/gpt-image-1") == 300_000


def test_array_entries_without_a_string_id_are_ignored():
    table = parse_models(doc([{"price": {"max": 1}}, {"id": 7, "price": {"max": 1}}, "x", {"id": "a/b", "price": {"max": 0.5}}]), 1)
    assert dict(table.holds) == {"a/b": 500_000}


def test_aliases_resolve_to_the_model_and_its_hold():
    table = parse_models(doc(default_models()), 1)
    assert table.resolve("gemini-2.5-flash-image") == "google/gemini-2.5-flash"
    assert table.hold_for("gemini-2.5-flash-image") == 39_000
    assert table.resolve("openai/gpt-image-1") == "openai/gpt-image-1"
    assert table.hold_for("no/such-model") is None


def test_an_alias_equal_to_its_own_id_and_non_string_aliases_are_ignored():
    models = {"a/b": {"id": "a/b", "price": {"max": 1}, "aliases": ["a/b", 5, None, "ab"]}}
    assert dict(parse_models(doc(models), 1).aliases) == {"ab": "a/b"}


def test_hold_is_the_max_price_rounded_up_to_a_ten_thousandth():
    models = {
        "m/a": {"price": {"min": 0.001, "average": 0.002, "max": 0.00011}},
        "m/b": {"price": {"max": 1.23456}},
        "m/c": {"price": {"max": "0.25"}},
    }
    table = parse_models(doc(models), 1)
    assert table.hold_for("m/a") == 200
    assert table.hold_for("m/b") == 1_234_600
    assert table.hold_for("m/c") == 250_000


def test_max_is_preferred_over_value_and_average():
    models = {
        "m/max": {"price": {"average": 5, "max": 1, "value": 3}},
        "m/value": {"price": {"average": 5, "value": 3}},
        "m/avg": {"price": {"average": 5}},
        "m/flat": {"price": 2},
    }
    table = parse_models(doc(models), 1)
    assert table.hold_for("m/max") == 1_000_000
    assert table.hold_for("m/value") == 3_000_000
    assert table.hold_for("m/avg") == 5_000_000
    assert table.hold_for("m/flat") == 2_000_000


def test_float_artefact_of_imagerouter_is_mirrored():
    # ImageRouter charges Math.ceil(0.07 * 10000) = 701 ticks: hold $0.0701, not $0.0700.
    models = {"m/seven": {"price": {"max": 0.07}}, "m/thirty-five": {"price": {"max": 0.035}}, "m/exact": {"price": {"max": 0.3}}}
    table = parse_models(doc(models), 1)
    assert table.hold_for("m/seven") == 70_100
    assert table.hold_for("m/thirty-five") == 35_100
    assert table.hold_for("m/exact") == 300_000


@pytest.mark.parametrize(
    "price",
    [None, {}, {"max": None}, {"max": "abc"}, {"max": -1}, {"max": "1e3"}, {"max": [1]}, {"max": {"usd": 1}}, {"max": 10**10}, "free"],
)
def test_missing_or_malformed_price_is_left_out(price):
    models = {"good/one": {"price": {"max": 0.5}}, "bad/one": {"price": price} if price is not None else {}}
    table = parse_models(doc(models), 1)
    assert table.hold_for("bad/one") is None
    assert table.hold_for("good/one") == 500_000


def test_boolean_max_is_skipped_for_the_next_candidate():
    table = parse_models(doc({"m/x": {"price": {"max": True, "value": 0.2}}}), 1)
    assert table.hold_for("m/x") == 200_000


def test_non_object_entries_are_skipped():
    table = parse_models(doc({"m/list": [1, 2], "m/ok": {"price": {"max": 1}}}), 1)
    assert dict(table.holds) == {"m/ok": 1_000_000}


@pytest.mark.parametrize(
    "document",
    [b"{}", b"[]", b'{"data": []}', doc({"m/x": {"price": {"max": "abc"}}}), doc([{"id": "m/x"}])],
)
def test_no_priced_model_is_an_error(document):
    with pytest.raises(PriceTableError, match="no priced model"):
        parse_models(document, 1)


@pytest.mark.parametrize("document", [b"not json", b"", b"\xff\xfe", b'"a string"', b"42", b"null"])
def test_not_a_models_document_is_an_error(document):
    with pytest.raises(PriceTableError):
        parse_models(document, 1)


def test_price_table_json_round_trip():
    table = parse_models(doc(default_models()), 99)
    again = PriceTable.from_json(table.to_json())
    assert dict(again.holds) == dict(table.holds)
    assert dict(again.aliases) == dict(table.aliases)
    assert again.fetched_at_ms == 99
    assert PriceTable.from_json(table.to_json().encode()).hold_for("gemini-2.5-flash-image") == 39_000


def test_empty_table_is_not_loaded():
    assert not PriceTable().loaded
    assert PriceTable().hold_for("anything") is None
