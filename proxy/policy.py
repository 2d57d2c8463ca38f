"""Load and validate YAML policy files into frozen dataclasses.

A policy path is one file or a directory whose `*.yaml` / `*.yml` files are merged in sorted order.
Unknown keys, wrong types and impossible values are all collected in one pass and raised as one
`PolicyError`, each line `<file>: <location>: <message>` naming the bad value, so a typo never
silently disables a limit. Money is converted to micro-dollars here and nowhere else.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import yaml

from proxy.errors import PolicyError
from proxy.money import MoneyError, usd_to_micros

Period = Literal["day", "week", "month"]
Mode = Literal["enforce", "shadow"]
RouteKind = Literal["image", "video", "text"]

DEFAULT_ROUTES: tuple[tuple[str, RouteKind], ...] = (
    ("/v1/openai/images/generations", "image"),
    ("/v1/openai/images/edits", "image"),
    ("/v1/openai/videos/generations", "video"),
    ("/v1/openai/chat/completions", "text"),
    ("/v1/openai/responses", "text"),
)
POLICY_SUFFIXES = (".yaml", ".yml")
SECTIONS = ("mode", "upstream", "account", "guard", "models")
LISTS = ("routes", "groups", "keys")
ACCOUNT_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
NAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
MIN_BODY_BYTES = 1024


@dataclass(frozen=True, slots=True)
class UpstreamPolicy:
    base_url: str = "https://api.imagerouter.io"
    timeout_s: float = 900.0
    connect_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class AccountPolicy:
    name: str = "main"
    api_key_env: str = "IMAGEROUTER_API_KEY"
    refresh_s: float = 30.0
    models_refresh_s: float = 3600.0
    max_staleness_s: float = 300.0
    min_remaining_micros: int = 0


@dataclass(frozen=True, slots=True)
class GuardPolicy:
    on_store_error: Literal["closed", "open"] = "closed"
    unknown_keys: Literal["account_only", "reject"] = "account_only"
    unknown_models: Literal["hold", "reject"] = "hold"
    max_body_bytes: int = 64 * 1024 * 1024
    hold_ttl_s: float = 960.0
    shutdown_grace_s: float = 900.0


@dataclass(frozen=True, slots=True)
class ModelRules:
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def permits(self, model: str) -> bool:
        """Deny globs win; an empty allow list allows every model not denied."""
        if any(fnmatch.fnmatchcase(model, glob) for glob in self.deny):
            return False
        return not self.allow or any(fnmatch.fnmatchcase(model, glob) for glob in self.allow)


def _empty_overrides() -> Mapping[str, int]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ModelsPolicy:
    default_hold_micros: int = 500_000
    text_hold_micros: int = 50_000
    overrides: Mapping[str, int] = field(default_factory=_empty_overrides)
    rules: ModelRules = field(default_factory=ModelRules)
    max_request_micros: int | None = None


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    path: str
    kind: RouteKind
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class Budget:
    id: str  # "key:<name>:<period or lifetime>" or "group:<name>:<period or lifetime>"
    limit_micros: int
    period: Period | None  # None = lifetime
    shadow: bool


@dataclass(frozen=True, slots=True)
class GroupPolicy:
    name: str
    budgets: tuple[Budget, ...]
    max_request_micros: int | None


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    name: str
    key_sha256: str
    api_key_id: str | None
    api_key_name: str | None
    group: str | None
    budgets: tuple[Budget, ...]
    max_request_micros: int | None
    rules: ModelRules


@dataclass(frozen=True, slots=True)
class Policy:
    mode: Mode
    upstream: UpstreamPolicy
    account: AccountPolicy
    guard: GuardPolicy
    models: ModelsPolicy
    routes: tuple[RoutePolicy, ...]  # effective: DEFAULT_ROUTES with the policy's merged over them
    groups: Mapping[str, GroupPolicy]
    keys: tuple[KeyPolicy, ...]
    sources: tuple[str, ...]
    version: str
    _by_fingerprint: Mapping[str, KeyPolicy] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = MappingProxyType({key.key_sha256: key for key in self.keys})
        object.__setattr__(self, "_by_fingerprint", index)

    def key_for(self, fingerprint: str) -> KeyPolicy | None:
        return self._by_fingerprint.get(fingerprint)

    def group_of(self, key: KeyPolicy) -> GroupPolicy | None:
        return None if key.group is None else self.groups.get(key.group)


def default_policy() -> Policy:
    """Every default, no keys: what runs when no `--policy` is given."""
    return Policy(
        mode="enforce",
        upstream=UpstreamPolicy(),
        account=AccountPolicy(),
        guard=GuardPolicy(),
        models=ModelsPolicy(),
        routes=tuple(RoutePolicy(path, kind) for path, kind in DEFAULT_ROUTES),
        groups=MappingProxyType({}),
        keys=(),
        sources=(),
        version="default",
    )


def policy_files(path: str | os.PathLike[str]) -> list[str]:
    """The files `path` names: itself, or a directory's `*.yaml`/`*.yml` in sorted order."""
    root = os.fspath(path)
    if not os.path.isdir(root):
        return [root]
    names = sorted(
        name
        for name in os.listdir(root)
        # Dot files are editor backups and lock files, not policies.
        if name.endswith(POLICY_SUFFIXES) and not name.startswith(".")
    )
    return [os.path.join(root, name) for name in names if os.path.isfile(os.path.join(root, name))]


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Load a policy file, or merge every policy file in a directory, and validate it.

    Raises `PolicyError` listing every problem found, each `<file>: <location>: <message>`.
    """
    root = os.fspath(path)
    if not os.path.exists(root):
        raise PolicyError([f"{root}: no such file or directory"])
    files = policy_files(root)
    if not files:
        raise PolicyError([f"{root}: directory has no *.yaml or *.yml policy files"])
    problems: list[str] = []
    builder = _Builder(problems)
    digest = hashlib.sha256()
    for file in files:
        try:
            with open(file, "rb") as stream:
                content = stream.read()
        except OSError as exc:
            problems.append(f"{file}: cannot read: {exc.strerror}")
            continue
        for part in (os.path.basename(file).encode(), content):
            digest.update(len(part).to_bytes(8, "big") + part)
        data = _parse_yaml(file, content, problems)
        if data is not None:
            builder.add(file, data)
    policy = builder.finish(tuple(files), digest.hexdigest()[:12])
    if problems:
        raise PolicyError(problems)
    return policy


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


def _parse_yaml(file: str, content: bytes, problems: list[str]) -> dict[Any, Any] | None:
    loader = _StrictLoader(content)
    try:
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
    finally:
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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Invalid(f"expected a number, got {_show(value)}")
    return float(value)


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
    if value == "day" or value == "week" or value == "month":
        return value
    raise _Invalid(f"unknown period {_show(value)}; expected day, week, month or null")


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


def _short_hash(value: str) -> str:
    # Fingerprints are not secrets, but a mistyped one may be a raw API key: show a prefix only.
    return f"'{value[:8]}...'"


def _sha256(value: object) -> str:
    if isinstance(value, str) and SHA256_RE.fullmatch(value):
        return value
    if isinstance(value, str):
        got = f"{_short_hash(value)} ({len(value)} characters)"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        got = "a number (put the digest in quotes)"  # all-digit digests read as YAML integers
    else:
        got = _show(value)
    raise _Invalid(
        f"expected 64 lowercase hex characters, got {got}; compute it with `spend-guard fingerprint`"
    )


def _route_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise _Invalid(f"expected a path starting with '/', got {_show(value)}")
    return value


_Spec = Mapping[str, tuple[str, _Check]]  # YAML key -> (dataclass attribute, check)
_entry_name = _name(NAME_RE, "_ . @ -")
_optional_money = _optional(_money)
_mode = _choice("mode", ("enforce", "shadow"))
FIELDS: Mapping[str, _Spec] = {
    "mode": {"mode": ("mode", _mode)},
    "upstream": {
        "base_url": ("base_url", _base_url),
        "timeout_s": ("timeout_s", _positive_s),
        "connect_timeout_s": ("connect_timeout_s", _positive_s),
    },
    "account": {
        "name": ("name", _name(ACCOUNT_NAME_RE, "_ . -")),
        "api_key_env": ("api_key_env", _env_name),
        "refresh_s": ("refresh_s", _positive_s),
        "models_refresh_s": ("models_refresh_s", _positive_s),
        "max_staleness_s": ("max_staleness_s", _positive_s),
        "min_remaining_usd": ("min_remaining_micros", _money),
    },
    "guard": {
        "on_store_error": ("on_store_error", _choice("value", ("closed", "open"))),
        "unknown_keys": ("unknown_keys", _choice("value", ("account_only", "reject"))),
        "unknown_models": ("unknown_models", _choice("value", ("hold", "reject"))),
        "max_body_bytes": ("max_body_bytes", _body_bytes),
        "hold_ttl_s": ("hold_ttl_s", _positive_s),
        "shutdown_grace_s": ("shutdown_grace_s", _non_negative_s),
    },
    "models": {
        "default_hold_usd": ("default_hold_micros", _money),
        "text_hold_usd": ("text_hold_micros", _money),
        "max_request_usd": ("max_request_micros", _optional_money),
    },
    "route": {
        "path": ("path", _route_path),
        "kind": ("kind", _choice("route kind", ("image", "video", "text"))),
        "enabled": ("enabled", _bool),
    },
    "budget": {
        "limit_usd": ("limit_micros", _money),
        "period": ("period", _period),
        "mode": ("mode", _mode),
    },
    "group": {"name": ("name", _entry_name), "max_request_usd": ("max_request_micros", _optional_money)},
    "key": {
        "name": ("name", _entry_name),
        "key_sha256": ("key_sha256", _sha256),
        "api_key_id": ("api_key_id", _optional(_text)),
        "api_key_name": ("api_key_name", _optional(_text)),
        "group": ("group", _optional(_entry_name)),
        "max_request_usd": ("max_request_micros", _optional_money),
    },
}
RULES_KEYS = ("allow", "deny")
# Keys each mapping accepts beyond its flat FIELDS: nested lists and mappings parsed on their own.
NESTED_KEYS: Mapping[str, tuple[str, ...]] = {
    "policy": (*SECTIONS, *LISTS),
    "models": ("overrides", *RULES_KEYS),
    "rules": RULES_KEYS,
    "group": ("budgets",),
    "key": ("budgets", "models"),
}


# --- building: one _Builder per load, fed each file in order -----------------------------------


@dataclass(slots=True)
class _File:
    """Problem reporting for one file: every message is `<file>: <location>: <message>`."""

    name: str
    problems: list[str]

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{self.name}: {where}: {message}")

    def mapping(self, value: object, where: str, kind: str) -> dict[Any, Any] | None:
        """`value` if it is a mapping of known keys for `kind`; unknown keys are reported."""
        if not isinstance(value, dict):
            self.problem(where, f"expected a mapping, got {_show(value)}")
            return None
        known = (*FIELDS.get(kind, {}), *NESTED_KEYS.get(kind, ()))
        for key in value:
            if key not in known:
                self.problem(_join(where, key), f"unknown key; expected one of {', '.join(known)}")
        return value

    def items(self, value: object, where: str) -> list[tuple[str, Any]]:
        """`(location, item)` per list item; null is an empty list, anything else is reported."""
        if value is None:
            return []
        if not isinstance(value, list):
            self.problem(where, f"expected a list, got {_show(value)}")
            return []
        return [(f"{where}[{index}]", item) for index, item in enumerate(value)]

    def fields(
        self, data: Mapping[Any, Any], where: str, kind: str, required: Sequence[str] = ()
    ) -> dict[str, Any]:
        """The valid flat fields of `data` by attribute name; missing or invalid ones are reported."""
        for key in required:
            if key not in data:
                self.problem(where, f"missing required key '{key}'")
        values: dict[str, Any] = {}
        for key, (attr, check) in FIELDS[kind].items():
            if key in data:
                try:
                    values[attr] = check(data[key])
                except _Invalid as exc:
                    self.problem(_join(where, key), str(exc))
        return values

    def overrides(self, value: object, where: str) -> Mapping[str, int]:
        """Per-model hold prices: model id -> USD, as micro-dollars."""
        prices: dict[str, int] = {}
        if not isinstance(value, dict):
            if value is not None:
                self.problem(where, f"expected a mapping of model id to USD amount, got {_show(value)}")
            return MappingProxyType(prices)
        for model, price in value.items():
            item_where = f"{where}[{_show(model)}]"
            if not isinstance(model, str) or not model:
                self.problem(item_where, "expected a model id")
                continue
            try:
                prices[model] = _money(price)
            except _Invalid as exc:
                self.problem(item_where, str(exc))
        return MappingProxyType(prices)

    def rules(self, data: Mapping[Any, Any], where: str) -> ModelRules:
        globs: dict[str, tuple[str, ...]] = {}
        for key in RULES_KEYS:
            found = []
            for item_where, item in self.items(data.get(key), _join(where, key)):
                if isinstance(item, str) and item:
                    found.append(item)
                else:
                    self.problem(item_where, f"expected a model id or glob, got {_show(item)}")
            globs[key] = tuple(found)
        return ModelRules(**globs)

    def budgets(self, data: Mapping[Any, Any], where: str, owner: str) -> tuple[Budget, ...]:
        """`owner` is `key:<name>` or `group:<name>`; two budgets with one period are an error."""
        budgets: list[Budget] = []
        first: dict[Period | None, str] = {}
        for item_where, item in self.items(data.get("budgets"), f"{where}.budgets"):
            if (raw := self.mapping(item, item_where, "budget")) is None:
                continue
            values = self.fields(raw, item_where, "budget", required=("limit_usd", "period"))
            if "period" not in values:
                continue
            period = values["period"]
            label = period or "lifetime"
            if period in first:
                message = f"duplicate period '{label}'; {first[period]} has it already"
                self.problem(f"{item_where}.period", message)
                continue
            first[period] = item_where
            if "limit_micros" not in values:
                continue
            shadow = values.get("mode") == "shadow"
            budgets.append(Budget(f"{owner}:{label}", values["limit_micros"], period, shadow))
        return tuple(budgets)


def _join(where: str, key: object) -> str:
    return f"{where}.{key}" if where else str(key)


def _or_empty(value: object) -> object:
    return {} if value is None else value


@dataclass(slots=True)
class _Section:
    file: _File
    raw: dict[Any, Any]
    values: dict[str, Any]  # valid fields only, by dataclass attribute


@dataclass(slots=True)
class _Entry:
    file: _File
    where: str  # e.g. "keys[3]"
    values: dict[str, Any]

    def at(self) -> str:
        return f"{self.file.name}: {self.where}"


@dataclass(slots=True)
class _Builder:
    problems: list[str]
    sections: dict[str, _Section] = field(default_factory=dict)
    entries: dict[str, list[_Entry]] = field(default_factory=lambda: {name: [] for name in LISTS})

    def add(self, name: str, data: dict[Any, Any]) -> None:
        file = _File(name, self.problems)
        file.mapping(data, "", "policy")
        for section in SECTIONS:
            if section not in data:
                continue
            if section in self.sections:
                first = self.sections[section].file.name
                file.problem(section, f"section already defined in {first}; define each section in one file")
            elif section == "mode":
                self.sections[section] = _Section(file, data, file.fields(data, "", "mode"))
            # `guard:` with nothing under it is an empty section.
            elif (raw := file.mapping(_or_empty(data[section]), section, section)) is not None:
                values = file.fields(raw, section, section)
                if section == "models":
                    values["overrides"] = file.overrides(raw.get("overrides"), "models.overrides")
                    values["rules"] = file.rules(raw, section)
                self.sections[section] = _Section(file, raw, values)
        for kind, plural in (("route", "routes"), ("group", "groups"), ("key", "keys")):
            for where, item in file.items(data.get(plural), plural):
                if (raw := file.mapping(item, where, kind)) is not None:
                    self.entries[plural].append(_Entry(file, where, self._entry(file, where, kind, raw)))

    @staticmethod
    def _entry(file: _File, where: str, kind: str, raw: dict[Any, Any]) -> dict[str, Any]:
        if kind == "route":
            values = file.fields(raw, where, kind, required=("path",))
            default_kind = dict(DEFAULT_ROUTES).get(values.get("path", ""))
            if "kind" not in raw and "path" in values:
                if default_kind is None:  # a default route may omit its kind, a new one may not
                    file.problem(where, "missing required key 'kind'")
                else:
                    values["kind"] = default_kind
            return values
        required = ("name", "key_sha256") if kind == "key" else ("name",)
        values = file.fields(raw, where, kind, required)
        values["budgets"] = file.budgets(raw, where, f"{kind}:{values.get('name')}")
        if kind == "key":
            rules = file.mapping(_or_empty(raw.get("models")), f"{where}.models", "rules")
            values["rules"] = ModelRules() if rules is None else file.rules(rules, f"{where}.models")
        return values

    def finish(self, sources: tuple[str, ...], version: str) -> Policy:
        """Cross-field and cross-file checks, then the Policy (meaningful only if no problems)."""
        built = {name: self.sections[name].values if name in self.sections else {} for name in SECTIONS}
        upstream, account = UpstreamPolicy(**built["upstream"]), AccountPolicy(**built["account"])
        guard = GuardPolicy(**built["guard"])
        # Balances must be refreshed before they count as stale; holds must outlive the upstream call.
        self._order(
            ("account", "refresh_s", account.refresh_s),
            ("account", "max_staleness_s", account.max_staleness_s),
            strict=False,
        )
        self._order(
            ("upstream", "timeout_s", upstream.timeout_s),
            ("guard", "hold_ttl_s", guard.hold_ttl_s),
            strict=True,
        )

        routes = {path: RoutePolicy(path, kind) for path, kind in DEFAULT_ROUTES}
        for entry in self._unique("routes", ("path", "route"), required=("path", "kind")):
            routes[entry.values["path"]] = RoutePolicy(**entry.values)
        groups = {}
        for entry in self._unique("groups", ("name", "group name"), required=("name",)):
            values = entry.values
            max_request = values.get("max_request_micros")
            groups[values["name"]] = GroupPolicy(values["name"], values["budgets"], max_request)
        for entry in self.entries["keys"]:
            group = entry.values.get("group")
            if group is not None and group not in groups:
                known = f"defined groups: {', '.join(groups)}" if groups else "no groups are defined"
                entry.file.problem(f"{entry.where}.group", f"unknown group {_show(group)}; {known}")
        keys = []
        unique = ("name", "key name"), ("key_sha256", "key_sha256"), ("api_key_id", "api_key_id")
        for entry in self._unique("keys", *unique, required=("name", "key_sha256")):
            values = entry.values
            keys.append(
                KeyPolicy(
                    name=values["name"],
                    key_sha256=values["key_sha256"],
                    api_key_id=values.get("api_key_id"),
                    api_key_name=values.get("api_key_name"),
                    group=values.get("group"),
                    budgets=values["budgets"],
                    max_request_micros=values.get("max_request_micros"),
                    rules=values["rules"],
                )
            )
        return Policy(
            mode=built["mode"].get("mode", "enforce"),
            upstream=upstream,
            account=account,
            guard=guard,
            models=ModelsPolicy(**built["models"]),
            routes=tuple(routes.values()),
            groups=MappingProxyType(groups),
            keys=tuple(keys),
            sources=sources,
            version=version,
        )

    def _unique(self, plural: str, *fields: tuple[str, str], required: Sequence[str]) -> list[_Entry]:
        """Entries with every `required` value, reporting a `fields` value seen in an earlier entry."""
        first: dict[tuple[str, Any], _Entry] = {}
        kept = []
        for entry in self.entries[plural]:
            complete = all(attr in entry.values for attr in required)  # if not, already reported
            for attr, label in fields:
                if (value := entry.values.get(attr)) is None:
                    continue
                if (attr, value) not in first:
                    first[attr, value] = entry
                    continue
                shown = _short_hash(value) if attr == "key_sha256" else _show(value)
                where, earlier = f"{entry.where}.{attr}", first[attr, value].at()
                entry.file.problem(where, f"duplicate {label} {shown}; first defined at {earlier}")
                complete = False
            if complete:
                kept.append(entry)
        return kept

    def _order(self, low: tuple[str, str, float], high: tuple[str, str, float], *, strict: bool) -> None:
        """Report `high` not above `low` (at least, unless `strict`), at whichever field was set."""
        given = []
        for section, key, _ in (low, high):
            if section in self.sections and key in self.sections[section].raw:
                if key not in self.sections[section].values:
                    return  # invalid, already reported
                given.append((section, key))
        if not given or high[2] > low[2] or (not strict and high[2] == low[2]):
            return
        section, key = given[-1]
        if (section, key) == high[:2]:
            relation = "greater than" if strict else "at least"
            message = f"{_show(high[2])} must be {relation} {low[0]}.{low[1]} ({_show(low[2])})"
        else:
            relation = "less than" if strict else "at most"
            message = f"{_show(low[2])} must be {relation} {high[0]}.{high[1]} ({_show(high[2])})"
        self.sections[section].file.problem(f"{section}.{key}", message)
