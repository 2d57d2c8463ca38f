"""The price table from `GET /v2/models`: each model's maximum price, and its aliases.

A model's hold is its `price.max` rounded up to $0.0001, one output per request (the API has no
`n`): the most ImageRouter itself pre-charges for the model, so a hold is never below the
upstream's bill while the published maximum holds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from proxy.money import MoneyError, usd_to_micros_ceil


class PriceTableError(ValueError):
    """The models document is not one we can price from."""


@dataclass(frozen=True)
class PriceTable:
    """Model id -> hold in micro-dollars, plus alias -> model id."""

    holds: Mapping[str, int] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    fetched_at_ms: int = 0

    @property
    def loaded(self) -> bool:
        return self.fetched_at_ms > 0

    def resolve(self, model: str) -> str:
        return self.aliases.get(model, model)

    def hold_for(self, model: str) -> int | None:
        return self.holds.get(self.resolve(model))

    def to_json(self) -> str:
        return json.dumps(
            {"holds": dict(self.holds), "aliases": dict(self.aliases), "fetched_at_ms": self.fetched_at_ms}
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> PriceTable:
        data = json.loads(text)
        return cls(dict(data["holds"]), dict(data["aliases"]), int(data["fetched_at_ms"]))


def parse_models(document: bytes, fetched_at_ms: int) -> PriceTable:
    """Parse `/v2/models`: an object keyed by id or an array of objects with `id`; index `aliases`.

    A model whose price is missing or malformed is left out (it then gets the policy's default
    hold or is refused), but a document that is not a models list at all raises `PriceTableError`.
    """
    try:
        data = json.loads(document, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PriceTableError("models document is not JSON") from exc
    entries: Iterable[tuple[str, object]]
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if isinstance(data, list):
        entries = [(str(m.get("id")), m) for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
    elif isinstance(data, dict):
        entries = [(k, v) for k, v in data.items()]
    else:
        raise PriceTableError("models document is neither an object nor an array")
    holds: dict[str, int] = {}
    aliases: dict[str, str] = {}
    for model_id, entry in entries:
        if not isinstance(entry, dict):
            continue
        hold = _max_price(entry)
        if hold is not None:
            holds[model_id] = hold
        aliases_in = entry.get("aliases") or ()
        for alias in [aliases_in] if isinstance(aliases_in, str) else aliases_in:
            if isinstance(alias, str) and alias != model_id:
                aliases[alias] = model_id
    if not holds:
        raise PriceTableError("models document lists no priced model")
    return PriceTable(holds, aliases, fetched_at_ms)


def _max_price(entry: Mapping[str, object]) -> int | None:
    price = entry.get("price")
    candidates: list[object] = []
    if isinstance(price, Mapping):
        candidates = [price.get("max"), price.get("value"), price.get("average")]
    elif price is not None:
        candidates = [price]
    for candidate in candidates:
        if candidate is None or isinstance(candidate, bool):
            continue
        try:
            exact = usd_to_micros_ceil(candidate)
        except MoneyError:
            return None
        # ImageRouter computes Math.ceil(usd * 10000) in doubles, so 0.07 is charged 0.0701:
        # mirror the float artefact so the hold is never a tick below the bill.
        as_double = math.ceil(float(str(candidate)) * 10000) * 100
        return max(exact, as_double)
    return None
