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
from pathlib import Path

import structlog

from outbox.store import connect

log = structlog.get_logger("ct1_cdc.outbox")


class Checkpointer:
    def __init__(self, path: str | Path, interval: float = 0.2) -> None:
        self.path = Path(path)
        self.interval = interval
        self.checkpoints = 0  # completed calls (for tests and stats)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="outbox-checkpoint", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        conn = connect(self.path)
        try:
            while True:
                stopping = self._stop.wait(self.interval)
                self.checkpoint(conn)
                if stopping:
                    return
        finally:
            conn.close()

    def checkpoint(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self.checkpoints += 1
        except sqlite3.Error as exc:  # busy or I/O: the next round tries again
            log.warning("outbox_checkpoint_failed", error=str(exc))
