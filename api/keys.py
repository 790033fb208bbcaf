"""API keys: made here, shown once, stored (by :mod:`outbox.keys`) as a SHA-256 hash with
permissions and an optional IP/CIDR allow-list.  Keys carry 256 random bits, so a plain
hash is enough to make a stolen outbox file useless for calling the API."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from common.errors import ConfigError
from outbox import keys as stored_keys

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
    stored_keys.insert(
        conn,
        key_id=key_id,
        name=name.strip(),
        key_hash=hash_key(key),
        prefix=KEY_PREFIX,  # never a character of the secret part
        permissions=permissions,
        allow_ips=allow_ips,
        created_at=time.time(),
    )
    return NewKey(key_id, name.strip(), key, permissions, allow_ips)


def listing(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return [
        {**row, "prefix": row["prefix"][: len(KEY_PREFIX)]}  # older rows hold 6 secret characters more
        for row in stored_keys.listing(conn)
    ]


def revoke(conn: sqlite3.Connection, key_id: str) -> None:
    outcome = stored_keys.revoke(conn, key_id, time.time())
    if outcome == "unknown":
        raise ConfigError(f"no API key {key_id!r} (see `ct1-cdc keys list`)")
    if outcome == "already":
        raise ConfigError(f"API key {key_id} is already revoked")
