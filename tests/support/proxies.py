"""The app in process, as `make_proxy` starts it, and what tests read back from it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from starlette.testclient import TestClient

from proxy.app import SpendGuardApp
from tests.support.constants import KEY_A


class Proxy:
    """A started app (TestClient running its lifespan) with helpers to drive the refresher."""

    def __init__(self, app: SpendGuardApp, client: TestClient) -> None:
        self.app = app
        self.client = client

    @property
    def runtime(self) -> Any:
        assert self.app.runtime is not None
        return self.app.runtime

    def refresh(self) -> None:
        """Fetch credits and prices now (deterministic; no waiting on the background loop)."""
        rt = self.runtime
        assert self.client.portal is not None
        assert self.client.portal.call(rt.refresher.refresh_credits), rt.refresher.state.last_error
        assert self.client.portal.call(rt.refresher.refresh_models)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self.client.portal is not None
        return self.client.portal.call(fn, *args)

    def generate(
        self, token: str | None = KEY_A, model: str = "openai/gpt-image-1", standin: str = "", **kw: Any
    ) -> Any:
        headers = {"X-Standin": standin} if standin else {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        headers.update(kw.pop("headers", {}))
        path = kw.pop("path", "/v1/openai/images/generations")
        return self.client.post(path, json={"model": model, "prompt": "a cat", **kw}, headers=headers)


def envelope(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type"}, body
    return body["error"]


def spent(proxy, scope: str, token: str = KEY_A) -> str:
    me = proxy.client.get("/-/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200, me.text
    return next(s for s in me.json()["scopes"] if s["scope"] == scope)["spent_usd"]


def open_holds(proxy) -> int:
    return proxy.run(proxy.runtime.store.open_holds)


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now
