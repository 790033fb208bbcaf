"""API keys: made here, shown once, stored as a SHA-256 hash with permissions and an
optional IP/CIDR allow-list.  Keys carry 256 random bits, so a plain hash is enough to
make a stolen outbox file useless for calling the API."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import orjson

from common import sqlfile
from common.errors import ConfigError

K = sqlfile.load("outbox", "keys.sql")

EXPORT = "core_transaction_1_export"
WEBHOOKS = "core_transaction_1_webhooks"
# POST /webhooks/send of a type that capture produces (a documented type, webhook.test,
# ct1.gap or a type the mapping emits): receivers trust those types to mirror the source
SEND_CAPTURED_TYPES = "core_transaction_1_send_captured_types"
PERMISSIONS = (EXPORT, WEBHOOKS, SEND_CAPTURED_TYPES)
KEY_PREFIX = "ct1_"


@dataclass(frozen=True, slots=True)
class NewKey:
    id: str
    name: str
    key: str
    permissions: list[str]
    allow_ips: list[str]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_permissions(values: list[str]) -> list[str]:
    chosen = []
    for value in values:
        for item in value.split(","):
            name = item.strip()
            if not name:
                continue
            if name not in PERMISSIONS:
                raise ConfigError(f"unknown permission {name!r}: use {', '.join(PERMISSIONS)}")
            if name not in chosen:
                chosen.append(name)
    if not chosen:
        raise ConfigError(f"give at least one permission: {', '.join(PERMISSIONS)}")
    return chosen


def parse_networks(values: list[str]) -> list[str]:
    networks = []
    for value in values:
        try:
            networks.append(str(ipaddress.ip_network(value.strip(), strict=False)))
        except ValueError:
            raise ConfigError(f"--allow-ip {value!r} is not an IP address or CIDR") from None
    return networks


def create(conn: sqlite3.Connection, name: str, permissions: list[str], allow_ips: list[str]) -> NewKey:
    if not name.strip():
        raise ConfigError("--name must not be empty")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = "key_" + secrets.token_hex(4)
    with conn:
        conn.execute(
            K["insert_key"],
            (
                key_id,
                name.strip(),
                hash_key(key),
                KEY_PREFIX,  # never a character of the secret part
                orjson.dumps(permissions).decode(),
                orjson.dumps(allow_ips).decode(),
                time.time(),
            ),
        )
    return NewKey(key_id, name.strip(), key, permissions, allow_ips)


def listing(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute(K["list_keys"]).fetchall()
    requests = dict(conn.execute(K["key_requests"]).fetchall())
    return [
        {
            "id": i,
            "name": n,
            "prefix": p[: len(KEY_PREFIX)],  # older rows hold 6 secret characters more
            "permissions": orjson.loads(perm),
            "allow_ips": orjson.loads(ips),
            "created_at": c,
            "revoked_at": r,
            "last_used_at": u,
            "requests": int(requests.get(i, 0)),
        }
        for i, n, p, perm, ips, c, r, u in rows
    ]


def revoke(conn: sqlite3.Connection, key_id: str) -> None:
    row = conn.execute(K["key_exists"], (key_id,)).fetchone()
    if row is None:
        raise ConfigError(f"no API key {key_id!r} (see `ct1-cdc keys list`)")
    if row[0] is not None:
        raise ConfigError(f"API key {key_id} is already revoked")
    with conn:
        conn.execute(K["revoke_key"], (time.time(), key_id))


def active_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute(K["count_keys"]).fetchone()[0])
