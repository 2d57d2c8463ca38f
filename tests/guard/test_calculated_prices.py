"""Calculated prices: ImageRouter pre-charges some models a price computed from the request's
`seconds`, `size` and input images, above the `price.max` it publishes. The hold scales with
what the request asks for beyond what that maximum covers, so it still bounds the charge; a call
charged more than its hold all the same is counted, summed, logged once, sent as `call.underheld`
and its model held at least that cost from then on (docs/how-it-works.md#calculated-prices).

The stand-in charges these models as ImageRouter's `calcFunction`s do (proxy/standin/wire.py)."""

from __future__ import annotations

import json
import logging
import uuid
from decimal import Decimal

import pytest

from proxy.guard.pricing import DEFAULT_COVERED_PIXELS, quote_hold, scale_hold, size_pixels
from proxy.http.body import PriceFields, read_price_fields
from proxy.policy.model import ModelsPolicy
from proxy.prices import Covers, PriceTable, parse_models
from proxy.standin import default_models
from tests.support.constants import KEY_A
from tests.support.policies import alice_keys
from tests.support.webhook_receiver import Receiver

HUNYUAN = "tencent/hunyuan-video-1.5"
GROK = "xAI/grok-imagine-video"
FLUX = "runware/Flux-2-Dev-Turbo"
VIDEO = "/v1/openai/videos/generations"
EDITS = "/v1/openai/images/edits"
BUDGET = alice_keys("[{limit_usd: 100, period: day}]")


def micros(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


def access_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "spend_guard.access"]


def json_call(p, model: str, path: str, **fields: object):
    return p.client.post(
        path, json={"model": model, "prompt": "a cat", **fields}, headers={"Authorization": f"Bearer {KEY_A}"}
    )


def multipart(fields: dict[str, str], images: int) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts += [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image[]"; filename="in{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + b"\x89PNG fake\r\n"
        for i in range(images)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def form_call(p, fields: dict[str, str], images: int, path: str = EDITS):
    body, ctype = multipart(fields, images)
    headers = {"Authorization": f"Bearer {KEY_A}", "Content-Type": ctype}
    return p.client.post(path, content=body, headers=headers)


def held_and_charged(p, up, caplog, call) -> tuple[int, int]:
    """(the guard's hold, what the stand-in charged) for one call."""
    before = up.charged_micros
    response = call()
    assert response.status_code == 200, response.text
    assert "error" not in response.json(), response.text
    return micros(access_lines(caplog)[-1]["hold_usd"]), up.charged_micros - before


# -- the three models ImageRouter charges above their published maximum -----------------------


@pytest.mark.parametrize(
    ("model", "path", "fields", "charge"),
    [
        (HUNYUAN, VIDEO, {"seconds": 8, "size": "1280x720"}, 320_000),
        (HUNYUAN, VIDEO, {"seconds": 60, "size": "1280x720"}, 2_400_000),
        (HUNYUAN, VIDEO, {"seconds": "60", "size": "720x1280"}, 2_400_000),
        (HUNYUAN, VIDEO, {"seconds": [60], "size": "1280x720"}, 2_400_000),  # Number([60]) is 60
        (HUNYUAN, VIDEO, {"seconds": "0x3c", "size": "1280x720"}, 2_400_000),  # Number("0x3c") is 60
        (HUNYUAN, VIDEO, {"seconds": 5, "size": "832x480"}, 100_000),
        (GROK, VIDEO, {"seconds": 15}, 1_050_000),  # within the published $1.052
        (GROK, VIDEO, {"seconds": 60}, 4_200_000),
        (GROK, VIDEO, {"seconds": 60, "size": "848x480"}, 3_000_000),
        (FLUX, "/v1/openai/images/generations", {"size": "2048x2048"}, 33_600),
        (FLUX, "/v1/openai/images/generations", {"size": "4096*4096"}, 134_300),
    ],
)
def test_a_calculated_price_above_the_maximum_is_held_at_least_what_the_upstream_charges(
    make_proxy, up, caplog, model, path, fields, charge
):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(BUDGET)
    hold, charged = held_and_charged(p, up, caplog, lambda: json_call(p, model, path, **fields))
    assert charged == charge
    assert hold >= charged, (model, fields, hold, charged)
    assert "spend_guard_underheld_total{" not in p.client.get("/-/metrics").text


def test_flux_at_2048_with_an_input_image_is_held_at_least_its_charge(make_proxy, up, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(BUDGET)
    hold, charged = held_and_charged(
        p, up, caplog, lambda: form_call(p, {"model": FLUX, "prompt": "a cat", "size": "2048x2048"}, 1)
    )
    assert charged == 41_600  # (1 + 4.194304) MP x $0.008, rounded up: ImageRouter's $0.0416
    assert hold >= charged


def test_hunyuan_8_seconds_at_720p_was_held_at_its_published_maximum_before(make_proxy, up, caplog):
    """What an earlier release held: $0.20 against a $0.32 charge (the hold bounded nothing)."""
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(BUDGET)
    hold, charged = held_and_charged(p, up, caplog, lambda: json_call(p, HUNYUAN, VIDEO, seconds=8, size="1280x720"))
    assert p.runtime.refresher.prices.hold_for(HUNYUAN) == 200_000 < charged == 320_000 <= hold


def test_a_scaled_hold_still_meets_max_request_usd(make_proxy, up):
    p = make_proxy(BUDGET + "models: {max_request_usd: 1}\n")
    assert json_call(p, HUNYUAN, VIDEO, seconds=5, size="1280x720").status_code == 200
    refused = json_call(p, HUNYUAN, VIDEO, seconds=60, size="1280x720")
    assert refused.status_code == 403 and "per-request cap of $1.0000" in refused.json()["error"]["message"]


# -- the rules, as pure functions ---------------------------------------------------------------


def table():
    return parse_models(json.dumps(default_models()).encode(), 1)


def test_what_a_published_maximum_covers_is_read_from_the_models_inputs():
    covers = table().covers
    assert covers[HUNYUAN] == Covers(5.0, 1280 * 720)  # one price for 5 and 8 s: the shortest
    assert covers[GROK] == Covers(15.0, 1280 * 720)  # a range: its maximum is the longest clip's
    assert FLUX not in covers  # sizes: only "custom"
    assert "openai/gpt-image-1" not in covers
    assert PriceTable.from_json(table().to_json()).covers == covers


def test_scale_hold_is_linear_in_seconds_pixels_and_input_images():
    assert scale_hold(200_000, PriceFields("m"), Covers(5.0, None)) == 200_000
    assert scale_hold(200_000, PriceFields("m", seconds_number=5.0), Covers(5.0, None)) == 200_000
    assert scale_hold(200_000, PriceFields("m", seconds_number=8.0), Covers(5.0, None)) == 320_100
    assert scale_hold(200_000, PriceFields("m", seconds_number=8.0), Covers(None, None)) == 400_100  # 4 s
    assert scale_hold(24_000, PriceFields("m", size="2048x2048"), Covers()) == 96_100
    assert scale_hold(24_000, PriceFields("m", size="1024x1024"), Covers()) == 24_000
    assert scale_hold(24_000, PriceFields("m", size="auto"), Covers()) == 24_000
    assert scale_hold(300_000, PriceFields("m", input_images=3), Covers()) == 900_100
    assert scale_hold(0, PriceFields("m", seconds_number=60.0), Covers()) == 0
    assert size_pixels("1024 × 768") == 1024 * 768 and size_pixels("auto") is None and size_pixels(None) is None
    assert size_pixels("١٠x١٠") is None  # JavaScript's \d is ASCII only
    assert DEFAULT_COVERED_PIXELS == 1024 * 1024


def test_overrides_scale_like_the_table_price_on_image_and_video_routes():
    models = ModelsPolicy(overrides={HUNYUAN: 100_000})
    fields = PriceFields(HUNYUAN, seconds_number=10.0, size="1280x720")
    quote = quote_hold("video", VIDEO, fields, HUNYUAN, table(), models)
    assert quote.basis == "override" and quote.micros == 200_100


def test_seconds_and_input_images_are_read_as_imagerouter_reads_them():
    fields = read_price_fields(json.dumps({"model": "m", "seconds": " 0x10 "}).encode(), "application/json")
    assert fields.seconds_number == 16.0
    assert read_price_fields(b'{"model": "m", "seconds": "auto"}', "application/json").seconds_number is None
    assert read_price_fields(b'{"model": "m", "seconds": "ten"}', "application/json").seconds_number is None
    body, ctype = multipart({"model": "m", "seconds": "12"}, 3)
    fields = read_price_fields(body, ctype)
    assert fields.seconds_number == 12.0 and fields.input_images == 3


# -- an under-hold is counted, summed, logged once, alerted, and raises the model's hold ---------


def test_an_underheld_call_is_counted_logged_alerted_and_raises_its_models_next_hold(make_proxy, up, caplog):
    caplog.set_level(logging.INFO)
    with Receiver() as receiver:
        hooks = f'alerts: {{webhooks: [{{url: "{receiver.url}"}}]}}\n'
        p = make_proxy(hooks + BUDGET + f'models: {{overrides: {{"{HUNYUAN}": 0.10}}}}\n')
        # $0.10 per 5 s clip scaled to 8 s: $0.1601 held, $0.32 charged.
        hold, charged = held_and_charged(
            p, up, caplog, lambda: json_call(p, HUNYUAN, VIDEO, seconds=8, size="1280x720")
        )
        assert (hold, charged) == (160_100, 320_000)
        metrics = p.client.get("/-/metrics").text
        assert f'spend_guard_underheld_total{{model="{HUNYUAN}"}} 1.0' in metrics
        assert f'spend_guard_underheld_usd_total{{model="{HUNYUAN}"}} 0.1599' in metrics
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "UNDERHELD" in r.getMessage()]
        assert len(warnings) == 1
        assert (
            warnings[0]
            .getMessage()
            .startswith(f"UNDERHELD: a video call to model {HUNYUAN} cost $0.3200, above its hold of $0.1601")
        )
        event = receiver.wait_for(1)[0].event
        assert event["type"] == "call.underheld" and event["scope"] == "key:alice"
        assert (event["model"], event["hold_usd"], event["cost_usd"], event["underheld_usd"]) == (
            HUNYUAN,
            "0.1601",
            "0.3200",
            "0.1599",
        )
        # The next call of that model holds at least the cost seen, even one that asks for less.
        hold, charged = held_and_charged(p, up, caplog, lambda: json_call(p, HUNYUAN, VIDEO, seconds=5, size="832x480"))
        assert hold == 320_000 and charged == 100_000
        assert f'spend_guard_underheld_total{{model="{HUNYUAN}"}} 1.0' in p.client.get("/-/metrics").text
        assert len(receiver.deliveries) == 1


def test_a_stand_in_price_raised_above_the_table_is_an_under_hold_once(make_proxy, up, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(BUDGET)
    up.models["google/veo-3.1"]["price"]["max"] = 5.0  # upstream raised it; the table has $3.20
    hold, charged = held_and_charged(p, up, caplog, lambda: json_call(p, "google/veo-3.1", VIDEO))
    assert (hold, charged) == (3_200_000, 1_600_000)  # charged its average: within the hold
    hold, charged = held_and_charged(
        p, up, caplog, lambda: p.generate(model="google/veo-3.1", path=VIDEO, standin="cost=4.5")
    )
    assert hold == 3_200_000 and charged == 4_500_000
    assert 'spend_guard_underheld_total{model="google/veo-3.1"} 1.0' in p.client.get("/-/metrics").text
    # The next call holds at least the cost seen (and the raised price, once the table is refetched).
    hold, _ = held_and_charged(p, up, caplog, lambda: p.generate(model="google/veo-3.1", path=VIDEO))
    assert hold >= 4_500_000
