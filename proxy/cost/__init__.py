"""Reading the bill out of an upstream response as it streams: the top-level `cost` and `error`
of a JSON body (`scanner`), of an event stream (`sse`), through gzip/deflate (`observers`).
"""

from __future__ import annotations

from proxy.cost.observers import observer_for
from proxy.cost.scanner import Outcome

__all__ = ["Outcome", "observer_for"]
