"""Bodies of the CLI commands other than `serve`: `status`, `store recover` and the demo.
"""

from __future__ import annotations
