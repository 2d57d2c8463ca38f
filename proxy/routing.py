"""Which requests spend money: canonical path matching against the policy's spending routes.

ImageRouter routes like Express's defaults (case-insensitive, trailing slash optional), and a
path may reach it spelled many ways. We match on one canonical form so that no spelling reaches
a spending route unguarded; an encoded `/` or `\\` is ambiguous and refused. The request itself
is forwarded exactly as received (DESIGN §1 step 1).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from proxy.types import RouteKind

_ENCODED_SEPARATOR = re.compile(rb"%(2f|5c)", re.IGNORECASE)


@dataclass(frozen=True)
class Match:
    """The outcome of classifying one request path."""

    kind: RouteKind | None  # None: not a spending route
    path: str  # the canonical form of the route that matched (or of the request)
    enabled: bool = True
    ambiguous: bool = False  # spelled with an encoded separator: refuse, never guess


@functools.lru_cache(maxsize=4096)
def canonical_path(raw_path: bytes) -> str:
    """Percent-decode, fold case, turn `\\` into `/`, resolve `.`/`..`, squeeze `//`, drop the trailing `/`."""
    decoded = unquote_to_bytes(raw_path).decode("utf-8", "replace").replace("\\", "/")
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
    """Canonical spending paths -> kind; built once per policy."""

    def __init__(self, routes: Iterable[tuple[str, RouteKind, bool]]) -> None:
        self._routes: dict[str, tuple[RouteKind, bool]] = {}
        for path, kind, enabled in routes:
            self._routes[canonical_path(path.encode())] = (kind, enabled)

    def classify(self, method: str, raw_path: bytes) -> Match:
        path = canonical_path(raw_path)
        found = self._routes.get(path)
        if found is None or method.upper() != "POST":
            # Only POST spends (the upstream registers generation handlers for POST alone).
            return Match(None, path)
        kind, enabled = found
        ambiguous = bool(_ENCODED_SEPARATOR.search(raw_path)) or b"\\" in raw_path
        return Match(kind, path, enabled, ambiguous)
