"""Client-supplied strings (model, path, request id) as they may appear in messages and logs.

An error message or a log line quotes what a client sent only through `excerpt`: never more than
`EXCERPT_MAX_CHARS` characters of it and never a control character, so a crafted model cannot
flood the log, forge a log line or hide text behind a terminal escape.
"""

from __future__ import annotations

EXCERPT_MAX_CHARS = 128  # the longest request id the guard accepts (http/request.py, REQUEST_ID_RE)


def excerpt(text: str, limit: int = EXCERPT_MAX_CHARS) -> str:
    """`text` with every non-printable character (C0/C1 controls, DEL, format and separator
    characters other than space, lone surrogates) removed, cut at `limit` characters; an ellipsis
    marks a cut."""
    if len(text) <= limit and text.isprintable():
        return text  # the usual case, without a character loop
    kept = "".join(ch for ch in text[: limit * 4] if ch.isprintable())
    return kept if len(kept) <= limit else kept[:limit] + "…"
