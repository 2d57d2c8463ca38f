"""`/-/quote`: what a call would hold, asked before it is sent (docs/operations.md#quote).

`GET /-/quote?model=…&quality=…&size=…&seconds=…&images=…&route=…` reads the fields from the
query (as a multipart form would carry them); `POST /-/quote?route=…` reads them from the body
the call would send (JSON or multipart, as the guard reads it). `route` is a guarded path
(`/v1/openai/videos/generations`) or a route kind (`image`, `video`, `text`); without it, a model
listed as producing video is quoted on the video route, any other on the image route. The caller
is identified by its bearer token, as on `/-/me`.

The hold is priced by the guard's own function (proxy.guard.observed.price_call), so the answer
is the hold the guard takes for the same call while the learned table and the prices stay as
they are. The answer names its basis, the signature it was learned under, the caller's tightest
remaining room, and any policy refusal the call would meet.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from proxy.errors import Rejected
from proxy.guard.callers import UNREGISTERED, identify_token
from proxy.guard.guard import Guard, read_fields
from proxy.guard.observed import price_call
from proxy.guard.verdicts import Verdicts
from proxy.http.body import PriceFields, read_price_fields
from proxy.http.request import BEARER_RE, fingerprint, header_pairs
from proxy.money import format_usd, usd_to_micros
from proxy.ops.levels import scopes_for
from proxy.policy.model import KeyPolicy, Policy
from proxy.untrusted import excerpt

if TYPE_CHECKING:
    from proxy.runtime import Runtime

# Query fields a GET reads (`images`: the number of input image files the call would send).
QUERY_FIELDS = ("model", "quality", "size", "seconds")
MAX_QUERY_IMAGES = 16  # ImageRouter refuses more input images than this
KIND_ROUTES = ("image", "video", "text")


async def quote_report(rt: Runtime, guard: Guard, request: Request) -> dict[str, Any]:
    """The quote for the call described by `request`; raises `Rejected` for a bad request or caller."""
    policy = rt.policy
    key = caller(rt, policy, request.headers.getlist("authorization"))
    body = await read_body(request, policy) if request.method == "POST" else None
    headers = header_pairs(request.scope)
    limit = policy.guard.max_body_bytes
    # A body is read as the guard reads it (Content-Encoding undone, large ones off the loop).
    fields = query_fields(request) if body is None else await read_fields(body, headers, limit)
    prices = rt.refresher.prices
    model = prices.resolve(fields.model)
    route, kind = route_of(policy, request.query_params.get("route"), prices.produces(model, "video"))
    if kind == "text" and body is not None:
        fields = await read_fields(body, headers, limit, text=True)  # its input's size bounds the hold
    priced = await price_call(rt, kind, route, fields, model, policy.models)
    answer: dict[str, Any] = {
        "model": model,
        "route": route,
        "kind": kind,
        "hold_usd": None if priced.micros is None else format_usd(priced.micros),
        "basis": priced.basis,
        "signature": None if priced.signature is None else priced.signature.as_json(),
        # How many calls the account made is not told to a token the policy does not list.
        "observations": None if priced.learned is None or not shows_account(policy, key) else priced.learned.count,
    }
    answer.update(await room(rt, policy, key, priced.micros))
    refusal = policy_refusal(guard, policy, key, model, fields.model, priced.micros, priced.basis)
    if refusal is not None:
        answer["refusal"] = {"status": refusal.status, "type": refusal.error_type, "message": refusal.message}
    return answer


def caller(rt: Runtime, policy: Policy, authorization: list[str]) -> KeyPolicy | None:
    if len(authorization) != 1 or not (m := BEARER_RE.match(authorization[0])):
        raise Rejected(401, "unauthorized", "Authorization header must be provided as Bearer token.", scope="auth")
    key = identify_token(policy, fingerprint(m.group(1)), rt.clock())
    if key is None and policy.guard.unknown_keys == "reject":
        raise Rejected(401, "unauthorized", UNREGISTERED, scope="auth")
    return key


async def read_body(request: Request, policy: Policy) -> bytes:
    """The POSTed body, bounded as a call's body is."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > policy.guard.max_body_bytes:
            raise Rejected(413, "invalid_request_error", f"Body exceeds {policy.guard.max_body_bytes} bytes.")
    return bytes(body)


def query_fields(request: Request) -> PriceFields:
    """The price fields a GET describes, read as a multipart form's strings are."""
    query = request.query_params
    asked = {name: query[name] for name in QUERY_FIELDS if name in query}
    fields = read_price_fields(json.dumps(asked).encode(), "application/json")
    images = query.get("images", "0")
    if not images.isdigit() or int(images) > MAX_QUERY_IMAGES:
        raise Rejected(400, "invalid_request_error", f"'images' must be a whole number from 0 to {MAX_QUERY_IMAGES}.")
    return dataclasses.replace(fields, input_images=int(images))


def route_of(policy: Policy, asked: str | None, video_model: bool) -> tuple[str, str]:
    """(path, kind) of the route quoted: `asked` as a guarded path or a kind, else by the model."""
    spending = [(r.path, r.kind) for r in policy.routes if r.kind in KIND_ROUTES]
    if asked is None:
        asked = "video" if video_model else "image"
    for path, kind in spending:
        if asked in (path, kind):
            return path, kind
    raise Rejected(
        400,
        "invalid_request_error",
        f"'route' {excerpt(asked)!r} is neither a guarded route nor one of {', '.join(KIND_ROUTES)}.",
    )


async def room(rt: Runtime, policy: Policy, key: KeyPolicy | None, hold: int | None) -> dict[str, Any]:
    """The caller's tightest remaining room among the scopes its calls are held against (null for
    a key the policy does not list, unless the policy shows it the account), and whether the hold
    fits in it."""
    if not shows_account(policy, key):
        return {"remaining_usd": None, "remaining_scope": None, "fits": None}
    try:
        report = await scopes_for(rt.ledger, policy, key, rt.clock())
    except Exception as exc:
        raise Rejected(503, "guard_unavailable", "The spend guard's store is unavailable.", scope="store") from exc
    enforced = [s for s in report["scopes"] if s.get("mode") != "shadow"]
    if not enforced:
        return {"remaining_usd": None, "remaining_scope": None, "fits": None}
    tightest = min(enforced, key=lambda s: usd_to_micros(s["remaining_usd"]))
    fits = None if hold is None else hold <= usd_to_micros(tightest["remaining_usd"])
    return {"remaining_usd": tightest["remaining_usd"], "remaining_scope": tightest["scope"], "fits": fits}


def shows_account(policy: Policy, key: KeyPolicy | None) -> bool:
    """Whether the caller may see account figures (a listed key, or any under
    `guard.show_account_to_unknown_keys`), as on `/-/me`."""
    return key is not None or policy.guard.show_account_to_unknown_keys


def policy_refusal(
    guard: Guard, policy: Policy, key: KeyPolicy | None, model: str, asked: str, hold: int | None, basis: str
) -> Rejected | None:
    """The first refusal the policy's model rules or per-request caps would give the call."""
    verdicts = Verdicts(False)
    guard.check_model(model, asked, policy, key, verdicts)
    try:
        if hold is not None:
            guard.check_hold(hold, policy, key, verdicts, basis)
    except Rejected as exc:
        return exc
    return verdicts.refusals[0] if verdicts.refusals else None
