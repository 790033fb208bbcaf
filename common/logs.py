"""Logging setup, done once by the CLI: JSON lines when not a terminal, console when it is.

structlog's events and every standard-library record (aiohttp's tracebacks, psycopg's
pool warnings, asyncio, Python warnings, a thread that dies) go through one handler and
one renderer, so in JSON mode every line on stderr is one object; an exception is its
``exception`` field (the formatted traceback), never lines of plain text.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = ("secret", "password", "token", "api_key", "dsn")


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in list(event):
        if name != "event" and any(s in name.lower() for s in _SECRET_KEYS):
            event[name] = "***"
    return event


def _thread_failed(args: threading.ExceptHookArgs) -> None:
    """A thread's uncaught exception as one log event (Python prints it as plain text)."""
    if args.exc_type is SystemExit:
        return
    structlog.get_logger("ct1_cdc").error(
        "thread_failed",
        thread=args.thread.name if args.thread is not None else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def configure(level: str = "info", *, json: bool | None = None) -> None:
    use_json = (not sys.stderr.isatty()) if json is None else json
    number = logging.getLevelNamesMapping()[level.upper()]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # the console renderer formats exceptions itself; JSON gets them as a string field
    exceptions: list[structlog.types.Processor] = [structlog.processors.format_exc_info] if use_json else []
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # records from the standard library: their logger's name says who logged
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *exceptions,
            _redact,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(number)
    logging.captureWarnings(True)  # warnings.warn(...) as records of "py.warnings"
    threading.excepthook = _thread_failed
