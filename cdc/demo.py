"""``ct1-cdc demo``: a throwaway Postgres, the sample marketplace, capture, live traffic.

Everything runs on loopback and stops by itself after ``duration`` seconds; the cluster
and the outbox are removed at the end unless ``keep`` is set.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import psycopg

from cdc.app import build_capture
from cdc.throwaway import create_cluster
from config import sample
from config.settings import PACKAGE_DIR, Settings
from outbox import store


def _describe(envelope: dict[str, object]) -> str:
    data = envelope["data"]
    assert isinstance(data, dict)
    record = data.get("record") or {}
    assert isinstance(record, dict)
    previous = data.get("previous") or {}
    assert isinstance(previous, dict)
    details = []
    for col in ("status", "payment_status", "total", "rating", "name", "product_id", "quantity"):
        if col in record:
            before = f"{previous[col]} -> " if col in previous else ""
            details.append(f"{col}={before}{record[col]}")
    return f"#{envelope['id']:<5} {envelope['type']:<24} {data.get('object')}:{data.get('id')}  " + " ".join(
        details[:3]
    )


def run_demo(
    duration: float = 30.0,
    rate: float = 5.0,
    keep: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, int]:
    root = Path(tempfile.mkdtemp(prefix="ct1-demo-"))
    root.chmod(0o711)  # the postgres OS user must reach its data directory inside
    echo(f"==> starting a throwaway Postgres with wal_level=logical in {root}")
    cluster = create_cluster(root / "pg")
    capture = None
    thread = None
    try:
        with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
            admin.execute("CREATE DATABASE marketplace")
        dsn = cluster.dsn("marketplace")
        with psycopg.connect(dsn, autocommit=True) as conn:
            sample.create_schema(conn)
            counts = sample.generate(conn, seed=1)
        echo(f"==> sample marketplace loaded: {counts}")
        settings = Settings(
            source={"dsn": dsn, "slot": "ct1_demo", "heartbeat_seconds": 2},
            outbox={"path": str(root / "outbox.db")},
            mapping={"file": str(PACKAGE_DIR / "mapping.toml")},
        )
        capture = build_capture(settings)
        thread = threading.Thread(target=capture.run, daemon=True)
        thread.start()
        reader = store.open_outbox(settings.outbox.path)
        echo(f"==> capture running (slot ct1_demo, outbox {settings.outbox.path})")
        echo(f"==> live traffic for {duration:.0f} s; events as they land in the outbox:")
        last = 0
        seen = 0
        with psycopg.connect(dsn, autocommit=True) as conn:
            traffic = sample.Traffic(conn)
            deadline = time.monotonic() + duration
            while time.monotonic() < deadline:
                traffic.step()
                time.sleep(1 / rate)
                for row in store.iter_events(reader, after=last):
                    last = row[0]
                    seen += 1
                    echo(_describe(orjson.loads(store.envelope_json(row))))
        time.sleep(1)
        for row in store.iter_events(reader, after=last):
            seen += 1
            echo(_describe(orjson.loads(store.envelope_json(row))))
        stats = store.stats(reader)
        echo(f"==> {seen} events in the outbox: {stats['events_by_type']}")
        if keep:
            echo(f"    inspect: CT1_OUTBOX__PATH={settings.outbox.path} ct1-cdc outbox list --json")
        reader.close()
        return {"events": seen}
    finally:
        if capture is not None:
            capture.stop()
        if thread is not None:
            thread.join(timeout=10)
        if capture is not None:
            capture.writer.close()
        if keep:
            echo(f"==> kept {root} (Postgres is stopped; data directory left in place)")
            cluster.stop()
        else:
            cluster.destroy()
            shutil.rmtree(root, ignore_errors=True)
