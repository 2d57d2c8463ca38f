"""A realistic ImageRouter stand-in for tests, served on 127.0.0.1 from a background thread.

    with StandIn() as up:
        up.url                     # "http://127.0.0.1:<port>"
        ...                        # point the proxy at it, send requests with `X-Standin: ...`
        up.charged_micros          # what ImageRouter would have billed

The server runs an aiohttp low-level `web.Server` on its own event loop in its own thread, so sync
tests (starlette `TestClient`), async tests and proxy subprocesses can all use it. It behaves like
the real upstream where the proxy depends on it (docs/reference imagerouter-api.md §2-5):

- generation routes pre-charge `price.max` (`ceil(usd * 10000)` units of $0.0001, float artefact
  included, as ImageRouter computes it), answer `200` + `Content-Type: application/json` and
  then heartbeat spaces, and report failures as `200` + `{"error": ...}`; a failure is refunded,
  a success refunds `pre-charge - cost` (which can be negative: the actual cost may exceed it);
- the upstream finishes a generation even when the client goes away, so a request whose client
  disconnected is settled as its planned outcome would have been;
- `GET /v1/credits` reflects in-flight pre-charges, as the real one does.

Behaviour is chosen per request by the `X-Standin` header, a comma-separated list of `name` or
`name=value` (see `Plan`), so a test picks it through the proxy, which forwards headers untouched.
An unknown behaviour or a contradictory combination is answered `500` with type `standin_error`
rather than ignored, so a typo in a test cannot pass silently.

State a test sets (`credits_remaining_micros`, `key_rows`, `models`, ...) is read by the server
under `lock`; wrap compound updates in `with up.lock:`.
"""

from __future__ import annotations

import asyncio
import base64
import decimal
import hashlib
import json
import math
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from typing import Any
from urllib.parse import parse_qs, unquote

from aiohttp import web

IMAGE_ROUTES = {
    "/v1/openai/images/generations": "image",
    "/v1/openai/images/edits": "image",
    "/v1/openai/videos/generations": "video",
}
TEXT_ROUTES = {
    "/v1/openai/chat/completions": "chat",
    "/v1/openai/responses": "responses",
}
GENERATION_ROUTES = {**IMAGE_ROUTES, **TEXT_ROUTES}

DEFAULT_ACCOUNT_KEY = "sk-account-" + "0" * 53
DEFAULT_BALANCE_MICROS = 100_000_000
DEFAULT_INTERVAL_S = 0.05
# A text model missing from `models` (the models list only covers image and video) is accepted
# with no pre-charge and this default cost, the docs' example chat charge.
TEXT_DEFAULT_COST_UNITS = 1
WRITE_CHUNK = 64 * 1024
MICROS_PER_UNIT = 100  # ImageRouter counts credits in 1/10,000 USD
SHUTDOWN_TIMEOUT_S = 0.2
PARTIAL_BODY = b'{"created":1,"data":[{"url":"ht'
PARTIAL_SSE = b'data: {"id":"chatcmpl-1","choi'
INSUFFICIENT = (
    "Insufficient credits (this model needs minimum ${usd} credits), "
    "please topup your ImageRouter account: https://imagerouter.io/pricing"
)
UNAUTHORIZED = "Authorization header must be provided as Bearer token"

# 64 KiB of valid base64 (4 | 65536), written repeatedly for `b64=`.
_B64_CHUNK = base64.b64encode(bytes(range(256)) * 192)
assert len(_B64_CHUNK) == WRITE_CHUNK


def default_models() -> dict[str, dict[str, Any]]:
    def model(model_id: str, low: float, avg: float, high: float, output: str, aliases: list[str] | None = None) -> dict[str, Any]:
        return {
            "id": model_id,
            "price": {"min": low, "average": avg, "max": high},
            "aliases": aliases or [],
            "output": [output],
        }

    return {
        "test/test": model("test/test", 0, 0, 0, "image"),
        "openai/gpt-image-1": model("openai/gpt-image-1", 0.011, 0.167, 0.3, "image"),
        "google/gemini-2.5-flash": model(
            "google/gemini-2.5-flash", 0.039, 0.039, 0.039, "image", ["gemini-2.5-flash-image"]
        ),
        "ir/test-video": model("ir/test-video", 0, 0, 0, "video"),
        "google/veo-3.1": model("google/veo-3.1", 1.2, 1.6, 3.2, "video"),
    }


def format_usd(micros: int) -> str:
    """Micro-dollars as ImageRouter prints money: a string with exactly four decimals."""
    return f"{decimal.Decimal(micros) / 1_000_000:.4f}"


def fingerprint(token: str) -> str:
    """The key `charged_by_key` uses for a bearer token: its sha256 hex digest."""
    return hashlib.sha256(token.encode()).hexdigest()


def b64_text(n: int) -> str:
    """The `b64_json` string a `b64=n` response carries (for checking a passed-through body)."""
    full, rest = divmod(n, WRITE_CHUNK)
    return (_B64_CHUNK * full + _B64_CHUNK[:rest]).decode()


def key_row(
    api_key_id: str,
    name: str,
    *,
    spend_limit: str | float | None = None,
    period: str | None = None,
    period_spend: str = "0.0000",
    period_start: str | None = None,
    expires_at: str | None = None,
    is_active: bool = True,
    credit_usage: str = "0.0000",
    total_requests: int = 0,
    created_at: str = "2026-01-01T00:00:00.000Z",
) -> dict[str, Any]:
    """A `usage_by_api_key` row in ImageRouter's format (money as 4-decimal strings)."""
    limit = None if spend_limit is None else f"{decimal.Decimal(str(spend_limit)):.4f}"
    return {
        "api_key_id": api_key_id,
        "api_key_name": name,
        "credit_usage": f"{decimal.Decimal(credit_usage):.4f}",
        "total_requests": total_requests,
        "created_at": created_at,
        "is_active": is_active,
        "spend_limit": limit,
        "spend_limit_period": period,
        "period_spend": f"{decimal.Decimal(period_spend):.4f}",
        "period_start": period_start,
        "expires_at": expires_at,
    }


@dataclass
class Recorded:
    """One request as received: raw path (percent-encoding kept), raw query, headers in order."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    time: float  # time.monotonic() on arrival

    def header(self, name: str) -> str | None:
        lower = name.lower()
        return next((v for k, v in self.headers if k.lower() == lower), None)


class StandinError(Exception):
    """A test asked for something the stand-in cannot do (bad `X-Standin`)."""


@dataclass
class Plan:
    """What one request should do, parsed from `X-Standin`."""

    heartbeat: int = 0
    interval_s: float = DEFAULT_INTERVAL_S
    gate: str | None = None
    cost_units: int | None = None  # actual cost in 1/10,000 USD
    nocost: bool = False
    error: bool = False
    status: int | None = None
    cut: bool = False
    b64: int | None = None
    gzip: bool = False
    sse: bool = False
    slow_s: float = 0.0
    echo: bool = False

    @classmethod
    def parse(cls, header: str) -> Plan:
        plan = cls()
        for item in header.split(","):
            name, eq, value = item.strip().partition("=")
            name, value = name.strip(), value.strip()
            if not name:
                continue
            flag = name in ("nocost", "error", "cut", "gzip", "sse", "echo")
            if flag == bool(eq):
                raise StandinError(f"behaviour {item.strip()!r}: unknown, or value missing/unexpected")
            try:
                if flag:
                    setattr(plan, name, True)
                elif name == "heartbeat":
                    plan.heartbeat = int(value)
                elif name == "interval":
                    plan.interval_s = float(value)
                elif name == "gate":
                    plan.gate = value
                elif name == "cost":
                    usd = decimal.Decimal(value)
                    if not usd.is_finite() or usd < 0:
                        raise ValueError(value)
                    plan.cost_units = int((usd * 10000).to_integral_value(rounding=decimal.ROUND_CEILING))
                elif name == "status":
                    plan.status = int(value)
                elif name == "b64":
                    plan.b64 = int(value)
                elif name == "slow":
                    plan.slow_s = float(value)
                else:
                    raise StandinError(f"unknown behaviour {name!r}")
            except (ValueError, decimal.InvalidOperation) as exc:
                raise StandinError(f"behaviour {item.strip()!r}: bad value") from exc
        if plan.status is not None and not plan.error:
            raise StandinError("status= only goes with error")
        if plan.status is not None and plan.heartbeat:
            raise StandinError("status= cannot follow a heartbeat: the 200 headers already went")
        if plan.gzip and (plan.heartbeat or plan.sse):
            raise StandinError("gzip cannot be combined with heartbeat or sse")
        return plan

    @property
    def streamed(self) -> bool:
        """Headers go first and the body follows in chunks (else one response with a length)."""
        if self.status is not None:
            return False
        return bool(self.heartbeat or self.gate or self.sse or self.b64 is not None or self.cut)


def _price_units(usd: float | int | str | None) -> int:
    # ImageRouter's own conversion, float artefact included: ceil(0.07 * 10000) == 701.
    return math.ceil(float(usd or 0) * 10000)


def _error_json(message: str, type_: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_}}).encode()


def _json_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def _form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """Non-file fields of a multipart/form-data body (enough to find `model`)."""
    params = BytesHeaderParser().parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n")
    boundary = params.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ValueError("multipart body without boundary")
    fields: dict[str, str] = {}
    for part in body.split(b"--" + boundary.encode("latin-1"))[1:]:
        if part.startswith(b"--"):
            break
        head, sep, value = part.lstrip(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            continue
        headers = BytesHeaderParser().parsebytes(head + b"\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        if isinstance(name, str) and headers.get_param("filename", header="content-disposition") is None:
            fields[name] = value.removesuffix(b"\r\n").decode("utf-8", "replace")
    return fields


def _model_field(content_type: str, body: bytes) -> object:
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype == "multipart/form-data":
        return _form_fields(content_type, body).get("model")
    if ctype == "application/x-www-form-urlencoded":
        values = parse_qs(body.decode("utf-8", "replace")).get("model")
        return values[0] if values else None
    data = json.loads(body)
    return data.get("model") if isinstance(data, dict) else None


class StandIn:
    """ImageRouter stand-in. Start with `with StandIn() as up:`; `up.url` is "http://127.0.0.1:<port>"."""

    url: str
    credits_remaining_micros: int
    total_deposits_micros: int | None  # None: remaining + charged, so credit_usage == charged
    key_rows: list[dict[str, Any]]
    key_ids: dict[str, str]  # bearer token -> api_key_id: billing also moves that row's figures
    models: dict[str, dict[str, Any]]
    models_as_array: bool
    account_key: str
    credits_status: int
    credits_body: bytes | None
    credits_delay_s: float
    requests: list[Recorded]
    credits_calls: int
    models_calls: int
    generation_calls: int
    charged_micros: int
    charged_by_key: dict[str, int]
    active_streams: int
    closed_early: int

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._cond = threading.Condition(self.lock)
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        # Gates live on the server loop: touched only there once it runs.
        self._gates: dict[str, asyncio.Event] = {}
        self._released: set[str] = set()
        self._serial = 0
        self.active_streams = 0  # a live count, so reset() leaves it alone
        self.reset()

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> StandIn:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("stand-in already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self._serve(ready))
            except BaseException as exc:  # reported to start() if it happened during startup
                failure.append(exc)
                ready.set()

        self._thread = threading.Thread(target=run, name="imagerouter-standin", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            self._thread.join(1)
            self._thread = None
            raise RuntimeError("stand-in failed to start") from (failure[0] if failure else None)

    def stop(self) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or loop is None or stop is None:
            return
        try:
            loop.call_soon_threadsafe(self._open_all_gates)
            loop.call_soon_threadsafe(stop.set)
        except RuntimeError:  # loop already closed
            pass
        thread.join(10)
        self._thread = self._loop = self._stop = None

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # handler_cancellation: a client that goes away cancels its handler, which is how
        # `closed_early` and `active_streams` see a proxy that dropped its upstream connection.
        server = web.Server(self._handle, handler_cancellation=True)
        runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def reset(self) -> None:
        """Back to defaults: balance, models, overrides, ledger, records, gates."""
        with self.lock:
            self.credits_remaining_micros = DEFAULT_BALANCE_MICROS
            self.total_deposits_micros = None
            self.key_rows = []
            self.key_ids = {}
            self.models = default_models()
            self.models_as_array = False
            self.account_key = DEFAULT_ACCOUNT_KEY
            self.credits_status = 200
            self.credits_body = None
            self.credits_delay_s = 0.0
            self.requests = []
            self.credits_calls = 0
            self.models_calls = 0
            self.generation_calls = 0
            self.charged_micros = 0
            self.charged_by_key = {}
            self.closed_early = 0
        self._in_loop(self._reset_gates)

    # -- test helpers ------------------------------------------------------------------------

    def release(self, tag: str) -> None:
        """Open gate `tag`: waiting responses go on, and later ones with it no longer wait."""
        self._in_loop(lambda: self._release_now(tag))

    def wait_for_requests(self, n: int, timeout: float = 10) -> None:
        """Block until at least `n` generation requests have arrived."""
        self._wait(lambda: self.generation_calls >= n, timeout, lambda: f"{self.generation_calls} generation requests, wanted {n}")

    def wait_for_streams(self, n: int, timeout: float = 10) -> None:
        """Block until exactly `n` generation responses are open."""
        self._wait(lambda: self.active_streams == n, timeout, lambda: f"{self.active_streams} active streams, wanted {n}")

    @property
    def generation_requests(self) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.path in GENERATION_ROUTES]

    fingerprint = staticmethod(fingerprint)
    b64_text = staticmethod(b64_text)

    def _wait(self, done: Callable[[], bool], timeout: float, describe: Callable[[], str]) -> None:
        with self._cond:
            if not self._cond.wait_for(done, timeout):
                raise TimeoutError(f"stand-in: {describe()} after {timeout} s")

    def _in_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            fn()
            return
        done = threading.Event()

        def call() -> None:
            try:
                fn()
            finally:
                done.set()

        try:
            loop.call_soon_threadsafe(call)
        except RuntimeError:  # loop closed under us
            fn()
            return
        done.wait(5)

    def _release_now(self, tag: str) -> None:
        self._released.add(tag)
        gate = self._gates.get(tag)
        if gate is not None:
            gate.set()

    def _open_all_gates(self) -> None:
        for gate in self._gates.values():
            gate.set()

    def _reset_gates(self) -> None:
        self._open_all_gates()  # a response left waiting by a previous test finishes now
        self._gates = {}
        self._released = set()

    async def _wait_gate(self, tag: str | None) -> None:
        if tag is None or tag in self._released:
            return
        await self._gates.setdefault(tag, asyncio.Event()).wait()

    # -- ledger ------------------------------------------------------------------------------

    def _bill(self, token: str, micros: int, *, new_request: bool = False) -> None:
        """Move `micros` from the balance to the ledger (negative = refund). Caller holds lock."""
        self.credits_remaining_micros -= micros
        self.charged_micros += micros
        fp = fingerprint(token)
        self.charged_by_key[fp] = self.charged_by_key.get(fp, 0) + micros
        key_id = self.key_ids.get(token)
        row = next((r for r in self.key_rows if r.get("api_key_id") == key_id), None) if key_id else None
        if row is not None:
            delta = decimal.Decimal(micros) / 1_000_000
            for name in ("credit_usage", "period_spend"):
                row[name] = f"{decimal.Decimal(row.get(name) or 0) + delta:.4f}"
            if new_request:
                row["total_requests"] = int(row.get("total_requests") or 0) + 1

    # -- HTTP --------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path, _, query = request.raw_path.partition("?")
        body = await request.content.read()
        record = Recorded(
            request.method, path, query, [(str(k), v) for k, v in request.headers.items()], body, time.monotonic()
        )
        with self._cond:
            self.requests.append(record)
            if path in GENERATION_ROUTES:
                self.generation_calls += 1
            self._cond.notify_all()
        try:
            plan = Plan.parse(",".join(request.headers.getall("X-Standin", [])))
        except StandinError as exc:
            return _json_response(500, _error_json(f"stand-in: {exc}", "standin_error"))

        if plan.echo or path.startswith("/echo/"):
            return self._echo(record)
        if path.startswith("/stream/"):
            return await self._unbilled_stream(request, plan)
        if path in GENERATION_ROUTES and request.method == "POST":
            return await self._generate(request, record, plan)
        if path == "/v1/credits" and request.method == "GET":
            return await self._credits(request, query)
        if path == "/v2/models" and request.method == "GET":
            return self._models()
        if path.startswith("/v2/models/") and request.method == "GET":
            return self._model(unquote(path.removeprefix("/v2/models/")))
        return _json_response(404, _error_json("not found", "invalid_request_error"))

    def _echo(self, record: Recorded) -> web.Response:
        payload = {
            "method": record.method,
            "path": record.path,
            "query": record.query,
            "headers": [[k, v] for k, v in record.headers],
            "body_sha256": hashlib.sha256(record.body).hexdigest(),
            "body_len": len(record.body),
            "cost": 0,
        }
        return _json_response(200, json.dumps(payload).encode())

    async def _credits(self, request: web.BaseRequest, query: str) -> web.Response:
        with self.lock:
            self.credits_calls += 1
            delay_s = self.credits_delay_s
        if delay_s:
            await asyncio.sleep(delay_s)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not token:
            return _json_response(401, _error_json(UNAUTHORIZED, "unauthorized"))
        with self.lock:
            if token != self.account_key:
                return _json_response(401, _error_json("Invalid API key", "unauthorized"))
            status, override = self.credits_status, self.credits_body
            remaining = self.credits_remaining_micros
            deposits = self.total_deposits_micros
            if deposits is None:
                deposits = remaining + self.charged_micros
            rows = json.loads(json.dumps(self.key_rows))
        if override is not None:
            return web.Response(status=status, body=override, content_type="application/json")
        if status != 200:
            if status == 401:
                return _json_response(401, _error_json("Invalid API key", "unauthorized"))
            return _json_response(status, _error_json("Failed to fetch credit information", "internal_error"))
        payload: dict[str, Any] = {
            "remaining_credits": format_usd(remaining),
            "credit_usage": format_usd(deposits - remaining),
            "total_deposits": format_usd(deposits),
        }
        if parse_qs(query).get("by_api_key") == ["true"]:
            payload["usage_by_api_key"] = rows
        return _json_response(200, json.dumps(payload).encode())

    def _models(self) -> web.Response:
        with self.lock:
            self.models_calls += 1
            models = json.loads(json.dumps(self.models))
            as_array = self.models_as_array
        document: object = list(models.values()) if as_array else models
        return _json_response(200, json.dumps(document).encode())

    def _model(self, model_id: str) -> web.Response:
        with self.lock:
            self.models_calls += 1
            entry = self.models.get(model_id)
            body = json.dumps(entry).encode()
        if entry is None:
            return _json_response(404, json.dumps({"error": {
                "message": f"The model '{model_id}' does not exist.", "type": "invalid_request_error",
                "param": "model", "code": "model_not_found"}}).encode())
        return _json_response(200, body)

    def _lookup(self, name: str) -> dict[str, Any] | None:
        with self.lock:
            entry = self.models.get(name)
            if entry is None:
                entry = next((m for m in self.models.values() if name in (m.get("aliases") or ())), None)
            return json.loads(json.dumps(entry)) if entry is not None else None

    async def _generate(self, request: web.BaseRequest, record: Recorded, plan: Plan) -> web.StreamResponse:
        route = GENERATION_ROUTES[record.path]
        text = route in ("chat", "responses")
        if plan.sse and not text:
            return _json_response(500, _error_json("stand-in: sse is only for chat and responses", "standin_error"))
        if plan.b64 is not None and text:
            return _json_response(500, _error_json("stand-in: b64 is only for image and video", "standin_error"))
        started = time.monotonic()
        with self._cond:
            self.active_streams += 1
            self._cond.notify_all()
        token = ""
        hold = final_micros = 0
        settled = True
        finished = False
        try:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme != "Bearer" or not token:
                return _json_response(401, _error_json(UNAUTHORIZED, "unauthorized"))
            try:
                model_name = _model_field(request.headers.get("Content-Type", ""), record.body)
            except (ValueError, UnicodeDecodeError):
                return _json_response(400, _error_json("Invalid request body", "invalid_request_error"))
            if not isinstance(model_name, str) or not model_name:
                return _json_response(400, _error_json("model is required", "invalid_request_error"))
            model = self._lookup(model_name)
            if model is None and not text:
                return _json_response(400, _error_json(f"model '{model_name}' is not supported", "invalid_request_error"))
            price = (model or {}).get("price") or {}
            hold_units = _price_units(price.get("max"))
            if plan.cost_units is not None:
                cost_units = plan.cost_units
            elif model is None:
                cost_units = TEXT_DEFAULT_COST_UNITS
            else:
                avg = price.get("average")
                cost_units = _price_units(price.get("max") if avg is None else avg)
            # What the upstream finally bills, whether or not the client stays to see it.
            if plan.cut or plan.nocost:
                final_micros = hold_units * MICROS_PER_UNIT
            elif plan.error:
                final_micros = 0
            else:
                final_micros = cost_units * MICROS_PER_UNIT
            with self.lock:
                if self.credits_remaining_micros < hold_units * MICROS_PER_UNIT:
                    message = INSUFFICIENT.format(usd=f"{hold_units / 10000:.4f}")
                    return _json_response(200, _error_json(message, "internal_error"))
                hold = hold_units * MICROS_PER_UNIT
                self._bill(token, hold, new_request=True)
                settled = False

            def settle() -> None:
                nonlocal settled
                with self.lock:
                    if not settled:
                        self._bill(token, final_micros - hold)
                        settled = True

            if plan.slow_s:
                await asyncio.sleep(plan.slow_s)
            cost = cost_units / 10000
            if not plan.streamed:
                await self._wait_gate(plan.gate)
                settle()
                finished = True
                if plan.error:
                    return _json_response(plan.status or 200, _error_json("provider failed", "generation_failed"))
                body = self._final_body(route, model_name, plan, cost, started)
                if plan.gzip:
                    return _json_response(200, zlib.compress(body, wbits=31), {"Content-Encoding": "gzip"})
                return _json_response(200, body)
            response = await self._stream(request, route, model_name, plan, cost, started, settle)
            finished = True
            return response
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client (the proxy) goes away.
            if not finished:
                with self.lock:
                    self.closed_early += 1
            raise
        except ConnectionError:
            # A write found the transport closing; swallowed so aiohttp stays quiet.
            if not finished:
                with self.lock:
                    self.closed_early += 1
            return web.Response(status=499)
        finally:
            with self._cond:
                if not settled:
                    # The upstream finishes a generation without its client (reference §6.2).
                    self._bill(token, final_micros - hold)
                    settled = True
                self.active_streams -= 1
                self._cond.notify_all()

    async def _unbilled_stream(self, request: web.BaseRequest, plan: Plan) -> web.StreamResponse:
        """`/stream/...`: an unbilled, non-spending response (heartbeat, gate, then `{}`), for
        passthrough tests: counts in `active_streams` and `closed_early` like a generation."""
        with self._cond:
            self.active_streams += 1
            self._cond.notify_all()
        finished = False
        try:
            response = web.StreamResponse(status=200)
            response.content_type = "application/json"
            await response.prepare(request)
            for i in range(max(1, plan.heartbeat)):
                if i:
                    await asyncio.sleep(plan.interval_s)
                await response.write(b" ")
                if i == 0:
                    await self._wait_gate(plan.gate)
            await response.write(b"{}")
            await response.write_eof()
            finished = True
            return response
        except asyncio.CancelledError:
            with self.lock:
                self.closed_early += 0 if finished else 1
            raise
        except ConnectionError:
            with self.lock:
                self.closed_early += 0 if finished else 1
            return web.Response(status=499)
        finally:
            with self._cond:
                self.active_streams -= 1
                self._cond.notify_all()

    def _final_body(self, route: str, model: str, plan: Plan, cost: float, started: float) -> bytes:
        self._serial += 1
        usage_cost = {} if plan.nocost else {"cost": cost}
        if route == "chat":
            body: dict[str, Any] = {
                "id": f"chatcmpl-{self._serial}",
                "object": "chat.completion",
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, **usage_cost},
            }
        elif route == "responses":
            body = {
                "id": f"resp_{self._serial}",
                "object": "response",
                "status": "completed",
                "model": model,
                "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]}],
                "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7, **usage_cost},
            }
        else:
            ext = "mp4" if route == "video" else "webp"
            body = {
                "created": int(time.time() * 1000),
                "data": [{"url": f"https://storage.imagerouter.io/standin-{self._serial}.{ext}"}],
                "latency": int((time.monotonic() - started) * 1000),
            }
        body.update(usage_cost)
        return json.dumps(body).encode()

    async def _stream(
        self,
        request: web.BaseRequest,
        route: str,
        model: str,
        plan: Plan,
        cost: float,
        started: float,
        settle: Callable[[], None],
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        response.content_type = "text/event-stream" if plan.sse else "application/json"
        if plan.gzip:
            response.headers["Content-Encoding"] = "gzip"
        await response.prepare(request)  # aiohttp sends the headers right away
        beat = b": keep-alive\n\n" if plan.sse else b" "
        for i in range(plan.heartbeat):
            if i:
                await asyncio.sleep(plan.interval_s)
            await response.write(beat)
            if i == 0 and not plan.sse:
                await self._wait_gate(plan.gate)
        if plan.sse:
            await self._stream_sse(request, response, route, model, plan, cost, settle)
        else:
            if not plan.heartbeat:
                await self._wait_gate(plan.gate)
            if plan.cut:
                settle()
                await response.write(PARTIAL_BODY)
                self._abort(request)
                return response
            settle()
            compress = zlib.compressobj(wbits=31) if plan.gzip else None

            async def write(chunk: bytes) -> None:
                await response.write(compress.compress(chunk) if compress else chunk)

            if plan.error:
                await write(_error_json("provider failed", "generation_failed"))
            elif plan.b64 is not None:
                self._serial += 1
                await write(b'{"created":%d,"data":[{"b64_json":"' % int(time.time() * 1000))
                full, rest = divmod(plan.b64, WRITE_CHUNK)
                for _ in range(full):
                    await write(_B64_CHUNK)
                if rest:
                    await write(_B64_CHUNK[:rest])
                tail: dict[str, Any] = {"latency": int((time.monotonic() - started) * 1000)}
                if not plan.nocost:
                    tail["cost"] = cost
                await write(b'"}],' + json.dumps(tail).encode()[1:])
            else:
                await write(self._final_body(route, model, plan, cost, started))
            if compress:
                await response.write(compress.flush())
        await response.write_eof()
        return response

    @staticmethod
    def _abort(request: web.BaseRequest) -> None:
        """Drop the connection mid-body: the client sees a broken transfer, not an end."""
        if request.transport is not None:
            request.transport.abort()

    async def _stream_sse(
        self,
        request: web.BaseRequest,
        response: web.StreamResponse,
        route: str,
        model: str,
        plan: Plan,
        cost: float,
        settle: Callable[[], None],
    ) -> None:
        def event(data: dict[str, Any], name: str | None = None) -> bytes:
            head = f"event: {name}\n" if name else ""
            return f"{head}data: {json.dumps(data)}\n\n".encode()

        chat = route == "chat"

        def delta(content: str) -> bytes:
            if chat:
                return event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model,
                              "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]})
            return event({"type": "response.output_text.delta", "delta": content}, "response.output_text.delta")

        if not chat:
            await response.write(event({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}},
                                       "response.created"))
        await response.write(delta("h"))
        await self._wait_gate(plan.gate)
        if plan.cut:
            settle()
            await response.write(PARTIAL_SSE)
            self._abort(request)
            return
        settle()
        if plan.error:
            failure = {"message": "provider failed", "type": "generation_failed"}
            await response.write(event({"error": failure}) if chat else event({"type": "error", "error": failure}, "error"))
            return
        await response.write(delta("i"))
        usage_cost = {} if plan.nocost else {"cost": cost}
        if chat:
            usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, **usage_cost}
            await response.write(event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model,
                                        "choices": [], "usage": usage, **usage_cost}))
            await response.write(b"data: [DONE]\n\n")
        else:
            usage = {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7, **usage_cost}
            completed = {"id": "resp_1", "status": "completed", "usage": usage, **usage_cost}
            await response.write(event({"type": "response.completed", "response": completed}, "response.completed"))
