"""Pruning stays proportional to what it removes: every prune statement (and the count
of a dry run) finds its rows through an index (a full scan of deliveries or attempts per
event made pruning a large outbox quadratic)."""

from __future__ import annotations

import pytest

from outbox import store
from outbox.retention import R


@pytest.mark.parametrize(
    "name", ["prune_candidates", "prune_count", "prune_attempts", "prune_deliveries", "prune_events"]
)
def test_prune_statements_use_indexes(tmp_path, name):
    conn = store.open_outbox(tmp_path / "o.db")
    conn.execute("PRAGMA foreign_keys=OFF")  # as `ct1-cdc outbox prune` runs them
    plan = " | ".join(
        row[3]
        for row in conn.execute(f"EXPLAIN QUERY PLAN {R[name]}", {"cutoff": 1, "batch": 10, "ids": "[1]"})
    )
    conn.close()
    for table in ("deliveries", "attempts"):
        assert f"SCAN {table}" not in plan and "SCAN d" not in plan, plan
