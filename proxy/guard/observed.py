"""Holds that fit the call (`models.holds: observed`; docs/how-it-works.md#observed-holds).

ImageRouter publishes a model's price range, not the function from quality, size and seconds to
its price, so the guard learns it: each image or video call that settles with a `cost` records
that cost under its price signature (proxy/guard/signature.py) in the store, shared by every
instance. Once a signature has settled `min_observations` calls within `window_days`, its calls
hold the highest cost charged in that window times `(1 + margin)`, never below the model's
`price.min` and never above the conservative hold (`price.max`, scaled) unless ImageRouter has
charged more than that: then at least the highest charge, with the margin. Until then, and
whenever the store cannot be read, the conservative hold.

`price_call` is the whole decision: the guard takes the hold it answers, and `/-/quote` answers
the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction

from proxy.errors import StoreError
from proxy.guard.pricing import QUANTUM_MICROS, Quote, quote_hold
from proxy.guard.signature import Signature, signature_of
from proxy.http.body import PriceFields
from proxy.policy.model import ModelsPolicy
from proxy.runtime import Runtime
from proxy.store.learned import Learned, Window

log = logging.getLogger("spend_guard.guard")


@dataclass(frozen=True, slots=True)
class Priced:
    """A call's hold and what it rests on. `basis`: `observed`, `max` (the conservative hold of a
    listed model), `override`, `text_rate`, `text_default`, `unlisted` or `no_table` (`micros` is
    None then). `signature` is the one the call is learned under (None: not learned from)."""

    micros: int | None
    basis: str
    quote: Quote
    signature: Signature | None = None
    learned: Learned | None = None


async def price_call(
    rt: Runtime, kind: str, route: str, fields: PriceFields, model: str, models: ModelsPolicy
) -> Priced:
    """The hold for a call of route kind `kind` to `model` (resolved) with `fields`."""
    prices = rt.refresher.prices
    quote = quote_hold(kind, route, fields, model, prices, models)
    if quote.micros is None:
        return Priced(None, quote.basis, quote)
    basis = "max" if quote.basis == "price" else quote.basis
    # At least the highest cost seen above one of this model's holds (Runtime.compare_to_hold).
    conservative = max(quote.micros, rt.hold_floor(model))
    if models.holds != "observed" or quote.basis != "price":
        return Priced(conservative, basis, quote)
    signature = signature_of(kind, model, fields, prices.stamp_for(model))
    if signature is None:
        return Priced(conservative, basis, quote)
    try:
        learned = await rt.store.learned(signature.digest, window_of(models), rt.now_ms())
    except StoreError as exc:
        log.warning("learned holds unreadable, holding the conservative amount: %s", exc)
        return Priced(conservative, basis, quote, signature)
    if learned.count < models.observed.min_observations:
        return Priced(conservative, basis, quote, signature, learned)
    hold = observed_hold(learned.highest_micros, models.observed.margin, conservative, prices.min_for(model))
    return Priced(hold, "observed", quote, signature, learned)


def observed_hold(highest_micros: int, margin: float, conservative_micros: int, min_micros: int) -> int:
    """The highest cost charged times `(1 + margin)`, rounded up to $0.0001; at most the
    conservative hold unless a charge exceeded it; at least `min_micros` (price.min)."""
    with_margin = highest_micros * (1 + Fraction(str(margin)))
    hold = int(-(-with_margin // QUANTUM_MICROS)) * QUANTUM_MICROS
    if highest_micros <= conservative_micros:
        hold = min(hold, conservative_micros)
    return max(hold, min_micros)


def window_of(models: ModelsPolicy) -> Window:
    return Window.of_days(models.observed.window_days)


async def learn(rt: Runtime, digest: str, text: str, cost_micros: int, models: ModelsPolicy) -> None:
    """Record what ImageRouter charged one call of a signature. Once a signature has enough
    calls, a process writes it again only in a new bucket of the window or for a cost above what
    it wrote in this one, so the steady state costs no store round trip per settle and the
    highest cost of every bucket is still in the store. A store error loses the one observation
    (logged): the signature's calls hold more, never less, meanwhile."""
    window = window_of(models)
    now_ms = rt.now_ms()
    bucket = window.current(now_ms)
    written = rt.learned_written.get(digest)
    in_bucket = written[1] if written is not None and written[0] == bucket else -1
    if written is not None and cost_micros <= in_bucket and written[2] >= models.observed.min_observations:
        return
    try:
        learned = await rt.store.observe(digest, text, cost_micros, window, now_ms, models.observed.max_signatures)
    except StoreError as exc:
        log.warning("could not record a learned cost: %s", exc)
        return
    if not learned.full:
        if len(rt.learned_written) >= models.observed.max_signatures:
            rt.learned_written.clear()
        rt.learned_written[digest] = (bucket, max(in_bucket, cost_micros), learned.count)
        return
    rt.metrics.learned_full.inc()
    if rt.learned_full_logged:
        return
    rt.learned_full_logged = True
    log.warning(
        "the learned holds table is full (models.observed.max_signatures=%d): %s and other new signatures"
        " keep their conservative hold (logged once; spend_guard_learned_table_full_total counts them)",
        models.observed.max_signatures,
        text,
    )
