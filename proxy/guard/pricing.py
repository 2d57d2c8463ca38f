"""The hold a request must reserve, priced from the table of `GET /v2/models` (proxy/prices.py).

Image and video: hold = `price.max` rounded up to $0.0001, one output per request (the API has
no `n`), scaled up when the request asks for more than that maximum covers (`scale_hold`): some
models' pre-charge is calculated from `seconds`, `size` and input images and exceeds the
published maximum (docs/how-it-works.md#calculated-prices). A name the table does not list,
directly or as an alias, may be an alias ImageRouter resolves without publishing it: it is held
at the dearest price of its route kind, and at least `default_hold_usd`.

Text (docs/text-holds.md): ImageRouter publishes no token prices, so the policy's `models.text_rates`
gives them per model glob, and hold = input bound × input rate + output bound × output rate,
rounded up to $0.0001 (`text_hold`). `quote_hold` is the whole decision, a pure function of the
route, the request's fields, the price table and the policy.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from proxy.http.body import PriceFields
from proxy.policy.model import ModelsPolicy, TextRate
from proxy.prices import Covers, PriceTable

# Holds are whole ten-thousandths of a dollar, as ImageRouter bills (docs/imagerouter-api.md).
QUANTUM_MICROS = 100
TOKENS_PER_MTOK = 1_000_000
# Input tokens a provider may add around what the body carries: the chat template's few tokens
# per message and the reply's priming, and a tool-use system prompt (Anthropic's is ~350 tokens).
INPUT_FRAMING_TOKENS = 1024
GLOB_WILDCARDS = "*?"  # a `[...]` set matches one character of a list: narrower, not counted
# What a maximum is taken to cover where the model publishes nothing about it: a clip of 4 s (the
# shortest default duration in ImageRouter's catalogue) and one megapixel (1024x1024).
DEFAULT_COVERED_SECONDS = Fraction(4)
DEFAULT_COVERED_PIXELS = 1024 * 1024
_SIZE = re.compile(r"\s*(\d+)\s*[xX×*]\s*(\d+)\s*", re.ASCII)  # ImageRouter's extractWidthHeight

TextApi = Literal["chat", "responses", "other"]
Basis = Literal["override", "text_rate", "text_default", "price", "unlisted", "no_table"]


# --- holds ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextBound:
    """Worst-case token counts of one text call."""

    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Quote:
    """The hold for one call and what it rests on. `micros` is None only for `no_table` (an
    image or video call before any price table loaded)."""

    micros: int | None
    basis: Basis
    rate: TextRate | None = None
    bound: TextBound | None = None

    @property
    def unpriced(self) -> bool:
        """The model has no price of its own (`unknown_models: reject` refuses it)."""
        return self.basis in ("unlisted", "text_default")


def quote_hold(
    kind: str, route: str, fields: PriceFields, model: str, prices: PriceTable, models: ModelsPolicy
) -> Quote:
    """The hold for a call to `route` (canonical path) of route kind `kind`, for `model` (the
    requested id resolved through the table's aliases). In order: a policy override for the
    model; on text routes its most specific `text_rates` entry, else `text_hold_usd`; else the
    table's `price.max` (the dearer of the requested id's and the resolved model's), else the
    dearest `price.max` of the route kind's models, but never below `default_hold_usd`. On image
    and video routes every one of these is scaled by what the request asks for (`scale_hold`)."""
    covers = prices.covers_for(model)
    override = models.overrides.get(model, models.overrides.get(fields.model))
    if override is not None:
        return Quote(override if kind == "text" else scale_hold(override, fields, covers), "override")
    if kind == "text":
        rate = text_rate_for(models.text_rates, model, fields.model)
        if rate is None:
            return Quote(models.text_hold_micros, "text_default")
        bound = text_bound(text_api(route), fields, rate, models.text_media_input_tokens)
        return Quote(text_hold(bound, rate), "text_rate", rate, bound)
    if not prices.loaded:
        return Quote(None, "no_table")
    listed = [price for price in (prices.hold_for(fields.model), prices.hold_for(model)) if price is not None]
    if listed:
        return Quote(scale_hold(max(listed), fields, covers), "price")
    unlisted = max(prices.dearest_for(kind) or 0, models.default_hold_micros)
    return Quote(scale_hold(unlisted, fields, covers), "unlisted")


def scale_hold(micros: int, fields: PriceFields, covers: Covers) -> int:
    """A maximum price `micros` scaled, linearly, by what the request asks for beyond what the
    maximum covers (docs/how-it-works.md#calculated-prices): `seconds` over the covered duration
    (`covers.seconds`, else `DEFAULT_COVERED_SECONDS`), output pixels of `size` over the covered
    pixels (the largest published size, else `DEFAULT_COVERED_PIXELS`), and input images beyond
    one. Each factor is at least 1. A scaled hold is rounded up to $0.0001 and one $0.0001 more is
    added: ImageRouter rounds its calculated price up from a double (`0.07 * 15` is 1.0500000000000003)."""
    pixels = size_pixels(fields.size)
    if fields.seconds_number is None and pixels is None and fields.input_images <= 1:
        return micros  # nothing asked beyond what the maximum covers (most calls)
    factor = Fraction(1)
    if fields.seconds_number is not None:
        covered = DEFAULT_COVERED_SECONDS if covers.seconds is None else Fraction(covers.seconds)
        factor *= max(Fraction(1), Fraction(fields.seconds_number) / covered)
    if pixels is not None:
        factor *= max(Fraction(1), Fraction(pixels, covers.pixels or DEFAULT_COVERED_PIXELS))
    factor *= max(1, fields.input_images)
    if factor == 1 or micros == 0:
        return micros
    quanta = -(-(micros * factor) // QUANTUM_MICROS)
    return (int(quanta) + 1) * QUANTUM_MICROS


def size_pixels(size: str | None) -> int | None:
    """Width x height of a `size` as ImageRouter reads it (`1024x768`, `1024X768`, `1024×768`,
    `1024*768`); None for `auto`, absent or any other text."""
    found = _SIZE.fullmatch(size) if size else None
    return int(found.group(1)) * int(found.group(2)) if found else None


def text_api(route: str) -> TextApi:
    """Which OpenAI API a text route speaks, by its path: `.../chat/completions`, `.../responses`
    or another (a route the policy adds), whose maximums the guard does not know to be obeyed."""
    if route.endswith("/chat/completions"):
        return "chat"
    if route.endswith("/responses"):
        return "responses"
    return "other"


def text_bound(api: TextApi, fields: PriceFields, rate: TextRate, media_input_tokens: int) -> TextBound:
    """Output: the request's own maximum (`max_tokens`/`max_completion_tokens` on chat,
    `max_output_tokens` on responses; the larger where several apply), else the rate's
    `max_output_tokens`; plus the largest reasoning budget the request sets (thinking is billed
    as output, and not every API counts it inside the maximum); times `n` (each choice is
    billed). On a route of neither API, or when a maximum is sent as a string or a boolean, the
    request is not trusted to stop the model: at least the rate's maximum. Input: the text's
    UTF-8 bytes (a BPE token covers at least one byte), `media_input_tokens` per image, audio or
    file part, plus `INPUT_FRAMING_TOKENS`."""
    asked: list[int | None] = []
    if api == "chat":
        asked = [fields.max_tokens, fields.max_completion_tokens]
    elif api == "responses":
        asked = [fields.max_output_tokens]
    given = [count for count in asked if count is not None]
    if fields.loose_maximum:
        given.append(rate.max_output_tokens)  # a maximum that is not a number may not stop the model
    per_choice = (max(given) if given else rate.max_output_tokens) + (fields.reasoning_tokens or 0)
    input_tokens = fields.input_bytes + fields.media_parts * media_input_tokens + INPUT_FRAMING_TOKENS
    return TextBound(input_tokens, per_choice * (fields.n or 1))


def text_hold(bound: TextBound, rate: TextRate) -> int:
    """input × input rate + output × output rate, in micro-dollars rounded up to $0.0001."""
    scaled = bound.input_tokens * rate.input_micros_per_mtok + bound.output_tokens * rate.output_micros_per_mtok
    return -(-scaled // (TOKENS_PER_MTOK * QUANTUM_MICROS)) * QUANTUM_MICROS


def text_rate_for(rates: Sequence[TextRate], *models: str) -> TextRate | None:
    """The most specific rate whose glob matches the first of `models` any glob matches (the
    resolved id before the id as requested). Most specific: fewest wildcard characters (`*` and
    `?`), then the longest literal text before the first `*`, `?` or `[`, then the longest glob
    less its wildcards, then the earliest in the policy. Globs match case-sensitively, as
    `allow`/`deny` do."""
    for model in models:
        matching = [
            (glob_specificity(rate.glob), index)
            for index, rate in enumerate(rates)
            if fnmatch.fnmatchcase(model, rate.glob)
        ]
        if matching:
            return rates[min(matching)[1]]
    return None


def glob_specificity(glob: str) -> tuple[int, int, int]:
    """Sort key of a glob, most specific first (see `text_rate_for`)."""
    wildcards = sum(glob.count(char) for char in GLOB_WILDCARDS)
    first = min((i for i, char in enumerate(glob) if char in "*?["), default=len(glob))
    return wildcards, -first, -(len(glob) - wildcards)
