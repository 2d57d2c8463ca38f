"""Store backends, picked from the URL's scheme in one table (as uvicorn maps "httptools" to a
protocol class): Redis, Redis over TLS or a unix socket, Redis Cluster; no URL is the embedded
server of the state dir."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable

import redis.asyncio as aioredis

# Query parameters of a store URL that hold a secret (redis-py takes `?password=` as the password).
SECRET_PARAMS = ("password", "pass", "secret", "token")


def describe_url(url: str) -> str:
    """`url` as output may show it: a password, in the user part or the query, is `***`."""
    try:
        parts = urllib.parse.urlsplit(url)
        hostname, port = parts.hostname, parts.port
    except ValueError:
        return "(a malformed store URL)"
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        host = f"[{hostname}]" if hostname and ":" in hostname else hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{port}" if port else "")
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        masked = [(k, "***" if any(s in k.lower() for s in SECRET_PARAMS) else v) for k, v in pairs]
        query = urllib.parse.urlencode(masked, safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def embedded_client(state_dir: str | None) -> aioredis.Redis:
    """The embedded Valkey server `spend-guard serve` runs for `state_dir` (proxy/store/embedded.py),
    reached on its unix socket."""
    from proxy.store.embedded import socket_url

    return _single_client(socket_url(state_dir))


def _single_client(url: str) -> aioredis.Redis:
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        socket_timeout=None,
        socket_connect_timeout=1.0,
        health_check_interval=10,  # see STORE_TIMEOUT_S (proxy/store/connection.py)
    )
    return client


def _cluster_client(url: str) -> aioredis.Redis:
    cluster = aioredis.RedisCluster.from_url(
        "redis://" + url[len(CLUSTER_SCHEME) :], socket_timeout=2.0, socket_connect_timeout=1.0
    )
    return cluster  # type: ignore[return-value]  # same command surface for what Store uses


CLUSTER_SCHEME = "redis+cluster://"
# The store backend for each URL scheme (as uvicorn maps "httptools" to a protocol class); no URL
# at all is the embedded server.
BACKENDS: dict[str, Callable[[str], aioredis.Redis]] = {
    "redis": _single_client,
    "rediss": _single_client,
    "unix": _single_client,
    "redis+cluster": _cluster_client,
}


def redis_client(url: str | None, *, state_dir: str | None = None) -> aioredis.Redis:
    """The client for a store URL (`redis://`, `rediss://`, `unix://`, `redis+cluster://host:port`),
    or for the embedded server of `state_dir` when there is no URL."""
    if not url:
        return embedded_client(state_dir)
    scheme = url.split("://", 1)[0].lower()
    backend = BACKENDS.get(scheme)
    if backend is None:
        raise ValueError(
            f"store URL {url.split('://', 1)[0]}://...: unknown scheme; expected one of {', '.join(BACKENDS)}"
        )
    return backend(url)
