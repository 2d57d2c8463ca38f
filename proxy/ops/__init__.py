"""Operating the guard: budget levels as people read them, Prometheus metrics and gauges,
threshold alerts and their signed webhooks, and the status page.
"""

from __future__ import annotations

from proxy.ops.metrics import Metrics

__all__ = ["Metrics"]
