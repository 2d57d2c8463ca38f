"""Reading one policy file's values: `_File` reports every problem as `<file>: <location>:
<message>` and reads mappings, lists and fields, and the nested values (model prices, text rates,
alerts, tokens, model rules, budgets), leaving out what is invalid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from proxy.policy.check import (
    _Invalid,
    _money,
    _sha256,
    _short_hash,
    _show,
    _threshold,
    glob_problem,
)
from proxy.policy.model import Budget, ModelRules, TextRate, Token, WebhookPolicy
from proxy.policy.schema import FIELDS, NESTED_KEYS, RULES_KEYS
from proxy.types import Period


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

    def fields(self, data: Mapping[Any, Any], where: str, kind: str, required: Sequence[str] = ()) -> dict[str, Any]:
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

    def text_rates(self, value: object, where: str) -> tuple[TextRate, ...]:
        """Token rates per model glob, in file order (the most specific glob wins when priced)."""
        if value is None:
            return ()
        if not isinstance(value, dict):
            self.problem(where, f"expected a mapping of model glob to rates, got {_show(value)}")
            return ()
        rates = []
        for glob, entry in value.items():
            item_where = f"{where}[{_show(glob)}]"
            if not isinstance(glob, str) or not glob:
                self.problem(item_where, "expected a model id or glob")
                continue
            if (raw := self.mapping(entry, item_where, "text_rate")) is None:
                continue
            required = tuple(FIELDS["text_rate"])
            values = self.fields(raw, item_where, "text_rate", required=required)
            if len(values) == len(required):
                rates.append(TextRate(glob, **values))
        return tuple(rates)

    def alerts(self, raw: Mapping[Any, Any], values: dict[str, Any]) -> None:
        """`alerts.thresholds` (distinct fractions, kept ascending) and `alerts.webhooks`."""
        if "thresholds" in raw:
            found: dict[float, str] = {}
            for item_where, item in self.items(raw["thresholds"], "alerts.thresholds"):
                try:
                    fraction = _threshold(item)
                except _Invalid as exc:
                    self.problem(item_where, str(exc))
                    continue
                if fraction in found:
                    self.problem(item_where, f"duplicate threshold {_show(item)}; {found[fraction]} has it already")
                found.setdefault(fraction, item_where)
            values["thresholds"] = tuple(sorted(found))
        hooks = []
        for item_where, item in self.items(raw.get("webhooks"), "alerts.webhooks"):
            if (hook := self.mapping(item, item_where, "webhook")) is not None:
                hook_values = self.fields(hook, item_where, "webhook", required=("url",))
                if "url" in hook_values:
                    hooks.append(WebhookPolicy(**hook_values))
        values["webhooks"] = tuple(hooks)

    def tokens(self, raw: Mapping[Any, Any], where: str, values: dict[str, Any]) -> None:
        """A virtual key's list of credentials into `values["tokens"]`, each a digest or
        `{sha256, expires_at}`; `values["key_sha256"]` is then the first (left out when any is
        invalid: already reported). One `key_sha256` string stays as it is."""
        if "upstream_key_env" in raw and "upstream_key_file" in raw:
            self.problem(where, "give upstream_key_env or upstream_key_file, not both")
        given = values.get("key_sha256")
        if not isinstance(given, list):
            return  # one digest (KeyPolicy.credentials), or invalid and reported
        del values["key_sha256"]
        if "upstream_key_env" not in raw and "upstream_key_file" not in raw:
            self.problem(
                f"{where}.key_sha256",
                "a list of tokens needs upstream_key_env or upstream_key_file (a virtual key); a key whose "
                "clients send their own ImageRouter key has one key_sha256",
            )
            return
        tokens: list[Token] = []
        first: dict[str, str] = {}
        valid = True
        for item_where, item in self.items(given, f"{where}.key_sha256"):
            token: Token | None = None
            if isinstance(item, dict):
                self.mapping(item, item_where, "token")
                found = self.fields(item, item_where, "token", required=("sha256",))
                if "sha256" in found and ("expires_at" not in item or "expires_ms" in found):
                    token = Token(found["sha256"], found.get("expires_ms"))
            else:
                try:
                    token = Token(_sha256(item))
                except _Invalid as exc:
                    self.problem(item_where, str(exc))
            if token is None:
                valid = False
            elif token.sha256 in first:
                self.problem(item_where, f"duplicate token {_short_hash(token.sha256)}; {first[token.sha256]} has it")
                valid = False
            else:
                first[token.sha256] = item_where
                tokens.append(token)
        if not given:
            self.problem(f"{where}.key_sha256", "expected at least one token")
        elif valid:
            values["tokens"], values["key_sha256"] = tuple(tokens), tokens[0].sha256

    def rules(self, data: Mapping[Any, Any], where: str) -> ModelRules:
        globs: dict[str, tuple[str, ...]] = {}
        for key in RULES_KEYS:
            found = []
            for item_where, item in self.items(data.get(key), _join(where, key)):
                if isinstance(item, str) and item:
                    if (problem := glob_problem(item)) is not None:
                        self.problem(item_where, problem)
                    found.append(item)
                else:
                    self.problem(item_where, f"expected a model id or glob, got {_show(item)}")
            globs[key] = tuple(found)
        return ModelRules(**globs)

    def budgets(self, data: Mapping[Any, Any], where: str, owner: str, counter_owner: str) -> tuple[Budget, ...]:
        """`owner` is `key:<name>` or `group:<name>` (how refusals name the budget), `counter_owner`
        what its store counter is keyed by (see `proxy.policy.build._counter_owner`). A period has at most one
        enforced and one shadow budget (a tighter cap on trial beside the enforced one); the
        shadow one of such a pair is `<owner>:<period>:shadow`, so every budget keeps an identity
        of its own (docs/policies.md#budgets-keep-their-identity)."""
        first: dict[tuple[Period | None, bool], str] = {}
        found: list[tuple[Period | None, bool, int]] = []
        for item_where, item in self.items(data.get("budgets"), f"{where}.budgets"):
            if (raw := self.mapping(item, item_where, "budget")) is None:
                continue
            values = self.fields(raw, item_where, "budget", required=("limit_usd", "period"))
            if "period" not in values:
                continue
            period = values["period"]
            shadow = values.get("mode") == "shadow"
            if (period, shadow) in first:
                message = (
                    f"duplicate period '{period or 'lifetime'}'; {first[period, shadow]} has it already "
                    "(a period may have one enforced and one shadow budget)"
                )
                self.problem(f"{item_where}.period", message)
                continue
            first[period, shadow] = item_where
            if "limit_micros" in values:
                found.append((period, shadow, values["limit_micros"]))
        budgets: list[Budget] = []
        for period, shadow, limit in found:
            label: str = period or "lifetime"
            if shadow and (period, False) in first:
                label += ":shadow"
            budgets.append(Budget(f"{owner}:{label}", limit, period, shadow, f"{counter_owner}:{label}"))
        return tuple(budgets)


def _join(where: str, key: object) -> str:
    """A location, `where.key`; a key that is blank, padded, long or not printable on one line (a newline
    in it would read as a second problem) is shown quoted, as values are."""
    name = str(key)
    if not name.strip() or name.strip() != name or len(name) > 60 or not name.isprintable():
        name = _show(name)
    return f"{where}.{name}" if where else name
