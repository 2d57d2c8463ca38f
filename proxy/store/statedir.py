"""What is recorded about the embedded store outside it: which store a state dir held
(`EpochRecord`, in the state dir) and which state dir each account's store is kept in
(`StateDirs`, beside the default state dir), so an empty store where one was kept is a loss, not
a new store (docs/state.md#the-embedded-store)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

from proxy.store.embedded import default_state_dir, state_home


class EpochRecord:
    """The epoch of the store this state dir's proxy counted in, kept beside the store (not in it):
    a store found empty while this says it had one lost its state; no record at all is a first
    start here, where an empty store is new."""

    NAME = "store-epoch"

    def __init__(self, state_dir: str | None) -> None:
        self.path = Path(state_dir or default_state_dir(), self.NAME)

    def read(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def write(self, epoch: str) -> None:
        if epoch and epoch != self.read():
            with contextlib.suppress(OSError):
                temporary = self.path.with_name(f"{self.NAME}.{os.getpid()}")
                temporary.write_text(epoch + "\n")
                temporary.replace(self.path)


class StateDirs:
    """Which state dir each ImageRouter account's embedded store was last kept in, recorded outside
    every state dir (beside the default one, in `$XDG_STATE_HOME`) by a keyed fingerprint of the
    account key, never the key. A proxy started on a state dir that holds no store while its
    account's store is recorded in another one that still holds it (another `--state-dir`, a
    relative one from another working directory, `SPEND_GUARD_STATE_DIR` set or unset) is
    looking in the wrong place: its empty store is a loss, not a new one."""

    NAME = "spend-guard.dirs"

    def __init__(self, home: str | None = None) -> None:
        self.path = Path(home or state_home(), self.NAME)

    def _read(self) -> dict[str, Any]:
        try:
            found = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    @staticmethod
    def _fingerprint(salt: str, account_key: str) -> str:
        return hmac.new(salt.encode(), account_key.encode(), hashlib.sha256).hexdigest()

    def elsewhere(self, account_key: str, state_dir: str) -> str | None:
        """The other state dir this account's store is kept in, when `state_dir` holds no store
        record and that one does; else None."""
        known = self._read()
        salt, dirs = known.get("salt"), known.get("dirs")
        if not isinstance(salt, str) or not isinstance(dirs, dict):
            return None
        before = dirs.get(self._fingerprint(salt, account_key))
        here = os.path.abspath(state_dir)
        if not isinstance(before, str) or before == here or EpochRecord(here).read():
            return None
        return before if EpochRecord(before).read() else None

    def record(self, account_key: str, state_dir: str) -> None:
        """This account's store is kept in `state_dir` from now on (best effort: a home that
        cannot be written only loses this check)."""
        known = self._read()
        salt, dirs = known.get("salt"), known.get("dirs")
        if not isinstance(salt, str):
            salt = os.urandom(16).hex()
        if not isinstance(dirs, dict):
            dirs = {}
        fingerprint, here = self._fingerprint(salt, account_key), os.path.abspath(state_dir)
        if dirs.get(fingerprint) == here:
            return
        dirs[fingerprint] = here
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(f"{self.NAME}.{os.getpid()}")
            temporary.write_text(json.dumps({"salt": salt, "dirs": dirs}, indent=1) + "\n")
            temporary.replace(self.path)
