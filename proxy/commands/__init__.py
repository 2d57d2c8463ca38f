"""Bodies of the CLI commands: `serve` (and `serve --demo`), `status`, `token new`, `store init` and
`store recover`."""

from __future__ import annotations
