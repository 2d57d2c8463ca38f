"""The tests' ImageRouter stand-in: the one imitation the demo serves too, proxy/standin/.

Tests import it from here (`from tests.support.standin import StandIn, key_row`); its behaviours, the
`X-Standin` header and the ledger are documented in `proxy/standin/__init__.py`.
"""

from __future__ import annotations

import proxy.standin
from proxy.standin import *  # noqa: F403 - the package's whole public surface, as listed there

__all__ = proxy.standin.__all__
