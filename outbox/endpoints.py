"""Endpoint state in the outbox: the health the dispatcher keeps (active, paused or
disabled, consecutive failures, the end of a pause), the operator's enable and disable,
and the signing secrets setup generates for endpoints configured without one.

Every endpoint that ever had a delivery has a row; the state written last wins, and its
``updated_at`` tells a running dispatcher that the operator changed it.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from common import sqlfile
from outbox.store import Q, transaction

E = sqlfile.load("outbox", "endpoints.sql")


@dataclass(slots=True)
class EndpointState:
    name: str
    state: str  # active | paused | disabled
    failures: int
    paused_until: float
    secret: str | None
    updated_at: float  # when this state was last written (by the dispatcher or the CLI)


def state_of(conn: sqlite3.Connection, name: str) -> EndpointState:
    """The stored state of ``name``; an endpoint not seen before is registered, active."""
    row = conn.execute(E["endpoint_state"], (name,)).fetchone()
    if row is None:
        conn.execute(Q["register_endpoint"], (name,))
        return EndpointState(name, "active", 0, 0.0, None, 0.0)
    return EndpointState(*row)


def save_state(conn: sqlite3.Connection, state: EndpointState) -> None:
    """Store the dispatcher's view of an endpoint's health."""
    with transaction(conn):
        conn.execute(
            E["set_endpoint_state"],
            {
                "name": state.name,
                "state": state.state,
                "failures": state.failures,
                "paused_until": state.paused_until,
                "now": state.updated_at,
            },
        )


def set_state(conn: sqlite3.Connection, name: str, state: str, now: float) -> bool:
    """The operator enables (``active``) or disables an endpoint, its failures forgotten;
    False when the outbox knows no endpoint ``name``."""
    with transaction(conn):
        cur = conn.execute(E["set_state_by_operator"], {"name": name, "state": state, "now": now})
    return cur.rowcount > 0


def stored_secret(conn: sqlite3.Connection, name: str) -> str | None:
    """The signing secret setup stored for ``name``, if any."""
    row = conn.execute(E["endpoint_secret"], (name,)).fetchone()
    return None if row is None else row[0]


def store_secret(conn: sqlite3.Connection, name: str, secret: str) -> None:
    """Keep ``secret`` for ``name`` (registering the endpoint); a stored one is never
    replaced."""
    with transaction(conn):
        conn.execute(Q["register_endpoint"], (name,))
        conn.execute(E["set_endpoint_secret"], (secret, name))
