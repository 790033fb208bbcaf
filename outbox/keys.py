"""API keys and their usage, as the outbox stores them.

A key is kept as a hash (never the key), with its permissions and allowed networks (JSON
lists), its creation, revocation and last use; ``api_usage`` counts requests per key and
route.  Making keys and checking them is :mod:`api.keys`' business.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from common import sqlfile
from outbox.store import dumps, transaction

K = sqlfile.load("outbox", "keys.sql")


@dataclass(frozen=True, slots=True)
class StoredKey:
    """What a request's key is checked against."""

    id: str
    name: str
    permissions: list[str]
    allow_ips: list[str]
    revoked_at: float | None


def insert(
    conn: sqlite3.Connection,
    *,
    key_id: str,
    name: str,
    key_hash: str,
    prefix: str,
    permissions: Sequence[str],
    allow_ips: Sequence[str],
    created_at: float,
) -> None:
    with transaction(conn):
        conn.execute(
            K["insert_key"],
            (key_id, name, key_hash, prefix, _json(permissions), _json(allow_ips), created_at),
        )


def _json(values: Sequence[str]) -> str:
    return orjson.dumps(list(values)).decode()


def find(conn: sqlite3.Connection, key_hash: str) -> StoredKey | None:
    """The key with this hash, revoked or not."""
    row = conn.execute(K["find_key"], (key_hash,)).fetchone()
    if row is None:
        return None
    key_id, name, permissions, allow_ips, revoked_at = row
    return StoredKey(key_id, name, orjson.loads(permissions), orjson.loads(allow_ips), revoked_at)


def listing(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every key, oldest first, with its stored prefix and its requests so far."""
    requests = dict(conn.execute(K["key_requests"]).fetchall())
    return [
        {
            "id": i,
            "name": n,
            "prefix": p,
            "permissions": orjson.loads(perm),
            "allow_ips": orjson.loads(ips),
            "created_at": c,
            "revoked_at": r,
            "last_used_at": u,
            "requests": int(requests.get(i, 0)),
        }
        for i, n, p, perm, ips, c, r, u in conn.execute(K["list_keys"]).fetchall()
    ]


def revoke(conn: sqlite3.Connection, key_id: str, now: float) -> Literal["revoked", "already", "unknown"]:
    """Revoke a key at ``now``; or say that it already was, or that there is no such key."""
    with transaction(conn):
        row = conn.execute(K["key_exists"], (key_id,)).fetchone()
        if row is None:
            return "unknown"
        if row[0] is not None:
            return "already"
        conn.execute(K["revoke_key"], (now, key_id))
    return "revoked"


def active_count(conn: sqlite3.Connection) -> int:
    """Keys not revoked."""
    return int(conn.execute(K["count_keys"]).fetchone()[0])


def record_usage(conn: sqlite3.Connection, rows: Sequence[tuple[str, str, int, float]]) -> None:
    """Add ``(key_id, route, requests, last_used_at)`` counts to the usage table and the
    keys' last use.  Runs inside the caller's write transaction (the API's writer)."""
    batch = dumps(list(rows))
    conn.execute(K["add_usage"], {"batch": batch})
    conn.execute(K["touch_keys"], {"batch": batch})


def usage_per_route(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Requests per key and route, by key then route (``name`` None for a deleted key)."""
    keys = ("key_id", "name", "route", "requests", "last_used_at")
    return [dict(zip(keys, row, strict=True)) for row in conn.execute(K["usage"]).fetchall()]
