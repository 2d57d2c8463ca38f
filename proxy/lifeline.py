"""Children that die with their parent: the embedded store's server and the `--workers N` workers.

On Linux a child asks the kernel for a signal when the thread that started it exits
(prctl PR_SET_PDEATHSIG), so a parent killed with SIGKILL, which runs no cleanup code, leaves no
orphan holding the state dir's server or the listening port. Elsewhere it is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
# Looked up once, before any fork: a child between fork and exec should not load libraries.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """In the child: `sig` arrives when the parent's starting thread exits; a parent that is
    already gone (it died before this ran) ends the child at once."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent_pid:
        os._exit(1)
