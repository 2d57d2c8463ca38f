"""Shared fixtures: the ImageRouter stand-in, the store over fake and real Redis, app builders."""

from __future__ import annotations

import multiprocessing.util
import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.policy.load import load_policy
from proxy.settings import Settings
from proxy.store.embedded import EmbeddedServer, EmbeddedStoreError, server_binary
from tests.support.constants import REAL_REDIS_URL
from tests.support.policies import POLICY_BASE
from tests.support.proxies import Proxy
from tests.support.standin import StandIn
from tests.support.stores import EMBEDDED, FAKE, REAL, StoreTarget, assert_local

# No test reads or writes the real home's state: each run gets its own $XDG_STATE_HOME (the
# embedded store's default dir, and the record of which state dir each account's store is kept
# in), set before any fixture runs and inherited by every process a test starts. A record left by
# an earlier run would name that run's temporary state dirs, and a new run's empty one would be
# a loss.
SESSION_STATE_HOME = tempfile.mkdtemp(prefix="sg-run-state-")
os.environ["XDG_STATE_HOME"] = SESSION_STATE_HOME


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(SESSION_STATE_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def state_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private XDG_STATE_HOME per test: a served proxy without a Redis URL keeps its embedded
    store's state dir (default: $XDG_STATE_HOME/spend-guard) there, never in the real home."""
    home = Path(tempfile.mkdtemp(prefix="sg-state-"))  # short: the server's socket path has a limit
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    yield home
    shutil.rmtree(home, ignore_errors=True)


class ProcessRefused(RuntimeError):
    """A test without the `system` marker tried to start a process."""


@pytest.fixture(autouse=True)
def no_process_unless_system(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Only a test marked `system` starts a process or an external tool, so that `pytest -m "not
    system"` starts none: any other test that tries is stopped there and fails, naming the command."""
    if request.node.get_closest_marker("system") is not None:
        yield
        return
    tried: list[str] = []

    def refuse(what: str) -> Callable[..., Any]:
        def spawn(*args: Any, **kwargs: Any) -> Any:
            tried.append(what if what != "subprocess" else f"subprocess {args[1]!r}")  # (self, args, ...)
            raise ProcessRefused(f"{tried[-1]}: a test that starts a process is marked `system`")

        return spawn

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse("subprocess"))
    monkeypatch.setattr(multiprocessing.util, "spawnv_passfds", refuse("multiprocessing"))
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        monkeypatch.setattr(os, name, refuse(f"os.{name}"))
    yield
    if tried:
        pytest.fail(f"{request.node.nodeid} is not marked `system` but tried to start a process: {tried}")


@pytest.fixture(scope="session")
def standin_server() -> Iterator[StandIn]:
    with StandIn() as up:
        yield up


@pytest.fixture
def up(standin_server: StandIn, monkeypatch: pytest.MonkeyPatch) -> StandIn:
    standin_server.reset()
    monkeypatch.setenv("IMAGEROUTER_API_KEY", standin_server.account_key)
    return standin_server


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


@pytest.fixture(params=[FAKE, REAL, EMBEDDED])
def store_target(request: pytest.FixtureRequest) -> Iterator[StoreTarget]:
    if request.param == "real":
        if not REAL_REDIS_URL:
            pytest.skip("SPEND_GUARD_TEST_REDIS_URL is not set")
        assert_local(REAL_REDIS_URL)
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


@pytest.fixture
def make_proxy(
    up: StandIn, store_target: StoreTarget, write_policy: Callable[[str], Path]
) -> Iterator[Callable[..., Proxy]]:
    from tests.support.served import init_store

    started: list[TestClient] = []

    def make(
        policy_text: str = "",
        *,
        clock: Any = None,
        refresh: bool = True,
        store: StoreTarget | None = None,
        init: bool = True,
    ) -> Proxy:
        text = textwrap.dedent(policy_text)
        path = write_policy(text if "\naccount:" in text else POLICY_BASE + text)
        settings = Settings(policy=str(path), upstream=up.url, redis_url=(store or store_target).url)
        target = store or store_target
        if target.url and init:
            init_store(target.url, path)  # `spend-guard store init`: a store without an epoch is a loss
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
