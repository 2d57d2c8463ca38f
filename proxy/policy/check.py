"""Policy validation: strict YAML parsing and one check per value (the schema that names each
key's check is schema.py; the builder is build.py).

Every problem is collected (never the first only) as `<file>: <location>: <message>`; see
`proxy.policy.load.load_policy`, the public entry point.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from proxy.money import MoneyError, usd_to_micros
from proxy.policy.model import (
    ENV_NAME_RE,
    MAX_MARGIN,
    MAX_OBSERVATIONS,
    MAX_SIGNATURES,
    MAX_THRESHOLD,
    MAX_TOKENS,
    MAX_WINDOW_DAYS,
    MIN_BODY_BYTES,
    SHA256_RE,
)
from proxy.types import PERIODS, Period, is_period
from proxy.windows import parse_timestamp_ms

# --- YAML -----------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that records duplicate mapping keys instead of letting the last one win."""

    def __init__(self, stream: bytes) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[object, int] = {}
        for key_node, _ in node.value:
            # Keys pulled in by a `<<` merge may be overridden; that is what merges are for.
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                self.duplicates.append(
                    f"line {line}: duplicate key {_show(key)}; first defined on line {first_line[key]}"
                )
            else:
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(file: str, content: bytes, problems: list[str]) -> dict[Any, Any] | None:
    loader: _StrictLoader | None = None
    try:
        loader = _StrictLoader(content)
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "top level"
        detail = ", ".join(part for part in (exc.context, exc.problem) if part)
        problems.append(f"{file}: {where}: invalid YAML: {detail}")
        return None
    except yaml.YAMLError as exc:
        problems.append(f"{file}: top level: invalid YAML: {' '.join(str(exc).split())}")
        return None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        # PyYAML's constructors raise these for bad tagged scalars (`!!int x`, `!!bool maybe`,
        # `!!set [a]`), huge integers and very deep nesting: still just invalid YAML to an operator.
        problems.append(f"{file}: top level: invalid YAML: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
        return None
    finally:
        if loader is not None:
            loader.dispose()
    problems.extend(f"{file}: {duplicate}" for duplicate in loader.duplicates)
    if data is None:  # an empty file, or only comments
        return {}
    if not isinstance(data, dict):
        problems.append(f"{file}: top level: expected a mapping of sections, got {_show(data)}")
        return None
    return data


# --- value checks: each returns the parsed value or raises _Invalid(message) ---------------------

_Check = Callable[[object], Any]


class _Invalid(Exception):
    pass


def _show(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _either(options: Sequence[str]) -> str:
    return f"{', '.join(options[:-1])} or {options[-1]}"


def _optional(check: _Check) -> _Check:
    def optional(value: object) -> Any:
        return None if value is None else check(value)

    return optional


def _number(value: object) -> float:
    # bool is an int subclass: `timeout_s: true` must not read as 1 second.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"expected a number, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise _Invalid(f"expected a number, got {_show(value)}") from None
    if not math.isfinite(number):
        raise _Invalid(f"expected a number, got {_show(value)}")
    return number


def _positive_s(value: object) -> float:
    if (seconds := _number(value)) <= 0:
        raise _Invalid(f"must be greater than 0, got {_show(value)}")
    return seconds


def _non_negative_s(value: object) -> float:
    if (seconds := _number(value)) < 0:
        raise _Invalid(f"must not be negative, got {_show(value)}")
    return seconds


def _body_bytes(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected a whole number of bytes, got {_show(value)}")
    if value < MIN_BODY_BYTES:
        raise _Invalid(f"must be at least {MIN_BODY_BYTES} bytes, got {value}")
    return value


def _counted(noun: str, maximum: int, unit: str = "") -> _Check:
    """A whole number of `noun` from 1 to `maximum` (`unit` follows the maximum in the message)."""

    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected a whole number of {noun}, got {_show(value)}")
        if not 1 <= value <= maximum:
            raise _Invalid(f"must be between 1 and {maximum}{unit}, got {value}")
        return value

    return check


_tokens = _counted("tokens", MAX_TOKENS, " tokens")
_observations = _counted("calls", MAX_OBSERVATIONS)
_signatures = _counted("signatures", MAX_SIGNATURES)


def _margin(value: object) -> float:
    if not 0 <= (margin := _number(value)) <= MAX_MARGIN:
        raise _Invalid(f"must be between 0 and {MAX_MARGIN:g}, got {_show(value)}")
    return margin


def _window_days(value: object) -> float:
    if not 0 < (days := _number(value)) <= MAX_WINDOW_DAYS:
        raise _Invalid(f"must be greater than 0 and at most {MAX_WINDOW_DAYS} days, got {_show(value)}")
    return days


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_show(value)}")
    return value


def _money(value: object) -> int:
    if value is None:
        raise _Invalid("expected a USD amount, got null")
    try:
        return usd_to_micros(value)
    except MoneyError as exc:
        raise _Invalid(str(exc)) from exc


def _choice(label: str, options: Sequence[str]) -> _Check:
    def check(value: object) -> str:
        if not isinstance(value, str) or value not in options:
            raise _Invalid(f"unknown {label} {_show(value)}; expected {_either(options)}")
        return value

    return check


def _period(value: object) -> Period | None:
    if value is None or value == "lifetime":
        return None
    if is_period(value):
        return value
    raise _Invalid(f"unknown period {_show(value)}; expected {', '.join(PERIODS)}, lifetime or null")


def glob_problem(glob: str) -> str | None:
    """Why `glob` would not match what it seems to (fnmatch reads an unclosed '[' as a plain
    character, so `openai/[sora` silently matches nothing), or None."""
    i = 0
    while (i := glob.find("[", i)) != -1:
        j = i + 1
        if j < len(glob) and glob[j] == "!":
            j += 1
        if j < len(glob) and glob[j] == "]":
            j += 1  # a ']' first in a class is a member, not its end
        end = glob.find("]", j)
        if end == -1:
            return f"glob {_show(glob)} has an unclosed '[' at position {i + 1}; write '[[]' for a literal '['"
        i = end + 1
    return None


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"expected a non-empty string, got {_show(value)}")
    return value


def _name(pattern: re.Pattern[str], allowed: str) -> _Check:
    def check(value: object) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise _Invalid(f"expected a name of 1-64 letters, digits or {allowed}, got {_show(value)}")
        return value

    return check


def _env_name(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected an environment variable name, got {_show(value)}")
    if not ENV_NAME_RE.fullmatch(value):
        # Someone may have pasted the API key itself here: never echo it.
        raise _Invalid("expected an environment variable name such as IMAGEROUTER_API_KEY (value not shown)")
    return value


def _base_url(value: object) -> str:
    try:
        parts = urllib.parse.urlsplit(value) if isinstance(value, str) else None
        ok = parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        ok = False
    if not ok or not isinstance(value, str):
        raise _Invalid(f"expected an http:// or https:// URL with a host, got {_show(value)}")
    return value.rstrip("/")


def webhook_url(value: object) -> str:
    """An alert webhook's URL, kept exactly as written (a trailing slash may matter to a receiver)."""
    _base_url(value)
    assert isinstance(value, str)
    return value


def _secret_env(value: object) -> str:
    name = _env_name(value)
    if name.lower().startswith("whsec_"):
        raise _Invalid(
            "expected the name of an environment variable holding the secret, "
            "got what looks like the secret itself (value not shown)"
        )
    return name


def _threshold(value: object) -> float:
    if (fraction := _number(value)) <= 0 or fraction > MAX_THRESHOLD:
        raise _Invalid(
            f"expected a fraction of the limit above 0 and at most {MAX_THRESHOLD:g} (0.8 is 80 %), got {_show(value)}"
        )
    return fraction


def _short_hash(value: str) -> str:
    # Fingerprints are not secrets, but a mistyped one may be a raw API key: show a prefix only.
    # Escaped, so a control or line-separator character cannot split the one-line message.
    return "'" + value[:8].encode("unicode_escape").decode("ascii") + "...'"


def _sha256(value: object) -> str:
    if isinstance(value, str) and SHA256_RE.fullmatch(value):
        return value
    if isinstance(value, str):
        got = f"{_short_hash(value)} ({len(value)} characters)"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        got = "a number (put the digest in quotes)"  # all-digit digests read as YAML integers
    else:
        got = _show(value)
    raise _Invalid(f"expected 64 lowercase hex characters, got {got}; compute it with `spend-guard fingerprint`")


def _sha256_or_list(value: object) -> str | list[Any]:
    """A key's `key_sha256`: one digest, or a list of tokens the builder checks item by item."""
    return value if isinstance(value, list) else _sha256(value)


def _expires_at(value: object) -> int:
    """A token's `expires_at`: an ISO 8601 time (`2027-01-31T00:00:00Z`; no zone means UTC), as
    YAML gives it (a string, or a timestamp YAML parsed), in Unix ms."""
    if isinstance(value, dt.datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
        return int(moment.timestamp() * 1000)
    if isinstance(value, dt.date):
        return int(dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC).timestamp() * 1000)
    try:
        ms = parse_timestamp_ms(value) if isinstance(value, str) else None
    except ValueError:
        ms = None
    if ms is None:
        raise _Invalid(f"expected an ISO 8601 time such as 2027-01-31T00:00:00Z, got {_show(value)}")
    return ms


def _upstream_key_file(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or "\n" in value:
        raise _Invalid(f"expected the path of a file holding the ImageRouter key, got {_show(value)}")
    return value


def _route_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise _Invalid(f"expected a path starting with '/', got {_show(value)}")
    return value
