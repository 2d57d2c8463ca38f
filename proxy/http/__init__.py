"""The wires, with no money in them: routing, reading requests and bodies as ImageRouter's own
stack reads them, the upstream session, the unguarded passthrough, the server protocol with its
connection bounds and the worker supervisor.
"""

from __future__ import annotations

from proxy.http.routing import Match, RouteTable
from proxy.http.upstream import Upstream

__all__ = ["Match", "RouteTable", "Upstream"]
