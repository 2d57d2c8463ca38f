"""Shared fixtures: the ImageRouter stand-in, the store over fake and real Redis, app builders."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
import redis.asyncio as aioredis
from starlette.testclient import TestClient

from proxy.app import SpendGuardApp, create_app
from proxy.policy.load import load_policy
from proxy.settings import Settings
from proxy.store.embedded import EmbeddedServer, EmbeddedStoreError, server_binary
from tests.standin import StandIn

REAL_REDIS_URL = os.environ.get("SPEND_GUARD_TEST_REDIS_URL", "")
ACCOUNT_KEY = "sk-account-" + "0" * 53
KEY_A = "sk-a-" + "a" * 59
KEY_B = "sk-b-" + "b" * 59
SHA_A = hashlib.sha256(KEY_A.encode()).hexdigest()


def alice_keys(budgets: str) -> str:
    """A policy `keys:` block with key alice (KEY_A) and the given budgets list, in YAML."""
    return f"""
keys:
  - name: alice
    key_sha256: {SHA_A}
    budgets: {budgets}
"""


def _assert_local(url: str) -> None:
    host = redis.Redis.from_url(url).connection_pool.connection_kwargs.get("host")
    assert host in ("127.0.0.1", "localhost", "::1"), f"tests only ever use a local Redis, not {host}"


@pytest.fixture(autouse=True)
def state_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private XDG_STATE_HOME per test: a served proxy without a Redis URL keeps its embedded
    store's state dir (default: $XDG_STATE_HOME/spend-guard) there, never in the real home."""
    home = Path(tempfile.mkdtemp(prefix="sg-state-"))  # short: the server's socket path has a limit
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def standin_server() -> Iterator[StandIn]:
    with StandIn() as up:
        yield up


@pytest.fixture
def up(standin_server: StandIn, monkeypatch: pytest.MonkeyPatch) -> StandIn:
    standin_server.reset()
    monkeypatch.setenv("IMAGEROUTER_API_KEY", standin_server.account_key)
    return standin_server


class StoreTarget:
    """Where a test's store lives: a fresh FakeServer, the real Redis or the embedded store's server
    (both flushed)."""

    def __init__(self, kind: str, url: str | None = None) -> None:
        self.kind = kind
        self.server = fakeredis.FakeServer() if kind == "fake" else None
        self.url = url or (REAL_REDIS_URL if kind == "real" else None)

    def client(self) -> aioredis.Redis:
        if self.server is not None:
            return fakeredis.FakeAsyncRedis(server=self.server)
        assert self.url
        return aioredis.Redis.from_url(self.url, socket_timeout=2.0, socket_connect_timeout=1.0)

    def flush(self) -> None:
        if self.url:
            redis.Redis.from_url(self.url).flushdb()


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """The server `spend-guard serve` runs without a Redis URL, in a state dir of its own."""
    try:
        server_binary()
    except EmbeddedStoreError as exc:
        if os.environ.get("SPEND_GUARD_REQUIRE_REAL") == "1":  # CI: the default store must be covered
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    with EmbeddedServer(str(tmp_path_factory.mktemp("embedded"))) as server:
        yield server


@pytest.fixture(
    params=[
        pytest.param("fake", marks=pytest.mark.fake),
        pytest.param("real", marks=pytest.mark.real),
        pytest.param("embedded", marks=pytest.mark.embedded),
    ]
)
def store_target(request: pytest.FixtureRequest) -> Iterator[StoreTarget]:
    if request.param == "real":
        if not REAL_REDIS_URL:
            pytest.skip("SPEND_GUARD_TEST_REDIS_URL is not set")
        _assert_local(REAL_REDIS_URL)
    url = request.getfixturevalue("embedded_server").url if request.param == "embedded" else None
    target = StoreTarget(request.param, url)
    target.flush()
    yield target
    target.flush()


@pytest.fixture
def write_policy(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str) -> Path:
        path = tmp_path / "policy.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    return write


POLICY_BASE = """
account: {name: t, refresh_s: 3600, models_refresh_s: 3600, max_staleness_s: 7200}
"""


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


@pytest.fixture
def make_proxy(
    up: StandIn, store_target: StoreTarget, write_policy: Callable[[str], Path]
) -> Iterator[Callable[..., Proxy]]:
    started: list[TestClient] = []

    def make(
        policy_text: str = "", *, clock: Any = None, refresh: bool = True, store: StoreTarget | None = None
    ) -> Proxy:
        text = textwrap.dedent(policy_text)
        path = write_policy(text if "\naccount:" in text else POLICY_BASE + text)
        settings = Settings(policy=str(path), upstream=up.url, redis_url=(store or store_target).url)
        target = store or store_target
        app = create_app(settings, policy=load_policy(path), clock=clock, redis_factory=target.client)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        started.append(client)
        proxy = Proxy(app, client)
        if refresh:
            proxy.refresh()
        return proxy

    yield make
    for client in reversed(started):
        client.__exit__(None, None, None)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 that never completes a TCP handshake: its one-place accept queue is
    already full, so Linux drops every further SYN and a connect hangs until its timeout."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        yield listener.getsockname()[1]


_real_skipped: list[str] = []
_real_ran: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "real" in report.keywords:
        if report.skipped:
            _real_skipped.append(report.nodeid)
        elif report.when == "call":
            _real_ran.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # CI sets SPEND_GUARD_REQUIRE_REAL=1: real Redis must have been covered, not skipped.
    if os.environ.get("SPEND_GUARD_REQUIRE_REAL") == "1" and (_real_skipped or not _real_ran):
        print(f"\nreal-Redis tests skipped: {len(_real_skipped)}, ran: {len(_real_ran)}; CI requires them to run")
        session.exitstatus = 1
