"""Prices by what the request asks for, in the shapes of ImageRouter's calculated schemes: tiers
by quality and size for images, linear and stepped per-second prices for video. Off by default
(every test keeps the published prices); `StandIn(tiered_prices=True)`, `up.price_by_request()`
and `spend-guard serve --demo` turn them on.

Each model keeps the range ImageRouter publishes for it in `/v2/models`; a call is charged its
tier. `calculated` models are pre-charged their tier too (ImageRouter computes the price before
the call), `post` models are pre-charged `price.max` and charged their tier at the end (a
post-generation price, as gpt-image-1's token-priced bill). `factor` raises every tier at once:
a price rise upstream that `/v2/models` does not show.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from proxy.standin.wire import CalcParams

Shape = Literal["calculated", "post"]

# gpt-image-1 per image, by quality, for a square and a landscape or portrait size (OpenAI's list;
# `auto` lets the provider choose: charged as high).
GPT_IMAGE_1 = {
    "low": (0.011, 0.016),
    "medium": (0.042, 0.063),
    "high": (0.167, 0.25),
    "auto": (0.167, 0.25),
}
GPT_IMAGE_1_SIZES = ("auto", "1024x1024", "1536x1024", "1024x1536")
DALL_E_3_SIZES = ("1024x1024", "1536x1024", "1024x1536")
VEO_SECONDS = (4, 6, 8)  # veo-3.1: $0.40 per second of a listed duration, else its default 4 s
SORA_SECONDS = (4, 8, 12)  # sora-2: $0.40 per started 4 s step of the seconds asked, up to 12 s


def _gpt_image_1(params: CalcParams) -> float:
    square, wide = GPT_IMAGE_1[params.quality]
    return square if params.size in ("auto", "1024x1024") else wide


def _dall_e_3(params: CalcParams) -> float:
    # ImageRouter's DallE3.calculatePrice: hd is `high`; a size it does not list is priced as 1024x1024.
    wide = params.size in ("1024x1536", "1536x1024")
    if params.quality == "high":
        return 0.12 if wide else 0.08
    return 0.08 if wide else 0.04


def _listed_seconds(params: CalcParams, listed: tuple[int, ...]) -> int:
    """ImageRouter's resolveSeconds: a listed duration, else the model's default (the first)."""
    seconds = params.seconds
    return int(seconds) if not isinstance(seconds, str) and seconds in listed else listed[0]


def _veo(params: CalcParams) -> float:
    return 0.4 * _listed_seconds(params, VEO_SECONDS)


def _sora(params: CalcParams) -> float:
    seconds = SORA_SECONDS[0] if isinstance(params.seconds, str) else min(params.seconds, SORA_SECONDS[-1])
    return -(-seconds // 4) * 4000 / 10000  # exact: 0.4 * 3 would be billed $1.2001


TIERED_PRICES: dict[str, tuple[Shape, Callable[[CalcParams], float]]] = {
    "openai/gpt-image-1": ("post", _gpt_image_1),
    "openai/dall-e-3": ("calculated", _dall_e_3),
    "google/veo-3.1": ("calculated", _veo),
    "openai/sora-2": ("calculated", _sora),
}


def tiered_models() -> dict[str, dict[str, Any]]:
    """The `/v2/models` entries of the tiered models, with the ranges ImageRouter publishes."""

    def model(
        model_id: str, low: float, avg: float, high: float, output: str, inputs: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "id": model_id,
            "price": {"min": low, "average": avg, "max": high},
            "aliases": [],
            "output": [output],
            "inputs": inputs,
        }

    return {
        "openai/gpt-image-1": model(
            "openai/gpt-image-1", 0.011, 0.167, 0.3, "image", {"image": True, "size": list(GPT_IMAGE_1_SIZES)}
        ),
        "openai/dall-e-3": model("openai/dall-e-3", 0.04, 0.04, 0.12, "image", {"size": list(DALL_E_3_SIZES)}),
        "google/veo-3.1": model(
            "google/veo-3.1", 1.6, 1.6, 3.2, "video", {"image": True, "seconds": list(VEO_SECONDS)}
        ),
        "openai/sora-2": model("openai/sora-2", 0.4, 0.8, 1.2, "video", {"image": True, "seconds": list(SORA_SECONDS)}),
    }
