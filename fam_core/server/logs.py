"""Structured logs: one JSON object per line."""

from __future__ import annotations

import json
import logging
import time

LOGGER = logging.getLogger("fam_core.server")


class JsonFormatter(logging.Formatter):
    """Formats ``logger.info({...})`` records as one JSON line with time and level."""

    def format(self, record: logging.LogRecord) -> str:
        fields = record.msg if isinstance(record.msg, dict) else {"message": record.getMessage()}
        entry = {"time": round(time.time(), 3), "level": record.levelname.lower(), **fields}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: int = logging.INFO) -> None:
    """Send the server's logs to stderr as JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level)
    LOGGER.propagate = False


def log_event(event: str, **fields: object) -> None:
    LOGGER.info({"event": event, **fields})
