"""Logging set-up: text for a terminal, or one JSON object per line for a log pipeline.

``--log-format json`` writes each record as ``{"time", "level", "logger", "message", ...}``
on one line, with the ``pid`` of the process and any fields the code passed with ``extra=``
(``upstream``, for example), and ``exception`` holding a traceback's text. Both the level and
the format can change while running (a reload): :func:`configure_logging` again.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Final

__all__ = ["JsonFormatter", "configure_logging"]

# The attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """The one handler this program installs (found again on a reload by its class)."""


def configure_logging(level: str, log_format: str = "text", *, workers: int = 1) -> None:
    """Log at ``level`` to stderr in ``log_format`` ("text" or "json"); again to change them."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _Stderr)), None)
    if handler is None:
        handler = _Stderr(sys.stderr)
        root.addHandler(handler)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        # With several workers, each line says which process wrote it.
        process = " [%(process)d]" if workers > 1 else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s{process} %(name)s: %(message)s")
        )
    root.setLevel(level)
