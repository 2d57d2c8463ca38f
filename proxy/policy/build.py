"""Policy building: one `Builder` per load, fed each parsed file in order; merges sections and
lists, reports duplicates naming both places, and produces the frozen `Policy` (each file's values
are read by proxy/policy/reading.py)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from proxy.policy.check import _short_hash, _show
from proxy.policy.model import (
    DEFAULT_ROUTES,
    LISTS,
    NAME_RE,
    SECTIONS,
    AccountPolicy,
    AdminPolicy,
    AlertsPolicy,
    GroupPolicy,
    GuardPolicy,
    KeyPolicy,
    ModelRules,
    ModelsPolicy,
    ObservedPolicy,
    Policy,
    RoutePolicy,
    UpstreamPolicy,
)
from proxy.policy.reading import _File

# --- building: one _Builder per load, fed each file in order -----------------------------------

# Keys a section must have when it is present at all.
REQUIRED: Mapping[str, tuple[str, ...]] = {"admin": ("token_sha256",)}


def _counter_owner(kind: str, values: Mapping[str, Any]) -> str:
    """What a budget's counter is keyed by, so that renaming its key or group keeps the money it
    counted: an explicit `id`; else a virtual key's upstream key reference (its variable or file,
    so rotating its tokens keeps it); else a key's fingerprint (renaming keeps it, a new secret
    starts afresh); else the group's name (give a group an `id` before renaming it)."""
    if values.get("budget_id"):
        return f"{kind}-id:{values['budget_id']}"
    if kind == "key" and (env := values.get("upstream_key_env") or values.get("upstream_key_file")):
        ref = f"env:{env}" if values.get("upstream_key_env") else f"file:{env}"
        return f"key-vk:{hashlib.sha256(ref.encode()).hexdigest()[:24]}"
    if kind == "key" and isinstance(values.get("key_sha256"), str):
        return f"key-fp:{values['key_sha256'][:24]}"
    return f"{kind}:{values.get('name')}"


def _named(where: str, name: object) -> str:
    """A key's or group's location with its name, `keys[2] (bob)`, so a problem points at the
    entry an operator knows by name; the index alone when the name is missing or invalid."""
    return f"{where} ({name})" if isinstance(name, str) and NAME_RE.fullmatch(name) else where


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
class Builder:
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
                values = file.fields(raw, section, section, required=REQUIRED.get(section, ()))
                if section == "models":
                    values["overrides"] = file.overrides(raw.get("overrides"), "models.overrides")
                    values["text_rates"] = file.text_rates(raw.get("text_rates"), "models.text_rates")
                    values["rules"] = file.rules(raw, section)
                    if raw.get("observed") is not None:
                        observed = file.mapping(raw["observed"], "models.observed", "observed")
                        if observed is not None:
                            values["observed"] = ObservedPolicy(**file.fields(observed, "models.observed", "observed"))
                if section == "alerts":
                    file.alerts(raw, values)
                self.sections[section] = _Section(file, raw, values)
        for kind, plural in (("route", "routes"), ("group", "groups"), ("key", "keys")):
            for where, item in file.items(data.get(plural), plural):
                if kind != "route" and isinstance(item, dict):
                    where = _named(where, item.get("name"))
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
        if kind == "key":
            file.tokens(raw, where, values)
        values["budgets"] = file.budgets(raw, where, f"{kind}:{values.get('name')}", _counter_owner(kind, values))
        if kind == "key":
            if (path := values.get("upstream_key_file")) is not None:
                # A relative path is read from the policy file's directory, wherever the proxy runs.
                values["upstream_key_file"] = os.path.join(os.path.dirname(os.path.abspath(file.name)), path)
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
                    tokens=values.get("tokens", ()),
                    upstream_key_env=values.get("upstream_key_env"),
                    upstream_key_file=values.get("upstream_key_file"),
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
            alerts=AlertsPolicy(**built["alerts"]),
            admin=AdminPolicy(**built["admin"]) if "token_sha256" in built["admin"] else None,
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
                # Every token of a key counts: no two keys may share one.
                tokens = entry.values.get("tokens", ()) if attr == "key_sha256" else ()
                found = [t.sha256 for t in tokens] or [value]
                for value in found:
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
