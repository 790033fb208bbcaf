"""Shared fixtures: a throwaway Postgres with logical decoding, a database and a slot per
test, settings pointing at them, and helpers to run capture until it has caught up.

``CT1_TEST_DSN`` points the suite at an existing server (superuser, wal_level=logical,
wal2json installed) instead of starting a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from config.settings import Settings
from outbox import store
from outbox.writer import OutboxWriter
from sidecar import sample
from sidecar.natscluster import NatsCluster, create_nats_cluster
from sidecar.throwaway import Cluster, create_cluster
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
MAPPING = ROOT / "config" / "mapping.toml"

# A developer's shell must not change a result.
for _name in list(os.environ):
    if _name.startswith("CT1_") and _name != "CT1_TEST_DSN":
        del os.environ[_name]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster | None]:
    """The throwaway cluster the suite started, or None under ``CT1_TEST_DSN``."""
    if os.environ.get("CT1_TEST_DSN"):
        yield None
        return
    cluster = create_cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def pg_server(pg_cluster: Cluster | None) -> str:
    """A superuser DSN of a server with wal_level=logical and wal2json (maintenance db)."""
    return pg_cluster.dsn() if pg_cluster is not None else os.environ["CT1_TEST_DSN"]


def with_db(dsn: str, dbname: str) -> str:
    params = conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return make_conninfo(**params)


@dataclass
class SourceDb:
    dsn: str
    name: str
    slot: str
    server_dsn: str

    def connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.dsn, autocommit=True)

    def execute(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            cur = conn.execute(query, params or None)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def current_lsn(self) -> int:
        from common.formats import parse_lsn

        return parse_lsn(self.execute("SELECT pg_current_wal_insert_lsn()::text")[0][0])


@pytest.fixture
def source_db(pg_server: str) -> Iterator[SourceDb]:
    """A fresh database holding the sample marketplace schema, and a slot name for it."""
    with fresh_source_db(pg_server) as db:
        yield db


@contextlib.contextmanager
def fresh_source_db(pg_server: str) -> Iterator[SourceDb]:
    """A new database with the sample schema; dropped after, with its slots."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    db = SourceDb(dsn=with_db(pg_server, name), name=name, slot=f"s_{name}", server_dsn=pg_server)
    with db.connect() as conn:
        sample.create_schema(conn)
    try:
        yield db
    finally:
        with psycopg.connect(pg_server, autocommit=True) as admin:
            for slot, pid in admin.execute(
                "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s", (name,)
            ).fetchall():
                if pid:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    time.sleep(0.2)
                admin.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def make_settings(db: SourceDb, outbox_path: Path, **overrides: Any) -> Settings:
    data: dict[str, Any] = {
        "source": {
            "dsn": db.dsn,
            "slot": db.slot,
            "heartbeat_seconds": 0.2,
            "status_interval_seconds": 1,
            "reconnect_max_seconds": 1,
        },
        "outbox": {"path": str(outbox_path)},
        "mapping": {"file": str(MAPPING)},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return Settings(**data)


@pytest.fixture
def settings(source_db: SourceDb, tmp_path: Path) -> Settings:
    return make_settings(source_db, tmp_path / "outbox.db")


class RunningCapture:
    """Capture running in a background thread, as ``ct1-cdc run`` does."""

    def __init__(self, settings: Settings, db: SourceDb) -> None:
        self.settings = settings
        self.db = db
        from sidecar.runner import build_capture, router_for

        self.writer = OutboxWriter(store.open_outbox(settings.outbox.path), router_for(settings))
        self.capture = build_capture(settings, self.writer)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.capture.run()
        except BaseException as exc:  # surfaced by wait/stop
            self.error = exc

    def start(self) -> RunningCapture:
        self.thread.start()
        return self

    def wait_caught_up(self, timeout: float = 30) -> None:
        """Wait until everything committed in the source so far is in the outbox."""
        target = self.db.current_lsn()
        deadline = time.monotonic() + timeout
        while self.capture.stats.confirmed_lsn < target:
            if self.error is not None:
                raise self.error
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"capture did not catch up: confirmed {self.capture.stats.confirmed_lsn} < {target}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        self.capture.stop()
        self.thread.join(timeout=30)
        self.writer.close()
        if self.error is not None:
            raise self.error


@pytest.fixture
def run_capture(source_db: SourceDb) -> Iterator[Callable[[Settings], RunningCapture]]:
    started: list[RunningCapture] = []

    def start(settings: Settings) -> RunningCapture:
        running = RunningCapture(settings, source_db).start()
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


def read_events(path: str | Path, after: int = 0) -> list[dict[str, Any]]:
    import orjson

    conn = store.connect(path, readonly=True)
    try:
        return [orjson.loads(store.envelope_json(r)) for r in store.iter_events(conn, after=after)]
    finally:
        conn.close()


@pytest.fixture
def small_wal_keep(pg_cluster, pg_server):
    if pg_cluster is None:
        pytest.skip("needs the suite's own throwaway cluster (CT1_TEST_DSN is set)")
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        conn.execute("SELECT pg_reload_conf()")
    yield
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        conn.execute("SELECT pg_reload_conf()")


def invalidate(db) -> None:
    """Write and checkpoint more WAL than the slot may keep, until Postgres gives it up."""
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS filler (x text)")

        def lost() -> bool:
            conn.execute("INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 20000)")
            conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
            row = conn.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (db.slot,))
            return row.fetchone()[0] == "lost"

        wait_until(lost, timeout=60, interval=0, what="the slot invalidated")


@pytest.fixture(scope="module")
def nats_cluster() -> Iterator[NatsCluster]:
    """A three-node JetStream cluster on loopback, for the tests of one module, handed over
    once it places a stream of three replicas."""
    cluster = create_nats_cluster()
    try:
        wait_for_jetstream(cluster.servers)
        yield cluster
    finally:
        cluster.stop()


def wait_for_jetstream(servers: list[str], within: float = 60.0) -> None:
    """Every node listening is not yet a cluster: JetStream places a stream of three
    replicas only once the nodes have found each other and elected a meta leader.  On a
    loaded machine that took longer than a test's own retries (CI: "no suitable peers for
    placement" for 10 s, in the first test of a module)."""
    import nats
    from nats.js.api import StreamConfig

    async def placed() -> None:
        nc = await nats.connect(servers=servers, connect_timeout=2, max_reconnect_attempts=-1)
        try:
            js = nc.jetstream(timeout=2)
            name = f"READY{uuid.uuid4().hex[:10].upper()}"
            deadline = time.monotonic() + within
            while True:
                try:
                    await js.add_stream(StreamConfig(name=name, subjects=[f"ready.{name}"], num_replicas=3))
                    await js.delete_stream(name)
                    return
                except Exception:
                    if time.monotonic() >= deadline:
                        raise
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()

    asyncio.run(placed())


def read_stream(
    servers: list[str], stream: str, subject: str, partitions: int = 0
) -> list[tuple[int, str | None, dict[str, Any]]]:
    """Every message of a JetStream outbox stream: (id, key, the stored event).  After a
    fault the cluster may answer "temporarily unavailable" for longer than the log's own
    retries on a busy machine (CI: a leader stopped with SIGSTOP, then resumed): asked
    again for up to a minute.  The connection is closed whatever happens, so none of its
    tasks outlives the loop (a later test would fail on them)."""
    import orjson

    from outbox.jetstream import JetStreamError, JetStreamLog
    from outbox.jetstream_sink import LoopThread

    loop = LoopThread()
    log = JetStreamLog(servers, stream=stream, subject=subject, partitions=partitions, timeout=2.0)
    try:
        loop.run(log.connect())
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    rows = loop.run(log.read(0, 1_000_000))
                    break
                except JetStreamError as exc:
                    if "unavailable" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(1)
        finally:
            with contextlib.suppress(Exception):
                loop.run(log.close())
    finally:
        loop.stop()
    return [(r.seq, r.key, orjson.loads(r.body)) for r in rows]
