"""The price table from `GET /v2/models`: each model's maximum price, and its aliases.

A model's hold is its `price.max` rounded up to $0.0001, one output per request (the API has no
`n`): the most ImageRouter itself pre-charges for the model, so a hold is never below the
upstream's bill while the published maximum holds.

A name the table does not list may still run: ImageRouter resolves aliases of its own before it
looks a model up, and `/v2/models` lists some and not others. The aliases it publishes, and those
its source names (`IMAGEROUTER_ALIASES`), resolve to the model they run; any other unlisted name
is held at the dearest price of the models that produce what its route produces (`dearest_for`),
since it may be an alias of any of them (docs/how-it-works.md#price).

Some models' pre-charge is calculated from the request (a price per second of `seconds`, per
megapixel of `size`) and can exceed `price.max`. What the maximum covers is read from the
model's published `inputs` (its `seconds` durations and `size` list) into `Covers`, and
proxy/guard/pricing.py scales the hold of a request asking for more
(docs/how-it-works.md#calculated-prices).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType

from proxy.money import MoneyError, usd_to_micros_ceil

# Aliases ImageRouter's validators resolve before looking a model up (its `MODEL_ALIASES`, in
# src/services/modelAliases.js) without `/v2/models` listing them: a call to one runs, and is
# billed as, the model it names. Aliases `/v2/models` publishes take precedence.
IMAGEROUTER_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "briaai/RMBG-2.0": "bria/remove-background",
        "briaai/RMBG-2.0:free": "bria/remove-background:free",
        "google/gemini-2.5-flash-image": "google/gemini-2.5-flash",
        "gemini-2.5-flash-image": "google/gemini-2.5-flash",
        "google/gemini-3-pro-image": "google/gemini-3-pro",
        "gemini-3-pro-image": "google/gemini-3-pro",
        "kwaivgi/kling-2.5-turbo-standard": "kling/kling-2.5-turbo-standard",
        "kwaivgi/kling-2.5-turbo-pro": "kling/kling-2.5-turbo-pro",
        "kwaivgi/kling-2.1-standard": "kling/kling-2.1-standard",
        "kwaivgi/kling-2.1-pro": "kling/kling-2.1-pro",
        "kwaivgi/kling-2.1-master": "kling/kling-2.1-master",
        "kwaivgi/kling-1.6-standard": "kling/kling-1.6-standard",
        "kwaivgi/wan-2.2": "wan/wan-2.2",
        "kwaivgi/wan-2.5": "wan/wan-2.5",
        "kwaivgi/wan-2.6": "wan/wan-2.6",
    }
)


@dataclass(frozen=True)
class Covers:
    """What a model's `price.max` is taken to cover: a clip of `seconds` (None: the model publishes
    no durations) and an output of `pixels` (None: it publishes no sizes, or only `custom`)."""

    seconds: float | None = None
    pixels: int | None = None


class PriceTableError(ValueError):
    """The models document is not one we can price from."""


@dataclass(frozen=True)
class PriceTable:
    """Model id -> hold in micro-dollars, alias -> model id, and output kind (`image`, `video`)
    -> the dearest hold among the models producing it."""

    holds: Mapping[str, int] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    fetched_at_ms: int = 0
    dearest: Mapping[str, int] = field(default_factory=dict)
    covers: Mapping[str, Covers] = field(default_factory=dict)
    # Per model: its published `price.min` (micro-dollars, rounded up), and a digest of what it
    # publishes for its price (`stamp_for`): a change of either starts its learned holds afresh.
    mins: Mapping[str, int] = field(default_factory=dict)
    stamps: Mapping[str, str] = field(default_factory=dict)
    # Per model, what it produces as listed (`["video"]`); absent when it does not say.
    outputs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def loaded(self) -> bool:
        return self.fetched_at_ms > 0

    def resolve(self, model: str) -> str:
        """The model a name runs: a published alias's, else ImageRouter's own alias's, else itself."""
        return self.aliases.get(model) or IMAGEROUTER_ALIASES.get(model) or model

    def names_of(self, model: str) -> set[str]:
        """Every name the model `model` runs goes by: itself, what it resolves to, and every alias
        of that (`allow`/`deny` globs are matched against all of them)."""
        target = self.resolve(model)
        return {model, target, *self._aliases_by_target.get(target, ())}

    @functools.cached_property
    def _aliases_by_target(self) -> Mapping[str, tuple[str, ...]]:
        names: dict[str, list[str]] = {}
        for alias in {**IMAGEROUTER_ALIASES, **self.aliases}:
            names.setdefault(self.resolve(alias), []).append(alias)
        return {target: tuple(aliases) for target, aliases in names.items()}

    def hold_for(self, model: str) -> int | None:
        """The dearer of the name's own price and its resolved model's; None if neither is listed."""
        listed = [self.holds[name] for name in {model, self.resolve(model)} if name in self.holds]
        return max(listed, default=None)

    def covers_for(self, model: str) -> Covers:
        """What the price of `model` (a resolved id) covers; nothing known for an unlisted name."""
        return self.covers.get(model, NO_COVERS)

    def min_for(self, model: str) -> int:
        """The published `price.min` of `model` (a resolved id); 0 when it publishes none."""
        return self.mins.get(model, 0)

    def produces(self, model: str, kind: str) -> bool:
        """Whether `model` (a resolved id) is listed as producing `kind` (`image`, `video`)."""
        return kind in self.outputs.get(model, ())

    def stamp_for(self, model: str) -> str:
        """A digest of the price `/v2/models` publishes for `model` ("" when none is listed)."""
        return self.stamps.get(model, "")

    def dearest_for(self, kind: str) -> int | None:
        """The dearest hold of a model producing `kind` (of any model if none is known to)."""
        return self.dearest.get(kind, max(self.holds.values(), default=None))

    def to_json(self) -> str:
        return json.dumps(
            {
                "holds": dict(self.holds),
                "aliases": dict(self.aliases),
                "fetched_at_ms": self.fetched_at_ms,
                "dearest": dict(self.dearest),
                "covers": {model: [c.seconds, c.pixels] for model, c in self.covers.items()},
                "mins": dict(self.mins),
                "stamps": dict(self.stamps),
                "outputs": {model: list(kinds) for model, kinds in self.outputs.items()},
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> PriceTable:
        data = json.loads(text)
        # A table saved by an older version has no `dearest`: every kind then gets the dearest model.
        dearest = dict(data.get("dearest", {}))
        # Nor `covers`: each model's hold then scales from the rules' defaults until the next refresh.
        covers = {model: Covers(seconds, pixels) for model, (seconds, pixels) in data.get("covers", {}).items()}
        # Nor `mins` and `stamps`: learned holds then wait for the next refresh's.
        mins, stamps = dict(data.get("mins", {})), dict(data.get("stamps", {}))
        outputs = {model: tuple(kinds) for model, kinds in data.get("outputs", {}).items()}
        return cls(
            dict(data["holds"]),
            dict(data["aliases"]),
            int(data["fetched_at_ms"]),
            dearest,
            covers,
            mins,
            stamps,
            outputs,
        )


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
    outputs: dict[str, list[str]] = {}
    covers: dict[str, Covers] = {}
    mins: dict[str, int] = {}
    stamps: dict[str, str] = {}
    for model_id, entry in entries:
        if not isinstance(entry, dict):
            continue
        hold = _max_price(entry)
        if hold is not None:
            holds[model_id] = hold
            outputs[model_id] = _outputs(entry)
            covered = _covers(entry)
            if covered != NO_COVERS:
                covers[model_id] = covered
            mins[model_id] = min(_min_price(entry), hold)
            stamps[model_id] = _stamp(entry)
        aliases_in = entry.get("aliases") or ()
        for alias in [aliases_in] if isinstance(aliases_in, str) else aliases_in:
            if isinstance(alias, str) and alias != model_id:
                aliases[alias] = model_id
    if not holds:
        raise PriceTableError("models document lists no priced model")
    # A model that does not say what it produces counts for every kind.
    kinds = {kind for produced in outputs.values() for kind in produced}
    dearest = {
        kind: max(hold for model_id, hold in holds.items() if kind in outputs[model_id] or not outputs[model_id])
        for kind in kinds
    }
    listed = {model_id: tuple(produced) for model_id, produced in outputs.items() if produced}
    return PriceTable(holds, aliases, fetched_at_ms, dearest, covers, mins, stamps, listed)


NO_COVERS = Covers()
_SIZE = re.compile(r"\s*(\d{1,12})\s*[xX×*]\s*(\d{1,12})\s*", re.ASCII)


def _covers(entry: Mapping[str, object]) -> Covers:
    """What `price.max` covers, from the model's published `inputs`. Durations: a price that has a
    range (min below max) is taken to cover the longest listed duration, a single price (min =
    max) only the shortest (ImageRouter lists `tencent/hunyuan-video-1.5` at one $0.20, a 5 s
    clip, and charges $0.04/s up to 8 s and beyond). Sizes: the largest listed, by pixels."""
    inputs = entry.get("inputs")
    if not isinstance(inputs, Mapping):
        return NO_COVERS
    listed = inputs.get("seconds")
    durations = sorted(float(s) for s in (listed if isinstance(listed, list) else []) if _finite(s) and float(s) > 0)
    seconds: float | None = None
    if durations:
        price = entry.get("price")
        low = price.get("min") if isinstance(price, Mapping) else None
        high = price.get("max") if isinstance(price, Mapping) else None
        ranged = _finite(low) and _finite(high) and float(low) < float(high)  # type: ignore[arg-type]
        seconds = durations[-1] if ranged else durations[0]
    sizes = inputs.get("size")
    areas = [
        int(m.group(1)) * int(m.group(2))
        for s in (sizes if isinstance(sizes, list) else [])
        if isinstance(s, str) and (m := _SIZE.fullmatch(s))
    ]
    pixels = max((a for a in areas if a > 0), default=None)
    return Covers(seconds, pixels)


def _finite(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer past a double's range
        return False


def _outputs(entry: Mapping[str, object]) -> list[str]:
    """What a model produces (its `output`: `["image"]`, `["video"]`), as listed."""
    output = entry.get("output")
    listed = [output] if isinstance(output, str) else output if isinstance(output, list) else []
    return [kind for kind in listed if isinstance(kind, str)]


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


def _min_price(entry: Mapping[str, object]) -> int:
    """`price.min` in micro-dollars rounded up; 0 when it is absent or malformed."""
    price = entry.get("price")
    low = price.get("min") if isinstance(price, Mapping) else None
    if low is None or isinstance(low, bool):
        return 0
    try:
        return usd_to_micros_ceil(low)
    except MoneyError:
        return 0


def _stamp(entry: Mapping[str, object]) -> str:
    """A short digest of the model's published `price` and `inputs`: what prices its calls."""
    published = {"price": entry.get("price"), "inputs": entry.get("inputs")}
    text = json.dumps(published, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]
