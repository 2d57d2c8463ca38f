"""Log formats: `text` (plain lines on stderr, access lines as JSON on stdout) or `json` (every
line, uvicorn's included, one JSON object on stdout), chosen by `--log-format`.

The access logger (`spend_guard.access`) always writes a bare JSON object per guarded call
(proxy/guard/verdicts.py); in `json` mode every other logger is formatted by `JsonFormatter`, so a log
shipper reads one stream of one format.

Access lines are many (one per guarded call), so the served proxy writes them with
`TurnBufferedHandler`: the lines of one event-loop turn go out together in one write at the end
of the turn, and `access_line` hands a line straight to that handler, skipping the `LogRecord`
that nothing reads (together ~8 us a call of logging's machinery and a write syscall each).
A line is in the stream by the end of the turn that logged it; only a process killed
(SIGKILL) within that turn loses what it logged in it. Elsewhere (tests, a handler of the
operator's own) each line is logged as a record of `spend_guard.access`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any, Literal, TypeGuard, get_args

from uvicorn.config import LOGGING_CONFIG

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = get_args(LogFormat)
ACCESS_LOGGER = "spend_guard.access"


def is_log_format(value: object) -> TypeGuard[LogFormat]:
    """Whether `value` names a log format, spelled exactly."""
    return isinstance(value, str) and value in LOG_FORMATS


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC), level, logger, message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


class TurnBufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the lines of an event-loop turn together, at its end (module
    doc). Off the event loop it writes each line at once, as `logging.StreamHandler` does."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.lines: list[str] = []
        self.due = False  # a write is scheduled for the end of this turn

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.add(self.format(record))
        except Exception:
            self.handleError(record)

    def add(self, line: str) -> None:
        self.lines.append(line)
        if self.due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self.due = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self.due = False
        lines, self.lines = self.lines, []
        try:
            if lines:
                self.stream.write(self.terminator.join(lines) + self.terminator)
            self.stream.flush()
        except ValueError:
            pass  # the stream was closed (interpreter exit)
        except OSError:
            # As logging.StreamHandler reports a record it could not write (stderr, once a turn).
            self.handleError(logging.makeLogRecord({"name": ACCESS_LOGGER, "msg": lines[0] if lines else ""}))


_access = logging.getLogger(ACCESS_LOGGER)


def access_line(line: str) -> None:
    """Log one access line: straight into a `TurnBufferedHandler` (the one `configure_logging`
    installs) when it is the access logger's only handler and the logger has no filter and logs
    INFO, else as a record of `spend_guard.access`."""
    handlers = _access.handlers
    if (
        len(handlers) == 1
        and type(handlers[0]) is TurnBufferedHandler
        and not _access.filters
        and _access.isEnabledFor(logging.INFO)
    ):
        handlers[0].add(line)
    else:
        _access.info(line)


def uvicorn_log_config(log_format: LogFormat, filters: dict[str, Any] | None = None) -> dict[str, Any]:
    """uvicorn's own logging config, in `log_format`, with `filters` on its error logger."""
    config: dict[str, Any] = json.loads(json.dumps(LOGGING_CONFIG))
    if filters:
        config["filters"] = filters
        config["loggers"]["uvicorn.error"]["filters"] = list(filters)
    if log_format == "json":
        config["formatters"] = {"json": {"()": f"{__name__}.JsonFormatter"}}
        for handler in config["handlers"].values():
            handler["formatter"] = "json"
            handler["stream"] = "ext://sys.stdout"
    return config


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Set up the proxy's own loggers (uvicorn's are set up by `uvicorn_log_config`)."""
    root = logging.getLogger()
    if log_format == "json":
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
        root.handlers[:] = [handler]
        root.setLevel(level.upper())
    else:
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not _access.handlers:
        buffered = TurnBufferedHandler(sys.stdout)
        buffered.setFormatter(logging.Formatter("%(message)s"))
        _access.addHandler(buffered)
        _access.propagate = False
    _access.setLevel(logging.INFO)
