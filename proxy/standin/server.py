"""The stand-in server: an aiohttp low-level server on its own loop and thread, its state and test
helpers, and the routes that are neither generations (generate.py) nor the account's (account.py):
echo and unbilled streams."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Callable
from urllib.parse import unquote

from aiohttp import web

from proxy.standin.account import Account
from proxy.standin.generate import Generation
from proxy.standin.tiers import tiered_models
from proxy.standin.wire import (
    DEFAULT_ACCOUNT_KEY,
    DEFAULT_BALANCE_MICROS,
    GENERATION_ROUTES,
    SHUTDOWN_TIMEOUT_S,
    UNLISTED_ALIASES,
    Plan,
    Recorded,
    StandinError,
    _error_json,
    _json_response,
    b64_text,
    default_models,
    fingerprint,
)


class StandIn(Generation, Account):
    """ImageRouter stand-in. Start with `with StandIn() as up:`; `up.url` is "http://127.0.0.1:<port>"."""

    url: str
    requests: list[Recorded]
    tiered_prices: bool
    price_factor: float
    generation_calls: int
    active_streams: int
    closed_early: int

    def __init__(
        self,
        *,
        default_behaviour: str = "",
        max_records: int | None = None,
        sse_from_body: bool = False,
        tiered_prices: bool = False,
    ) -> None:
        # `X-Standin` for a request that sends none (the demo gives every call a heartbeat).
        self.default_behaviour = default_behaviour
        # Answer a text call whose JSON body says `"stream": true` with SSE, without `sse` in X-Standin.
        self.sse_from_body = sse_from_body
        # Price image and video calls by quality, size and seconds (proxy/standin/tiers.py); kept by reset().
        self.tiered_by_default = tiered_prices
        # Keep only the latest `max_records` requests (a long-running demo must not grow).
        self.max_records = max_records
        Plan.parse(default_behaviour)  # a bad default fails here, not on every request
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
            self.tiered_prices = self.tiered_by_default
            self.price_factor = 1.0
            self.models = default_models()
            if self.tiered_prices:
                self.models.update(tiered_models())
            self.unlisted_aliases = dict(UNLISTED_ALIASES)
            self.models_as_array = False
            self.account_key = DEFAULT_ACCOUNT_KEY
            self.credits_status = 200
            self.credits_body = None
            self.credits_delay_s = 0.0
            self.credits_lag_s = 0.0
            self._ledger_history = []
            self.requests = []
            self.credits_calls = 0
            self.models_calls = 0
            self.generation_calls = 0
            self.charged_micros = 0
            self.charged_by_key = {}
            self.closed_early = 0
        self._in_loop(self._reset_gates)

    # -- test helpers ------------------------------------------------------------------------

    def price_by_request(self, factor: float = 1.0) -> None:
        """Charge image and video calls by quality, size and seconds (proxy/standin/tiers.py), each
        tier times `factor` (a price rise `/v2/models` does not show); lists the tiered models."""
        with self.lock:
            self.tiered_prices, self.price_factor = True, factor
            self.models.update(tiered_models())

    def release(self, tag: str) -> None:
        """Open gate `tag`: waiting responses go on, and later ones with it no longer wait."""
        self._in_loop(lambda: self._release_now(tag))

    def wait_for_requests(self, n: int, timeout: float = 10) -> None:
        """Block until at least `n` generation requests have arrived."""
        self._wait(
            lambda: self.generation_calls >= n,
            timeout,
            lambda: f"{self.generation_calls} generation requests, wanted {n}",
        )

    def wait_for_streams(self, n: int, timeout: float = 10) -> None:
        """Block until exactly `n` generation responses are open."""
        self._wait(
            lambda: self.active_streams == n, timeout, lambda: f"{self.active_streams} active streams, wanted {n}"
        )

    def wait_until(self, done: Callable[[], bool], timeout: float = 10) -> None:
        """Block until `done()` holds, checked whenever a request arrives or a stream opens or
        closes, and whenever `wake()` is called."""
        self._wait(done, timeout, lambda: "the condition waited for did not come true")

    def wake(self) -> None:
        """Have `wait_until` check its condition again (something outside the stand-in changed)."""
        with self._cond:
            self._cond.notify_all()

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

    # -- HTTP --------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path, _, query = request.raw_path.partition("?")
        body = await request.content.read()
        record = Recorded(
            request.method, path, query, [(str(k), v) for k, v in request.headers.items()], body, time.monotonic()
        )
        with self._cond:
            self.requests.append(record)
            if self.max_records is not None and len(self.requests) > self.max_records:
                del self.requests[: len(self.requests) - self.max_records]
            if path in GENERATION_ROUTES:
                self.generation_calls += 1
            self._cond.notify_all()
        try:
            plan = Plan.parse(",".join(request.headers.getall("X-Standin", [])) or self.default_behaviour)
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
