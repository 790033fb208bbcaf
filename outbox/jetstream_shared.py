"""What every node must see alike on the JetStream backend, shared through key-value
buckets beside the stream; each node's copy (:mod:`outbox.jetstream_mirror`) keeps its
own tables in step with them.

* **API keys** (``<stream>_KEYS``): a key made or revoked on any host (``ct1-cdc keys``,
  the first key ``setup`` makes) works, or is refused, on every API node.  Only the
  key's hash travels, as the outbox stores it; usage counts stay with the node that
  served the requests.  A revocation is never undone.
* **Endpoint states** (``<stream>_ENDPOINTS``): an endpoint disabled or enabled by an
  operator on any host, or paused or disabled by the dispatching node (a 410, failures),
  is so on every node; the state written last wins.  Signing secrets are not shared.
* **Dead deliveries and replays** (``<stream>_DELIVERIES``, key ``<endpoint>.<event id>``):
  a delivery a dispatch node gave up on is listed as dead on every node; one replayed on
  any node (``ct1-cdc outbox replay --dead`` or ``--event``) is due again on every node,
  and the node holding its partition sends it, then says it is delivered.  A key's value
  is the last word on it: ``dead``, ``replayed`` or ``delivered``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import structlog

from common.jsontext import dumps, loads
from outbox import deliveries, store
from outbox.deliveries import D
from outbox.jetstream import JetStreamLog

log = structlog.get_logger("ct1_cdc.jetstream")


@dataclass(frozen=True)
class Shared:
    """One table shared through one bucket: its rows by their first column."""

    suffix: str  # the bucket: <stream>_<suffix>
    table: str
    columns: tuple[str, ...]
    merge: str  # the ON CONFLICT update: how a row from the bucket changes the file's

    def bucket(self, events: JetStreamLog) -> str:
        return f"{events.stream}_{self.suffix}"

    def rows(self, conn: sqlite3.Connection) -> list[dict[str, Any]]:
        query = f"SELECT {', '.join(self.columns)} FROM {self.table}"
        return [dict(zip(self.columns, row, strict=True)) for row in conn.execute(query)]

    def apply(self, conn: sqlite3.Connection, row: dict[str, Any]) -> None:
        conn.execute(
            f"INSERT INTO {self.table} ({', '.join(self.columns)})"
            f" VALUES ({', '.join('?' * len(self.columns))})"
            f" ON CONFLICT ({self.columns[0]}) DO UPDATE SET {self.merge}",
            tuple(row[c] for c in self.columns),
        )

    async def publish(self, events: JetStreamLog, rows: list[dict[str, Any]]) -> None:
        bucket = await events.bucket(self.bucket(events))
        for row in rows:
            await events.put(bucket, str(row[self.columns[0]]), dumps(row))

    async def follow(
        self,
        events: JetStreamLog,
        conn: sqlite3.Connection,
        seen: dict[str, dict[str, Any]] | None = None,
        synced: asyncio.Event | None = None,
    ) -> None:
        """Keep the file's table in step with the bucket, for good (what is there first);
        ``seen`` gets each row the bucket gave, by its key; ``synced`` is set once what
        the bucket held at the start is in the file."""
        bucket = await events.bucket(self.bucket(events))
        async for entry in events.watch(bucket):
            if entry is None:  # the end of what was there at the start
                if synced is not None:
                    synced.set()
                continue
            if not entry.value:
                continue  # (a deletion)
            row = loads(entry.value)
            self.apply(conn, row)
            if seen is not None:
                seen[str(row[self.columns[0]])] = row
            log.debug("shared_row", table=self.table, key=row[self.columns[0]])


KEYS = Shared(
    "KEYS",
    "api_keys",
    ("id", "name", "key_hash", "prefix", "permissions", "allow_ips", "created_at", "revoked_at"),
    "name = excluded.name, permissions = excluded.permissions, allow_ips = excluded.allow_ips,"
    " revoked_at = coalesce(api_keys.revoked_at, excluded.revoked_at)",
)
ENDPOINTS = Shared(
    "ENDPOINTS",
    "endpoints",
    ("name", "state", "failures", "paused_until", "updated_at"),
    "state = excluded.state, failures = excluded.failures, paused_until = excluded.paused_until,"
    " updated_at = excluded.updated_at WHERE excluded.updated_at > endpoints.updated_at",
)


def share(events: JetStreamLog, conn: sqlite3.Connection, *tables: Shared, only: str | None = None) -> None:
    """Every row of ``tables`` from a command's file into the cluster, or the one whose
    key is ``only`` (what the command changed: the rest of a file not kept current would
    put old values over newer ones) (blocking)."""
    blocking(
        events,
        *(
            shared.publish(
                events, [r for r in shared.rows(conn) if only in (None, str(r[shared.columns[0]]))]
            )
            for shared in tables
        ),
    )


def share_replays(events: JetStreamLog, rows: list[tuple[str, int, str]]) -> None:
    """Deliveries (endpoint, event id, entity) a command replayed in its file, for every
    node: the one holding each one's partition sends it (blocking)."""
    blocking(events, DELIVERIES.replayed(events, rows))


def blocking(events: JetStreamLog, *work: Any) -> None:
    """Connect, run ``work`` (coroutines) in order, close (blocking: for the commands)."""
    from outbox.jetstream_sink import LoopThread

    loop = LoopThread()
    try:
        loop.run(events.connect())
        try:
            for step in work:
                loop.run(step)
        finally:
            loop.run(events.close())
    finally:
        loop.stop()
        for step in work:
            step.close()  # (a coroutine not run when connecting failed)


class SharedDeliveries:
    """Dead deliveries and replays through ``<stream>_DELIVERIES`` (see the module).
    :meth:`follow` keeps a node's file in step with the bucket and remembers each key's
    last value; a dispatch node calls :meth:`publish` every second, and once more when its
    dispatcher has finished."""

    suffix = "DELIVERIES"

    def __init__(self) -> None:
        self.known: dict[str, tuple[str, int]] = {}  # key: (status, revision) the bucket last gave
        self.synced = False  # the follow has read what the bucket held at its start
        self._later: dict[str, dict[str, Any]] = {}  # values for events the copy has not yet

    def bucket(self, events: JetStreamLog) -> str:
        return f"{events.stream}_{self.suffix}"

    async def follow(self, events: JetStreamLog, conn: sqlite3.Connection) -> None:
        bucket = await events.bucket(self.bucket(events))
        async for entry in events.watch(bucket):
            if entry is None:
                self.synced = True  # (the end of what was there at the start)
                continue
            self._later.pop(entry.key, None)
            if not entry.value:
                self.known.pop(entry.key, None)
                continue
            row = loads(entry.value)
            self.known[entry.key] = (row["status"], entry.revision)
            self._apply(conn, entry.key, row)

    def caught_up(self, conn: sqlite3.Connection) -> None:
        """The copy appended events: what waited for them applies now."""
        if not self._later:
            return
        (last,) = conn.execute("SELECT max(id) FROM events").fetchone()
        for key, row in list(self._later.items()):
            if last is not None and row["event_id"] <= last:
                self._apply(conn, key, row)

    def _apply(self, conn: sqlite3.Connection, key: str, row: dict[str, Any]) -> None:
        """``row`` into the file, once it holds the event (an event pruned since is passed
        over); a file busy past its timeout is tried again with the next batch."""
        self._later.pop(key, None)
        if conn.execute("SELECT 1 FROM events WHERE id >= ? LIMIT 1", (row["event_id"],)).fetchone() is None:
            self._later[key] = row  # not copied yet
            return
        if conn.execute("SELECT 1 FROM events WHERE id = ?", (row["event_id"],)).fetchone() is None:
            return  # pruned: nothing to list or send
        try:
            self.apply(conn, row)
        except sqlite3.OperationalError as exc:  # (busy)
            self._later[key] = row
            log.warning("shared_delivery_deferred", key=key, error=str(exc))
            return
        log.debug("shared_delivery", endpoint=row["endpoint"], event_id=row["event_id"], status=row["status"])

    @staticmethod
    def apply(conn: sqlite3.Connection, row: dict[str, Any]) -> None:
        with store.transaction(conn):
            if row["status"] == "dead":
                conn.execute(D["shared_dead"], {k: row.get(k) for k in DEAD_FIELDS})
            elif row["status"] == "replayed":
                deliveries.unbatch(conn, [(row["endpoint"], row["event_id"])])
                conn.execute(
                    D["shared_replayed"],
                    {
                        "endpoint": row["endpoint"],
                        "event_id": row["event_id"],
                        "entity": row["entity"],
                        "now": time.time(),
                    },
                )
            elif row["status"] == "delivered":
                conn.execute(
                    D["shared_delivered"], {"endpoint": row["endpoint"], "event_id": row["event_id"]}
                )

    async def publish(self, events: JetStreamLog, conn: sqlite3.Connection) -> None:
        """What this node's dispatcher settled that the bucket does not say yet: a delivery
        it gave up on (again, after a replay), one the bucket lists as dead or replayed that
        it delivered.  A replay whose row a partition's take removed (the previous holder
        had not made it due yet) is made due again.  Each put is made at the revision
        planned from, so a value written meanwhile is never undone."""
        from nats.js.errors import KeyWrongLastSequenceError

        if not self.synced:  # what the bucket holds is not known yet
            return
        self.caught_up(conn)  # (a value deferred by a busy file, on a stream that is idle)
        bucket = await events.bucket(self.bucket(events))
        changes: list[tuple[str, tuple[str, int] | None, dict[str, Any]]] = []
        for values in conn.execute(D["dead_to_share"]).fetchall():
            row = dict(zip(DEAD_FIELDS, values, strict=True))
            key = delivery_key(row["endpoint"], row["event_id"])
            seen = self.known.get(key)
            if key not in self._later and (seen is None or seen[0] != "dead"):  # (a newer value waits)
                changes.append((key, seen, {**row, "status": "dead"}))
        for key, seen in list(self.known.items()):
            if seen[0] == "dead" or seen[0] == "replayed":
                endpoint, _, event_id = key.rpartition(".")
                found = conn.execute(D["status_of"], (endpoint, int(event_id))).fetchone()
                if found is not None and found[0] == "delivered":
                    changes.append(
                        (key, seen, {"endpoint": endpoint, "event_id": int(event_id), "status": "delivered"})
                    )
                elif found is None and seen[0] == "replayed" and key not in self._later:
                    entity = conn.execute(D["entity_of"], (int(event_id),)).fetchone()
                    if entity is not None:  # (taken away by a partition's take: due again)
                        row = {"endpoint": endpoint, "event_id": int(event_id), "entity": entity[0]}
                        self._apply(conn, key, {**row, "status": "replayed"})
        for key, seen, row in changes:
            value = dumps({**row, "at": time.time()})
            try:
                if seen is None:
                    await events.retrying(bucket.create, key, value)
                else:
                    await events.retrying(bucket.update, key, value, seen[1])
            except KeyWrongLastSequenceError:
                continue  # written meanwhile: the follow brings it, the next round sees
            log.info(
                "delivery_shared", endpoint=row["endpoint"], event_id=row["event_id"], status=row["status"]
            )

    async def replayed(self, events: JetStreamLog, rows: list[tuple[str, int, str]]) -> None:
        bucket = await events.bucket(self.bucket(events))
        for endpoint, event_id, entity in rows:
            value = {"endpoint": endpoint, "event_id": event_id, "entity": entity, "status": "replayed"}
            await events.put(bucket, delivery_key(endpoint, event_id), dumps({**value, "at": time.time()}))


def share_skip(events: JetStreamLog, xid: int, requested_at: float) -> None:
    """A skip asked on this host, for the capture of any host (blocking)."""

    from outbox.jetstream_sink import SKIPS

    async def put() -> None:
        bucket = await events.bucket(f"{events.stream}_{SKIPS}")
        await events.put(bucket, str(xid), dumps({"xid": xid, "requested_at": requested_at}))

    blocking(events, put())


DEAD_FIELDS = ("endpoint", "event_id", "entity", "attempts", "last_status", "last_error")
DELIVERIES = SharedDeliveries()  # (for its bucket's name and the commands' replays)


def delivery_key(endpoint: str, event_id: int) -> str:
    return f"{endpoint}.{event_id}"
