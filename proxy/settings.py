"""Process settings from `SPEND_GUARD_*` environment variables, read once at start.

The CLI writes its options into the same variables, so `uvicorn` workers started in factory mode
build exactly the app the command line described.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.logs import LogFormat, is_log_format

ENV_PREFIX = "SPEND_GUARD_"
# prometheus_client's multiprocess mode: the directory the workers of one `serve` share.
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Secret:
    """A string that never shows itself in a repr, a log line or an error message."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    @property
    def value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    policy: str | None = None
    upstream: str | None = None  # overrides the policy's upstream.base_url
    redis_url: str | None = None  # None: the embedded store, a private server (proxy/store/embedded.py)
    workers: int = 1
    log_level: str = "info"
    # Bounds on what a client can hold open, so slow or hostile clients cannot exhaust the process
    # (docs/failure-modes.md).
    head_timeout_s: float = 10.0  # a request head must arrive within this
    body_timeout_s: float = 60.0  # a guarded request's body must arrive within this of its head
    max_connections: int = 2048  # open client connections per process; past it new ones get 503
    max_buffered_bytes: int = 256 * 1024 * 1024  # guarded request bodies held at once, per process
    max_head_bytes: int = 16 * 1024  # a request's URL and headers, Node's default; past it 431
    write_timeout_s: float = 60.0  # a client that takes nothing of a response for this is dropped
    state_dir: str | None = None  # the embedded store's directory (proxy/store/embedded.py); None: its default
    log_format: LogFormat = "text"  # text or json (proxy/logs.py)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def text(name: str) -> str | None:
            value = env.get(ENV_PREFIX + name, "").strip()
            return value or None

        def integer(name: str, default: int) -> int:
            raw = text(name)
            if raw is None:
                return default
            try:
                return int(raw)
            except ValueError:
                raise SettingsError(f"{ENV_PREFIX}{name} has value {raw!r}. Not a valid int.") from None

        def number(name: str, default: float) -> float:
            raw = text(name)
            if raw is None:
                return default
            try:
                return float(raw)
            except ValueError:
                raise SettingsError(f"{ENV_PREFIX}{name} has value {raw!r}. Not a valid number.") from None

        def log_format(raw: str | None) -> LogFormat:
            if raw is None:
                return cls.log_format
            if is_log_format(value := raw.lower()):
                return value
            raise SettingsError(f"{ENV_PREFIX}LOG_FORMAT has value {raw!r}. Expected text or json.")

        return cls(
            host=text("HOST") or cls.host,
            port=integer("PORT", cls.port),
            policy=text("POLICY"),
            upstream=text("UPSTREAM"),
            redis_url=text("REDIS_URL"),
            workers=integer("WORKERS", cls.workers),
            log_level=(text("LOG_LEVEL") or cls.log_level).lower(),
            head_timeout_s=number("HEAD_TIMEOUT_S", cls.head_timeout_s),
            body_timeout_s=number("BODY_TIMEOUT_S", cls.body_timeout_s),
            max_connections=integer("MAX_CONNECTIONS", cls.max_connections),
            max_buffered_bytes=integer("MAX_BUFFERED_BYTES", cls.max_buffered_bytes),
            max_head_bytes=integer("MAX_HEAD_BYTES", cls.max_head_bytes),
            write_timeout_s=number("WRITE_TIMEOUT_S", cls.write_timeout_s),
            state_dir=text("STATE_DIR"),
            log_format=log_format(text("LOG_FORMAT")),
        )

    def to_env(self) -> dict[str, str]:
        values = {
            "HOST": self.host,
            "PORT": str(self.port),
            "POLICY": self.policy or "",
            "UPSTREAM": self.upstream or "",
            "REDIS_URL": self.redis_url or "",
            "WORKERS": str(self.workers),
            "LOG_LEVEL": self.log_level,
            "HEAD_TIMEOUT_S": repr(self.head_timeout_s),
            "BODY_TIMEOUT_S": repr(self.body_timeout_s),
            "MAX_CONNECTIONS": str(self.max_connections),
            "MAX_BUFFERED_BYTES": str(self.max_buffered_bytes),
            "MAX_HEAD_BYTES": str(self.max_head_bytes),
            "WRITE_TIMEOUT_S": repr(self.write_timeout_s),
            "STATE_DIR": self.state_dir or "",
            "LOG_FORMAT": self.log_format,
        }
        return {ENV_PREFIX + k: v for k, v in values.items()}


def account_key(env_name: str, environ: Mapping[str, str] | None = None) -> Secret | None:
    value = (os.environ if environ is None else environ).get(env_name, "").strip()
    return Secret(value) if value else None
