"""The bill of a `text/event-stream` response: the cost its final event carries."""

from __future__ import annotations

import decimal
import json

from proxy.cost.scanner import EOL, ERROR, MAX_EVENT_BYTES, UNKNOWN, Outcome, cost_to_micros

# Responses API events sent before any output: an error after only these produced nothing.
NO_OUTPUT_TYPES = frozenset({"response.created", "response.in_progress", "response.queued"})


class SseScanner:
    """Reads `text/event-stream` events; the final event decides the outcome.

    A chat stream ends with a chunk holding top-level `cost` and `usage` (then `data: [DONE]`);
    the responses API ends with `{"type": "response.completed", "response": {..., "cost": ...}}`.
    Only the final event's `cost` is the bill: a cost in an earlier event, with more events
    after it, is not final, and the whole hold is charged. An `{"error": ...}` releases the hold
    only when nothing was streamed before it: once output has gone out, the provider may bill
    it, so the hold is charged unless a final cost follows.
    """

    def __init__(self) -> None:
        self._line = bytearray()  # the current line, held until its end of line arrives
        self._line_bytes = 0  # length of the current line, also when not held (oversized)
        self._data: list[bytes] = []
        self._event_bytes = 0
        self._oversized = False
        self._skip_lf = False  # the previous chunk ended on `\r`; a leading `\n` is the same EOL
        self._cost: int | None = None  # the cost the latest event carried, if it carried one
        self._doubt = False  # an event could not be read: it may have carried output or a cost
        self._output = False  # an event with output went out
        self._error = False

    def feed(self, chunk: bytes) -> None:
        pos = 0
        if self._skip_lf and chunk[:1] == b"\n":
            pos = 1
        self._skip_lf = False
        for match in EOL.finditer(chunk, pos):
            self._add_to_line(chunk[pos : match.start()])
            self._end_line()
            pos = match.end()
            self._skip_lf = pos == len(chunk) and match.group() == b"\r"
        self._add_to_line(chunk[pos:])

    def finish(self, complete: bool = True) -> Outcome:
        # A broken stream's unterminated event may be cut short: only a complete one is read.
        if complete:
            if self._line_bytes:
                self._end_line()
            self._dispatch()
        if self._cost is not None:
            return Outcome("cost", self._cost)
        if self._error and not (self._output or self._doubt):
            return ERROR
        return UNKNOWN

    def _add_to_line(self, piece: bytes) -> None:
        if not piece:
            return
        self._line_bytes += len(piece)
        if self._event_bytes + self._line_bytes > MAX_EVENT_BYTES:
            self._oversized = True
            self._data.clear()
            self._line.clear()
        if not self._oversized:
            self._line += piece

    def _end_line(self) -> None:
        line = bytes(self._line)
        blank = self._line_bytes == 0
        self._line.clear()
        self._line_bytes = 0
        if blank:
            self._dispatch()
        elif self._oversized or line.startswith(b":"):
            return
        else:
            name, colon, value = line.partition(b":")
            if name == b"data":
                if colon and value.startswith(b" "):
                    value = value[1:]
                self._data.append(value)
                self._event_bytes += len(value) + 1

    def _dispatch(self) -> None:
        if self._oversized:
            self._cost = None
            self._doubt = self._output = True
        elif self._data:
            self._read_event(b"\n".join(self._data))
        self._data.clear()
        self._event_bytes = 0
        self._oversized = False

    def _read_event(self, data: bytes) -> None:
        if data.strip() == b"[DONE]":
            return
        self._cost = None  # a cost counts only while no event follows it
        try:
            event = json.loads(data, parse_float=decimal.Decimal)
        except (ValueError, RecursionError):
            event = None
        if not isinstance(event, dict):
            self._output = True  # unreadable: it may have been output
            return
        if isinstance(event.get("error"), dict):
            self._error = True
        elif _has_output(event):
            self._output = True
        cost = event.get("cost")
        response = event.get("response")
        if cost is None and isinstance(response, dict):
            cost = response.get("cost")
        if cost is not None:
            self._cost = cost_to_micros(cost)
            self._doubt = self._doubt or self._cost is None


def _has_output(event: dict[str, object]) -> bool:
    """Whether a (non-error) event may carry billed output: anything but a chat chunk with no
    choices and no usage, or a responses event from before the output starts."""
    if event.get("type") in NO_OUTPUT_TYPES:
        return False
    return not (event.get("choices") == [] and event.get("usage") is None)
