"""WAL checkpoints of the outbox on a thread of their own.

In WAL mode every commit appends to ``outbox.db-wal``; a checkpoint copies those pages
back into ``outbox.db`` and fsyncs it.  By default SQLite runs one inside whichever
commit finds the WAL past 1,000 pages, so capture would stop reading the replication
stream while the copy runs.  With a :class:`Checkpointer`, capture's connection turns
automatic checkpoints off and this thread runs a ``PASSIVE`` checkpoint every
``interval`` seconds on its own connection: it never blocks a writer or a reader and
copies only what is committed, so durability is unchanged (each commit still fsyncs the
WAL under ``synchronous=FULL``).  The sqlite3 module releases the GIL for the whole call.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import structlog

from outbox.store import connect

log = structlog.get_logger("ct1_cdc.outbox")


class Checkpointer:
    def __init__(self, path: str | Path, interval: float = 0.2) -> None:
        self.path = Path(path)
        self.interval = interval
        self.checkpoints = 0  # completed rounds
        self.failures = 0  # failed rounds (each is retried at the next)
        self._failing_since: float | None = None
        self._last_warning = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="outbox-checkpoint", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop after one last round, so the main file holds everything committed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                stopping = self._stop.wait(self.interval)
                try:
                    if conn is None:
                        conn = connect(self.path)
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except Exception as exc:  # busy, I/O, disk full: this thread must not die
                    self._failed(exc)
                else:
                    self._succeeded()
                if stopping:
                    return
        finally:
            if conn is not None:
                conn.close()

    def _succeeded(self) -> None:
        self.checkpoints += 1
        if self._failing_since is not None:
            log.info(
                "outbox_checkpoint_recovered", failed_seconds=round(time.monotonic() - self._failing_since, 1)
            )
            self._failing_since = None

    def _failed(self, exc: Exception) -> None:
        """Warn at the first failure and then once a minute, not every round."""
        self.failures += 1
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._last_warning >= 60:
            self._last_warning = now
            log.warning("outbox_checkpoint_failed", error=str(exc), failures=self.failures)
