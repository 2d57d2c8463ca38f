"""The policy's schema: for each section and entry kind, the YAML keys it accepts, the attribute
each becomes and the check that parses it (`FIELDS`), and the nested keys parsed on their own
(`NESTED_KEYS`). Unknown keys are reported against it."""

from __future__ import annotations

from collections.abc import Mapping

from proxy.policy.check import (
    _base_url,
    _body_bytes,
    _bool,
    _Check,
    _choice,
    _env_name,
    _expires_at,
    _margin,
    _money,
    _name,
    _non_negative_s,
    _observations,
    _optional,
    _period,
    _positive_s,
    _route_path,
    _secret_env,
    _sha256,
    _sha256_or_list,
    _signatures,
    _text,
    _tokens,
    _upstream_key_file,
    _window_days,
    webhook_url,
)
from proxy.policy.model import ACCOUNT_NAME_RE, LISTS, NAME_RE, SECTIONS
from proxy.types import ROUTE_KINDS

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
        "show_account_to_unknown_keys": ("show_account_to_unknown_keys", _bool),
        "unknown_routes": ("unknown_routes", _choice("value", ("reject", "pass"))),
    },
    "models": {
        "default_hold_usd": ("default_hold_micros", _money),
        "text_hold_usd": ("text_hold_micros", _money),
        "max_request_usd": ("max_request_micros", _optional_money),
        "text_media_input_tokens": ("text_media_input_tokens", _tokens),
        "holds": ("holds", _choice("value", ("max", "observed"))),
    },
    # `models.observed` (docs/how-it-works.md#observed-holds). These names are a contract
    # operators' files rely on: keep them.
    "observed": {
        "min_observations": ("min_observations", _observations),
        "margin": ("margin", _margin),
        "window_days": ("window_days", _window_days),
        "max_signatures": ("max_signatures", _signatures),
    },
    # One `models.text_rates` entry (docs/text-holds.md). These names are a contract operators'
    # files and other tools rely on: keep them.
    "text_rate": {
        "input_usd_per_mtok": ("input_micros_per_mtok", _money),
        "output_usd_per_mtok": ("output_micros_per_mtok", _money),
        "max_output_tokens": ("max_output_tokens", _tokens),
    },
    # `alerts:` (docs/alerts.md). These names are a contract operators' files rely on: keep them.
    "alerts": {
        "credits_below_usd": ("credits_below_micros", _optional_money),
        "key_expiry_days": ("key_expiry_days", _optional(_positive_s)),
    },
    "webhook": {
        "url": ("url", webhook_url),
        "secret_env": ("secret_env", _optional(_secret_env)),
    },
    # `admin:` enables /-/status (docs/status-page.md): the sha256 of the token a browser sends as
    # its password; with `protect_metrics`, /-/metrics asks for the token too.
    "admin": {"token_sha256": ("token_sha256", _sha256), "protect_metrics": ("protect_metrics", _bool)},
    "route": {
        "path": ("path", _route_path),
        "kind": ("kind", _choice("route kind", (*ROUTE_KINDS, "free"))),
        "enabled": ("enabled", _bool),
    },
    "budget": {
        "limit_usd": ("limit_micros", _money),
        "period": ("period", _period),
        "mode": ("mode", _mode),
    },
    # One item of a virtual key's `key_sha256` list, in its mapping form.
    "token": {
        "sha256": ("sha256", _sha256),
        "expires_at": ("expires_ms", _expires_at),
    },
    "group": {
        "name": ("name", _entry_name),
        "id": ("budget_id", _entry_name),
        "max_request_usd": ("max_request_micros", _optional_money),
    },
    "key": {
        "name": ("name", _entry_name),
        "id": ("budget_id", _entry_name),
        "key_sha256": ("key_sha256", _sha256_or_list),
        "upstream_key_env": ("upstream_key_env", _env_name),
        "upstream_key_file": ("upstream_key_file", _upstream_key_file),
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
    "models": ("overrides", "text_rates", "observed", *RULES_KEYS),
    "alerts": ("thresholds", "webhooks"),
    "rules": RULES_KEYS,
    "group": ("budgets",),
    "key": ("budgets", "models"),
}
