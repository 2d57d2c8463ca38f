"""`spend-guard serve --demo`: the proxy in front of an in-process imitation of ImageRouter.

No account, no Redis, nothing billed: the stand-in the tests use (proxy/standin/) runs on a free
port of 127.0.0.1 in this process, with a few priced models (one free), a heartbeat before every
result, `cost` in every body, chat and responses with SSE, and `/v1/credits` listing two demo
keys. The proxy runs with the embedded store in a fresh temporary directory and a policy written
there, so every demo starts from $0 spent and leaves nothing behind.

With a policy of one's own (`serve --demo --policy PATH`) the proxy serves that policy in front of
the imitation instead (its upstream replaced): the imitation's account key is put in the variable
the policy's `account.api_key_env` names, and printed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from types import TracebackType

from proxy.policy.model import Policy
from proxy.standin import StandIn, fingerprint, key_row

# Where the demo policy tells the proxy to find the (made-up) account key.
ACCOUNT_KEY_ENV = "SPEND_GUARD_DEMO_ACCOUNT_KEY"
# Every call the demo upstream answers waits for two heartbeat spaces, half a second apart, as
# ImageRouter sends one every 3 s while a generation runs.
BEHAVIOUR = "heartbeat=3,interval=0.5"
MAX_RECORDS = 100


@dataclass(frozen=True)
class DemoKey:
    name: str
    token: str  # made up; the demo upstream accepts it, ImageRouter never would
    api_key_id: str
    spend_limit_usd: str | None  # the key's ImageRouter spend limit per day, as /v1/credits shows it
    budget_usd: str | None  # a local budget per day in the demo policy

    def describe(self) -> str:
        limits = []
        if self.spend_limit_usd:
            limits.append(f"ImageRouter spend limit ${self.spend_limit_usd} per day")
        if self.budget_usd:
            limits.append(f"local budget ${self.budget_usd} per day")
        return f"key '{self.name}': " + "; ".join(limits)


KEYS = (
    DemoKey("alice", "sk-demo-alice", "00000000-0000-4000-8000-00000000a11c", None, "1.00"),
    DemoKey("bob", "sk-demo-bob", "00000000-0000-4000-8000-000000000b0b", "0.10", None),
)


def policy_yaml(upstream_url: str) -> str:
    """The demo's policy: the stand-in as upstream, both demo keys, fast refreshes."""
    lines = [
        "# Written by `spend-guard serve --demo`; edit it while the demo runs to try a hot reload.",
        "mode: enforce",
        f"upstream: {{base_url: '{upstream_url}', timeout_s: 60}}",
        f"account: {{name: demo, api_key_env: {ACCOUNT_KEY_ENV}, refresh_s: 5, models_refresh_s: 60, "
        "max_staleness_s: 60, min_remaining_usd: 1.00}",
        "guard: {shutdown_grace_s: 5, hold_ttl_s: 120}",
        "keys:",
    ]
    for key in KEYS:
        lines += [
            f"  - name: {key.name}",
            f"    key_sha256: {fingerprint(key.token)}",
            f"    api_key_id: {key.api_key_id}",
        ]
        if key.budget_usd:
            lines.append(f"    budgets: [{{limit_usd: {key.budget_usd}, period: day}}]")
    return "\n".join(lines) + "\n"


class Demo:
    """The demo upstream and its working directory, for as long as the `with` block runs.

    `policy_path`, `state_dir` and `upstream_url` are set on entry; the account key the policy
    names is put in this process's environment (workers inherit it)."""

    def __init__(
        self, state_dir: str | None = None, policy_path: str | None = None, policy: Policy | None = None
    ) -> None:
        self._own_dir: str | None = None
        self._state_dir = state_dir
        self._given_policy = (os.path.abspath(policy_path), policy) if policy_path and policy else None
        self.key_env = ACCOUNT_KEY_ENV
        self._saved_env: str | None = None
        self.standin = StandIn(
            default_behaviour=BEHAVIOUR, max_records=MAX_RECORDS, sse_from_body=True, tiered_prices=True
        )
        self.policy_path = ""
        self.state_dir = ""
        self.upstream_url = ""

    def __enter__(self) -> Demo:
        self._own_dir = tempfile.mkdtemp(prefix="spend-guard-demo-")
        try:
            self.state_dir = self._state_dir or os.path.join(self._own_dir, "state")
            # The imitation's own access lines would read as the proxy's.
            logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
            self.standin.start()
            up = self.standin
            with up.lock:
                up.key_rows = [
                    key_row(
                        k.api_key_id, k.name, spend_limit=k.spend_limit_usd, period="day" if k.spend_limit_usd else None
                    )
                    for k in KEYS
                ]
                up.key_ids = {k.token: k.api_key_id for k in KEYS}
            self.upstream_url = up.url
            if self._given_policy is not None:
                self.policy_path, policy = self._given_policy
                self.key_env = policy.account.api_key_env
            else:
                self.policy_path = os.path.join(self._own_dir, "policy.yaml")
                with open(self.policy_path, "w", encoding="utf-8") as file:
                    file.write(policy_yaml(up.url))
            # The imitation knows only its own account key: a real one set here is set aside.
            self._saved_env = os.environ.get(self.key_env)
            os.environ[self.key_env] = up.account_key
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.standin.stop()
        if self._saved_env is None:
            os.environ.pop(self.key_env, None)
        else:
            os.environ[self.key_env] = self._saved_env
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    def paths(self) -> list[str]:
        """Where the demo's policy and state are (removed on exit when they are the demo's own)."""
        own = "written by the demo, removed on exit" if self._given_policy is None else "yours"
        gone = self._own_dir is not None and self.state_dir.startswith(self._own_dir)
        return [
            f"Policy: {self.policy_path} ({own}; edit it while the demo runs to try a hot reload)",
            f"State: {self.state_dir} (the embedded store{', removed on exit' if gone else ''})",
        ]

    def banner(self, proxy_url: str) -> str:
        """What `serve --demo` prints before serving: the paths, the keys and a call to try."""
        head = (
            "spend-guard demo: an imitation of ImageRouter runs inside this process "
            f"({self.upstream_url}); no account, nothing is billed."
        )
        if self._given_policy is not None:
            return self._own_policy_banner(head, proxy_url)
        width = max(len(k.token) for k in KEYS)
        lines = [
            head,
            *self.paths(),
            "Demo API keys (send them as 'Authorization: Bearer <key>'):",
            *(f"  {k.token.ljust(width)}  {k.describe()}" for k in KEYS),
            "Models: openai/gpt-image-1 (holds $0.30), google/gemini-2.5-flash ($0.039), test/test (free), "
            "google/veo-3.1 (video), any text model on /v1/openai/chat/completions.",
            "Try (allowed, then refused with 402 by bob's $0.10 limit):",
            f"  curl -s {proxy_url}/v1/openai/images/generations -H 'Authorization: Bearer {KEYS[1].token}' "
            '-H \'Content-Type: application/json\' -d \'{"model": "test/test", "prompt": "a lighthouse"}\'',
            f"  curl -s {proxy_url}/v1/openai/images/generations -H 'Authorization: Bearer {KEYS[1].token}' "
            '-H \'Content-Type: application/json\' -d \'{"model": "openai/gpt-image-1", "prompt": "a lighthouse"}\'',
            f"  curl -s {proxy_url}/-/me -H 'Authorization: Bearer {KEYS[1].token}'",
        ]
        return "\n".join(lines)

    def _own_policy_banner(self, head: str, proxy_url: str) -> str:
        assert self._given_policy is not None
        policy = self._given_policy[1]
        names = ", ".join(key.name for key in policy.keys) or "none (every token gets the account checks)"
        return "\n".join(
            [
                head,
                *self.paths(),
                f"Its upstream is replaced by the imitation. The imitation's account key, put in {self.key_env} "
                f"(account.api_key_env) for this process: {self.standin.account_key}",
                f"Keys of the policy: {names}. Send a key's own token as 'Authorization: Bearer <token>' "
                "(the imitation accepts any); its key_sha256 must be the token's (`spend-guard fingerprint`).",
                "Models: openai/gpt-image-1 (holds $0.30), google/gemini-2.5-flash ($0.039), test/test (free).",
                "Try:",
                f"  curl -s {proxy_url}/v1/openai/images/generations -H 'Authorization: Bearer <token>' "
                '-H \'Content-Type: application/json\' -d \'{"model": "test/test", "prompt": "a lighthouse"}\'',
                f"  curl -s {proxy_url}/-/me -H 'Authorization: Bearer <token>'",
            ]
        )
