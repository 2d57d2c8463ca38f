"""The policy's data model: frozen dataclasses, and the defaults (`default_policy`).

Loading lives in load.py (files, merge, version), checking values in check.py and building these
dataclasses in build.py; each imports only downwards, ending here (docs/policies.md).
A policy path is one file or a directory whose `*.yaml` / `*.yml` files are merged in sorted order.
Unknown keys, wrong types and impossible values are all collected in one pass and raised as one
`PolicyError`, each line `<file>: <location>: <message>` naming the bad value, so a typo never
silently disables a limit. Money is converted to micro-dollars at loading and nowhere else.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from proxy.types import Period, RouteKind

Mode = Literal["enforce", "shadow"]
# A route's `kind` in the policy: a spending kind, or `free` (a POST that spends nothing and is
# forwarded without a hold, counted; docs/policies.md#routes).
RouteClass = RouteKind | Literal["free"]
FREE: Literal["free"] = "free"

DEFAULT_ROUTES: tuple[tuple[str, RouteClass], ...] = (
    ("/v1/openai/images/generations", "image"),
    ("/v1/openai/images/edits", "image"),
    ("/v1/openai/videos/generations", "video"),
    ("/v1/openai/chat/completions", "text"),
    ("/v1/openai/responses", "text"),
    # ImageRouter's own POST that spends nothing: a key check for integrations (Zapier, n8n).
    ("/v1/auth/test", FREE),
)
POLICY_SUFFIXES = (".yaml", ".yml")
SECTIONS = ("mode", "upstream", "account", "guard", "models", "alerts", "admin")
LISTS = ("routes", "groups", "keys")
ACCOUNT_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
NAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
MIN_BODY_BYTES = 1024
# Bound on any token count in a policy (a rate's max_output_tokens, text_media_input_tokens).
MAX_TOKENS = 100_000_000
# Bounds of `models.observed`: a hold may be learned from one call, taken with up to ten times its
# highest cost, over up to a year; at most a million signatures per account.
MAX_OBSERVATIONS = 1_000_000
MAX_MARGIN = 10.0
MAX_WINDOW_DAYS = 366
MAX_SIGNATURES = 1_000_000


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
    # Prices: a price raised upstream is held within models_refresh_s + refresh_s (one minute).
    models_refresh_s: float = 30.0
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
    # /-/me to a bearer token the policy does not list: nothing (the default), or the account's
    # credits and floor as a listed key sees them.
    show_account_to_unknown_keys: bool = False
    # A POST, PUT, PATCH or DELETE to a path `routes` does not list: refused 403, or forwarded
    # without a hold, counted and logged (docs/policies.md#routes).
    unknown_routes: Literal["reject", "pass"] = "reject"


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
class TextRate:
    """`models.text_rates[glob]`: what a text model's tokens cost, and its longest answer.
    Rates are micro-dollars per million tokens (`input_usd_per_mtok: 2.50` -> 2_500_000)."""

    glob: str
    input_micros_per_mtok: int
    output_micros_per_mtok: int
    max_output_tokens: int


HoldsMode = Literal["max", "observed"]


@dataclass(frozen=True, slots=True)
class ObservedPolicy:
    """`models.observed` (docs/how-it-works.md#observed-holds). These YAML names are a contract
    operators' files rely on: min_observations, margin, window_days."""

    min_observations: int = 20  # settled calls of a signature before its learned hold is used
    margin: float = 0.1  # hold = highest cost in the window x (1 + margin)
    window_days: float = 7.0  # how far back the highest cost is looked for
    # Signatures learned per account at once; a new one beyond it keeps the conservative hold.
    max_signatures: int = 10_000


@dataclass(frozen=True, slots=True)
class ModelsPolicy:
    default_hold_micros: int = 500_000
    text_hold_micros: int = 50_000
    overrides: Mapping[str, int] = field(default_factory=_empty_overrides)
    rules: ModelRules = field(default_factory=ModelRules)
    max_request_micros: int | None = None
    # In file order; the most specific glob wins (proxy.guard.pricing.text_rate_for).
    text_rates: tuple[TextRate, ...] = ()
    # Input tokens counted for each input a body does not carry as text (an image, audio or file
    # part, a stored response or conversation it refers to) instead of its bytes.
    text_media_input_tokens: int = 10_000
    # `max`: an image or video call holds its model's price.max (scaled); `observed`: the highest
    # cost charged for its price signature, once learned (proxy/guard/observed.py).
    holds: HoldsMode = "max"
    observed: ObservedPolicy = field(default_factory=ObservedPolicy)


DEFAULT_THRESHOLDS = (0.5, 0.8, 1.0)
# Largest threshold a policy may name: a shadow budget runs past its limit, so 1.5 means something.
MAX_THRESHOLD = 10.0


@dataclass(frozen=True, slots=True)
class WebhookPolicy:
    """`alerts.webhooks[i]`: where alert events are POSTed, and the env var holding the signing
    secret (Standard Webhooks; never the secret itself)."""

    url: str
    secret_env: str | None = None


@dataclass(frozen=True, slots=True)
class AlertsPolicy:
    """`alerts:` (docs/alerts.md). These YAML names are a contract operators' files rely on:
    thresholds, credits_below_usd, key_expiry_days, webhooks."""

    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS  # fractions of a scope's limit, ascending
    credits_below_micros: int | None = None
    key_expiry_days: float | None = None
    webhooks: tuple[WebhookPolicy, ...] = ()


@dataclass(frozen=True, slots=True)
class AdminPolicy:
    """`admin:` enables `/-/status`: a browser sends the admin token as its HTTP Basic password;
    only its sha256 is in the policy (docs/status-page.md)."""

    token_sha256: str
    protect_metrics: bool = False  # /-/metrics needs the token too


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    path: str
    kind: RouteClass
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class Budget:
    id: str  # "key:<name>:<period or lifetime>" or "group:<name>:<period or lifetime>"
    limit_micros: int
    period: Period | None  # None = lifetime
    shadow: bool
    # The store counter's identity: survives renaming the key or group (proxy.policy.build._counter_owner).
    counter: str = ""

    def __post_init__(self) -> None:
        if not self.counter:
            object.__setattr__(self, "counter", self.id)


@dataclass(frozen=True, slots=True)
class GroupPolicy:
    name: str
    budgets: tuple[Budget, ...]
    max_request_micros: int | None


@dataclass(frozen=True, slots=True)
class Token:
    """One credential a key's clients may send: the sha256 of the bearer token, and when it stops
    being accepted (Unix ms; None: never). A virtual key may have several, for rotation."""

    sha256: str
    expires_ms: int | None = None


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    name: str
    key_sha256: str  # the first of `tokens`
    api_key_id: str | None
    api_key_name: str | None
    group: str | None
    budgets: tuple[Budget, ...]
    max_request_micros: int | None
    rules: ModelRules
    # Every fingerprint that identifies this key; empty means (key_sha256,) without an expiry.
    tokens: tuple[Token, ...] = ()
    # A virtual key (docs/policies.md#virtual-keys): its clients send a proxy token and the proxy
    # sends the real ImageRouter key, read from this variable or file, upstream.
    upstream_key_env: str | None = None
    upstream_key_file: str | None = None

    @property
    def virtual(self) -> bool:
        return self.upstream_key_env is not None or self.upstream_key_file is not None

    def credentials(self) -> tuple[Token, ...]:
        return self.tokens or (Token(self.key_sha256),)


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
    alerts: AlertsPolicy = AlertsPolicy()
    admin: AdminPolicy | None = None  # None: /-/status answers 404
    _by_fingerprint: Mapping[str, tuple[KeyPolicy, Token]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = MappingProxyType({token.sha256: (key, token) for key in self.keys for token in key.credentials()})
        object.__setattr__(self, "_by_fingerprint", index)

    def key_for(self, fingerprint: str) -> KeyPolicy | None:
        found = self._by_fingerprint.get(fingerprint)
        return None if found is None else found[0]

    def token_for(self, fingerprint: str) -> tuple[KeyPolicy, Token] | None:
        """The key a bearer token's fingerprint belongs to, and which of its tokens it is (its
        expiry is the caller's to check)."""
        return self._by_fingerprint.get(fingerprint)

    @property
    def has_virtual_keys(self) -> bool:
        """With any virtual key, a token the policy does not list is refused (401): clients hold
        proxy tokens, and a real ImageRouter key sent to the proxy is not one."""
        return any(key.virtual for key in self.keys)

    def group_of(self, key: KeyPolicy) -> GroupPolicy | None:
        return None if key.group is None else self.groups.get(key.group)

    @property
    def has_local_budgets(self) -> bool:
        return any(key.budgets for key in self.keys) or any(group.budgets for group in self.groups.values())


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
