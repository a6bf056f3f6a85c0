"""Logging setup: JSON lines when not on a TTY (systemd, files), readable console on a TTY.

This is the only module that calls ``structlog.configure``. Request-scoped fields
(``request_id``, ``model``, ``version``) are bound through structlog's contextvars.
Records of the standard ``logging`` module (aiohttp, asyncio, watchdog) go through the
same renderer, so the journal holds one format only.

Secrets never reach a log line: callers log ``config.describe()``, never raw values, and
tracebacks are rendered without local variables (a frame's locals may hold a config
with its tokens, or a request's ``Authorization`` header).
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import orjson
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

#: Third-party loggers that are chatty at INFO; they speak from WARNING up.
_QUIET = ("aiohttp.access", "aiohttp.server", "watchdog", "asyncio")


def _dumps(obj: object, default: object = None) -> str:
    return orjson.dumps(obj, default=str).decode()


def _renderer(use_json: bool) -> structlog.typing.Processor:
    if use_json:
        return structlog.processors.JSONRenderer(serializer=_dumps)
    # plain_traceback: no rich / better-exceptions, which would print local variables.
    return structlog.dev.ConsoleRenderer(
        colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
    )


def _shared(use_json: bool) -> list[structlog.typing.Processor]:
    """Processors for both structlog events and standard-library records."""
    shared: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_json:
        no_locals = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        shared.append(structlog.processors.ExceptionRenderer(no_locals))
    return shared


def _configure_stdlib(level: int, use_json: bool) -> None:
    """Send standard ``logging`` records (aiohttp, asyncio) through the same renderer."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *_shared(use_json)],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _renderer(use_json),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def configure(
    level: Literal["debug", "info", "warning", "error"] = "info",
    fmt: Literal["json", "console", "auto"] = "auto",
) -> None:
    """Configure structlog and standard logging for the process (safe to call again on SIGHUP)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        *_shared(use_json),
        _renderer(use_json),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configure_stdlib(_LEVELS[level], use_json)
