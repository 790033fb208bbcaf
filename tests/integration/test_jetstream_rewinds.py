"""`outbox replay --from` on the JetStream backend (outbox/jetstream_rewinds.py), on a real
three-node cluster and real outbox files: each dispatch node's copy applies every rewind
once, in order, also across a restart; a new copy starts after the rewinds made before
it; the progress a node publishes names the last rewind it reflects, and a partition
taken over goes on from below every rewind its progress does not reflect."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path

from outbox import deliveries, store
from outbox.jetstream import JetStreamLog
from outbox.jetstream_rewinds import Rewinds, ask
from sidecar.natscluster import NatsCluster
from tests.outbox_helpers import append_events


def copy_at(path: Path, cursor: int) -> sqlite3.Connection:
    """A node's copy: ten events for ct2, whose cursor is at ``cursor``."""
    append_events(path, ["ct2"], [("order.updated", "order", n) for n in range(10)])
    conn = store.open_outbox(path)
    conn.execute("UPDATE delivery_cursors SET last_event_id = ? WHERE endpoint = 'ct2'", (cursor,))
    return conn


def cursor(conn: sqlite3.Connection) -> tuple[int, int]:
    row = conn.execute(
        "SELECT last_event_id, generation FROM delivery_cursors WHERE endpoint = 'ct2'"
    ).fetchone()
    return int(row[0]), int(row[1])


async def following(log: JetStreamLog, path: Path, until: Callable[[], bool]) -> Rewinds:
    """A node's copy at ``path`` following the rewinds, applying them as its lease rounds
    do, until ``until`` holds (and a moment more)."""
    rewinds = Rewinds(lambda: store.open_outbox(path), ["ct2"])
    task = asyncio.ensure_future(rewinds.follow(log))
    try:
        async with asyncio.timeout(20):
            while not (rewinds.synced.is_set() and until()):
                assert not task.done(), task.result()
                if rewinds.synced.is_set():
                    await asyncio.to_thread(rewinds.apply)
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # (nothing more comes)
        await asyncio.to_thread(rewinds.apply)
    finally:
        task.cancel()
    return rewinds


async def test_each_rewind_is_applied_once_in_order_and_handed_over_progress_goes_below_it(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    name = f"R{uuid.uuid4().hex[:8].upper()}"
    log = JetStreamLog(nats_cluster.servers, stream=name, subject=f"r.{name.lower()}", partitions=4)
    await log.connect()
    try:
        await log.ensure_stream()
        node = copy_at(tmp_path / "a.db", 10)
        await following(log, tmp_path / "a.db", lambda: True)  # the node started before the command
        first = await ask(log, "ct2", 5)
        rewinds = await following(log, tmp_path / "a.db", lambda: cursor(node) == (4, 1))
        assert cursor(node) == (4, 1)  # back before event 5, a new generation: once
        assert rewinds.tag("ct2", 0) < first <= rewinds.tag("ct2", 1)

        node.execute("UPDATE delivery_cursors SET last_event_id = 10 WHERE endpoint = 'ct2'")
        again = await following(log, tmp_path / "a.db", lambda: True)  # a restart
        assert cursor(node) == (10, 1)  # not applied twice
        assert again.tag("ct2", 1) == first  # what the file reflects at its start

        second = await ask(log, "ct2", 8)
        rewinds = await following(log, tmp_path / "a.db", lambda: cursor(node) == (7, 2))
        assert cursor(node) == (7, 2)
        assert rewinds.tag("ct2", 1) == first and rewinds.tag("ct2", 2) == second
        # a partition handed over settled at 10: below every rewind its holder did not reflect
        assert rewinds.lowered("ct2", 10, 0) == (4, second)
        assert rewinds.lowered("ct2", 10, first) == (7, second)
        assert rewinds.lowered("ct2", 10, second) == (10, second)
        assert rewinds.lowered("ct2", 3, 0) == (3, second)

        fresh = copy_at(tmp_path / "b.db", 10)  # a node that starts after both
        joined = await following(log, tmp_path / "b.db", lambda: True)
        assert cursor(fresh) == (10, 0)  # the rewinds before it are not its own
        assert joined.tag("ct2", 0) == second
        assert deliveries.count_from(fresh, "ct2", 8) == 3
        node.close()
        fresh.close()
    finally:
        await log.close()
