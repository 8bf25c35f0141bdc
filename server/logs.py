"""Log set-up (plain text or one JSON object per line) and per-request ids.

Every RPC gets a request id: the client's `x-request-id` metadata when it is a short token,
else a fresh random one. It is sent back as `x-request-id` metadata, quoted in INTERNAL error
messages and attached to every log line about the request.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

from server.config import LoggingConfig

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class _RequestIdDefault(logging.Filter):
    """Give records without a request id the placeholder "-" so formats can always use it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, request_id, message (and exc_info)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _ServerHandler(logging.StreamHandler[TextIO]):
    """The stderr handler installed by `configure_logging` (marked so it can be replaced)."""


def configure_logging(config: LoggingConfig) -> None:
    """Send every log record to stderr in the configured format (call once at start-up).

    Replaces a handler from an earlier call, and leaves other handlers alone.
    """
    handler = _ServerHandler(sys.stderr)
    handler.addFilter(_RequestIdDefault())
    handler.setFormatter(JsonFormatter() if config.json else logging.Formatter(_PLAIN_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ServerHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level)


def request_id_from(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The client's request id if it sent a well-formed one, else a new random id."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID_PATTERN.match(value):
            return value
    return uuid.uuid4().hex[:16]


class RequestLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger that tags each record with one request's id."""

    def __init__(self, logger: logging.Logger, request_id: str) -> None:
        super().__init__(logger, {"request_id": request_id})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        kwargs["extra"] = {**kwargs.get("extra", {}), **(self.extra or {})}
        return msg, kwargs
