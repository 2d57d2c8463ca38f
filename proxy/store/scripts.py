"""The Lua scripts as the store sends them, and what their replies mean.

A ledger script (every file under `lua/` but `_common.lua`, `alert_marks.lua` and
`observe.lua`) is sent as four parts, in this order (`ledger_script`):

1. the run's memo, `local ONCE = {}` (what `_common.lua` says of it; a batch shares one);
2. the key binding: `local K = {snap = KEYS[1], ...}` and `local N_BASE = <n>`, naming the
   account's fixed keys that script receives first (`Keys.lua_binding`, from `SCRIPT_KEYS`);
3. `_common.lua`: what every ledger script shares (hold records, `settle_hold`, `row_level`);
4. the script's own file.

`alert_marks.lua` and `observe.lua` touch no fixed account key and are sent alone. Redis numbers
the lines of the whole text it runs, so `Script` maps an error's `user_script:<n>` back to the
part it came from and that part's own line (`reserve.lua:88`, `_common.lua:126`).

Replies are plain Lua values; the reply codes below carry the same names in the scripts' headers
(tests/store/test_store.py checks that each script spells them as here), and the functions below turn
each reply shape into the typed values of `records.py`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
import redis.exceptions

from proxy.store.keyspace import Keys, parse_spec
from proxy.store.records import Decision, Reclaimed, RowLevel, ScopeRefusal, ScopeUsage

if TYPE_CHECKING:
    from proxy.store.connection import Lane

# reserve.lua's reply opens with one of these, naming the shape of the rest:
#   {REFUSED, code, scope, limit, spent, held}
#   {ALLOWED, tight_scope, tight_remaining, code, scope, limit, spent, held}: the last five are
#     the refusal a shadow scope would have made (code "" = none)
#   {RECLAIM_FIRST, {budget counter specs}}: expired leases to reclaim first; nothing changed
RESERVE_REFUSED = 0
RESERVE_ALLOWED = 1
RESERVE_RECLAIM_FIRST = 2

# settle.lua answers the amount charged (>= 0), one of these, or the budget counter specs it
# needs and was not given (a list; nothing changed).
SETTLE_GONE = -1  # no such hold: settled already, reclaimed, or its reserve has not run yet
SETTLE_QUARANTINED = -2  # its record was unreadable and has been moved aside

# levels.lua's status of each key row asked about.
ROW_NONE = "none"  # the snapshot has no such row (or there is no snapshot)
ROW_UNREADABLE = "unreadable"  # the snapshot had the row but could not read it
ROW_OK = "ok"

# Matches the line number of the source Redis ran in an error: `user_script:12` (Redis, Valkey)
# and `[string "<python>"]:12` (fakeredis' Lua).
_SCRIPT_LINE = re.compile(r'user_script:(\d+)|\[string "[^"]*"\]:(\d+)')


@functools.cache
def lua_source(name: str) -> str:
    """The text of `lua/<name>`, as shipped in the package."""
    return (importlib.resources.files("proxy.store") / "lua" / name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Part:
    """One piece of the text a script is sent as, and the name its lines are reported under."""

    name: str
    text: str


class Script:
    """A Lua script run with EVALSHA, loaded again if Redis lost its script cache (a restart or
    SCRIPT FLUSH): NOSCRIPT means it did not run, so the retry cannot apply it twice. An error
    Redis reports names the part and line it came from, not the line of the whole text."""

    def __init__(self, client: aioredis.Redis, *parts: Part) -> None:
        self.client = client
        self.parts = parts
        self.source = "".join(part.text for part in parts)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()
        self._first_lines: list[int] = []  # the line of the whole source each part starts on
        line = 1
        for part in parts:
            self._first_lines.append(line)
            line += part.text.count("\n")

    async def __call__(self, keys: Sequence[str | bytes], args: Sequence[Any], lane: Lane | None = None) -> Any:
        """Run the script with `keys` and `args`: through `lane` when given (the same command, sent
        without the client's command machinery), else with the client's `execute_command`."""
        execute = self.client.execute_command if lane is None else lane.execute
        try:
            try:
                return await execute("EVALSHA", self.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                await self.client.script_load(self.source)
                return await execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except redis.exceptions.ResponseError as exc:
            message = str(exc)
            located = self.locate_lines(message)
            if located != message:
                exc.args = (located, *exc.args[1:])
            raise

    def locate(self, line: int) -> str:
        """`<part>:<its line>` for line `line` (from 1) of the whole source."""
        for part, first in zip(reversed(self.parts), reversed(self._first_lines), strict=True):
            if first <= line:
                return f"{part.name}:{line - first + 1}"
        return f"line {line}"

    def locate_lines(self, message: str) -> str:
        """`message` with each line number of the whole source it names replaced by `locate`'s."""
        return _SCRIPT_LINE.sub(lambda m: self.locate(int(m.group(1) or m.group(2))), message)


# What one run of Redis has learned, for its operations to share (_common.lua says what).
RUN_MEMO = "local ONCE = {}\n"


def ledger_script(client: aioredis.Redis, name: str) -> Script:
    """`lua/<name>.lua` as it is sent: the run's memo, its key binding, `_common.lua`, then its
    own text."""
    return Script(
        client,
        Part("run memo", RUN_MEMO),
        Part("key binding", Keys.lua_binding(name)),
        Part("_common.lua", lua_source("_common.lua")),
        Part(f"{name}.lua", lua_source(f"{name}.lua")),
    )


def lone_script(client: aioredis.Redis, name: str) -> Script:
    """`lua/<name>.lua` sent alone, nothing prepended."""
    return Script(client, Part(f"{name}.lua", lua_source(f"{name}.lua")))


def as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def refusal_of(code: bytes | str, scope: bytes | str, limit: int, spent: int, held: int) -> ScopeRefusal:
    """A refusal as reserve.lua answers it: code, scope, limit, spent and held (micro-dollars)."""
    return ScopeRefusal.of(as_text(code), as_text(scope), int(limit), int(spent), int(held))


def decision_of(reply: Sequence[Any], reclaimed: Reclaimed) -> Decision:
    """reserve.lua's RESERVE_REFUSED or RESERVE_ALLOWED reply, typed."""
    status, *fields = reply
    if status == RESERVE_REFUSED:
        return Decision(False, refusal_of(*fields), reclaimed=reclaimed)
    tight_scope, tight_remaining, code, *would_refuse = fields
    shadow_refusal = refusal_of(code, *would_refuse) if code else None
    return Decision(True, shadow_refusal, as_text(tight_scope), int(tight_remaining), reclaimed)


def counters_named(specs: Sequence[bytes | str]) -> list[tuple[str, int]]:
    """Budget counters as scripts name them (`<id>@<window start ms>`), as `(id, window start ms)`."""
    return [parse_spec(as_text(s)) for s in specs]


def settle_of(reply: int) -> int | None:
    """settle.lua's answer once it had the counters it needs and the record was readable (not
    SETTLE_QUARANTINED): the amount charged (micros), or None for SETTLE_GONE (no such hold)."""
    return None if int(reply) < 0 else int(reply)


def row_level_of(row: Sequence[Any]) -> RowLevel | str | None:
    """One key row of levels.lua's reply: None (no such row), "unreadable", or its level."""
    status, active, expires_ms, limit_micros, period, window_start_ms, spent_micros, held_micros = row
    status = as_text(status)
    if status == ROW_NONE:
        return None
    if status == ROW_UNREADABLE:
        return "unreadable"
    expires, limit, period = int(expires_ms), int(limit_micros), as_text(period)
    return RowLevel(
        bool(int(active)),
        None if expires < 0 else expires,
        None if limit < 0 else limit,
        None if period == "-" else period,
        int(window_start_ms),
        int(spent_micros),
        int(held_micros),
    )


def budget_level_of(budget: Sequence[Any]) -> ScopeUsage:
    """One budget of levels.lua's reply: charged in its window, and held."""
    charged_micros, held_micros = budget
    return ScopeUsage(int(charged_micros), int(held_micros))
