"""Backfill throughput against ``COPY (SELECT ...) TO STDOUT`` of the same rows, peak RSS
at two table sizes, and capture's lag while a backfill runs beside live writes.

    .venv/bin/python bench/backfill.py [--rows 1000000] [--small-rows 200000] [--rounds 1]
                                       [--chunk-size 2000] [--writes-per-second 200]

A throwaway cluster gets the sample schema and ``--rows`` orders.  Each round times, on
the same table: ``psql -c "COPY (SELECT * FROM orders) TO STDOUT" > /dev/null`` (the
baseline: the rows leaving Postgres, nothing done with them), then ``ct1-cdc run --role
capture`` with a backfill of public.orders queued, from start until the job is done (its
order.snapshot events in a fresh outbox); its rate is the job's own (started to done,
as ``backfill status`` shows it), and the rate counted from the process's start is given
beside it.  While ct1-cdc backfills, a writer updates
orders at ``--writes-per-second`` and the slot's lag (bytes of WAL not yet confirmed) is
sampled.  A second run on ``--small-rows`` orders gives the peak RSS to compare.  The last
line is JSON with the rates, their medians, RSS and lag, and ``ratio`` = ct1-cdc / COPY.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.capture import ct1_env, peak_rss_kb  # noqa: E402
from outbox import backfills, store  # noqa: E402
from sidecar import sample  # noqa: E402
from sidecar.throwaway import Cluster, create_cluster  # noqa: E402

CLI = str(Path(sys.executable).parent / "ct1-cdc")


def make_table(cluster: Cluster, name: str, rows: int) -> str:
    small = sample.Volume(customers=100, sellers=2, products=50, orders=10, reviews=10, views=10, carts=5)
    dsn, _ = cluster.sample_database(name, small)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE orders REPLICA IDENTITY FULL")  # no shadow to seed: the rows only
        conn.execute(
            f"""INSERT INTO orders (user_id, shop_id, status, subtotal, total, notes, shipping_address)
                SELECT 1 + (i % 100), 1, 'pending', 10.50 + i, 15.49 + i, 'n' || i,
                       jsonb_build_object('city', 'C' || (i % 97), 'zip', i)
                FROM generate_series(1, {rows}) i"""
        )
        conn.execute("VACUUM ANALYZE orders")
    return dsn


def copy_rate(cluster: Cluster, dsn: str, rows: int) -> float:
    started = time.perf_counter()
    with open(os.devnull, "wb") as null:
        subprocess.run(
            [str(cluster.bin / "psql"), dsn, "-qAt", "-c", "COPY (SELECT * FROM public.orders) TO STDOUT"],
            stdout=null,
            check=True,
        )
    return rows / (time.perf_counter() - started)


class Writer(threading.Thread):
    def __init__(self, dsn: str, per_second: float) -> None:
        super().__init__(daemon=True)
        self.dsn, self.per_second, self.stop = dsn, per_second, threading.Event()

    def run(self) -> None:
        if self.per_second <= 0:
            return
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            i = 0
            while not self.stop.wait(1 / self.per_second):
                i += 1
                conn.execute(
                    "UPDATE orders SET status = 'processing', updated_at = now() WHERE id = %s",
                    (1 + i * 7919 % 1000,),
                )


def ct1_backfill(dsn: str, slot: str, work: Path, rows: int, chunk: int, writes: float) -> dict[str, float]:
    outbox = work / f"{slot}.db"
    conn = store.open_outbox(outbox)
    backfills.add(conn, ["public.orders"], None, 0, "bench")
    conn.close()
    env = ct1_env(dsn, slot, outbox)
    env["CT1_BACKFILL__CHUNK_SIZE"] = str(chunk)
    writer = Writer(dsn, writes)
    lags: list[int] = []
    started = time.perf_counter()
    proc = subprocess.Popen(
        [CLI, "run", "--role", "capture"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    rss = 0
    try:
        reader = None
        with psycopg.connect(dsn, autocommit=True) as pg:
            next_sample = 0.0
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"ct1-cdc exited {proc.returncode}")
                rss = max(rss, peak_rss_kb(proc.pid))
                if reader is None and outbox.exists():
                    reader = store.connect(outbox, readonly=True)
                if reader is not None:
                    [job] = backfills.jobs(reader)
                    if job["state"] == "running" and writer.ident is None:
                        writer.start()  # live writes while the backfill runs
                    if job["state"] in ("done", "failed", "cancelled"):
                        assert job["state"] == "done", job
                        backfilling = job["finished_at"] - job["started_at"]
                        break
                now = time.perf_counter()
                if writer.is_alive() and now >= next_sample:
                    row = pg.execute(
                        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
                        "FROM pg_replication_slots WHERE slot_name = %s",
                        (slot,),
                    ).fetchone()
                    if row and row[0] is not None:
                        lags.append(int(row[0]))
                    next_sample = now + 0.5
                time.sleep(0.05)
        elapsed = time.perf_counter() - started
        rss = max(rss, peak_rss_kb(proc.pid))
        if reader is not None:
            reader.close()
    finally:
        writer.stop.set()
        proc.terminate()
        proc.wait(timeout=60)
    return {
        "seconds": elapsed,  # from the process's start: imports, connections, the slot
        "backfill_seconds": backfilling,  # the job's own time, as `backfill status` shows it
        "rows_per_second": rows / backfilling,
        "rows_per_second_with_start": rows / elapsed,
        "peak_rss_mb": rss / 1024,
        "lag_bytes_median": statistics.median(lags) if lags else 0,
        "lag_bytes_max": max(lags) if lags else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small-rows", type=int, default=200_000, help="a second table, for peak RSS")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=2000)
    parser.add_argument("--writes-per-second", type=float, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ct1-bench-backfill-"))
    work.chmod(0o711)
    cluster = create_cluster(work / "pg", settings={"max_wal_size": "'4GB'"})
    try:
        print(f"writing {args.rows} orders ...", file=sys.stderr)
        big = make_table(cluster, "big", args.rows)
        rows = args.rows + 10
        copy_rates, ct1_runs = [], []
        for r in range(args.rounds):
            copy_rates.append(copy_rate(cluster, big, rows))
            ct1_runs.append(
                ct1_backfill(big, f"big_{r}", work, rows, args.chunk_size, args.writes_per_second)
            )
            print(f"round {r}: COPY {copy_rates[-1]:,.0f} rows/s; ct1-cdc {ct1_runs[-1]}", file=sys.stderr)
        small_rows = args.small_rows + 10
        small = make_table(cluster, "small", args.small_rows)
        small_run = ct1_backfill(small, "small_0", work, small_rows, args.chunk_size, 0)
        copy = statistics.median(copy_rates)
        ct1 = statistics.median(r["rows_per_second"] for r in ct1_runs)
        result = {
            "rows": rows,
            "chunk_size": args.chunk_size,
            "copy_rows_per_second": [round(x) for x in copy_rates],
            "ct1_rows_per_second": [round(r["rows_per_second"]) for r in ct1_runs],
            "ct1_rows_per_second_with_start": [round(r["rows_per_second_with_start"]) for r in ct1_runs],
            "copy_median": round(copy),
            "ct1_median": round(ct1),
            "peak_rss_mb": {
                str(rows): round(max(r["peak_rss_mb"] for r in ct1_runs), 1),
                str(small_rows): round(small_run["peak_rss_mb"], 1),
            },
            "writes_per_second_during": args.writes_per_second,
            "capture_lag_bytes_median": statistics.median(r["lag_bytes_median"] for r in ct1_runs),
            "capture_lag_bytes_max": max(r["lag_bytes_max"] for r in ct1_runs),
            "ratio": round(ct1 / copy, 4),
        }
        print(json.dumps(result))
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
