"""Keep the current policy, and swap in a new one on SIGHUP or when the files change.

A new policy that fails to load never replaces the running one: the failure is logged on one line,
counted and kept (`last_failure`, shown by `/-/readyz` and the status page until a reload succeeds),
and the proxy goes on enforcing what it had. A file change is taken only once the
files have stayed unchanged for `POLICY_STABLE_S`, so a file being written in pieces is not
loaded half-written (write elsewhere and rename into place to be safe whatever the timing; SIGHUP
reloads at once). Each reload logs one line summing up what changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.errors import PolicyError
from proxy.money import format_usd
from proxy.policy.load import file_version, load_policy, policy_files
from proxy.policy.model import Budget, Policy

logger = logging.getLogger("spend_guard.policy")

# (path, mtime_ns, size) per policy file; None for a file that could not be stat'ed.
Fingerprint = tuple[tuple[str, int | None, int | None], ...]
# A changed policy is loaded once its files have looked the same for this long.
POLICY_STABLE_S = 5.0


@dataclass(frozen=True)
class ReloadFailure:
    """The latest reload, which failed: when (Unix seconds), what was wrong, and the version the
    files had (None: unreadable). Cleared by the next reload that succeeds."""

    path: str
    at_s: float
    problems: tuple[str, ...]
    file_version: str | None

    def describe(self, enforced: str) -> str:
        """One line for /-/readyz and the status page."""
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at_s))
        first = " ".join(self.problems[0].split()) if self.problems else "unknown error"
        count = len(self.problems)
        return (
            f"policy: the reload of {self.path} at {when} failed with {count} problem(s), the first: {first}; "
            f"still enforcing version {enforced} (the files are version {self.file_version or 'unreadable'})"
        )


class PolicyHolder:
    """The current `policy`, read by the guard on every request, and the counts of reloads."""

    def __init__(
        self,
        path: str | None,
        policy: Policy,
        *,
        on_change: Callable[[Policy], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.clock = clock
        # A change seen but not yet loaded, and since when it has looked like this.
        self._pending: Fingerprint | None = None
        self._pending_since = 0.0
        self.policy = policy
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_error: str | None = None
        self.last_failure: ReloadFailure | None = None
        self._on_change = on_change
        # Taken now, close to when `policy` was loaded, so an edit made before watch() starts is seen.
        self._seen = self._fingerprint()

    def reload(self) -> bool:
        """Load the policy again; keep the old one if the new one fails. True unless it failed."""
        if self.path is None:
            return True
        try:
            policy = load_policy(self.path)
        except (PolicyError, OSError) as exc:
            problems = exc.problems if isinstance(exc, PolicyError) else [str(exc)]
            self.reloads_failed += 1
            self.last_error = "; ".join(" ".join(problem.split()) for problem in problems)
            self.last_failure = ReloadFailure(self.path, time.time(), tuple(problems), file_version(self.path))
            logger.error(
                "policy reload from %s failed, keeping version %s: %d problem(s): %s",
                self.path,
                self.policy.version,
                len(problems),
                self.last_error,
            )
            return False
        self.reloads_ok += 1
        self.last_error = None
        self.last_failure = None
        if policy.version == self.policy.version:
            logger.debug("policy at %s unchanged (version %s)", self.path, policy.version)
            return True
        old, self.policy = self.policy, policy
        logger.info("policy reloaded from %s: version %s -> %s", self.path, old.version, policy.version)
        line, removed = summary(old, policy)
        logger.log(logging.WARNING if removed else logging.INFO, "policy reload changed: %s", line)
        for line in budget_changes(old, policy):
            logger.warning("policy reload: %s", line)
        if self._on_change is not None:
            self._on_change(policy)
        return True

    def file_version(self) -> str | None:
        """The version of the policy files on disk now (None: no path, or unreadable)."""
        return None if self.path is None else file_version(self.path)

    async def watch(self, interval_s: float = 1.0, stable_s: float = POLICY_STABLE_S) -> None:
        """Poll the policy files every `interval_s` and reload once a change has held for
        `stable_s`; runs until cancelled."""
        if self.path is None:
            return
        while True:
            await asyncio.sleep(interval_s)
            self.poll(stable_s)

    def poll(self, stable_s: float = POLICY_STABLE_S) -> bool:
        """One look at the files: reload if they changed and have looked the same for `stable_s`
        (a file still being written keeps moving its size or mtime). True if it reloaded."""
        current = self._fingerprint()
        now = self.clock()
        if current == self._seen:
            self._pending = None
            return False
        if current != self._pending:
            self._pending, self._pending_since = current, now
            if stable_s > 0:
                return False
        if now - self._pending_since < stable_s:
            return False
        # Remember what was seen before loading, so an edit during the load is caught next time.
        self._seen, self._pending = current, None
        self.reload()
        return True

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reload on SIGHUP; a no-op where the platform or the loop has no such signal."""
        sighup = getattr(signal, "SIGHUP", None)
        if sighup is None:
            return
        try:
            loop.add_signal_handler(sighup, self.reload)
        except NotImplementedError:  # e.g. the Windows proactor loop
            logger.debug("event loop has no signal handlers; policy reload on SIGHUP is off")

    def _fingerprint(self) -> Fingerprint:
        if self.path is None:
            return ()
        try:
            files = policy_files(self.path)
        except OSError:  # the directory went away
            return ()
        stats: list[tuple[str, int | None, int | None]] = []
        for file in files:
            try:
                stat = os.stat(file)
            except OSError:
                stats.append((file, None, None))
            else:
                stats.append((file, stat.st_mtime_ns, stat.st_size))
        return tuple(stats)


def _budgets(policy: Policy) -> dict[str, Budget]:
    """Every budget of `policy` by its counter (a group budget once, however many keys share it)."""
    found = {b.counter: b for key in policy.keys for b in key.budgets}
    found.update({b.counter: b for group in policy.groups.values() for b in group.budgets})
    return found


def budget_changes(old: Policy, new: Policy) -> list[str]:
    """What a reload does to the money budgets counted: renamed budgets keep their counter; a
    removed budget, or one whose period changed, leaves its counter behind (never enforced again)."""
    before, after = _budgets(old), _budgets(new)
    lines = []
    for counter, budget in sorted(before.items()):
        kept = after.get(counter)
        if kept is None:
            lines.append(
                f"budget {budget.id} is gone (removed, its period changed, or its key/group got a new id or "
                f"secret): what it counted this window stays in the store but no longer limits anything"
            )
        elif kept.id != budget.id:
            lines.append(f"budget {budget.id} is now {kept.id}; it keeps counting what it counted")
    for counter, budget in sorted(after.items()):
        if counter not in before:
            lines.append(f"budget {budget.id} is new: it counts from what its store counter holds ($0 if never used)")
    return lines


def summary(old: Policy, new: Policy) -> tuple[str, bool]:
    """One line of what a reload changed (keys, groups, budgets added, removed, changed), and
    whether anything was removed (logged as a warning: an accidental removal must be seen)."""
    parts: list[str] = []
    removed_any = False

    def compare(
        what: str, before: dict[str, object], after: dict[str, object], show: Callable[[str, object], str]
    ) -> None:
        nonlocal removed_any
        added = [show(n, after[n]) for n in after if n not in before]
        removed = [show(n, before[n]) for n in before if n not in after]
        changed = [
            n if show(n, before[n]) == n else f"{show(n, before[n])} -> {show(n, after[n]).removeprefix(n + ' ')}"
            for n in before
            if n in after and before[n] != after[n]
        ]
        removed_any = removed_any or bool(removed)
        found = [
            f"{label} {', '.join(names)}"
            for label, names in (("added", added), ("removed", removed), ("changed", changed))
            if names
        ]
        if found:
            parts.append(f"{what} " + "; ".join(found))

    compare("keys", {k.name: k for k in old.keys}, {k.name: k for k in new.keys}, lambda name, _: name)
    compare("groups", dict(old.groups), dict(new.groups), lambda name, _: name)
    compare(
        "budgets", {b.id: b for b in _budgets(old).values()}, {b.id: b for b in _budgets(new).values()}, _show_budget
    )
    if old.mode != new.mode:
        parts.append(f"mode {old.mode} -> {new.mode}")
    return ("; ".join(parts) or "no key, group or budget changed"), removed_any


def _show_budget(budget_id: str, budget: object) -> str:
    assert isinstance(budget, Budget)
    return f"{budget_id} (${format_usd(budget.limit_micros)}{', shadow' if budget.shadow else ''})"
