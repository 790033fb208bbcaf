"""``ct1-cdc outbox replay --from ID --endpoint E`` on the JetStream backend: one rewind
for every dispatch node, whichever partitions it holds then or later (docs/jetstream.md).

* **Asked:** the command puts the rewind into the key-value bucket ``<stream>_REWINDS``
  (key ``<endpoint>.<nonce>``, value the first event id).  Its revision in the bucket
  orders it among the rewinds.
* **Applied:** every dispatch node follows the bucket (:meth:`Rewinds.follow`) and
  applies each rewind once, in order, to its own file as the command does on SQLite
  (:meth:`Rewinds.apply`, between its lease rounds):
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
from outbox.state import S

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
    """A dispatch node's view of the rewinds: those in the bucket (:meth:`follow`, on the
    copy's thread), applied to its file between the lease rounds (:meth:`apply`, on the
    lease thread, before a round works out where partitions taken over start: so a
    rewind the file reflects is always one those starts went below), and for each
    endpoint which generation of its cursor reflects which of them."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], endpoints: list[str]) -> None:
        """``connect``: a new connection to the node's file; ``endpoints``: its endpoints."""
        self.connect = connect
        self.endpoints = endpoints
        self._lock = threading.Lock()
        self._known: list[tuple[int, str, int]] = []  # (revision, endpoint, first id), oldest first
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
            newer = [first - 1 for rev, name, first in self._known if name == endpoint and rev > tag]
            return min([settled, *newer]), max(tag, self._newest)

    async def follow(self, events: JetStreamLog) -> None:
        """Read the bucket's rewinds, for good (a new file starts after those made before
        it: the progress it takes over says what they mean)."""
        bucket = await events.bucket(bucket_of(events))
        conn = self.connect()
        try:
            done = _applied_in(conn)
            with self._lock:
                self._base = done or 0
            async for entry in events.watch(bucket):
                if entry is None:  # the end of what the bucket held at the start
                    if done is None:
                        with self._lock:
                            self._base = done = self._newest
                        with store.transaction(conn):
                            _note_applied(conn, done)
                    self.synced.set()
                elif entry.value:
                    row = loads(entry.value)
                    with self._lock:
                        self._known.append((int(entry.revision), str(row["endpoint"]), int(row["from"])))
                        self._newest = max(self._newest, int(entry.revision))
        finally:
            conn.close()

    def apply(self) -> bool:
        """Apply to the file, once each and in order, the rewinds read since it last did
        (blocking; a connection of its own); whether any was."""
        with self._lock:
            known = list(self._known)
        conn = self.connect()
        try:
            done = _applied_in(conn) or 0
            applied = False
            for revision, endpoint, first in known:
                if revision <= done:
                    continue
                generation = self._apply(conn, endpoint, first, revision)
                done = revision
                if generation is not None:
                    with self._lock:
                        self._applied.setdefault(endpoint, []).append((revision, generation))
                    applied = True
            return applied
        finally:
            conn.close()

    def _apply(self, conn: sqlite3.Connection, endpoint: str, first: int, revision: int) -> int | None:
        """One rewind to the file, with the note that it is applied, in one commit; the
        cursor's new generation (None: not an endpoint of this node)."""
        with store.transaction(conn):
            generation = None
            if endpoint in self.endpoints:
                count = deliveries.rewind(conn, endpoint, first, now=time.time())
                generation = deliveries.cursor_generation(conn, endpoint)
                log.info("rewind_applied", endpoint=endpoint, event_id=first, events=count, revision=revision)
            _note_applied(conn, revision)
        return generation


def _applied_in(conn: sqlite3.Connection) -> int | None:
    row = conn.execute(S["get"], {"kind": KIND, "key": "applied"}).fetchone()
    return None if row is None else int(loads(row[0]))


def _note_applied(conn: sqlite3.Connection, revision: int) -> None:
    conn.execute(S["put"], {"kind": KIND, "key": "applied", "value": str(revision), "ref": None, "due": None})
