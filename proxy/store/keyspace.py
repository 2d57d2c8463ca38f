"""Every Redis key the guard uses, named in one place.

All of an account's keys carry the hash tag `{<account>}` (`sg:{main}:holds`), so Redis Cluster
keeps them on one node and one script may touch several. A script touches only keys it receives
in KEYS: first the account's fixed keys it uses (`SCRIPT_KEYS`; proxy/store/scripts.py sends the
Lua binding `local K = {snap = KEYS[1], ...}` in front of each script from `Keys.lua_binding`, and
the store passes `Keys.fixed`, both from that one tuple), then its own (a hold's tombstone,
budget counters; each script's header says which). A script that would need a counter it was not
given says so instead of touching it, and the caller runs it again with those keys.
"""

from __future__ import annotations

from collections.abc import Sequence

# The account's fixed keys (each script receives those of them it uses: SCRIPT_KEYS).
BASE = (
    "snap",  # hash: the credits snapshot (fetched_ms, remaining, usage, "r:<row_ref>" rows)
    "holds",  # hash: hold_id -> hold record (its versions: parse_hold in _common.lua)
    "held",  # hash: what calls in flight hold, per scope ("acct", "row:<ref>", "b:<budget>")
    "leases",  # sorted set: hold_id by lease expiry (ms)
    "started",  # sorted set: hold_id by when the upstream answered, until a snapshot holds it
    "chsum",  # hash: charges since the snapshot ("acct", "row:<ref>:<window>")
    "chlog",  # sorted set: charge ("<hold_id>[;<figures admitted against>]") by the instant it counts from
    "chamt",  # hash: charge (as in chlog) -> "amount|row field"
    "base",  # hash: hold_id -> which scopes' figures contained its call in flight, until it settles
    "pend",  # hash: "<scope field>|<slot>" -> charges the figures have not shown yet, and their baseline
    "wm",  # hash: scope field -> how far up its figure is spoken for by what has left it
    "quarantine",  # hash: hold_id -> an unreadable record moved aside
    "epoch",  # string: the store's identity (amnesia check)
    "lost",  # string: why and when the store lost its local budget state
    "counted",  # hash: budget counter id -> the window start (ms) of its counter's latest charge
    "seq",  # hash: instance id -> how many settles of that instance the store took (rollback check)
    "seqseen",  # sorted set: instance id by when it last checked the store's identity (ms)
)


# The fixed keys each script touches, in the order it receives them: its `K` binding
# (`lua_binding`) and the keys the store passes (`Keys.fixed`) come from the same tuple. Fewer
# keys per call is less to encode and send (a reserve and a settle run on every guarded call).
SCRIPT_KEYS = {
    "reserve": ("snap", "holds", "held", "leases", "chsum", "epoch", "lost", "counted"),
    "reclaim": ("holds", "held", "leases", "started", "chsum", "chlog", "chamt", "quarantine", "counted", "base", "wm"),
    "settle": (
        *("holds", "held", "leases", "started", "chsum", "chlog", "chamt", "quarantine", "counted", "lost", "seq"),
        *("base", "wm"),
    ),
    "mark_started": ("snap", "holds", "held", "leases", "started", "quarantine", "base", "wm"),
    "apply_snapshot": (
        *("snap", "holds", "held", "leases", "started", "chsum", "chlog", "chamt", "quarantine"),
        *("base", "pend", "wm"),
    ),
    "levels": ("snap", "held", "chsum"),
    "identity": ("epoch", "lost", "seq", "seqseen"),
}


# The one key outside every account's keyspace: which account name counts each ImageRouter account
# in this store (hash: "salt" -> the salt of the account key fingerprints, "fp:<fingerprint>" -> the
# account name). Touched only by plain commands, never by a script, so it may live in any slot.
ACCOUNTS = "sg:accounts"


def spec(budget_id: str, window_start_ms: int) -> str:
    """A budget counter as hold records and scripts spell it: `<id>@<window start ms>`."""
    return f"{budget_id}@{window_start_ms}"


def parse_spec(text: str) -> tuple[str, int]:
    budget_id, _, window = text.rpartition("@")
    return budget_id, int(window)


class Keys:
    """The key names of one account."""

    def __init__(self, account: str) -> None:
        self.prefix = f"sg:{{{account}}}:"
        self.base = tuple((self.prefix + name).encode() for name in BASE)  # every fixed key, in BASE order
        self._fixed = {
            script: tuple((self.prefix + name).encode() for name in names) for script, names in SCRIPT_KEYS.items()
        }

    def fixed(self, script: str) -> tuple[bytes, ...]:
        """The fixed keys `script` receives first, encoded once."""
        return self._fixed[script]

    def __call__(self, name: str) -> str:
        """A fixed key by name (`snap`, `epoch`, `prices`, `status`, a lock)."""
        return self.prefix + name

    def budget(self, budget_id: str, window_start_ms: int) -> str:
        """A local budget's counter (micro-dollars charged) in the window starting then (0: lifetime)."""
        return f"{self.prefix}b:{budget_id}:{window_start_ms}"

    def budgets(self, counters: Sequence[tuple[str, int]]) -> list[str]:
        return [self.budget(budget_id, window) for budget_id, window in counters]

    def tomb(self, hold_id: str) -> str:
        """Left by a release that found no hold: its reserve, if it still runs, holds nothing."""
        return f"{self.prefix}tomb:{hold_id}"

    def learned(self, digest: str) -> str:
        """One price signature's learned costs (proxy/store/learned.py)."""
        return f"{self.prefix}learned:{digest}"

    @property
    def learned_index(self) -> str:
        """Every learned signature by when it was last written: the table's bound."""
        return f"{self.prefix}learned-index"

    def alert(self, scope: str) -> str:
        return f"{self.prefix}alert:{scope}"

    def alert_rate(self, scope: str) -> str:
        return f"{self.prefix}alert-rate:{scope}"

    @staticmethod
    def lua_binding(script: str) -> str:
        """`local K = {snap = KEYS[1], ...}` for the fixed keys of `script`, and their count."""
        names = SCRIPT_KEYS[script]
        bound = ", ".join(f"{name} = KEYS[{i}]" for i, name in enumerate(names, 1))
        return f"local K = {{{bound}}}\nlocal N_BASE = {len(names)}\n"
