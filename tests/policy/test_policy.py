from __future__ import annotations

import dataclasses
import glob
import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import PolicyError
from proxy.guard.pricing import text_rate_for
from proxy.policy.load import load_policy
from proxy.policy.model import (
    DEFAULT_ROUTES,
    AccountPolicy,
    Budget,
    GroupPolicy,
    GuardPolicy,
    KeyPolicy,
    ModelRules,
    ModelsPolicy,
    ObservedPolicy,
    RoutePolicy,
    TextRate,
    UpstreamPolicy,
    default_policy,
)

POLICIES = Path(__file__).parents[1] / "policies"
BAD = POLICIES / "bad"
GOOD = POLICIES / "good"
SHIPPED = Path(__file__).parents[2] / "policies"
SHA_1 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
SHA_2 = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"

# One file per failure in tests/policies/bad/, and the one line each must produce after
# "<file>: ". `{file}` stands for the file's own path where a message names a second place.
EXPECTED = {
    "alerts_key_expiry_negative.yaml": "alerts.key_expiry_days: must be greater than 0, got -7",
    "alerts_threshold_duplicate.yaml": (
        "alerts.thresholds[2]: duplicate threshold 0.8; alerts.thresholds[1] has it already"
    ),
    "alerts_threshold_percent.yaml": (
        "alerts.thresholds[1]: expected a fraction of the limit above 0 and at most 10 (0.8 is 80 %), got 80"
    ),
    "alerts_unknown_key.yaml": (
        "alerts.threshold: unknown key; expected one of credits_below_usd, key_expiry_days, thresholds, webhooks"
    ),
    "alerts_webhook_secret_inline.yaml": (
        "alerts.webhooks[0].secret_env: expected the name of an environment variable holding the secret, "
        "got what looks like the secret itself (value not shown)"
    ),
    "alerts_webhook_url_missing.yaml": "alerts.webhooks[0]: missing required key 'url'",
    "admin_token_missing.yaml": "admin: missing required key 'token_sha256'",
    "admin_token_short.yaml": (
        "admin.token_sha256: expected 64 lowercase hex characters, got 'not-a-di...' (12 characters); "
        "compute it with `spend-guard fingerprint`"
    ),
    "admin_unknown_key.yaml": "admin.user: unknown key; expected one of token_sha256, protect_metrics",
    "account_name_invalid.yaml": "account.name: expected a name of 1-64 letters, digits or _ . -, got 'main account'",
    "api_key_env_invalid.yaml": (
        "account.api_key_env: expected an environment variable name such as IMAGEROUTER_API_KEY (value not shown)"
    ),
    "base_url_no_host.yaml": "upstream.base_url: expected an http:// or https:// URL with a host, got 'https:///v1'",
    "base_url_scheme.yaml": (
        "upstream.base_url: expected an http:// or https:// URL with a host, got 'ftp://api.imagerouter.io'"
    ),
    "budget_limit_missing.yaml": "groups[0] (design-team).budgets[0]: missing required key 'limit_usd'",
    "budget_mode_unknown.yaml": (
        "groups[0] (design-team).budgets[0].mode: unknown mode 'log'; expected enforce or shadow"
    ),
    "choice_unknown.yaml": "guard.unknown_models: unknown value 'allow'; expected hold or reject",
    "duplicate_api_key_id.yaml": (
        "keys[1] (renderer-2).api_key_id: duplicate api_key_id 'd9eb93dc-56b1-4216-91b5-a44944508bbc'; "
        "first defined at {file}: keys[0] (renderer)"
    ),
    "duplicate_group_name.yaml": (
        "groups[1] (design-team).name: duplicate group name 'design-team'; "
        "first defined at {file}: groups[0] (design-team)"
    ),
    "duplicate_key_name.yaml": (
        "keys[1] (renderer).name: duplicate key name 'renderer'; first defined at {file}: keys[0] (renderer)"
    ),
    "duplicate_key_sha256.yaml": (
        "keys[1] (renderer-2).key_sha256: duplicate key_sha256 '9f86d081...'; "
        "first defined at {file}: keys[0] (renderer)"
    ),
    "glob_list_is_string.yaml": "models.deny: expected a list, got '*:free'",
    "glob_not_string.yaml": "models.allow[1]: expected a model id or glob, got 5",
    "glob_unclosed.yaml": (
        "models.deny[1]: glob 'openai/[sora' has an unclosed '[' at position 8; write '[[]' for a literal '['"
    ),
    "show_account_not_bool.yaml": "guard.show_account_to_unknown_keys: expected true or false, got 'yes'",
    "group_name_invalid.yaml": (
        "groups[0].name: expected a name of 1-64 letters, digits or _ . @ -, got 'design team'"
    ),
    "hold_ttl_not_above_timeout.yaml": "guard.hold_ttl_s: 900 must be greater than upstream.timeout_s (900)",
    "key_entry_not_mapping.yaml": "keys[0]: expected a mapping, got 'renderer'",
    "key_group_no_groups.yaml": "keys[0] (renderer).group: unknown group 'design-team'; no groups are defined",
    "key_group_undefined.yaml": "keys[0] (renderer).group: unknown group 'design-teem'; defined groups: design-team",
    "key_models_unknown_key.yaml": "keys[0] (renderer).models.block: unknown key; expected one of allow, deny",
    "key_name_invalid.yaml": "keys[0].name: expected a name of 1-64 letters, digits or _ . @ -, got 'renderer/1'",
    "key_sha256_missing.yaml": "keys[0] (renderer): missing required key 'key_sha256'",
    "key_sha256_short.yaml": (
        "keys[0] (renderer).key_sha256: expected 64 lowercase hex characters, got 'a94a8fe5...' (40 characters); "
        "compute it with `spend-guard fingerprint`"
    ),
    "key_sha256_uppercase.yaml": (
        "keys[0] (renderer).key_sha256: expected 64 lowercase hex characters, got '9F86D081...' (64 characters); "
        "compute it with `spend-guard fingerprint`"
    ),
    "key_sha256_line_break.yaml": (
        "keys[0] (renderer).key_sha256: expected 64 lowercase hex characters, got ' \\x85\\r...' (3 characters); "
        "compute it with `spend-guard fingerprint`"
    ),
    "key_sha256_number.yaml": (
        "keys[0] (renderer).key_sha256: expected 64 lowercase hex characters, got a number (put the digest in quotes); "
        "compute it with `spend-guard fingerprint`"
    ),
    "keys_is_mapping.yaml": "keys: expected a list, got a mapping",
    "max_body_bytes_float.yaml": "guard.max_body_bytes: expected a whole number of bytes, got 65536.5",
    "max_body_bytes_small.yaml": "guard.max_body_bytes: must be at least 1024 bytes, got 512",
    "max_request_negative.yaml": "keys[0] (renderer).max_request_usd: USD amount -0.5 is negative",
    "mode_unknown.yaml": "mode: unknown mode 'dry-run'; expected enforce or shadow",
    "money_negative.yaml": "account.min_remaining_usd: USD amount -1.0 is negative",
    "money_not_decimal.yaml": "models.overrides['openai/gpt-image-1']: not a plain decimal USD amount: '1e3'",
    "money_null.yaml": "models.text_hold_usd: expected a USD amount, got null",
    "money_too_many_decimals.yaml": "models.default_hold_usd: USD amount 0.1234567 has more than 6 decimals",
    "number_is_bool.yaml": "upstream.connect_timeout_s: expected a number, got true",
    "number_is_string.yaml": "account.refresh_s: expected a number, got 'fast'",
    "overrides_not_mapping.yaml": "models.overrides: expected a mapping of model id to USD amount, got a list",
    "period_duplicate.yaml": (
        "groups[0] (design-team).budgets[1].period: duplicate period 'day'; "
        "groups[0] (design-team).budgets[0] has it already "
        "(a period may have one enforced and one shadow budget)"
    ),
    "period_duplicate_shadow.yaml": (
        "keys[0] (alice).budgets[2].period: duplicate period 'week'; keys[0] (alice).budgets[0] has it already "
        "(a period may have one enforced and one shadow budget)"
    ),
    "period_lifetime_duplicate.yaml": (
        "groups[0] (design-team).budgets[1].period: duplicate period 'lifetime'; "
        "groups[0] (design-team).budgets[0] has it already "
        "(a period may have one enforced and one shadow budget)"
    ),
    "period_unknown.yaml": (
        "keys[0] (renderer).budgets[0].period: unknown period 'weekly'; expected day, week, month, lifetime or null"
    ),
    "refresh_not_positive.yaml": "account.refresh_s: must be greater than 0, got 0",
    "route_duplicate_path.yaml": (
        "routes[1].path: duplicate route '/v1/openai/responses'; first defined at {file}: routes[0]"
    ),
    "route_enabled_not_bool.yaml": "routes[0].enabled: expected true or false, got 'off'",
    "route_kind_missing.yaml": "routes[0]: missing required key 'kind'",
    "route_kind_unknown.yaml": "routes[0].kind: unknown route kind 'audio'; expected image, video, text or free",
    "route_path_relative.yaml": (
        "routes[0].path: expected a path starting with '/', got 'v1/openai/images/generations'"
    ),
    "section_is_list.yaml": "guard: expected a mapping, got a list",
    "shutdown_grace_negative.yaml": "guard.shutdown_grace_s: must not be negative, got -1",
    "staleness_below_refresh.yaml": "account.max_staleness_s: 30 must be at least account.refresh_s (60)",
    "timeout_above_default_hold_ttl.yaml": "upstream.timeout_s: 1200 must be less than guard.hold_ttl_s (960)",
    "timeout_negative.yaml": "upstream.timeout_s: must be greater than 0, got -5",
    "top_level_list.yaml": "top level: expected a mapping of sections, got a list",
    "unknown_nested_key.yaml": (
        "guard.on_store_eror: unknown key; expected one of on_store_error, unknown_keys, unknown_models, "
        "max_body_bytes, hold_ttl_s, shutdown_grace_s, show_account_to_unknown_keys, unknown_routes"
    ),
    "unknown_top_key.yaml": (
        "acount: unknown key; expected one of mode, upstream, account, guard, models, alerts, admin, routes, "
        "groups, keys"
    ),
    "holds_unknown.yaml": "models.holds: unknown value 'learned'; expected max or observed",
    "observed_min_observations_zero.yaml": "models.observed.min_observations: must be between 1 and 1000000, got 0",
    "observed_margin_negative.yaml": "models.observed.margin: must be between 0 and 10, got -0.1",
    "observed_window_zero.yaml": "models.observed.window_days: must be greater than 0 and at most 366 days, got 0",
    "observed_unknown_key.yaml": (
        "models.observed.min_obs: unknown key; expected one of min_observations, margin, window_days, max_signatures"
    ),
    "text_media_input_tokens_bool.yaml": "models.text_media_input_tokens: expected a whole number of tokens, got true",
    "text_rate_glob_not_string.yaml": "models.text_rates[7]: expected a model id or glob",
    "text_rate_missing_field.yaml": "models.text_rates['openai/gpt-4o*']: missing required key 'max_output_tokens'",
    "text_rate_money_not_decimal.yaml": (
        "models.text_rates['anthropic/*'].input_usd_per_mtok: not a plain decimal USD amount: '$3'"
    ),
    "text_rate_negative.yaml": "models.text_rates['*'].output_usd_per_mtok: USD amount -75 is negative",
    "text_rate_not_mapping.yaml": "models.text_rates['*']: expected a mapping, got 15",
    "text_rate_tokens_fractional.yaml": (
        "models.text_rates['*'].max_output_tokens: expected a whole number of tokens, got 8192.5"
    ),
    "text_rate_tokens_zero.yaml": (
        "models.text_rates['*'].max_output_tokens: must be between 1 and 100000000 tokens, got 0"
    ),
    "text_rate_unknown_field.yaml": (
        "models.text_rates['openai/gpt-4o*'].max_input_tokens: unknown key; "
        "expected one of input_usd_per_mtok, output_usd_per_mtok, max_output_tokens"
    ),
    "text_rates_not_mapping.yaml": "models.text_rates: expected a mapping of model glob to rates, got a list",
    "yaml_duplicate_key.yaml": "line 3: duplicate key 'refresh_s'; first defined on line 2",
    "yaml_syntax.yaml": (
        "line 3, column 2: invalid YAML: while parsing a block mapping, "
        "expected <block end>, but found '<block mapping start>'"
    ),
    "yaml_two_documents.yaml": (
        "line 2, column 1: invalid YAML: expected a single document in the stream, but found another document"
    ),
}


def problems_of(path: str | Path) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    return caught.value.problems


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_policy_file_reports_its_one_exact_problem(name: str) -> None:
    path = str(BAD / name)
    assert problems_of(path) == [f"{path}: {EXPECTED[name].format(file=path)}"]


def test_every_bad_policy_file_has_an_expected_message() -> None:
    assert sorted(os.listdir(BAD)) == sorted(EXPECTED)


def test_all_problems_are_collected_in_one_pass() -> None:
    path = str(POLICIES / "three_problems.yaml")
    assert problems_of(path) == [
        f"{path}: account.refresh_s: expected a number, got 'fast'",
        f"{path}: guard.on_store_eror: unknown key; expected one of on_store_error, unknown_keys, unknown_models, "
        "max_body_bytes, hold_ttl_s, shutdown_grace_s, show_account_to_unknown_keys, unknown_routes",
        f"{path}: keys[0] (renderer).budgets[0].period: unknown period 'weekly'; expected day, week, month, lifetime "
        "or null",
    ]
    assert str(PolicyError(problems_of(path))).count("\n") == 2


def test_problem_names_a_relative_file_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(BAD)
    assert problems_of("mode_unknown.yaml") == ["mode_unknown.yaml: " + EXPECTED["mode_unknown.yaml"]]


def test_alerts_section_loads_with_its_defaults(tmp_path: Path) -> None:
    from proxy.policy.model import AlertsPolicy, WebhookPolicy

    assert default_policy().alerts == AlertsPolicy((0.5, 0.8, 1.0), None, None, ())
    path = tmp_path / "alerts.yaml"
    path.write_text(
        "alerts:\n  thresholds: [0.9, 0.25]\n  credits_below_usd: 10.00\n  key_expiry_days: 7\n"
        "  webhooks:\n    - {url: 'https://hooks.example.com/spend/', secret_env: SPEND_GUARD_WEBHOOK_SECRET}\n"
        "    - {url: 'http://127.0.0.1:9000/hook'}\n"
    )
    assert load_policy(path).alerts == AlertsPolicy(
        (0.25, 0.9),
        10_000_000,
        7.0,
        (
            WebhookPolicy("https://hooks.example.com/spend/", "SPEND_GUARD_WEBHOOK_SECRET"),
            WebhookPolicy("http://127.0.0.1:9000/hook"),
        ),
    )


def test_admin_section_enables_the_status_page_by_a_token_digest(tmp_path: Path) -> None:
    from proxy.policy.model import AdminPolicy

    assert default_policy().admin is None
    path = tmp_path / "admin.yaml"
    path.write_text(f"admin: {{token_sha256: '{SHA_1}'}}\n")
    assert load_policy(path).admin == AdminPolicy(SHA_1)


def test_key_fingerprints_are_never_printed_in_full() -> None:
    for name in (
        "duplicate_key_sha256.yaml",
        "key_sha256_uppercase.yaml",
        "key_sha256_short.yaml",
        "key_sha256_number.yaml",
    ):
        hashes = re.findall(r"[0-9a-fA-F]{40,}", (BAD / name).read_text())
        assert hashes
        for problem in problems_of(BAD / name):
            assert not any(value in problem for value in hashes), problem


def test_full_policy_loads_every_field() -> None:
    path = str(GOOD / "full.yaml")
    policy = load_policy(path)
    assert policy.mode == "shadow"
    assert policy.upstream == UpstreamPolicy("http://imagerouter.internal:8080", 600.0, 2.5)
    assert policy.account == AccountPolicy(
        name="staging.main",
        api_key_env="STAGING_IMAGEROUTER_KEY",
        refresh_s=15.0,
        models_refresh_s=1800.0,
        max_staleness_s=15.0,
        min_remaining_micros=2_500_000,
    )
    assert policy.guard == GuardPolicy("open", "reject", "reject", 1_048_576, 660.0, 0.0, unknown_routes="pass")
    assert policy.models.default_hold_micros == 750_000
    assert policy.models.text_hold_micros == 1
    assert dict(policy.models.overrides) == {"openai/gpt-image-1": 300_000, "google/imagen-4:free": 0}
    assert policy.models.rules == ModelRules(("openai/*", "google/*"), ("*:free", "openai/sora-*"))
    assert policy.models.max_request_micros == 5_000_000
    assert policy.routes == (
        RoutePolicy("/v1/openai/images/generations", "video"),
        RoutePolicy("/v1/openai/images/edits", "image"),
        RoutePolicy("/v1/openai/videos/generations", "video", enabled=False),
        RoutePolicy("/v1/openai/chat/completions", "text"),
        RoutePolicy("/v1/openai/responses", "text"),
        RoutePolicy("/v1/auth/test", "free"),
        RoutePolicy("/v2/images", "image"),
        RoutePolicy("/v1/openai/audio/voices", "free"),
    )
    assert dict(policy.groups) == {
        "design-team": GroupPolicy(
            "design-team",
            (
                Budget("group:design-team:month", 50_000_000, "month", shadow=False),
                Budget("group:design-team:day", 5_000_000, "day", shadow=True),
            ),
            max_request_micros=2_000_000,
        ),
        "research@lab": GroupPolicy("research@lab", (), None),
    }
    assert policy.keys == (
        KeyPolicy(
            name="batch-renderer",
            key_sha256=SHA_1,
            api_key_id="d9eb93dc-56b1-4216-91b5-a44944508bbc",
            api_key_name="renderer",
            group="design-team",
            budgets=(
                # The counters follow the key's fingerprint, so a rename keeps what they counted.
                Budget("key:batch-renderer:day", 2_000_000, "day", shadow=False, counter=f"key-fp:{SHA_1[:24]}:day"),
                Budget(
                    "key:batch-renderer:week", 10_000_000, "week", shadow=False, counter=f"key-fp:{SHA_1[:24]}:week"
                ),
            ),
            max_request_micros=1_000_000,
            rules=ModelRules(("openai/*",), ("openai/dall-e-2",)),
        ),
        KeyPolicy(
            name="intern",
            key_sha256=SHA_2,
            api_key_id=None,
            api_key_name=None,
            group=None,
            budgets=(Budget("key:intern:lifetime", 0, None, shadow=False, counter=f"key-fp:{SHA_2[:24]}:lifetime"),),
            max_request_micros=None,
            rules=ModelRules(),
        ),
    )
    assert policy.sources == (path,)
    assert len(policy.version) == 12 and int(policy.version, 16) >= 0


def test_text_rates_load_in_file_order_with_their_pinned_field_names(tmp_path: Path) -> None:
    path = tmp_path / "rates.yaml"
    path.write_text(
        "models:\n"
        "  text_media_input_tokens: 2500\n"
        "  text_rates:\n"
        '    "openai/gpt-4o*": {input_usd_per_mtok: 2.50, output_usd_per_mtok: 10.00, max_output_tokens: 16384}\n'
        '    "*":              {input_usd_per_mtok: 15, output_usd_per_mtok: "75.000001", max_output_tokens: 8192}\n'
    )
    models = load_policy(path).models
    assert models.text_rates == (
        TextRate("openai/gpt-4o*", 2_500_000, 10_000_000, 16384),
        TextRate("*", 15_000_000, 75_000_001, 8192),
    )
    assert models.text_media_input_tokens == 2500
    assert (ModelsPolicy().text_rates, ModelsPolicy().text_media_input_tokens) == ((), 10_000)
    assert (ModelsPolicy().holds, ModelsPolicy().observed) == ("max", ObservedPolicy(20, 0.1, 7.0, 10_000))


def test_models_holds_observed_and_its_tuning_are_read(write_policy) -> None:
    path = write_policy("models:\n  holds: observed\n  observed: {min_observations: 5, margin: 0, window_days: 0.5}\n")
    models = load_policy(path).models
    assert (models.holds, models.observed) == ("observed", ObservedPolicy(5, 0.0, 0.5, 10_000))


def test_a_glob_given_twice_in_text_rates_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(
        "models:\n  text_rates:\n"
        '    "*": {input_usd_per_mtok: 1, output_usd_per_mtok: 1, max_output_tokens: 1}\n'
        '    "*": {input_usd_per_mtok: 2, output_usd_per_mtok: 2, max_output_tokens: 2}\n'
    )
    assert problems_of(path) == [f"{path}: line 4: duplicate key '*'; first defined on line 3"]


def test_sparse_policy_fills_defaults() -> None:
    policy = load_policy(GOOD / "sparse.yaml")
    defaults = default_policy()
    assert (policy.mode, policy.upstream, policy.account, policy.guard, policy.models) == (
        defaults.mode,
        defaults.upstream,
        defaults.account,
        defaults.guard,
        defaults.models,
    )
    # A default route re-stated without `kind` keeps its kind.
    assert policy.routes[-2:] == (
        RoutePolicy("/v1/openai/responses", "text", enabled=False),
        RoutePolicy("/v1/auth/test", "free"),
    )
    assert policy.groups["ops"].budgets == (Budget("group:ops:lifetime", 100_000_000, None, shadow=False),)
    (key,) = policy.keys
    assert (key.name, key.group, key.budgets, key.rules) == ("ops-bot", "ops", (), ModelRules())


def test_empty_file_is_the_default_policy() -> None:
    path = str(GOOD / "empty.yaml")
    policy = load_policy(path)
    assert policy == dataclasses.replace(default_policy(), sources=(path,), version=policy.version)


def test_default_policy() -> None:
    policy = default_policy()
    assert policy.version == "default"
    assert policy.mode == "enforce"
    assert policy.keys == () and dict(policy.groups) == {}
    assert policy.models == ModelsPolicy()
    assert [(route.path, route.kind, route.enabled) for route in policy.routes] == [
        (path, kind, True) for path, kind in DEFAULT_ROUTES
    ]
    assert policy.key_for(SHA_1) is None


def test_policy_is_immutable() -> None:
    policy = load_policy(GOOD / "full.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.mode = "enforce"  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy.groups["new"] = policy.groups["design-team"]  # type: ignore[index]
    with pytest.raises(TypeError):
        policy.models.overrides["x"] = 1  # type: ignore[index]


def test_routes_merge_over_defaults_by_path(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(
        "routes:\n"
        "  - {path: /v1/openai/custom, kind: text}\n"
        "  - {path: /v1/openai/videos/generations, enabled: false}\n"
        "  - {path: /v1/openai/chat/completions, kind: image}\n"
    )
    assert load_policy(path).routes == (
        RoutePolicy("/v1/openai/images/generations", "image"),
        RoutePolicy("/v1/openai/images/edits", "image"),
        RoutePolicy("/v1/openai/videos/generations", "video", enabled=False),
        RoutePolicy("/v1/openai/chat/completions", "image"),
        RoutePolicy("/v1/openai/responses", "text"),
        RoutePolicy("/v1/auth/test", "free"),
        RoutePolicy("/v1/openai/custom", "text"),
    )


def test_key_for_finds_keys_by_fingerprint_and_group_of_their_group() -> None:
    policy = load_policy(GOOD / "full.yaml")
    renderer = policy.key_for(SHA_1)
    assert renderer is not None and renderer.name == "batch-renderer"
    assert policy.group_of(renderer) is policy.groups["design-team"]
    intern = policy.key_for(SHA_2)
    assert intern is not None and intern.name == "intern"
    assert policy.group_of(intern) is None
    assert policy.key_for(SHA_1.upper()) is None
    assert policy.key_for("0" * 64) is None


@pytest.mark.parametrize(
    ("allow", "deny", "model", "permitted"),
    [
        ((), (), "openai/gpt-image-1", True),
        ((), ("*:free",), "google/imagen-4:free", False),
        ((), ("*:free",), "google/imagen-4", True),
        (("openai/*",), (), "openai/gpt-image-1", True),
        (("openai/*",), (), "google/imagen-4", False),
        (("openai/*",), ("openai/sora-*",), "openai/sora-2", False),
        (("openai/*", "google/*"), (), "google/imagen-4", True),
        (("openai/gpt-image-?",), (), "openai/gpt-image-1", True),
        (("openai/gpt-image-?",), (), "openai/gpt-image-10", False),
        (("openai/*",), (), "OpenAI/gpt-image-1", False),  # globs are case-sensitive
        (("[ab]*/x",), (), "b-lab/x", True),
    ],
)
def test_model_rules_permits_globs_with_deny_winning(
    allow: tuple[str, ...], deny: tuple[str, ...], model: str, permitted: bool
) -> None:
    assert ModelRules(allow, deny).permits(model) is permitted


@given(st.text(min_size=1))
def test_a_denied_model_is_never_permitted_whatever_the_allow_list(model: str) -> None:
    # Deny entries are globs: `[0]` matches "0", not "[0]". glob.escape spells the model literally.
    assert not ModelRules(allow=(model, "*"), deny=(glob.escape(model),)).permits(model)


@given(st.text(alphabet=st.characters(blacklist_characters="[]*?"), min_size=1))
def test_a_model_named_in_deny_without_glob_characters_is_never_permitted(model: str) -> None:
    assert not ModelRules(allow=(model, "*"), deny=(model,)).permits(model)


def test_deny_entries_are_globs_not_literals() -> None:
    assert ModelRules(allow=("*",), deny=("[0]",)).permits("[0]")  # `[0]` is the set {"0"}
    assert not ModelRules(allow=("*",), deny=("[0]",)).permits("0")


def test_directory_merges_yaml_files_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b-keys.yml").write_text(f"keys:\n  - name: renderer\n    key_sha256: {SHA_1}\n    group: design\n")
    (tmp_path / "a-base.yaml").write_text("mode: shadow\ngroups:\n  - name: design\n")
    (tmp_path / "c-more.yaml").write_text(f"keys:\n  - name: intern\n    key_sha256: {SHA_2}\n")
    (tmp_path / "notes.txt").write_text("not: [valid")
    (tmp_path / ".#a-base.yaml").write_text("not: [valid")  # an editor's lock file
    (tmp_path / "sub.yaml").mkdir()
    policy = load_policy(tmp_path)
    assert policy.sources == tuple(str(tmp_path / name) for name in ("a-base.yaml", "b-keys.yml", "c-more.yaml"))
    assert policy.mode == "shadow"
    assert [key.name for key in policy.keys] == ["renderer", "intern"]
    renderer = policy.key_for(SHA_1)
    assert renderer is not None and policy.group_of(renderer) is policy.groups["design"]


def test_directory_duplicates_across_files_name_both_places(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(
        "guard: {on_store_error: open}\n"
        "groups:\n  - name: design\n"
        f"keys:\n  - name: renderer\n    key_sha256: {SHA_1}\n    api_key_id: id-1\n"
    )
    b.write_text(
        "guard: {on_store_error: closed}\n"
        "account: {name: main}\n"
        "groups:\n  - name: design\n"
        "keys:\n"
        f"  - name: other\n    key_sha256: {SHA_2}\n"
        f"  - name: renderer\n    key_sha256: '{'1' * 64}'\n"
        f"  - name: third\n    key_sha256: {SHA_1}\n    api_key_id: id-1\n"
    )
    assert problems_of(tmp_path) == [
        f"{b}: guard: section already defined in {a}; define each section in one file",
        f"{b}: groups[0] (design).name: duplicate group name 'design'; first defined at {a}: groups[0] (design)",
        f"{b}: keys[1] (renderer).name: duplicate key name 'renderer'; first defined at {a}: keys[0] (renderer)",
        f"{b}: keys[2] (third).key_sha256: duplicate key_sha256 '9f86d081...'; "
        f"first defined at {a}: keys[0] (renderer)",
        f"{b}: keys[2] (third).api_key_id: duplicate api_key_id 'id-1'; first defined at {a}: keys[0] (renderer)",
    ]


def test_cross_file_order_check_points_at_the_field_that_was_set(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("guard: {hold_ttl_s: 100}\n")
    (tmp_path / "b.yaml").write_text("upstream: {timeout_s: 120}\n")
    assert problems_of(tmp_path) == [
        f"{tmp_path / 'a.yaml'}: guard.hold_ttl_s: 100 must be greater than upstream.timeout_s (120)"
    ]


def test_invalid_field_is_not_reported_again_by_order_checks(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("upstream: {timeout_s: 2000}\nguard: {hold_ttl_s: soon}\n")
    assert problems_of(path) == [f"{path}: guard.hold_ttl_s: expected a number, got 'soon'"]


def test_missing_path_and_empty_directory_are_errors(tmp_path: Path) -> None:
    assert problems_of(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: no such file or directory"]
    assert problems_of(tmp_path) == [f"{tmp_path}: directory has no *.yaml or *.yml policy files"]


def test_yaml_anchors_and_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text("groups:\n  - &team {name: design, max_request_usd: 2}\n  - <<: *team\n    name: research\n")
    groups = load_policy(path).groups
    assert groups["research"].max_request_micros == 2_000_000


def test_version_changes_with_content_and_not_otherwise(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("mode: enforce\n")
    first = load_policy(path).version
    os.utime(path, ns=(1, 1))
    assert load_policy(path).version == first
    path.write_text("mode: enforce  # now with a comment\n")
    second = load_policy(path).version
    assert second != first
    path.write_text("mode: enforce\n")
    assert load_policy(path).version == first


def test_version_of_a_directory_covers_file_names(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("mode: enforce\n")
    first = load_policy(tmp_path).version
    (tmp_path / "a.yaml").rename(tmp_path / "b.yaml")
    assert load_policy(tmp_path).version != first


@pytest.mark.parametrize("name", ["default.yaml", "teams.yaml"])
def test_shipped_policy_loads_on_its_own(name: str) -> None:
    policy = load_policy(SHIPPED / name)
    assert policy.account.min_remaining_micros == 1_000_000
    assert policy.guard.on_store_error == "closed"
    assert policy.guard.unknown_keys == "account_only"


@pytest.mark.parametrize("name", ["default.yaml", "teams.yaml"])
def test_shipped_policy_prices_text_calls_by_tokens(name: str) -> None:
    models = load_policy(SHIPPED / name).models
    assert models.text_rates and models.text_rates[-1].glob == "*"
    gpt4o = text_rate_for(models.text_rates, "openai/gpt-4o")
    assert gpt4o is not None and (gpt4o.input_micros_per_mtok, gpt4o.output_micros_per_mtok) == (2_500_000, 10_000_000)


@pytest.mark.parametrize("name", ["default.yaml", "teams.yaml"])
def test_a_shipped_policy_with_a_deny_list_refuses_unknown_models(name: str) -> None:
    # A deny list cannot see what an alias the guard cannot resolve runs.
    policy = load_policy(SHIPPED / name)
    assert not policy.models.rules.deny or policy.guard.unknown_models == "reject"


def test_shipped_teams_policy_shows_each_feature() -> None:
    policy = load_policy(SHIPPED / "teams.yaml")
    assert len(policy.groups) >= 2
    budgets = [budget for group in policy.groups.values() for budget in group.budgets]
    budgets += [budget for key in policy.keys for budget in key.budgets]
    assert any(budget.shadow for budget in budgets)
    assert any(budget.id.startswith("key:") for budget in budgets)
    assert any(key.max_request_micros is not None for key in policy.keys) or any(
        group.max_request_micros is not None for group in policy.groups.values()
    )
    assert policy.models.rules.deny
    assert all(policy.group_of(key) is not None for key in policy.keys if key.group)
