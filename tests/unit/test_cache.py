"""The export cache: TTL, size bound and invalidation by the outbox's source tables."""

from __future__ import annotations

import sqlite3

from api.cache import SYNC_EVENTS, ExportCache


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[ExportCache, sqlite3.Connection, Clock]:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, source_table TEXT)")
    clock = Clock()
    return ExportCache(lambda: conn, max_entries=2, clock=clock), conn, clock


def test_entries_live_for_their_ttl():
    cache, _, clock = make()
    assert cache.get("a") is None
    cache.put("a", frozenset({"public.users"}), 10, b"A")
    clock.now = 9.9
    assert cache.get("a") == b"A"
    clock.now = 10.0
    assert cache.get("a") is None
    cache.put("b", frozenset(), 0, b"B")  # ttl 0: not cached
    assert cache.get("b") is None


def test_a_captured_change_drops_the_entries_reading_its_table_only():
    cache, conn, _ = make()
    cache.get("warm-up")
    cache.put("users", frozenset({"public.users"}), 60, b"U")
    cache.put("reviews", frozenset({"public.reviews"}), 60, b"R")
    conn.execute("INSERT INTO events (source_table) VALUES ('public.users'), (NULL)")
    assert cache.get("users") is None
    assert cache.get("reviews") == b"R"
    cache.put("any", frozenset({"*"}), 60, b"*")
    conn.execute("INSERT INTO events (source_table) VALUES ('public.orders')")
    assert cache.get("any") is None and cache.get("reviews") == b"R"


def test_the_least_recently_used_entry_goes_first():
    cache, _, _ = make()
    cache.put("a", frozenset(), 60, b"A")
    cache.put("b", frozenset(), 60, b"B")
    assert cache.get("a") == b"A"
    cache.put("c", frozenset(), 60, b"C")
    assert cache.get("b") is None and cache.get("a") == b"A" and cache.get("c") == b"C"


def test_a_lookup_after_a_burst_of_changes_reads_a_bounded_slice_and_drops_everything():
    """The lookup runs on the event loop: it never walks a whole backlog of new events."""
    cache, conn, _ = make()
    cache.get("warm-up")
    cache.put("reviews", frozenset({"public.reviews"}), 60, b"R")
    conn.executemany("INSERT INTO events (source_table) VALUES (?)", [("public.users",)] * (SYNC_EVENTS + 1))
    read = []
    conn.set_trace_callback(read.append)
    assert cache.get("reviews") is None  # unrelated, but past the bound every entry goes
    assert cache.seen == SYNC_EVENTS + 1
    cache.put("reviews", frozenset({"public.reviews"}), 60, b"R")
    assert cache.get("reviews") == b"R"
    assert all("LIMIT" in q or "max(id)" in q for q in read), read
