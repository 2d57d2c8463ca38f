"""Policy YAML for tests, built a line at a time so a test names only what it changes.

    policy_yaml(keys=[key_entry("alice", api_key_id="key-a", budgets=[budget(50, None)])])

is the text

    keys:
      - name: alice
        key_sha256: <SHA-256 of KEY_A>
        api_key_id: key-a
        budgets: [{limit_usd: 50, period: null}]

Sections come out in the order they are given: a string is written on the section's line
(`guard: {hold_ttl_s: 60}`), a list as a block list of `entry()` items or `flow()` mappings.
Fields keep their order too, and values are written as given (`budget("0.50", "day")` keeps its
"0.50"); None is `null`, a list is a flow sequence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from tests.support.constants import KEY_A

# What `make_proxy` puts in front of a policy that has no `account:` section: refreshes far apart,
# so a test drives the refresher itself.
POLICY_BASE = """
account: {name: t, refresh_s: 3600, models_refresh_s: 3600, max_staleness_s: 7200}
"""


def value(v: object) -> str:
    """A YAML scalar or flow sequence, written as given."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(value(item) for item in v) + "]"
    return str(v)


def flow(**fields: object) -> str:
    """A flow mapping: `flow(name="design", id="grp-7")` is `{name: design, id: grp-7}`."""
    return "{" + ", ".join(f"{name}: {value(v)}" for name, v in fields.items()) + "}"


def budget(limit_usd: str | int, period: str | None, **more: object) -> str:
    """One budget: `budget("2.00", "day")` is `{limit_usd: 2.00, period: day}`; None is lifetime."""
    return flow(limit_usd=limit_usd, period=period, **more)


def entry(name: str, **fields: object) -> str:
    """One item of a block list (a group or a key), a field a line."""
    return f"  - name: {name}\n" + "".join(f"    {field}: {value(v)}\n" for field, v in fields.items())


def key_entry(name: str = "alice", *, token: str = KEY_A, **fields: object) -> str:
    """A key, named by the SHA-256 of its bearer `token` (alice's KEY_A unless told)."""
    return entry(name, key_sha256=hashlib.sha256(token.encode()).hexdigest(), **fields)


def policy_yaml(**sections: str | Sequence[str]) -> str:
    """A policy text: each section in the order given, after a first empty line."""
    text = "\n"
    for name, body in sections.items():
        if isinstance(body, str):
            text += f"{name}: {body}\n"
        else:
            text += f"{name}:\n" + "".join(item if item.endswith("\n") else f"  - {item}\n" for item in body)
    return text


def alice_keys(budgets: str) -> str:
    """A policy `keys:` block with key alice (KEY_A) and the given budgets list, in YAML."""
    return policy_yaml(keys=[key_entry(budgets=budgets)])


# alice (KEY_A, ImageRouter key id key-a) with a $50 lifetime budget.
KEYS = policy_yaml(keys=[key_entry(api_key_id="key-a", budgets=[budget(50, None)])])
