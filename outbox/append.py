"""Capture's event inserts on a native thread (``outbox/_append.c``), when it can be had.

:func:`appender_for` gives an ``Appender`` on the writer's own connection, or None where
the compiled module is missing or the interpreter is not one whose ``sqlite3.Connection``
layout it knows: the writer then inserts with ``executemany`` as before.  The environment
variable ``CT1_CDC_APPEND_THREAD=off`` turns it off (for comparing the two in a benchmark).
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path
from typing import Protocol

# CPython versions whose sqlite3.Connection keeps its sqlite3 handle right after the
# object header (Modules/_sqlite/connection.h), the handle the compiled module uses.
KNOWN_LAYOUTS = {(3, 10), (3, 11), (3, 12), (3, 13)}
SQLITE_CONSTRAINT = 19


class Appender(Protocol):
    def append(self, rows: list[tuple[object, ...]], /) -> None: ...
    def settle(self) -> int: ...
    def execute(self, sql: str, /) -> int: ...
    def done(self) -> int: ...
    def wait_statements(self) -> None: ...
    def queued(self) -> int: ...
    def close(self) -> None: ...
    def filename(self) -> str | None: ...


def appender_for(conn: sqlite3.Connection, sql: str) -> Appender | None:
    """An appender of ``sql``'s rows on ``conn``, or None (the caller uses executemany)."""
    if os.environ.get("CT1_CDC_APPEND_THREAD", "on").lower() in ("0", "off", "false", "no"):
        return None
    if sys.implementation.name != "cpython" or sys.version_info[:2] not in KNOWN_LAYOUTS:
        return None
    if type(conn) is not sqlite3.Connection:
        return None
    try:
        import _sqlite3

        from outbox import _append  # type: ignore[attr-defined]
    except ImportError:
        return None
    main = next((row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"), "")
    if not main:
        return None  # an in-memory database: nothing to gain
    try:
        appender: Appender = _append.Appender(conn, sql, _sqlite3.__file__)
    except (ImportError, ValueError, OSError, _append.AppendError):
        return None
    if not _same_file(appender.filename(), main):
        appender.close()
        return None
    return appender


def settle(appender: Appender) -> int:
    """``appender.settle()``, a failure raised as sqlite3 would raise it; the error's
    ``tickets_done``: how many tickets were done before it."""
    from outbox import _append  # type: ignore[attr-defined]

    try:
        return appender.settle()
    except _append.AppendError as exc:
        message, code, done = exc.args
        kind = sqlite3.IntegrityError if code & 0xFF == SQLITE_CONSTRAINT else sqlite3.OperationalError
        error = kind(message)
        error.sqlite_errorcode = code
        error.tickets_done = done  # type: ignore[union-attr]
        raise error from None


def _same_file(a: str | None, b: str) -> bool:
    if not a:
        return False
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False
