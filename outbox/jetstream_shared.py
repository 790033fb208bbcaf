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
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

import structlog

from common.jsontext import dumps, loads
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

    async def follow(self, events: JetStreamLog, conn: sqlite3.Connection) -> None:
        """Keep the file's table in step with the bucket, for good (what is there first)."""
        bucket = await events.bucket(self.bucket(events))
        watcher = await events.retrying(bucket.watchall)
        async for entry in watcher:
            if entry is None or not entry.value:
                continue  # (the end of what was there at the start; a deletion)
            row = loads(entry.value)
            self.apply(conn, row)
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


def share(events: JetStreamLog, conn: sqlite3.Connection, *tables: Shared) -> None:
    """Every row of ``tables`` from a command's file into the cluster (blocking)."""
    from outbox.jetstream_sink import LoopThread

    loop = LoopThread()
    try:
        loop.run(events.connect())
        try:
            for shared in tables:
                loop.run(shared.publish(events, shared.rows(conn)))
        finally:
            loop.run(events.close())
    finally:
        loop.stop()
