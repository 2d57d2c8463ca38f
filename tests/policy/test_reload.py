from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from proxy.policy.load import load_policy
from proxy.policy.model import Policy, default_policy
from proxy.policy.reload import PolicyHolder

WAIT_S = 5.0


def write(path: Path, text: str) -> None:
    """Write `text` and move the mtime on, so a coarse filesystem clock still shows a change."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    later = max(path.stat().st_mtime_ns, before + 1_000_000_000)
    os.utime(path, ns=(later, later))


class Changes:
    """An `on_change` callback that records each new policy and sets an event."""

    def __init__(self) -> None:
        self.policies: list[Policy] = []
        self.event = asyncio.Event()

    def __call__(self, policy: Policy) -> None:
        self.policies.append(policy)
        self.event.set()

    async def wait(self) -> Policy:
        await asyncio.wait_for(self.event.wait(), WAIT_S)
        self.event.clear()
        return self.policies[-1]


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    write(path, "mode: enforce\n")
    return path


def holder_for(path: Path, on_change: Callable[[Policy], None] | None = None) -> PolicyHolder:
    return PolicyHolder(str(path), load_policy(path), on_change=on_change)


@asynccontextmanager
async def watching(holder: PolicyHolder) -> AsyncIterator[None]:
    task = asyncio.create_task(holder.watch(interval_s=0.01, stable_s=0.05))
    try:
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_reload_with_a_broken_file_keeps_the_old_policy_and_counts_the_failure(
    policy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    changes: list[Policy] = []
    holder = holder_for(policy_file, changes.append)
    old = holder.policy
    write(policy_file, "mode: dry-run\nguard: {on_store_eror: open}\n")
    with caplog.at_level(logging.INFO, logger="spend_guard.policy"):
        assert holder.reload() is False
    assert holder.policy is old
    assert (holder.reloads_ok, holder.reloads_failed) == (0, 1)
    assert changes == []
    problems = [
        f"{policy_file}: mode: unknown mode 'dry-run'; expected enforce or shadow",
        f"{policy_file}: guard.on_store_eror: unknown key; expected one of on_store_error, unknown_keys, "
        "unknown_models, max_body_bytes, hold_ttl_s, shutdown_grace_s, show_account_to_unknown_keys, unknown_routes",
    ]
    assert holder.last_error == "; ".join(problems)
    (record,) = [r for r in caplog.records if r.name == "spend_guard.policy"]
    assert record.levelno == logging.ERROR
    message = record.getMessage()
    assert "\n" not in message
    assert f"keeping version {old.version}" in message and "2 problem(s)" in message
    assert all(problem in message for problem in problems)


def test_reload_of_a_vanished_file_keeps_the_old_policy(policy_file: Path) -> None:
    holder = holder_for(policy_file)
    old = holder.policy
    policy_file.unlink()
    assert holder.reload() is False
    assert holder.policy is old
    assert holder.reloads_failed == 1
    assert holder.last_error == f"{policy_file}: no such file or directory"


def test_reload_with_a_good_change_swaps_and_calls_on_change(
    policy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    changes: list[Policy] = []
    holder = holder_for(policy_file, changes.append)
    old = holder.policy
    write(policy_file, "mode: shadow\n")
    with caplog.at_level(logging.INFO, logger="spend_guard.policy"):
        assert holder.reload() is True
    assert holder.policy.mode == "shadow"
    assert holder.policy.version != old.version
    assert changes == [holder.policy]
    assert (holder.reloads_ok, holder.reloads_failed, holder.last_error) == (1, 0, None)
    messages = [r.getMessage() for r in caplog.records if r.name == "spend_guard.policy"]
    assert messages == [
        f"policy reloaded from {policy_file}: version {old.version} -> {holder.policy.version}",
        "policy reload changed: mode enforce -> shadow",
    ]


def test_reload_of_unchanged_content_does_not_swap(policy_file: Path) -> None:
    changes: list[Policy] = []
    holder = holder_for(policy_file, changes.append)
    old = holder.policy
    write(policy_file, "mode: enforce\n")  # new mtime, same bytes
    assert holder.reload() is True
    assert holder.policy is old
    assert changes == []


def test_a_good_reload_after_a_failure_clears_the_error(policy_file: Path) -> None:
    holder = holder_for(policy_file)
    write(policy_file, "mode: [\n")
    assert holder.reload() is False
    assert holder.last_error is not None
    write(policy_file, "mode: shadow\n")
    assert holder.reload() is True
    assert (holder.reloads_ok, holder.reloads_failed) == (1, 1)
    assert holder.last_error is None
    assert holder.policy.mode == "shadow"


def test_reload_without_a_path_keeps_the_given_policy() -> None:
    policy = default_policy()
    holder = PolicyHolder(None, policy)
    assert holder.reload() is True
    assert holder.policy is policy


async def test_watch_picks_up_a_file_change(policy_file: Path) -> None:
    changes = Changes()
    holder = holder_for(policy_file, changes)
    async with watching(holder):
        write(policy_file, "mode: shadow\n")
        assert (await changes.wait()).mode == "shadow"
        write(policy_file, "mode: enforce\n")
        assert (await changes.wait()).mode == "enforce"
    assert holder.reloads_ok == 2


async def test_watch_picks_up_a_new_file_in_a_directory(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "mode: enforce\n")
    changes = Changes()
    holder = holder_for(tmp_path, changes)
    async with watching(holder):
        write(tmp_path / "b.yaml", "groups: [{name: design}]\n")
        policy = await changes.wait()
    assert list(policy.groups) == ["design"]
    assert policy.sources == (str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml"))


async def test_watch_keeps_going_after_a_broken_file(policy_file: Path) -> None:
    changes = Changes()
    holder = holder_for(policy_file, changes)
    reloaded = asyncio.Event()
    reload = holder.reload

    def reload_and_signal() -> bool:
        result = reload()
        reloaded.set()
        return result

    holder.reload = reload_and_signal  # type: ignore[method-assign]
    old = holder.policy
    async with watching(holder):
        write(policy_file, "mode: [\n")
        await asyncio.wait_for(reloaded.wait(), WAIT_S)
        assert holder.reloads_failed == 1 and holder.policy is old
        write(policy_file, "mode: shadow\n")
        assert (await changes.wait()).mode == "shadow"


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
async def test_sighup_reloads_the_policy(policy_file: Path) -> None:
    changes = Changes()
    holder = holder_for(policy_file, changes)
    loop = asyncio.get_running_loop()
    holder.install_sighup(loop)
    try:
        write(policy_file, "mode: shadow\n")
        os.kill(os.getpid(), signal.SIGHUP)
        assert (await changes.wait()).mode == "shadow"
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


class RecordingLoop:
    def __init__(self) -> None:
        self.handlers: list[tuple[Any, ...]] = []

    def add_signal_handler(self, *args: Any) -> None:
        self.handlers.append(args)


def test_install_sighup_is_a_no_op_without_sighup(policy_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(signal, "SIGHUP", raising=False)
    loop = RecordingLoop()
    holder_for(policy_file).install_sighup(loop)  # type: ignore[arg-type]
    assert loop.handlers == []


def test_install_sighup_is_a_no_op_on_a_loop_without_signal_handlers(
    policy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class ProactorLike:
        def add_signal_handler(self, *args: Any) -> None:
            raise NotImplementedError

    holder = holder_for(policy_file)
    with caplog.at_level(logging.DEBUG, logger="spend_guard.policy"):
        holder.install_sighup(ProactorLike())  # type: ignore[arg-type]
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "spend_guard.policy"] == [
        (logging.DEBUG, "event loop has no signal handlers; policy reload on SIGHUP is off")
    ]
    # The proxy still starts and still picks up an edited file.
    write(policy_file, "mode: shadow\n")
    assert holder.poll(stable_s=0) is True
    assert holder.policy.mode == "shadow" and holder.reloads_ok == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


HALF = "keys:\n  - name: alice\n    key_sha256: " + "a" * 64 + "\n"
WHOLE = HALF + "    budgets: [{limit_usd: 1.00, period: day}]\n"


def test_a_file_still_being_written_is_not_loaded_until_it_holds_still(policy_file: Path) -> None:
    # The first half of the file is a valid policy on its own: alice without her budget.
    clock = FakeClock()
    changes = Changes()
    holder = PolicyHolder(str(policy_file), load_policy(policy_file), on_change=changes, clock=clock)
    write(policy_file, HALF)
    assert holder.poll(stable_s=5) is False  # just changed: wait
    clock.now += 3
    write(policy_file, WHOLE)  # the second half, 3 s later
    assert holder.poll(stable_s=5) is False  # changed again: the wait starts over
    clock.now += 4.9
    assert holder.poll(stable_s=5) is False
    clock.now += 0.1
    assert holder.poll(stable_s=5) is True
    assert len(changes.policies) == 1  # the half-written policy never ran
    assert [b.limit_micros for b in holder.policy.keys[0].budgets] == [1_000_000]
    assert holder.poll(stable_s=5) is False  # nothing new


def test_a_reload_logs_one_line_of_what_changed(policy_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(policy_file, WHOLE + "  - name: bob\n    key_sha256: " + "b" * 64 + "\ngroups: [{name: design}]\n")
    holder = holder_for(policy_file)
    caplog.set_level(logging.INFO, logger="spend_guard.policy")
    write(policy_file, WHOLE.replace("1.00", "2.50") + "  - name: carol\n    key_sha256: " + "c" * 64 + "\n")
    assert holder.reload() is True
    lines = [r for r in caplog.records if r.getMessage().startswith("policy reload changed:")]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING  # something was removed
    assert lines[0].getMessage() == (
        "policy reload changed: keys added carol; removed bob; changed alice; groups removed design; "
        "budgets changed key:alice:day ($1.0000) -> ($2.5000)"
    )
    caplog.clear()
    write(policy_file, policy_file.read_text() + "mode: shadow\n")
    assert holder.reload() is True
    line = next(r for r in caplog.records if r.getMessage().startswith("policy reload changed:"))
    assert line.levelno == logging.INFO and line.getMessage() == "policy reload changed: mode enforce -> shadow"
