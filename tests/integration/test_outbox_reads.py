"""The events cursor's read (``store.read_events``) on a real outbox file: the same answer
as a plain walk of the events, and work bounded by what it returns, whatever the patterns."""

from __future__ import annotations

import fnmatch
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outbox import store
from tests.outbox_helpers import append_events

TYPES = ["order.created", "order.updated", "order.status_changed", "customer.created", "review.created"]
PATTERNS = [*TYPES, "order.*", "*.created", "*", "nothing.*", "order.[cu]*", "?ustomer.created"]


@pytest.fixture(scope="module")
def outbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reads") / "o.db"
    kinds = [TYPES[(i * 7 + i // 3) % len(TYPES)] for i in range(300)]
    append_events(path, ["ct2"], [(t, t.split(".")[0], i) for i, t in enumerate(kinds)])
    return path


def walk(conn: sqlite3.Connection, after: int, types: list[str], limit: int) -> tuple[list[int], int]:
    """What a reader that looks at every event would answer."""
    ids = [
        i
        for i, t in conn.execute("SELECT id, type FROM events WHERE id > ? ORDER BY id", (after,))
        if not types or any(fnmatch.fnmatchcase(t, p) for p in types)
    ][:limit]
    newest = conn.execute("SELECT max(id) FROM events").fetchone()[0]
    return ids, ids[-1] if len(ids) == limit else max(newest, after)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    after=st.integers(0, 320),
    types=st.lists(st.sampled_from(PATTERNS), max_size=4),
    limit=st.integers(1, 120),
)
def test_read_events_answers_what_a_walk_of_every_event_answers(outbox, after, types, limit):
    conn = store.connect(outbox, readonly=True)
    try:
        rows, got_to = store.read_events(conn, after=after, types=types, limit=limit)
        assert ([r[0] for r in rows], got_to) == walk(conn, after, types, limit)
        assert all(r[1] for r in rows)
    finally:
        conn.close()


def test_a_rare_type_among_many_events_costs_what_it_returns(tmp_path):
    """Issue 10, fault 1: a filter read every event between the cursor and the next match.
    Counted in SQLite VM steps, not seconds."""
    path = tmp_path / "o.db"
    append_events(path, ["ct2"], [("product.viewed", "product", i) for i in range(30_000)])
    append_events(path, ["ct2"], [("order.created", "order", 1)])
    conn = store.connect(path, readonly=True)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(count, 100)
    patterns = [f"nothing{i}.*" for i in range(49)] + ["order.*"]
    rows, got_to = store.read_events(conn, after=0, types=patterns, limit=100)
    assert [r[1] for r in rows] == ["order.created"] and got_to == 30_001
    # a walk of 30,000 rows takes hundreds of thousands of VM steps (thousands of handler calls)
    assert steps < 50, f"{steps * 100} VM steps for one matching event"
    conn.close()
