"""A headless Chromium driven over the Chrome DevTools protocol, for the status page's browser test.

The websocket is aiohttp's (already a dependency), so the suite needs no browser-driver package:
Debian's `chromium` is the whole of it. The browser answers HTTP Basic challenges the way a person
typing the password would (Fetch.authRequired), and every console error, uncaught exception or
failed load it logs is collected.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
LISTENING_RE = re.compile(rb"DevTools listening on (ws://\S+)")


def chromium_binary() -> str:
    """The browser; under CI its absence fails the test (.ci/run installs Debian's chromium)."""
    for name in CHROMIUM_NAMES:
        if found := shutil.which(name):
            return found
    message = "chromium is not installed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI") == "true":
        pytest.fail(message + "; .ci/run installs it")
    pytest.skip(message)


class Page:
    """One browser tab: `call` sends a command and returns its result; events go to `errors`
    (console errors) and to one-shot waiters."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, credentials: tuple[str, str] | None) -> None:
        self.ws, self.credentials = ws, credentials
        self.next_id = 0
        self.replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self.errors: list[str] = []
        self.auth_challenges = 0
        self.reader = asyncio.create_task(self._read())
        self.tasks: set[asyncio.Task[Any]] = set()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        reply = self.replies[self.next_id] = asyncio.get_running_loop().create_future()
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        return await asyncio.wait_for(reply, 30)

    def event(self, method: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next `method` event (ask before causing it)."""
        future = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(method, []).append(future)
        return future

    async def evaluate(self, expression: str) -> Any:
        """`expression`'s value, awaiting it if it is a promise; a thrown error fails the test."""
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self, path: str) -> None:
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        await asyncio.to_thread(Path(path).write_bytes, base64.b64decode(shot["data"]))

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data:
                reply = self.replies.pop(data["id"])
                if "error" in data:
                    reply.set_exception(AssertionError(f"CDP error: {data['error']}"))
                else:
                    reply.set_result(data.get("result", {}))
                continue
            method, params = data.get("method", ""), data.get("params", {})
            self._note(method, params)
            for waiter in self.waiters.pop(method, []):
                if not waiter.done():
                    waiter.set_result(params)

    def _note(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.errors.append(
                "console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            )
        elif method == "Runtime.exceptionThrown":
            self.errors.append("exception: " + json.dumps(params["exceptionDetails"])[:500])
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        elif method == "Fetch.requestPaused":
            self._spawn(self.call("Fetch.continueRequest", requestId=params["requestId"]))
        elif method == "Fetch.authRequired":
            # What a person does at the browser's sign-in prompt (or cancels, without credentials).
            self.auth_challenges += 1
            if self.credentials is None:
                answer = {"response": "CancelAuth"}
            else:
                answer = {
                    "response": "ProvideCredentials",
                    "username": self.credentials[0],
                    "password": self.credentials[1],
                }
            self._spawn(
                self.call("Fetch.continueWithAuth", requestId=params["requestId"], authChallengeResponse=answer)
            )

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


@contextlib.asynccontextmanager
async def chromium_page(
    credentials: tuple[str, str] | None = None, width: int = 1280, height: int = 900
) -> AsyncIterator[Page]:
    """A fresh headless Chromium (own profile, no network but loopback use) with one tab."""
    binary = chromium_binary()
    profile = tempfile.mkdtemp(prefix="sg-chromium-")
    args = [
        binary,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--metrics-recording-only",
        "--disable-dev-shm-usage",
        "about:blank",
    ]
    proc = await asyncio.create_subprocess_exec(*args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        browser_url = None
        while browser_url is None:
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            if not line:
                raise RuntimeError(f"chromium exited ({await proc.wait()}) before its DevTools endpoint was up")
            if match := LISTENING_RE.search(line):
                browser_url = match.group(1).decode()
        drain = asyncio.create_task(proc.stderr.read())  # keep its pipe from filling
        port = browser_url.split(":")[2].split("/")[0]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as listing:
                targets = await listing.json()
            page_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with session.ws_connect(page_url, max_msg_size=0) as ws:
                page = Page(ws, credentials)
                for domain in ("Page", "Runtime", "Log"):
                    await page.call(f"{domain}.enable")
                await page.call("Fetch.enable", handleAuthRequests=True, patterns=[{"urlPattern": "*"}])
                try:
                    yield page
                finally:
                    page.reader.cancel()
        drain.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
