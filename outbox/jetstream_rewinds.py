"""``ct1-cdc outbox replay --from ID --endpoint E`` on the JetStream backend: one rewind
for every dispatch node, whichever partitions it holds then or later (docs/jetstream.md).

* **Asked:** the command puts the rewind into the key-value bucket ``<stream>_REWINDS``
  (key ``<endpoint>.<nonce>``, value the first event id).  Its revision in the bucket
  orders it among the rewinds.
* **Applied:** every dispatch node follows the bucket (:meth:`Rewinds.follow`) and
  applies each rewind once, in order, to its own file as the command does on SQLite:
  the endpoint's cursor goes back (a new generation) and its rows from there are due
  again, so the node sends again what it holds from there.  The file notes the last
  rewind applied, so none is applied twice, and a new file starts after those made
  before it (the progress below gives it what they mean).
* **Handed over:** a partition may change hands before its holder applied a rewind.  So
  the progress a holder publishes names the last rewind it reflects (:meth:`tag`: by the
  generation of the cursor it was measured under), and a node taking a partition over
  goes on from below the first id of every rewind newer than that (:meth:`lowered`): a
  rewind is never lost in a hand-over, at worst sent twice (at least once, the same
  webhook-id).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable

import structlog

from common.jsontext import dumps, loads
from outbox import deliveries, store
from outbox.jetstream import JetStreamLog

log = structlog.get_logger("ct1_cdc.jetstream")

REWINDS = "REWINDS"  # the bucket: <stream>_REWINDS
KIND = "jetstream_rewinds"  # in a node's file (derived_state): "applied", the last rewind's revision


def bucket_of(events: JetStreamLog) -> str:
    return f"{events.stream}_{REWINDS}"


async def ask(events: JetStreamLog, endpoint: str, first: int) -> int:
    """Put a rewind of ``endpoint`` to event ``first``; its revision."""
    bucket = await events.bucket(bucket_of(events))
    value = dumps({"endpoint": endpoint, "from": first, "asked_at": time.time()})
    return int(await events.retrying(bucket.put, f"{endpoint}.{os.urandom(6).hex()}", value))


class Rewinds:
    """A dispatch node's view of the rewinds: those it read (every node applies each), and
    for each endpoint which generation of its cursor reflects which of them.  Read from
    the lease thread, written by the copy's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[str, list[tuple[int, int]]] = {}  # endpoint → (revision, first id)
        self._applied: dict[str, list[tuple[int, int]]] = {}  # endpoint → (revision, generation)
        self._base = 0  # what the file had applied when the node started: reflected by every generation
        self._newest = 0  # the newest revision read
        self.synced = threading.Event()  # what the bucket held at the start has been read

    def tag(self, endpoint: str, generation: int) -> int:
        """The newest rewind that progress measured under ``generation`` reflects."""
        with self._lock:
            reflected = [rev for rev, gen in self._applied.get(endpoint, ()) if gen <= generation]
            return max([self._base, *reflected])

    def lowered(self, endpoint: str, settled: int, tag: int) -> tuple[int, int]:
        """Where a partition taken over goes on from, handed over at ``settled`` reflecting
        the rewinds up to ``tag``: below every newer rewind's first id; and the tag that
        start reflects."""
        with self._lock:
            newer = [first - 1 for rev, first in self._known.get(endpoint, ()) if rev > tag]
            return min([settled, *newer]), max(tag, self._newest)

    async def follow(
        self,
        events: JetStreamLog,
        conn: sqlite3.Connection,
        endpoints: list[str],
        applied: Callable[[], None],
    ) -> None:
        """Apply each rewind of the bucket to the file on ``conn`` once, in order, for good;
        ``applied`` after each (wakes the dispatcher)."""
        bucket = await events.bucket(bucket_of(events))
        done = _applied_in(conn)
        fresh = done is None  # a new file: the rewinds made before it are not its to apply
        with self._lock:
            self._base = done or 0
        watcher = await events.retrying(bucket.watchall)
        async for entry in watcher:
            if entry is None:  # the end of what the bucket held at the start
                if fresh:
                    fresh = False
                    with self._lock:
                        self._base = done = self._newest
                    with store.transaction(conn):
                        _note_applied(conn, done)
                self.synced.set()
                continue
            if not entry.value:
                continue
            row = loads(entry.value)
            endpoint, first, revision = str(row["endpoint"]), int(row["from"]), int(entry.revision)
            with self._lock:
                self._known.setdefault(endpoint, []).append((revision, first))
                self._newest = max(self._newest, revision)
            if fresh or revision <= (done or 0):
                continue
            generation = self._apply(conn, endpoint, first, revision, endpoints)
            done = revision
            if generation is not None:
                with self._lock:
                    self._applied.setdefault(endpoint, []).append((revision, generation))
                applied()

    @staticmethod
    def _apply(
        conn: sqlite3.Connection, endpoint: str, first: int, revision: int, endpoints: list[str]
    ) -> int | None:
        """One rewind to the file, with the note that it is applied, in one commit; the
        cursor's new generation (None: not an endpoint of this node)."""
        with store.transaction(conn):
            generation = None
            if endpoint in endpoints:
                count = deliveries.rewind(conn, endpoint, first, now=time.time())
                generation = deliveries.cursor_generation(conn, endpoint)
                log.info("rewind_applied", endpoint=endpoint, event_id=first, events=count, revision=revision)
            _note_applied(conn, revision)
        return generation


def _applied_in(conn: sqlite3.Connection) -> int | None:
    row = conn.execute(
        "SELECT value FROM derived_state WHERE kind = ? AND key = 'applied'", (KIND,)
    ).fetchone()
    return None if row is None else int(loads(row[0]))


def _note_applied(conn: sqlite3.Connection, revision: int) -> None:
    conn.execute(
        "INSERT INTO derived_state (kind, key, value) VALUES (?, 'applied', ?)"
        " ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value",
        (KIND, str(revision)),
    )
