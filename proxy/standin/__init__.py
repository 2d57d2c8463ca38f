"""A realistic ImageRouter stand-in, served on 127.0.0.1 from a background thread: the tests'
upstream, and the upstream of `spend-guard serve --demo` (proxy/commands/demo.py).

    with StandIn() as up:
        up.url                     # "http://127.0.0.1:<port>"
        ...                        # point the proxy at it, send requests with `X-Standin: ...`
        up.charged_micros          # what ImageRouter would have billed

The server runs an aiohttp low-level `web.Server` on its own event loop in its own thread, so sync
tests (starlette `TestClient`), async tests and proxy subprocesses can all use it. It behaves like
the real upstream where the proxy depends on it (docs/imagerouter-api.md):

- generation routes pre-charge `price.max` (`ceil(usd * 10000)` units of $0.0001, float artefact
  included, as ImageRouter computes it), answer `200` + `Content-Type: application/json` and
  then heartbeat spaces, and report failures as `200` + `{"error": ...}`; a failure is refunded,
  a success refunds `pre-charge - cost` (which can be negative: the actual cost may exceed it);
- a streamed (SSE) text call that fails after its first chunk is billed its cost: the provider
  produced tokens (`sse,error,cost=...`); `sse,earlycost=X` puts a cost of X on the first chunk
  and none on the final one;
- the upstream finishes a generation even when the client goes away, so a request whose client
  disconnected is settled as its planned outcome would have been;
- `GET /v1/credits` reflects in-flight pre-charges, as the real one does;
- a model name is first resolved through `unlisted_aliases` (ImageRouter's own `MODEL_ALIASES`,
  which `/v2/models` does not list, e.g. `kwaivgi/kling-2.1-master -> kling/kling-2.1-master`),
  then looked up by id or by the `aliases` `/v2/models` lists; the call is charged as the model
  it resolves to.

Behaviour is chosen per request by the `X-Standin` header, a comma-separated list of `name` or
`name=value` (see `Plan`), so a test picks it through the proxy, which forwards headers untouched.
An unknown behaviour or a contradictory combination is answered `500` with type `standin_error`
rather than ignored, so a typo in a test cannot pass silently.

State a test sets (`credits_remaining_micros`, `key_rows`, `models`, ...) is read by the server
under `lock`; wrap compound updates in `with up.lock:`.
"""

from __future__ import annotations

from proxy.standin.server import StandIn
from proxy.standin.wire import (
    DEFAULT_ACCOUNT_KEY,
    DEFAULT_BALANCE_MICROS,
    GENERATION_ROUTES,
    IMAGE_ROUTES,
    TEXT_ROUTES,
    Plan,
    Recorded,
    StandinError,
    b64_text,
    default_models,
    fingerprint,
    format_usd,
    key_row,
)

__all__ = [
    "DEFAULT_ACCOUNT_KEY",
    "DEFAULT_BALANCE_MICROS",
    "GENERATION_ROUTES",
    "IMAGE_ROUTES",
    "TEXT_ROUTES",
    "Plan",
    "Recorded",
    "StandIn",
    "StandinError",
    "b64_text",
    "default_models",
    "fingerprint",
    "format_usd",
    "key_row",
]
