"""Client-supplied strings (model, path, request id) as they may appear in messages and logs.

An error message or a log line never carries more than `ECHO_MAX_CHARS` characters of what a
client sent, and never a control character (issue #12): a crafted model cannot flood the log,
forge a log line or hide text behind a terminal escape.
"""

from __future__ import annotations

ECHO_MAX_CHARS = 128  # the longest request id the guard accepts (request.REQUEST_ID_RE)


def echo(text: str, limit: int = ECHO_MAX_CHARS) -> str:
    """`text` with every non-printable character (C0/C1 controls, DEL, format and separator
    characters other than space, lone surrogates) removed, cut at `limit` characters; an ellipsis
    marks a cut."""
    if len(text) <= limit and text.isprintable():
        return text  # the usual case, without a character loop
    kept = "".join(ch for ch in text[: limit * 4] if ch.isprintable())
    return kept if len(kept) <= limit else kept[:limit] + "…"
