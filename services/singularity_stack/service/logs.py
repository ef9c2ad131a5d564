"""Structured logs: one JSON object per line on stdout, tagged with the service's name.

Every record of the process goes through the root logger's one handler: libraries that install their
own handlers at import (litellm writes plain, coloured text) are routed through it when logging is
configured, Python warnings become records, terminal colour codes are removed, and fields that only
mean something to another formatter (uvicorn's `color_message`) or whose value has no text of its own
(litellm's `litellm_redacted` stamp, an `object()`) are dropped.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

from pythonjsonlogger.json import JsonFormatter

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# Fields other libraries put on records for their own formatters.
FOREIGN_FIELDS = frozenset({"color_message", "litellm_redacted"})
QUIET_LOGGERS = ("httpx", "LiteLLM", "litellm")


def _has_text(value: object) -> bool:
    """False for a value whose only text would be `<… object at 0x…>` (no __str__ or __repr__ of its own)."""
    kind = type(value)
    return kind.__str__ is not object.__str__ or kind.__repr__ is not object.__repr__


class ServiceJsonFormatter(JsonFormatter):
    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {
            key: ANSI_ESCAPE.sub("", value) if isinstance(value, str) else value
            for key, value in log_data.items()
            if key not in FOREIGN_FIELDS and _has_text(value)
        }


def configure_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        ServiceJsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"service": service},
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    route_library_loggers()


def route_library_loggers() -> None:
    """Loggers that brought their own handlers (litellm's, at import) write through the root's instead, and
    the chatty ones only from WARNING. Call again after importing such a library later (Nexus loads litellm
    in the background, after logging is configured)."""
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and logger.handlers:
            logger.handlers.clear()
            logger.propagate = True
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
