"""How the stand-in answers a generation: pre-charge, heartbeat, result or error, SSE for text."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy.standin.tiers import TIERED_PRICES
from proxy.standin.wire import (
    _B64_CHUNK,
    CALCULATED_PRICES,
    GENERATION_ROUTES,
    INSUFFICIENT,
    MICROS_PER_UNIT,
    PARTIAL_BODY,
    PARTIAL_SSE,
    TEXT_DEFAULT_COST_UNITS,
    UNAUTHORIZED,
    WRITE_CHUNK,
    CalcParams,
    Plan,
    Recorded,
    _error_json,
    _json_response,
    _model_field,
    _price_units,
    calc_params,
)

PriceFunction = Callable[[CalcParams], float]


def _wants_stream(content_type: str, body: bytes) -> bool:
    if not content_type.lower().startswith("application/json"):
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("stream") is True


class Generation:
    """The generation routes of `StandIn` (proxy/standin/server.py), which provides the state."""

    lock: threading.Lock
    _cond: threading.Condition
    active_streams: int
    closed_early: int
    credits_remaining_micros: int
    _serial: int
    sse_from_body: bool
    tiered_prices: bool
    price_factor: float

    if TYPE_CHECKING:

        def _bill(self, token: str, micros: int, *, new_request: bool = False) -> None: ...

        async def _wait_gate(self, tag: str | None) -> None: ...

        def _lookup(self, name: str) -> dict[str, Any] | None: ...

    async def _generate(self, request: web.BaseRequest, record: Recorded, plan: Plan) -> web.StreamResponse:
        route = GENERATION_ROUTES[record.path]
        text = route in ("chat", "responses")
        if (
            text
            and self.sse_from_body
            and not plan.sse
            and _wants_stream(request.headers.get("Content-Type", ""), record.body)
        ):
            plan = dataclasses.replace(plan, sse=True)  # as ImageRouter answers `"stream": true`
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
                return _json_response(
                    400, _error_json(f"model '{model_name}' is not supported", "invalid_request_error")
                )
            price = (model or {}).get("price") or {}
            hold_units = _price_units(price.get("max"))
            calculate, post = self._price_functions(str((model or {}).get("id")))
            post_units = 0
            if calculate is not None or post is not None:
                # A calculated price is pre-charged, and finally charged, as computed from the
                # request; a post-generation one is pre-charged price.max and charged as computed.
                try:
                    params = calc_params(request.headers.get("Content-Type", ""), record.body)
                    if calculate is not None:
                        hold_units = _price_units(calculate(params))
                    if post is not None:
                        post_units = _price_units(post(params))
                except ValueError as exc:
                    return _json_response(400, _error_json(str(exc), "invalid_request_error"))
            if plan.cost_units is not None:
                cost_units = plan.cost_units
            elif calculate is not None:
                cost_units = hold_units
            elif post is not None:
                cost_units = post_units
            elif model is None:
                cost_units = TEXT_DEFAULT_COST_UNITS
            else:
                avg = price.get("average")
                cost_units = _price_units(price.get("max") if avg is None else avg)
            # What the upstream finally bills, whether or not the client stays to see it. A stream
            # that fails after its first chunk is billed what it produced: the plan's cost.
            if plan.cut or plan.nocost:
                final_micros = hold_units * MICROS_PER_UNIT
            elif plan.error and not plan.sse:
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
                    # ImageRouter finishes a generation without its client, and bills it.
                    self._bill(token, final_micros - hold)
                    settled = True
                self.active_streams -= 1
                self._cond.notify_all()

    def _price_functions(self, model_id: str) -> tuple[PriceFunction | None, PriceFunction | None]:
        """(calculated, post-generation) price functions of a model: ImageRouter's calculated
        prices always; the request-priced tiers (proxy/standin/tiers.py) when turned on."""
        calculate = CALCULATED_PRICES.get(model_id)
        if not self.tiered_prices or model_id not in TIERED_PRICES:
            return calculate, None
        shape, tier = TIERED_PRICES[model_id]
        factor = self.price_factor

        def priced(params: CalcParams) -> float:
            return tier(params) * factor

        return (priced, None) if shape == "calculated" else (calculate, priced)

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
                "output": [
                    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]}
                ],
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

        def delta(content: str, extra: dict[str, Any] | None = None) -> bytes:
            if chat:
                return event(
                    {
                        "id": "chatcmpl-1",
                        "object": "chat.completion.chunk",
                        "model": model,
                        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
                        **(extra or {}),
                    }
                )
            return event(
                {"type": "response.output_text.delta", "delta": content, **(extra or {})}, "response.output_text.delta"
            )

        if not chat:
            await response.write(
                event(
                    {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}},
                    "response.created",
                )
            )
        early = {} if plan.early_cost_units is None else {"cost": plan.early_cost_units / 10000}
        await response.write(delta("h", early))
        await self._wait_gate(plan.gate)
        if plan.cut:
            settle()
            await response.write(PARTIAL_SSE)
            self._abort(request)
            return
        settle()
        if plan.error:
            failure = {"message": "provider failed", "type": "generation_failed"}
            await response.write(
                event({"error": failure}) if chat else event({"type": "error", "error": failure}, "error")
            )
            return
        await response.write(delta("i"))
        usage_cost = {} if plan.nocost or early else {"cost": cost}
        if chat:
            usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, **usage_cost}
            await response.write(
                event(
                    {
                        "id": "chatcmpl-1",
                        "object": "chat.completion.chunk",
                        "model": model,
                        "choices": [],
                        "usage": usage,
                        **usage_cost,
                    }
                )
            )
            await response.write(b"data: [DONE]\n\n")
        else:
            usage = {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7, **usage_cost}
            completed = {"id": "resp_1", "status": "completed", "usage": usage, **usage_cost}
            await response.write(event({"type": "response.completed", "response": completed}, "response.completed"))
