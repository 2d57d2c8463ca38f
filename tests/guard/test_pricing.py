"""The price table from `/v2/models`: both shapes, aliases, holds rounded up like ImageRouter does;
and the hold of a call as a pure function (text holds from token rates, docs/text-holds.md)."""

from __future__ import annotations

import json
from decimal import Decimal
from fractions import Fraction
from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.guard.pricing import (
    INPUT_FRAMING_TOKENS,
    Quote,
    TextBound,
    glob_specificity,
    quote_hold,
    text_api,
    text_rate_for,
)
from proxy.http.body import PriceFields
from proxy.policy.model import ModelsPolicy, TextRate
from proxy.prices import IMAGEROUTER_ALIASES, PriceTable, PriceTableError, parse_models
from tests.support.standin import default_models


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
    table = parse_models(
        doc([{"price": {"max": 1}}, {"id": 7, "price": {"max": 1}}, "x", {"id": "a/b", "price": {"max": 0.5}}]), 1
    )
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
    models = {
        "m/seven": {"price": {"max": 0.07}},
        "m/thirty-five": {"price": {"max": 0.035}},
        "m/exact": {"price": {"max": 0.3}},
    }
    table = parse_models(doc(models), 1)
    assert table.hold_for("m/seven") == 70_100
    assert table.hold_for("m/thirty-five") == 35_100
    assert table.hold_for("m/exact") == 300_000


@pytest.mark.parametrize(
    "price",
    [
        None,
        {},
        {"max": None},
        {"max": "abc"},
        {"max": -1},
        {"max": "1e3"},
        {"max": [1]},
        {"max": {"usd": 1}},
        {"max": 10**10},
        "free",
    ],
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


# --- holds (docs/text-holds.md): a pure function of route, fields, price table and policy -------

GPT4O = TextRate("openai/gpt-4o*", 2_500_000, 10_000_000, 16384)
ANY = TextRate("*", 15_000_000, 75_000_000, 8192)
RATES = ModelsPolicy(text_rates=(ANY, GPT4O), text_hold_micros=50_000, default_hold_micros=500_000)
CHAT, RESPONSES = "/v1/openai/chat/completions", "/v1/openai/responses"
TABLE = parse_models(doc(default_models()), 1)


def quote(
    fields: PriceFields, route: str = CHAT, models: ModelsPolicy = RATES, kind: str = "text", table: PriceTable = TABLE
):
    return quote_hold(kind, route, fields, fields.model, table, models)


def usd_hold(input_tokens: int, output_tokens: int, input_usd: str, output_usd: str) -> int:
    """The text hold formula in decimal dollars: rounded up to $0.0001, as micro-dollars."""
    usd = (input_tokens * Decimal(input_usd) + output_tokens * Decimal(output_usd)) / 1_000_000
    return int((usd * 10_000).to_integral_value(rounding="ROUND_CEILING")) * 100


def test_text_hold_is_input_bound_times_input_rate_plus_output_bound_times_output_rate():
    fields = PriceFields("openai/gpt-4o", max_tokens=1000, input_bytes=976)
    q = quote(fields)
    assert (q.basis, q.rate, q.bound) == ("text_rate", GPT4O, TextBound(976 + INPUT_FRAMING_TOKENS, 1000))
    # 2,000 input tokens x $2.50/M + 1,000 output tokens x $10/M = $0.005 + $0.010
    assert q.micros == 15_000 == usd_hold(2000, 1000, "2.50", "10.00")


def test_text_hold_is_rounded_up_to_a_ten_thousandth():
    q = quote(PriceFields("openai/gpt-4o", max_tokens=1000, input_bytes=977))  # $0.0150025
    assert q.micros == 15_100 == usd_hold(2001, 1000, "2.50", "10.00")


def test_no_max_in_the_body_falls_back_to_the_rates_max_output_tokens():
    q = quote(PriceFields("openai/gpt-4o-mini", input_bytes=0))
    assert q.bound == TextBound(INPUT_FRAMING_TOKENS, 16384)
    assert q.micros == usd_hold(INPUT_FRAMING_TOKENS, 16384, "2.50", "10.00") == 166_400


def test_n_multiplies_the_output_bound():
    one = quote(PriceFields("openai/gpt-4o", max_tokens=500)).bound
    three = quote(PriceFields("openai/gpt-4o", max_tokens=500, n=3)).bound
    assert one is not None and three is not None
    assert three.output_tokens == 3 * one.output_tokens == 1500 and three.input_tokens == one.input_tokens
    assert quote(PriceFields("openai/gpt-4o", n=2)).bound == TextBound(INPUT_FRAMING_TOKENS, 2 * 16384)


def test_a_reasoning_budget_adds_to_each_choices_output_bound():
    assert quote(PriceFields("m", max_tokens=1, reasoning_tokens=32_000)).bound == TextBound(
        INPUT_FRAMING_TOKENS, 32_001
    )
    # Without a maximum, on top of the rate's; on a responses call too; and for every choice.
    assert quote(PriceFields("m", reasoning_tokens=1000)).bound == TextBound(INPUT_FRAMING_TOKENS, 9192)
    assert quote(PriceFields("m", max_output_tokens=10, reasoning_tokens=90), RESPONSES).bound == TextBound(
        INPUT_FRAMING_TOKENS, 100
    )
    assert quote(PriceFields("m", max_tokens=10, reasoning_tokens=90, n=3)).bound == TextBound(
        INPUT_FRAMING_TOKENS, 300
    )


def test_chat_takes_the_larger_of_max_tokens_and_max_completion_tokens():
    assert quote(PriceFields("m", max_completion_tokens=300)).bound == TextBound(INPUT_FRAMING_TOKENS, 300)
    assert quote(PriceFields("m", max_tokens=200, max_completion_tokens=300)).bound == TextBound(
        INPUT_FRAMING_TOKENS, 300
    )
    assert quote(PriceFields("m", max_tokens=400, max_completion_tokens=300)).bound == TextBound(
        INPUT_FRAMING_TOKENS, 400
    )
    # max_output_tokens is the Responses API's field: a chat call does not stop at it.
    assert quote(PriceFields("m", max_output_tokens=10)).bound == TextBound(INPUT_FRAMING_TOKENS, 8192)


def test_responses_reads_max_output_tokens_only():
    assert quote(PriceFields("m", max_output_tokens=700), RESPONSES).bound == TextBound(INPUT_FRAMING_TOKENS, 700)
    # max_tokens and max_completion_tokens are chat fields: a responses call runs to the model's maximum.
    assert quote(PriceFields("m", max_tokens=10, max_completion_tokens=10), RESPONSES).bound == TextBound(
        INPUT_FRAMING_TOKENS, 8192
    )


def test_a_text_route_of_neither_api_holds_the_rates_maximum():
    for fields in (PriceFields("m", max_tokens=10), PriceFields("m", max_output_tokens=10)):
        assert quote(fields, "/v1/openai/custom").bound == TextBound(INPUT_FRAMING_TOKENS, 8192)
    assert [text_api(r) for r in (CHAT, RESPONSES, "/v1/openai/custom")] == ["chat", "responses", "other"]


def test_media_parts_count_the_configured_tokens_each():
    models = ModelsPolicy(text_rates=(GPT4O,), text_media_input_tokens=3000)
    q = quote(PriceFields("openai/gpt-4o", max_tokens=1, input_bytes=100, media_parts=2), models=models)
    assert q.bound == TextBound(100 + 2 * 3000 + INPUT_FRAMING_TOKENS, 1)


def test_a_text_model_matching_no_rate_holds_text_hold_usd():
    models = ModelsPolicy(text_rates=(GPT4O,), text_hold_micros=70_000)
    q = quote(PriceFields("anthropic/claude-sonnet-4", max_tokens=10**6), models=models)
    assert (q.micros, q.basis, q.unpriced) == (70_000, "text_default", True)
    assert quote(PriceFields("openai/gpt-4o"), models=ModelsPolicy()).basis == "text_default"


def test_an_override_wins_over_a_text_rate():
    models = ModelsPolicy(text_rates=(GPT4O,), overrides=MappingProxyType({"openai/gpt-4o": 1_000}))
    assert quote(PriceFields("openai/gpt-4o", max_tokens=10**6), models=models) == Quote(1_000, "override")


def test_image_and_video_holds_are_the_models_price_max():
    assert quote(PriceFields("openai/gpt-image-1", max_tokens=5), kind="image") == Quote(300_000, "price")
    assert quote(PriceFields("openai/gpt-image-1"), kind="image", table=PriceTable()) == Quote(None, "no_table")
    # A text call needs no price table: its rates are the policy's.
    assert quote(PriceFields("openai/gpt-4o", max_tokens=1), table=PriceTable()).basis == "text_rate"


def test_an_unlisted_model_holds_the_dearest_price_of_its_route_kind_and_at_least_the_default():
    # An earlier release held default_hold_usd ($0.50) whatever the model might run.
    assert quote(PriceFields("no/such-model"), kind="video") == Quote(3_200_000, "unlisted")  # google/veo-3.1
    assert quote(PriceFields("no/such-model"), kind="image") == Quote(500_000, "unlisted")  # the default is more
    cheap = ModelsPolicy(default_hold_micros=1)
    assert quote(PriceFields("no/such-model"), kind="image", models=cheap) == Quote(300_000, "unlisted")
    assert quote(PriceFields("no/such-model"), kind="video").unpriced


def test_imagerouters_unpublished_aliases_resolve_to_what_they_run():
    for alias, target in IMAGEROUTER_ALIASES.items():
        assert TABLE.resolve(alias) == target
    assert TABLE.resolve("kwaivgi/kling-2.1-master") == "kling/kling-2.1-master"
    assert quote(PriceFields("kwaivgi/kling-2.1-master"), kind="video") == Quote(2_800_000, "price")
    # Even before a price table loads, so allow and deny rules see the model it runs.
    assert PriceTable().resolve("gemini-3-pro-image") == "google/gemini-3-pro"
    # An alias /v2/models publishes wins; a listed name that is also an alias holds the dearer price.
    assert PriceTable(aliases={"gemini-3-pro-image": "x/y"}).resolve("gemini-3-pro-image") == "x/y"
    table = PriceTable({"kwaivgi/wan-2.6": 5, "wan/wan-2.6": 9}, fetched_at_ms=1)
    assert table.hold_for("kwaivgi/wan-2.6") == 9 and table.hold_for("wan/wan-2.6") == 9
    assert table.hold_for("google/gemini-3-pro-image") is None


def test_a_model_goes_by_its_own_id_its_target_and_every_alias_of_that():
    table = PriceTable(aliases={"flash": "google/gemini-2.5-flash"}, fetched_at_ms=1)
    names = {"google/gemini-2.5-flash", "flash", "gemini-2.5-flash-image", "google/gemini-2.5-flash-image"}
    assert table.names_of("google/gemini-2.5-flash") == names
    assert table.names_of("flash") == names == table.names_of("gemini-2.5-flash-image")
    assert table.names_of("kwaivgi/kling-2.1-master") == {"kwaivgi/kling-2.1-master", "kling/kling-2.1-master"}
    assert table.names_of("vendor/unknown") == {"vendor/unknown"}


def test_the_dearest_price_is_kept_per_kind_of_output():
    models = {
        "a/img": {"price": {"max": 0.2}, "output": ["image"]},
        "b/vid": {"price": {"max": 1.0}, "output": ["video"]},
        "c/both": {"price": {"max": 0.5}, "output": ["image", "video"]},
        "d/unsaid": {"price": {"max": 0.7}},  # says nothing of its output: counts for every kind
        "e/unpriced": {"price": {}, "output": ["video"], "aliases": ["e"]},
    }
    table = parse_models(doc(models), 1)
    assert dict(table.dearest) == {"image": 700_000, "video": 1_000_000}
    assert (table.dearest_for("image"), table.dearest_for("video"), table.dearest_for("audio")) == (
        700_000,
        1_000_000,
        1_000_000,
    )
    again = PriceTable.from_json(table.to_json())
    assert dict(again.dearest) == dict(table.dearest)
    # A table saved before kinds were kept holds every kind at the dearest model.
    old = json.dumps({"holds": {"a": 1, "b": 7}, "aliases": {}, "fetched_at_ms": 1})
    assert PriceTable.from_json(old).dearest_for("image") == 7
    assert PriceTable().dearest_for("image") is None


def test_the_resolved_model_is_matched_before_the_requested_alias():
    table = PriceTable(aliases={"gpt4o": "openai/gpt-4o"}, fetched_at_ms=1)
    fields = PriceFields("gpt4o", max_tokens=100)
    models = ModelsPolicy(text_rates=(TextRate("gpt4o", 1, 1, 1), GPT4O))
    assert quote_hold("text", CHAT, fields, table.resolve("gpt4o"), table, models).rate == GPT4O
    # An alias ImageRouter does not list still matches by the name the client sent.
    assert text_rate_for((TextRate("gpt4o", 1, 1, 1),), "openai/gpt-4o", "gpt4o") == TextRate("gpt4o", 1, 1, 1)


@pytest.mark.parametrize(
    ("globs", "model", "winner"),
    [
        (["*", "openai/gpt-4o*"], "openai/gpt-4o-mini", "openai/gpt-4o*"),  # one wildcard each: the longer prefix
        (["openai/gpt-4o*", "openai/gpt-4o-mini"], "openai/gpt-4o-mini", "openai/gpt-4o-mini"),  # no wildcard wins
        (["openai/*", "openai/gpt-4o*"], "openai/gpt-4o", "openai/gpt-4o*"),  # longest literal prefix
        (["openai/gpt-4o*", "openai/*"], "openai/gpt-4o", "openai/gpt-4o*"),  # ... whatever the order
        (["openai/gpt-*-mini*", "openai/gpt-4o*"], "openai/gpt-4o-mini", "openai/gpt-4o*"),  # fewest wildcards
        (["*", "*-mini"], "x-mini", "*-mini"),  # then the most literal characters
        (["openai/gpt-4o?", "openai/gpt-4o*"], "openai/gpt-4oX", "openai/gpt-4o?"),  # a tie: the first listed
        (["openai/gpt-4o*", "openai/gpt-4o?"], "openai/gpt-4oX", "openai/gpt-4o*"),
        (["*", "[ab]*"], "a-model", "[ab]*"),  # a [..] set is no wildcard: it counts as literal text
        (["openai/gpt-4o?", "openai/gpt-4o[a-z]"], "openai/gpt-4ox", "openai/gpt-4o[a-z]"),
        (["OpenAI/*", "*"], "openai/gpt-4o", "*"),  # case-sensitive, as allow/deny
    ],
)
def test_the_most_specific_glob_wins(globs, model, winner):
    rates = tuple(TextRate(glob, 1, 1, 1) for glob in globs)
    rate = text_rate_for(rates, model)
    assert rate is not None and rate.glob == winner


def test_glob_specificity_orders_by_wildcards_then_prefix_then_literals():
    assert glob_specificity("openai/gpt-4o") == (0, -13, -13)
    assert glob_specificity("openai/gpt-4o*") == (1, -13, -13)
    assert glob_specificity("*-mini") == (1, 0, -5)
    assert glob_specificity("[ab]*") == (1, 0, -4)
    assert text_rate_for((GPT4O,), "anthropic/claude") is None


@given(
    input_bytes=st.integers(0, 10**7),
    media=st.integers(0, 20),
    asked=st.one_of(st.none(), st.integers(1, 10**6)),
    n=st.one_of(st.none(), st.integers(1, 16)),
    rate=st.builds(TextRate, st.just("*"), st.integers(0, 10**9), st.integers(0, 10**9), st.integers(1, 10**6)),
    used=st.tuples(st.floats(0, 1), st.floats(0, 1)),
)
def test_no_call_within_its_bounds_costs_more_than_its_hold(input_bytes, media, asked, n, rate, used):
    fields = PriceFields("m", max_tokens=asked, n=n, input_bytes=input_bytes, media_parts=media)
    q = quote(fields, models=ModelsPolicy(text_rates=(rate,), text_media_input_tokens=1000))
    assert q.bound is not None and q.micros is not None
    # Any token counts up to the bounds cost at most the hold, and the hold is the least
    # whole $0.0001 that covers the bounds.
    input_tokens, output_tokens = int(q.bound.input_tokens * used[0]), int(q.bound.output_tokens * used[1])
    cost = Fraction(input_tokens * rate.input_micros_per_mtok + output_tokens * rate.output_micros_per_mtok, 10**6)
    worst = Fraction(
        q.bound.input_tokens * rate.input_micros_per_mtok + q.bound.output_tokens * rate.output_micros_per_mtok, 10**6
    )
    assert cost <= worst <= q.micros < worst + 100 and q.micros % 100 == 0
    assert q.bound.output_tokens == (asked or rate.max_output_tokens) * (n or 1)
