"""Deliveries: the dispatcher's claims and attempt log, and what an operator lists and
replays (``ct1-cdc outbox deliveries|show|replay``).

:class:`DeliveryStore` is the dispatcher's adapter.  All its methods are synchronous:
the dispatcher calls the reads (``changed``, ``claim``, ``next_due``) on one thread and
everything else on another (see :class:`dispatcher.worker.Dispatcher`), so claims never
wait behind a commit's fsync and one thread owns the dispatcher's writes; capture's
writer uses another connection and SQLite serialises the two writers.
"""

from __future__ import annotations

import sqlite3
import zlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from common import sqlfile
from outbox import endpoints, store
from outbox.endpoints import EndpointState

D = sqlfile.load("outbox", "deliveries.sql")
MATERIALIZE_BATCH = 5000  # events past a cursor made rows of in one commit


@dataclass(frozen=True, slots=True)
class Due:
    """An event to send to one endpoint: a delivery row that is due (``has_row``), or an
    event read past the endpoint's cursor that has no row (``blocked``: its entity has a
    pending row before it, so it must queue behind rather than go)."""

    event_id: int
    attempts: int
    body: bytes
    entity: str = ""
    has_row: bool = True
    blocked: bool = False


@dataclass(frozen=True, slots=True)
class Finished:
    """One attempt and where it leaves the delivery (fields in the order of the
    ``record_attempts`` batch).  ``kind``: ``row`` (the delivery has a row: the attempt
    is logged and the row updated), ``first`` (its first attempt, no row: a success goes
    into a batch of attempt_batches, a failure makes the row), ``again`` (the same, sent
    again after ``replay --from`` when its first try is on record already: a success is
    logged as an attempt, so it is counted once) or ``queue`` (not sent: it gets a
    row due now, behind a pending delivery of its entity)."""

    endpoint: str
    event_id: int
    attempted_at: float
    http_status: int
    duration_ms: float
    error: str | None
    response: str | None
    status: str  # pending | delivered | dead
    next_attempt_at: float
    entity: str = ""
    kind: str = "row"
    generation: int = 0  # of the endpoint's cursor when it was sent


def _batch(results: list[Finished]) -> str:
    return store.dumps(
        [
            (
                r.endpoint,
                r.event_id,
                r.attempted_at,
                r.http_status,
                r.duration_ms,
                r.error,
                r.response,
                r.status,
                r.next_attempt_at,
                r.entity,
            )
            for r in results
        ]
    )


def success_batches(results: list[Finished]) -> list[dict[str, Any]]:
    """First-try successes as rows of attempt_batches: one per endpoint and HTTP status,
    split so that none spans more than :data:`store.BATCH_SPAN` event ids."""
    groups: dict[tuple[str, int, int], list[Finished]] = {}
    for r in results:
        groups.setdefault((r.endpoint, r.http_status, r.generation), []).append(r)
    out = []
    for (endpoint, status, generation), members in groups.items():
        members.sort(key=lambda r: r.event_id)
        start = 0
        for i in range(1, len(members) + 1):
            if i < len(members) and members[i].event_id - members[start].event_id <= store.BATCH_SPAN:
                continue
            part = members[start:i]
            durations = sorted(r.duration_ms for r in part)
            out.append(
                {
                    "endpoint": endpoint,
                    "first": part[0].event_id,
                    "last": part[-1].event_id,
                    "attempted_at": min(r.attempted_at for r in part),
                    "status": status,
                    "count": len(part),
                    "median_ms": durations[len(durations) // 2],
                    "max_ms": durations[-1],
                    "event_ids": store.dumps([r.event_id for r in part]),
                    "generation": generation,
                }
            )
            start = i
    return out


def partition_of(entity: str, partitions: int) -> int:
    """The partition of an entity (``object:key``) among ``partitions``: the subject its
    events are published on (outbox/jetstream_sink.py), the unit dispatchers share."""
    return zlib.crc32(entity.encode()) % partitions


class Superseded(Exception):
    """A change of a dispatcher's partitions that a newer one replaced before it was
    applied everywhere (its outcome so far is not final)."""


class DeliveryStore:
    def __init__(self, path: str | Path, partitions: int = 0) -> None:
        """``partitions``: the events' partitions (JetStream backend), so that this node's
        reads can be narrowed to the ones it holds; 0: every event is this node's."""
        self.conn = store.open_outbox(path)  # writes: attempts, delivery and endpoint state
        self.conn.execute("PRAGMA busy_timeout=60000")  # capture may hold the lock a while
        # Claims read on a connection of their own, so they never queue behind an fsync.
        self.reader = store.connect(path)
        self._data_version = -1
        self.partitions = partitions
        n = max(1, partitions)
        for conn in (self.conn, self.reader):
            conn.create_function("ct1_partition", 1, lambda e: partition_of(e, n), deterministic=True)

    def changed(self) -> bool:
        """Whether another connection committed since the last call (cheap to poll)."""
        version = store.data_version(self.reader)
        changed = version != self._data_version
        self._data_version = version
        return changed

    def claim(
        self,
        endpoint: str,
        now: float,
        limit: int,
        skip: Collection[int],
        busy: Collection[str] = (),
        horizon: int | None = None,
        parts: Collection[int] | None = None,
    ) -> list[Due]:
        """Up to ``limit`` due delivery rows, oldest first, none of the ``skip`` event ids,
        of the ``busy`` entities or past ``horizon`` (every row when None); of the
        partitions ``parts`` only, when given."""
        args = {
            "endpoint": endpoint,
            "now": now,
            "limit": limit,
            "skip": store.dumps(list(skip)),
            "busy": store.dumps(list(busy)),
            "horizon": (1 << 62) if horizon is None else horizon,
            "parts": _parts(parts),
        }
        row = self.reader.execute(D["claim"], args).fetchone()
        due = []
        for event_id, attempts, entity, *envelope in orjson.loads(row[0]):
            body = store.envelope_json((event_id, *envelope)).encode("utf-8")
            due.append(Due(event_id, attempts, body, entity))
        due.sort(key=lambda d: d.event_id)
        return due

    def fresh(
        self,
        endpoint: str,
        after: int,
        limit: int,
        parts: Collection[int] | None = None,
        floors: Mapping[int, int] | None = None,
    ) -> tuple[list[Due], int]:
        """The events past ``after`` that ``endpoint`` takes and that have no row, at most
        ``limit``, oldest first; and how far they were read (the newest event when fewer
        than ``limit`` came back).  ``parts``: of those partitions only; ``floors``: per
        partition, an event id up to which its events are settled already (another
        dispatcher delivered them): left out, as read."""
        upto = int(self.reader.execute(store.Q["last_event_id"]).fetchone()[0])
        if upto <= after:
            return [], after
        args = {"endpoint": endpoint, "after": after, "upto": upto, "limit": limit, "parts": _parts(parts)}
        row = self.reader.execute(D["fresh"], args).fetchone()
        found = orjson.loads(row[0])
        due = []
        for event_id, entity, blocked, *envelope in found:
            if floors and event_id <= floors.get(partition_of(entity, self.partitions), 0):
                continue
            body = store.envelope_json((event_id, *envelope)).encode("utf-8")
            due.append(Due(event_id, 0, body, entity, has_row=False, blocked=bool(blocked)))
        return due, (found[-1][0] if len(found) >= limit else upto)

    def batched_after(self, endpoint: str, cursor: int, generation: int) -> tuple[set[int], set[int]]:
        """The events past ``cursor`` that already have a first-try success on record:
        those sent under this ``generation`` of the cursor (done: a crash left them past
        it, behind an event in flight) and those sent before a ``replay --from``."""
        args = {"endpoint": endpoint, "cursor": cursor, "span": store.BATCH_SPAN}
        done: set[int] = set()
        again: set[int] = set()
        for event_id, sent_under in self.conn.execute(D["batched_after"], args):
            (done if sent_under == generation else again).add(int(event_id))
        return done, again

    def next_batch(
        self,
        endpoint: str,
        now: float,
        rows: int,
        skip: Collection[int],
        busy: Collection[str],
        horizon: int | None,
        after: int,
        events: int,
        parts: Collection[int] | None = None,
        floors: Mapping[int, int] | None = None,
    ) -> tuple[list[Due], list[Due], int, float | None]:
        """One round of the dispatcher in one call on the read thread: up to ``rows`` due
        rows (:meth:`claim`), then up to ``events`` events past ``after`` (:meth:`fresh`),
        how far those were read, and when the next row falls due if nothing came back."""
        due = self.claim(endpoint, now, rows, skip, busy, horizon, parts) if rows > 0 else []
        fresh, upto = self.fresh(endpoint, after, events, parts, floors) if events > 0 else ([], after)
        next_at = self.next_due(endpoint, parts) if not due and not fresh else None
        return due, fresh, upto, next_at

    def cursor(self, endpoint: str) -> tuple[int, int]:
        """The endpoint's cursor and its generation (moved back by ``replay --from``);
        an endpoint not registered yet starts at the newest event."""
        row = self.conn.execute(D["cursor_of"], (endpoint,)).fetchone()
        if row is None:
            return int(self.conn.execute(store.Q["last_event_id"]).fetchone()[0]), -1
        return int(row[0]), int(row[1])

    def materialize(self, endpoint: str, batch: int = MATERIALIZE_BATCH) -> int:
        """Make the delivery rows of the events past ``endpoint``'s cursor that its routes
        take (at most ``batch`` events further), and move the cursor, in one commit; the
        events appended since the last call become claimable. Returns how far it went."""
        row = self.conn.execute(D["cursor_of"], (endpoint,)).fetchone()
        last = int(self.conn.execute(store.Q["last_event_id"]).fetchone()[0])
        if row is None or int(row[0]) >= last:
            return 0  # the common case when idle: two reads, no write
        # Without an fsync of its own: rows and cursor can be made again from the events,
        # and the next durable commit on this file (an attempt record, capture's next
        # group) makes them durable too, since the WAL is written in order.
        self.conn.execute("PRAGMA synchronous=NORMAL")
        try:
            with store.transaction(self.conn):
                after = int(self.conn.execute(D["cursor_of"], (endpoint,)).fetchone()[0])
                upto = min(int(self.conn.execute(store.Q["last_event_id"]).fetchone()[0]), after + batch)
                args = {"endpoint": endpoint, "after": after, "upto": upto}
                self.conn.execute(D["materialize"], args)
                self.conn.execute(D["move_cursor"], args)
        finally:
            self.conn.execute("PRAGMA synchronous=FULL")
        return upto - after

    def take_partitions(self, endpoint: str, starts: Mapping[int, int], upto: int, now: float) -> int:
        """Partitions taken over from another dispatcher: a row due now for each of their
        events in (start, ``upto``] that ``endpoint`` takes (``upto``: what this node has
        read past without sending them), and no pending row at or below the start, in one
        commit; how many rows."""
        made = 0
        with store.transaction(self.conn):
            for part, after in starts.items():
                args = {"endpoint": endpoint, "part": part, "after": after, "upto": upto, "now": now}
                self.conn.execute(D["take_partition_settled"], args)
                if after < upto:
                    made += self.conn.execute(D["take_partition"], args).rowcount
        return made

    def release_partitions(self, endpoint: str, parts: Collection[int]) -> int:
        """Partitions given up to another dispatcher: their pending deliveries to
        ``endpoint`` are forgotten here (the next holder sends them, from the progress
        handed over, which is below them); how many."""
        args = {"endpoint": endpoint, "parts": _parts(parts)}
        with store.transaction(self.conn):
            return int(self.conn.execute(D["release_partitions"], args).rowcount)

    def pending_by_partition(self, endpoint: str) -> dict[int, int]:
        """Per partition, the first event with a delivery to ``endpoint`` still pending."""
        first: dict[int, int] = {}
        for entity, event_id in self.conn.execute(D["pending_by_entity"], {"endpoint": endpoint}):
            part = partition_of(entity, self.partitions)
            first[part] = min(first.get(part, event_id), event_id)
        return first

    def next_due(self, endpoint: str, parts: Collection[int] | None = None) -> float | None:
        row = self.reader.execute(D["next_due"], {"endpoint": endpoint, "parts": _parts(parts)}).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def finish_many(self, results: list[Finished], cursors: Collection[tuple[str, int, int]] = ()) -> None:
        """Record attempts and the deliveries' new states, and move the ``cursors``
        (endpoint, event id, generation), in one transaction (group commit: one fsync for
        every delivery that finished meanwhile).  Each batch goes to SQLite as one JSON
        document per statement, so this thread asks for the GIL a handful of times per
        commit rather than twice per delivery."""
        rows = [r for r in results if r.kind == "row"]
        failed = [r for r in results if r.kind in ("first", "again") and r.status != "delivered"]
        succeeded = [r for r in results if r.kind == "first" and r.status == "delivered"]
        again = [r for r in results if r.kind == "again" and r.status == "delivered"]
        queued = [r for r in results if r.kind == "queue"]
        with store.transaction(self.conn):
            if rows or failed or again:
                self.conn.execute(D["record_attempts"], {"batch": _batch(rows + failed + again)})
            if rows:
                self.conn.execute(D["finish_deliveries"], {"batch": _batch(rows)})
            if failed or queued:
                unbatch(self.conn, [(r.endpoint, r.event_id) for r in failed + queued])
            if failed:
                self.conn.execute(D["insert_failed"], {"batch": _batch(failed)})
            if queued:
                batch = store.dumps([(r.endpoint, r.event_id, r.entity) for r in queued])
                self.conn.execute(D["queue_rows"], {"batch": batch})
            for success in success_batches(succeeded):
                self.conn.execute(D["record_batch"], success)
            for endpoint, upto, generation in cursors:
                args = {"endpoint": endpoint, "upto": upto, "generation": generation}
                self.conn.execute(D["advance_cursor"], args)

    def endpoint(self, name: str) -> EndpointState:
        return endpoints.state_of(self.conn, name)

    def save_endpoint(self, state: EndpointState) -> None:
        endpoints.save_state(self.conn, state)

    def close(self) -> None:
        self.reader.close()
        self.conn.close()


def _parts(parts: Collection[int] | None) -> str | None:
    return None if parts is None else store.dumps(sorted(parts))


# -- what an operator sees and does ---------------------------------------------------------


def list_deliveries(
    conn: sqlite3.Connection,
    *,
    status: str | None = None,
    endpoint: str | None = None,
    event_id: int | None = None,
    after: int = 0,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Deliveries by event id then endpoint, with their state, last HTTP status and error."""
    params = {
        "status": status,
        "endpoint": endpoint,
        "event_id": event_id,
        "after": after,
        "limit": limit,
        "span": store.BATCH_SPAN,
    }
    keys = (
        "endpoint",
        "event_id",
        "type",
        "status",
        "attempts",
        "next_attempt_at",
        "last_status",
        "last_error",
    )
    return [dict(zip(keys, row, strict=True)) for row in conn.execute(D["list_deliveries"], params)]


def attempts_of(conn: sqlite3.Connection, event_id: int) -> list[dict[str, Any]]:
    """Every recorded attempt to deliver one event, oldest first."""
    keys = ("endpoint", "attempted_at", "status", "duration_ms", "error", "response")
    cur = conn.execute(D["delivery_attempts"], {"event_id": event_id, "span": store.BATCH_SPAN})
    return [dict(zip(keys, row, strict=True)) for row in cur]


def unbatch(conn: sqlite3.Connection, pairs: list[tuple[str, int]]) -> None:
    """Take these (endpoint, event id) deliveries out of their batches of first-try
    successes, their attempt moved to the attempt log: they are getting a row (within the
    caller's transaction)."""
    found = conn.execute(D["batches_holding"], {"pairs": store.dumps(pairs), "span": store.BATCH_SPAN})
    held = [list(row) for row in found]
    if not held:
        return  # the usual case: a first try that failed, never in a batch
    args = {"held": store.dumps(held)}
    for name in ("unbatch_attempts", "unbatch_events", "unbatch_counts", "drop_empty_batches"):
        conn.execute(D[name], args)


def replay_event(conn: sqlite3.Connection, event_id: int, *, endpoint: str | None, now: float) -> int:
    """Make an event's deliveries (to ``endpoint``, or every one) due again at ``now`` with
    a fresh retry schedule; how many."""
    args = {"event_id": event_id, "endpoint": endpoint, "now": now}
    with store.transaction(conn):
        names = [r[0] for r in conn.execute(D["cursor_names"]) if endpoint in (None, r[0])]
        unbatch(conn, [(name, event_id) for name in names])
        conn.execute(D["make_event_rows"], args)
        cur = conn.execute(D["replay_event"], args)
    return cur.rowcount


def replay_dead(conn: sqlite3.Connection, *, endpoint: str | None, since: float, now: float) -> int:
    """Make every dead delivery of events stored since ``since`` due again; how many."""
    with store.transaction(conn):
        cur = conn.execute(D["replay_dead"], {"endpoint": endpoint, "since": since, "now": now})
    return cur.rowcount


def replayable_dead(
    conn: sqlite3.Connection, *, endpoint: str | None, since: float
) -> list[tuple[str, int, str]]:
    """The dead deliveries :func:`replay_dead` would make due: (endpoint, event id, entity)."""
    return [
        (str(e), int(i), str(k))
        for e, i, k in conn.execute(D["replayable_dead"], {"endpoint": endpoint, "since": since})
    ]


def rows_of_event(
    conn: sqlite3.Connection, event_id: int, *, endpoint: str | None
) -> list[tuple[str, int, str]]:
    """An event's delivery rows (to ``endpoint``, or every one): (endpoint, event id, entity)."""
    return [
        (str(e), int(i), str(k))
        for e, i, k in conn.execute(D["rows_of_event"], {"event_id": event_id, "endpoint": endpoint})
    ]


def replay_from(conn: sqlite3.Connection, endpoint: str, first: int, *, now: float) -> int:
    """Send ``endpoint`` every event it takes from ``first`` on again (history to a new
    endpoint, or again to one that lost it): its cursor goes back to just before
    ``first`` and its rows from there are due again.  A running dispatcher notices the
    new generation within a second.  Returns how many events that is."""
    with store.transaction(conn):
        return rewind(conn, endpoint, first, now=now)


def rewind(conn: sqlite3.Connection, endpoint: str, first: int, *, now: float) -> int:
    """:func:`replay_from` inside the caller's transaction."""
    args = {"endpoint": endpoint, "from": first, "now": now}
    if conn.execute(D["rewind_cursor"], args).rowcount == 0:
        raise KeyError(endpoint)
    conn.execute(D["rewind_rows"], args)
    return int(conn.execute(D["count_from"], args).fetchone()[0])


def count_from(conn: sqlite3.Connection, endpoint: str, first: int) -> int:
    """How many events from ``first`` on ``endpoint`` takes."""
    return int(conn.execute(D["count_from"], {"endpoint": endpoint, "from": first}).fetchone()[0])


def cursor_generation(conn: sqlite3.Connection, endpoint: str) -> int:
    """The generation of the endpoint's cursor (each rewind adds one)."""
    return int(conn.execute(D["cursor_of"], (endpoint,)).fetchone()[1])
