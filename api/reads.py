"""Outbox reads of the API, off the event loop.

The loop is shared with the dispatcher (and capture's commit callbacks): a read whose cost
a client chooses must never run on it.  Each thread of a :class:`Reads` keeps one read-only
connection of its own (WAL mode lets it read while capture writes).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from outbox import store

T = TypeVar("T")


class Reads:
    def __init__(self, path: str, threads: int, name: str) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def conn(self) -> sqlite3.Connection:
        """The calling thread's connection (opened on first use)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = store.connect(self.path, readonly=True)
            with self._lock:
                self._opened.append(conn)
        return conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(conn)`` on one of the threads, with that thread's connection."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(self.conn()))

    def close(self) -> None:
        """Wait for reads under way, then close every connection."""
        self._pool.shutdown(wait=True)
        with self._lock:
            for conn in self._opened:
                conn.close()
            self._opened.clear()
