"""Where a consumer of ``/events`` got to: the id of the last event it handled, kept
durably so a restarted consumer goes on from there (nothing skipped; at most the events
of the batch it was handling when it stopped come again).

Any object with ``load() -> int | None`` and ``save(last_event_id)`` will do, e.g. one
that keeps the position in the same database transaction as what the handler wrote:
:class:`CallbackPosition` wraps two functions.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol


class PositionStore(Protocol):
    def load(self) -> int | None:
        """The last event handled, ``None`` when nothing was ever saved."""

    def save(self, last_event_id: int) -> None:
        """Remember it; durable when this returns."""


class FilePosition:
    """The position as a number in a text file, replaced atomically (written beside it,
    flushed to disk, renamed), so a crash leaves the old or the new number, never half."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> int | None:
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        if not text.isdigit():
            raise ValueError(f"{self.path}: not an event id: {text[:40]!r}")
        return int(text)

    def save(self, last_event_id: int) -> None:
        folder = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(f"{int(last_event_id)}\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class SqlitePosition:
    """Positions by name in a SQLite file (several consumers may share one file)."""

    def __init__(self, path: str | Path, name: str = "default") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS positions (name TEXT PRIMARY KEY, last_event_id INTEGER NOT NULL)"
        )

    def load(self) -> int | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT last_event_id FROM positions WHERE name = ?", (self.name,)
            ).fetchone()
        return None if row is None else int(row[0])

    def save(self, last_event_id: int) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO positions (name, last_event_id) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET last_event_id = excluded.last_event_id",
                (self.name, int(last_event_id)),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SqlitePosition:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CallbackPosition:
    """The user's own store: ``load()`` and ``save(last_event_id)`` given as functions."""

    def __init__(self, load: Callable[[], int | None], save: Callable[[int], None]) -> None:
        self._load, self._save = load, save

    def load(self) -> int | None:
        return self._load()

    def save(self, last_event_id: int) -> None:
        self._save(last_event_id)


class MemoryPosition:
    """Not durable: for tests and one-off reads."""

    def __init__(self, last_event_id: int | None = None) -> None:
        self.last_event_id = last_event_id

    def load(self) -> int | None:
        return self.last_event_id

    def save(self, last_event_id: int) -> None:
        self.last_event_id = last_event_id


class Tracked:
    """A store that also remembers the last position saved through it."""

    def __init__(self, store: PositionStore, start: int) -> None:
        self.store, self.last = store, start

    def load(self) -> int | None:
        return self.store.load()

    def save(self, last_event_id: int) -> None:
        self.store.save(last_event_id)
        self.last = last_event_id
