"""Which requests spend money: canonical path matching against the policy's spending routes.

ImageRouter routes like Express's defaults (case-insensitive, trailing slash optional), and a
path may reach it spelled many ways. We match on one canonical form so that no spelling reaches
a spending route unguarded; an encoded `/` or `\\` is ambiguous and refused. So is, on every
method, a path that still holds a percent-escape after one decode and names a spending route
once decoded further (`/v1/openai/images/%2567enerations`): Express decodes once, but any layer
in between that decodes twice would turn it into an unguarded spending call. The request itself
is forwarded exactly as received (docs/how-it-works.md).

Only a route the table lists is known. A `free` route (kind None here) is a POST that spends
nothing. Any method but GET, HEAD or OPTIONS to a path the table does not list is *unknown*: the
guard refuses it or passes it as `guard.unknown_routes` says, never as a passthrough that nobody
counted (docs/how-it-works.md#route).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote_to_bytes

from proxy.types import RouteKind

_ENCODED_SEPARATOR = re.compile(rb"%(2f|5c)", re.IGNORECASE)
_ESCAPE = re.compile(rb"%[0-9a-f]{2}", re.IGNORECASE)
# Decoding rounds tried on a path that stays encoded; `%25` nested deeper than this is refused
# outright when it sits under a spending route's first segment.
MAX_DECODES = 8
# The answers for the paths seen last are remembered (clients call a few paths over and over, and
# canonicalising one costs more than the rest of an unguarded call's own work), but only for paths
# of at most CACHED_PATH_BYTES: a longer one is worked out afresh, so the caches of this module hold
# at most (CLASSIFIED_CACHE + 4096 + 1024) short paths, about 3 MB, whatever clients send.
CLASSIFIED_CACHE = 1024
CACHED_PATH_BYTES = 256
# Methods that reach ImageRouter's read-only handlers (and CORS preflights) only.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Match:
    """The outcome of classifying one request path."""

    kind: RouteKind | None  # None: not a spending route
    path: str  # the canonical form of the route that matched (or of the request)
    enabled: bool = True
    ambiguous: bool = False  # an encoded separator, or still encoded after one decode: refuse, never guess
    free: bool = False  # a POST to a route listed as spending nothing
    unknown: bool = False  # a method other than GET, HEAD, OPTIONS to a path the table does not list


def canonical_path(raw_path: bytes) -> str:
    """Percent-decode, fold case, turn `\\` into `/`, resolve `.`/`..`, squeeze `//`, drop the trailing `/`."""
    if len(raw_path) > CACHED_PATH_BYTES:
        return _canonical(unquote_to_bytes(raw_path))
    return _canonical_cached(raw_path)


@functools.lru_cache(maxsize=4096)
def _canonical_cached(raw_path: bytes) -> str:
    return _canonical(unquote_to_bytes(raw_path))


def deep_path(raw_path: bytes) -> str | None:
    """The canonical form once every layer of percent-encoding is gone, for a path that still
    holds an escape after one decode (None for any other path, and past MAX_DECODES layers "")."""
    if len(raw_path) > CACHED_PATH_BYTES:
        return _deep_path(raw_path)
    return _deep_path_cached(raw_path)


@functools.lru_cache(maxsize=1024)
def _deep_path_cached(raw_path: bytes) -> str | None:
    return _deep_path(raw_path)


def _deep_path(raw_path: bytes) -> str | None:
    decoded = unquote_to_bytes(raw_path)
    if not _ESCAPE.search(decoded):
        return None
    for _ in range(MAX_DECODES):
        decoded = unquote_to_bytes(decoded)
        if not _ESCAPE.search(decoded):
            return _canonical(decoded)
    return ""


def _canonical(decoded_bytes: bytes) -> str:
    decoded = decoded_bytes.decode("utf-8", "replace").replace("\\", "/")
    parts: list[str] = []
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if parts:
                parts.pop()
            continue
        parts.append(segment)
    return ("/" + "/".join(parts)).casefold()


class RouteTable:
    """Canonical spending paths -> kind, and the free POST paths; built once per policy."""

    def __init__(self, routes: Iterable[tuple[str, RouteKind | Literal["free"], bool]]) -> None:
        self._routes: dict[str, tuple[RouteKind, bool]] = {}
        free: set[str] = set()
        for path, kind, enabled in routes:
            canonical = canonical_path(path.encode())
            if kind == "free":
                # A free route disabled by the policy is as if unlisted: an unknown route.
                if enabled:
                    free.add(canonical)
            else:
                self._routes[canonical] = (kind, enabled)
        self._free = frozenset(free - self._routes.keys())
        self._seen: dict[tuple[str, bytes], Match] = {}  # short paths only (CACHED_PATH_BYTES)

    def classify(self, method: str, raw_path: bytes) -> Match:
        if len(raw_path) > CACHED_PATH_BYTES or len(method) > 16:
            return self._classify(method, raw_path)
        found = self._seen.get((method, raw_path))
        if found is None:
            if len(self._seen) >= CLASSIFIED_CACHE:
                self._seen.clear()
            found = self._seen[(method, raw_path)] = self._classify(method, raw_path)
        return found

    def _classify(self, method: str, raw_path: bytes) -> Match:
        path = canonical_path(raw_path)
        found = self._routes.get(path)
        if found is None:
            match = self._double_encoded(raw_path, path)
            if match.kind is not None or method.upper() in SAFE_METHODS:
                return match
            if path in self._free:
                return Match(None, path, free=method.upper() == "POST")
            return Match(None, path, unknown=True)
        if method.upper() != "POST":
            # Only POST spends (the upstream registers generation handlers for POST alone).
            return Match(None, path)
        kind, enabled = found
        ambiguous = bool(_ENCODED_SEPARATOR.search(raw_path)) or b"\\" in raw_path
        return Match(kind, path, enabled, ambiguous)

    def _double_encoded(self, raw_path: bytes, path: str) -> Match:
        """A path still encoded after one decode, on (or under) a spending route once fully decoded:
        refused on every method. Nested deeper than MAX_DECODES, anything under a route's first
        segment is refused."""
        deep = deep_path(raw_path)
        if deep is None:
            return Match(None, path)
        for route, (kind, enabled) in self._routes.items():
            if deep == route or deep.startswith(route + "/") or (deep == "" and path.startswith(_first_segment(route))):
                return Match(kind, route, enabled, ambiguous=True)
        return Match(None, path)


def _first_segment(route: str) -> str:
    return "/" + route.split("/")[1] if route.count("/") > 1 else route
