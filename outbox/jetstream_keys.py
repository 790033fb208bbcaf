"""API keys shared by every node on the JetStream backend: a key made or revoked on any
host (``ct1-cdc keys``, the first key ``setup`` makes) goes into the key-value bucket
``<stream>_KEYS``, and every node's copy of the stream (:mod:`outbox.jetstream_mirror`)
keeps its ``api_keys`` table in step with it, so a key works, or stops working, on every
API node.  Only the key's hash travels, as the outbox stores it; usage counts stay with
the node that served the requests.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import structlog

from common.jsontext import dumps, loads
from outbox.jetstream import JetStreamLog

log = structlog.get_logger("ct1_cdc.jetstream")

COLUMNS = ("id", "name", "key_hash", "prefix", "permissions", "allow_ips", "created_at", "revoked_at")


def bucket_of(events: JetStreamLog) -> str:
    return f"{events.stream}_KEYS"


def rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every key of the outbox file, as it is shared (the hash, never the key)."""
    return [
        dict(zip(COLUMNS, row, strict=True))
        for row in conn.execute(f"SELECT {', '.join(COLUMNS)} FROM api_keys")
    ]


async def publish(events: JetStreamLog, conn: sqlite3.Connection) -> int:
    """Put every key of the file into the bucket (a revocation included); returns how many."""
    bucket = await events.bucket(bucket_of(events))
    shared = rows(conn)
    for row in shared:
        await bucket.put(row["id"], dumps(row))
    return len(shared)


def apply(conn: sqlite3.Connection, row: dict[str, Any]) -> None:
    """One shared key into the file: made, or changed (a revocation is never undone)."""
    conn.execute(
        f"INSERT INTO api_keys ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        " ON CONFLICT (id) DO UPDATE SET name = excluded.name, permissions = excluded.permissions,"
        " allow_ips = excluded.allow_ips, revoked_at = coalesce(api_keys.revoked_at, excluded.revoked_at)",
        tuple(row[c] for c in COLUMNS),
    )


async def follow(events: JetStreamLog, conn: sqlite3.Connection) -> None:
    """Keep the file's keys in step with the bucket, for good (the keys there first)."""
    bucket = await events.bucket(bucket_of(events))
    watcher = await bucket.watchall()
    async for entry in watcher:
        if entry is None or not entry.value:
            continue  # (the end of the keys there at the start; a deletion)
        row = loads(entry.value)
        apply(conn, row)
        log.info("api_key_shared", key_id=row["id"], revoked=row["revoked_at"] is not None)


def share(events: JetStreamLog, conn: sqlite3.Connection) -> int:
    """:func:`publish` from a command (blocking): connects, puts, closes."""
    from outbox.jetstream_sink import LoopThread

    loop = LoopThread()
    try:
        loop.run(events.connect())
        try:
            return loop.run(publish(events, conn))
        finally:
            loop.run(events.close())
    finally:
        loop.stop()
