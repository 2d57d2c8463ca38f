"""A webhook receiver for the alert tests: an aiohttp server on 127.0.0.1 in its own thread that
records every POST (arrival time, headers, raw body) and answers as a test tells it to, with
its own Standard Webhooks signature check (HMAC-SHA256 written out here, not the proxy's)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Delivery:
    at: float  # time.monotonic() when it arrived
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)

    def signed_by(self, secret: str) -> bool:
        """The spec's check: base64 key after `whsec_`, HMAC-SHA256 over "{id}.{timestamp}.{body}"."""
        key = base64.b64decode(secret.removeprefix("whsec_"))
        msg_id, timestamp = self.headers["webhook-id"], self.headers["webhook-timestamp"]
        signed = msg_id.encode() + b"." + timestamp.encode() + b"." + self.body
        expected = hmac.new(key, signed, hashlib.sha256).digest()
        for signature in self.headers.get("webhook-signature", "").split(" "):
            version, _, value = signature.partition(",")
            if version == "v1" and hmac.compare_digest(base64.b64decode(value), expected):
                return True
        return False


class Receiver:
    """`statuses`: answers for the next POSTs in order (then 200). `hold()` keeps every answer
    back until `release()`."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.statuses: list[int] = []
        self.url = ""
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gate: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Receiver:
        ready = threading.Event()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._serve(ready)), name="webhook-receiver", daemon=True
        )
        self._thread.start()
        assert ready.wait(10), "webhook receiver did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None and self._stop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._open)
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop, self._gate = asyncio.Event(), asyncio.Event()
        self._gate.set()
        runner = web.ServerRunner(web.Server(self._handle))
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks/spend"
            ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        body = await request.read()
        with self._cond:
            self.deliveries.append(Delivery(time.monotonic(), {k.lower(): v for k, v in request.headers.items()}, body))
            status = self.statuses.pop(0) if self.statuses else 200
            self._cond.notify_all()
        assert self._gate is not None
        await self._gate.wait()
        return web.Response(status=status)

    def hold(self) -> None:
        assert self._loop is not None and self._gate is not None
        gate = self._gate

        async def close() -> None:
            gate.clear()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)

    def release(self) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._open)

    def _open(self) -> None:
        assert self._gate is not None
        self._gate.set()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Delivery]:
        """Block until `count` POSTs have arrived (an event, not a poll); all of them so far."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.deliveries) >= count, timeout):
                raise TimeoutError(f"{len(self.deliveries)} webhook(s) arrived, expected {count}")
            return list(self.deliveries)
