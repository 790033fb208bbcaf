"""The derived-state store: the outbox's SQLite one and the in-memory one pass the same
contract, and on SQLite a timer and what it fired share the transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdc.carts import CartRule, CartStore, CartTracker
from cdc.decode import RowChange
from outbox import store
from outbox.state import MemoryState, SqliteState
from outbox.store import Route, Router
from outbox.writer import OutboxWriter


def sqlite_state(path: Path) -> tuple[SqliteState, sqlite3.Connection]:
    conn = store.open_outbox(path)

    def begin() -> None:
        if not conn.in_transaction:
            conn.execute("BEGIN IMMEDIATE")

    return SqliteState(conn, begin), conn


class Committing:
    """A SqliteState whose every change is committed at once: reads then come from the
    file, not from the changes held in memory."""

    def __init__(self, state: SqliteState, conn: sqlite3.Connection) -> None:
        self.inner, self.conn = state, conn

    def __getattr__(self, name: str) -> object:
        attr = getattr(self.inner, name)
        if name not in ("state_put", "state_delete"):
            return attr

        def write(*args: object) -> None:
            attr(*args)
            self.inner.flush()
            self.conn.execute("COMMIT")

        return write


@pytest.fixture(params=["memory", "sqlite-held", "sqlite-committed", "sqlite-mixed"])
def state(request, tmp_path) -> Iterator[object]:
    if request.param == "memory":
        yield MemoryState()
        return
    state, conn = sqlite_state(tmp_path / "outbox.db")
    if request.param == "sqlite-held":
        yield state
    elif request.param == "sqlite-committed":
        yield Committing(state, conn)
    else:  # some committed, the rest held in memory over them
        yield Mixed(state, conn)
    conn.close()


class Mixed(Committing):
    def __init__(self, state: SqliteState, conn: sqlite3.Connection) -> None:
        super().__init__(state, conn)
        self.writes = 0

    def __getattr__(self, name: str) -> object:
        attr = getattr(self.inner, name)
        if name not in ("state_put", "state_delete"):
            return attr

        def write(*args: object) -> None:
            attr(*args)
            self.writes += 1
            if self.writes % 2:
                self.inner.flush()
                self.conn.execute("COMMIT")

        return write


def test_values_by_kind_and_key_lossless(state):
    big = 2**70
    state.state_put("cart", "n:1", [1, "19.90", big, None, True], None, None)
    state.state_put("item", "n:1", {"x": [1, {"y": "z"}]}, None, None)
    assert state.state_get("cart", "n:1") == [1, "19.90", big, None, True]
    assert state.state_get("item", "n:1") == {"x": [1, {"y": "z"}]}
    assert state.state_get("cart", "n:2") is None
    state.state_put("cart", "n:1", "replaced", None, None)
    assert state.state_get("cart", "n:1") == "replaced"
    state.state_delete("cart", "n:1")
    state.state_delete("cart", "n:1")  # twice: no error
    assert state.state_get("cart", "n:1") is None and state.state_get("item", "n:1") is not None


def test_refs_and_due_times(state):
    for n, (ref, due) in enumerate([("a", 30.0), ("b", 10.0), ("a", None), (None, 20.0), ("a", 10.0)]):
        state.state_put("cart", f"k{n}", n, ref, due)
    state.state_put("other", "k9", 9, "a", 1.0)
    assert state.state_by_ref("cart", "a") == [0, 2, 4]  # by key
    assert state.state_by_ref("cart", "zzz") == []
    assert state.state_due("cart", 20.0, 10) == [1, 4, 3]  # by due time, then key
    assert state.state_due("cart", 20.0, 2) == [1, 4]
    assert state.state_due("cart", 5.0, 10) == []
    assert state.state_next_due("cart") == 10.0
    assert state.state_next_due("none") is None
    state.state_put("cart", "k1", 1, "b", None)  # disarmed
    assert state.state_due("cart", 100.0, 10) == [4, 3, 0]


RULE = CartRule(carts="public.carts", items="public.cart_items", orders=None, abandon_after=60.0)


def row(table: str, **new: object) -> RowChange:
    return RowChange("insert", table, 1, "0/1", dict(new), None, ("id",))


def writer(path: Path) -> OutboxWriter:
    return OutboxWriter(store.open_outbox(path), Router([Route("ct2", ("*",))]))


def test_a_timer_and_what_it_fired_commit_together(tmp_path):
    path = tmp_path / "outbox.db"
    w = writer(path)
    tracker = CartTracker(RULE, CartStore(w.state))
    tracker.change("public.carts", row("public.carts", id=1, customer_id=5), 0.0)
    tracker.change("public.cart_items", row("public.cart_items", id=1, cart_id=1, price="1.00"), 0.0)
    assert w.in_transaction
    w.commit("slot", 10)
    assert len(tracker.due(100.0)) == 1  # fired: disarmed, in the next commit
    w.rollback()  # that commit did not happen (a crash)
    tracker.forget()
    assert len(tracker.due(100.0)) == 1  # so it fires again
    w.commit("slot", 20)
    assert tracker.due(1000.0) == []
    w.close()
    again = writer(path)
    assert CartTracker(RULE, CartStore(again.state)).due(1000.0) == []  # its firing is stored
    assert again.state.state_count("cart") == (1, 0)
    again.close()


def test_held_changes_do_not_take_the_write_lock(tmp_path):
    path = tmp_path / "outbox.db"
    w = writer(path)
    w.state.state_put("cart", "n:1", 1, None, 5.0)
    other = sqlite3.connect(path, timeout=0.1, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer (the dispatcher) is not kept waiting
    other.execute("ROLLBACK")
    other.close()
    w.commit("slot", 1)
    w.close()


def test_the_refs_in_use(state):
    state.state_put("cart", "k1", 1, "a", 5.0)
    state.state_put("cart", "k2", 2, "b", None)
    state.state_put("cart", "k3", 3, None, 1.0)
    state.state_put("other", "k4", 4, "z", None)
    assert state.state_refs("cart", 10) == {"a", "b"}
    assert state.state_refs("cart", 1) is None  # more than asked for
    assert state.state_refs("none", 10) == set()
