"""Log formats: `text` (plain lines on stderr, access lines as JSON on stdout) or `json` (every
line, uvicorn's included, one JSON object on stdout), chosen by `--log-format`.

The access logger (`spend_guard.access`) always writes a bare JSON object per guarded call
(proxy/guard/verdicts.py); in `json` mode every other logger is formatted by `JsonFormatter`, so a log
shipper reads one stream of one format.
"""

from __future__ import annotations

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
    access = logging.getLogger(ACCESS_LOGGER)
    if not access.handlers:
        access_handler = logging.StreamHandler(sys.stdout)
        access_handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(access_handler)
        access.propagate = False
    access.setLevel(logging.INFO)
