"""The log line format the agent and the GSLB API share (`log_format: json`).

One JSON object per line, for log shippers (Loki, Vector, journald's JSON export):

    {"ts": "2026-12-02T00:41:07.123456+00:00", "level": "info", "logger": "edge.agent",
     "msg": "state healthy -> draining ...", "component": "agent", "node": "edge-a1",
     "event": "state", "state": "draining", "reason": "drain requested by ops: maint"}

`ts` (UTC, ISO 8601), `level`, `logger` and `msg` are always there. Fields given once to the
formatter (the process's `component`, `node`, `site`) are on every line; a call's own fields
come from `extra=` (`log.info("...", extra={"event": "state", "reason": ...})`). An exception
adds `exc` (the traceback as text). Values that JSON cannot hold are written as `str()`.
Plain text stays the default on a terminal.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: What every LogRecord carries (and uvicorn's ANSI-coloured copy of the message): never
#: copied as a structured field.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "color_message"}
)


class JsonLines(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, the static fields, `extra=`."""

    def __init__(self, static: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self._static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self._static,
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(
    level: int | str, log_format: LogFormat, static: Mapping[str, Any] | None = None
) -> None:
    """The process's root handler on stderr, in the chosen format (replaces any earlier one)."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonLines(static) if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler], force=True)


__all__ = ["TEXT_FORMAT", "JsonLines", "LogFormat", "configure"]
