"""Logging setup: JSON lines when not on a TTY (systemd, files), readable console on a TTY.

This is the only module that calls ``structlog.configure``. Request-scoped fields
(``request_id``, ``model``, ``version``) are bound through structlog's contextvars.
Secrets never reach a log event: callers log ``config.describe()``, never raw values.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def _dumps(obj: object, default: object = None) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure(
    level: Literal["debug", "info", "warning", "error"] = "info",
    fmt: Literal["json", "console", "auto"] = "auto",
) -> None:
    """Configure structlog for the process (safe to call again on SIGHUP)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_json:
        processors += [
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
