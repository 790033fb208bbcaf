"""Capture throughput against pg_recvlogical on the same backlog, and peak RSS on a
transaction of a million rows.

    .venv/bin/python bench/capture.py [--rows 200000] [--rounds 3] [--big-rows 1000000]

A throwaway cluster gets the sample schema and one slot per (tool, round), all created
before the backlog is written, so every drain reads the same WAL.  Each round drains one
slot with ``pg_recvlogical`` (same wal2json options, output to /dev/null) and one with
``ct1-cdc run --role capture`` into a fresh outbox, alternating; both run as subprocesses
and are timed from start until the slot's confirmed position reaches the backlog's end.
The last line is JSON with both rates, their medians and ``ratio`` = ct1-cdc / pg_recvlogical.

``--txn-rows N`` writes the backlog in transactions of N row changes (default 50; 4: a
marketplace's small transactions, where each transaction's begin and commit cost most).

``--endpoints N`` captures for N endpoints that take every event (default: the two
default ones, ct2 taking all but marketplace.analytics and ct3 all): a delivery row per
endpoint and event is what capture writes beside each event.

``--backend jetstream`` starts a three-node JetStream cluster on loopback and has
ct1-cdc capture into a stream of three replicas (one per run), its state in the file.

``--standby`` (with ``--backend jetstream``) runs a second capture beside each ct1-cdc
round, on a file of its own, waiting as the standby; half-way through the drain the
active one is killed with SIGKILL, the standby takes over and finishes the round. The
round's rate includes the take-over, and ``takeover_seconds`` gives, per round, the time
from the kill to the standby's ``standby_took_over``.

``--open-carts N`` starts each ct1-cdc round with N open carts in its outbox (the timers of
cart.abandoned, as capture leaves them); ``--without-carts`` captures with a mapping that
has no ``[cart_abandoned]`` section.  Together: what holding the timers costs capture.

``--compare-appends`` drains a third slot in each round with the writer's native insert
thread off (``CT1_CDC_APPEND_THREAD=off``: sqlite3's executemany and a COMMIT on capture's
thread, as before it): ``executemany_rows_per_s`` and ``executemany_ratio``.
``--compare-reads`` does the same with the native frame reader off
(``CT1_CDC_NATIVE_READ=off``: a frame a call through psycopg, as before it):
``frame_at_a_time_rows_per_s`` and ``frame_at_a_time_ratio``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdc.capture import wal2json_options  # noqa: E402
from cdc.decode import COMPILED  # noqa: E402
from common.formats import parse_lsn  # noqa: E402
from config.settings import Settings  # noqa: E402
from sidecar import sample  # noqa: E402
from sidecar.throwaway import Cluster, create_cluster  # noqa: E402

CLI = str(Path(sys.executable).parent / "ct1-cdc")
BATCH = 50  # row changes per source transaction in the backlog


def backlog_source(cluster: Cluster) -> str:
    """The sample marketplace the backlog is written to (orders under REPLICA IDENTITY FULL)."""
    small = sample.Volume(customers=100, sellers=2, products=50, orders=10, reviews=10, views=10, carts=5)
    dsn, _ = cluster.sample_database("bench", small)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE orders REPLICA IDENTITY FULL")
    return dsn


def write_backlog(dsn: str, rows: int, batch: int = BATCH) -> int:
    """Row changes, ``batch`` a transaction: 1/2 product_views inserts, 1/4 order inserts,
    1/4 order status updates."""
    txns = rows // batch
    per = batch // 4
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"""
            DO $$
            BEGIN
              FOR t IN 1..{txns} LOOP
                INSERT INTO product_views (product_id, user_id, session_id)
                  SELECT 1 + (i % 50), 1 + (i % 100), 'bench' FROM generate_series(1, {batch - 2 * per}) i;
                INSERT INTO orders (user_id, shop_id, subtotal, total)
                  SELECT 1 + (i % 100), 1, 10.50 + i, 15.49 + i FROM generate_series(1, {per}) i;
                UPDATE orders SET status = 'processing', updated_at = now()
                  WHERE id IN (SELECT id FROM orders WHERE status = 'pending' ORDER BY id LIMIT {per});
                COMMIT;
              END LOOP;
            END $$;
            """
        )
        return txns * batch


def current_lsn(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        return parse_lsn(row[0])


def confirmed(conn: psycopg.Connection, slot: str) -> int:
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()
    assert row is not None and row[0] is not None
    return parse_lsn(row[0])


def peak_rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def drain(
    cmd: list[str], dsn: str, slot: str, endpos: int, env: dict[str, str] | None = None, timeout: float = 900
) -> tuple[float, int]:
    """Run ``cmd`` until ``slot`` is confirmed past ``endpos``; (seconds, peak RSS kB)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rss = 0
        try:
            while confirmed(conn, slot) < endpos:
                if proc.poll() is not None and confirmed(conn, slot) < endpos:
                    raise RuntimeError(f"{cmd[0]} exited {proc.returncode} before the end")
                if time.perf_counter() - started > timeout:
                    raise TimeoutError(f"{cmd[0]} did not drain {slot}")
                rss = max(rss, peak_rss_kb(proc.pid))
                time.sleep(0.02)
            elapsed = time.perf_counter() - started
            rss = max(rss, peak_rss_kb(proc.pid))
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    return elapsed, rss


def drain_with_standby(
    cmd: list[str],
    dsn: str,
    slot: str,
    endpos: int,
    env: dict[str, str],
    standby_env: dict[str, str],
    log: Path,
) -> tuple[float, float]:
    """:func:`drain`, with a standby beside the capture and the capture killed half-way:
    (seconds in all, seconds from the kill to the standby's take-over)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        begin = confirmed(conn, slot)
        started = time.perf_counter()
        active = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        query = "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s"
        while conn.execute(query, (slot,)).fetchone()[0] is None:  # (the active one streams first)
            if active.poll() is not None or time.perf_counter() - started > 120:
                raise RuntimeError("the capture did not start streaming")
            time.sleep(0.01)
        with open(log, "ab") as err:
            standby = subprocess.Popen(cmd, env=standby_env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            while confirmed(conn, slot) < begin + (endpos - begin) // 2:
                if active.poll() is not None or time.perf_counter() - started > 900:
                    raise RuntimeError("the active capture stopped before half of the backlog")
                time.sleep(0.01)
            active.send_signal(signal.SIGKILL)
            killed = time.perf_counter()
            active.wait(timeout=60)
            while "standby_took_over" not in log.read_text(errors="replace"):
                if standby.poll() is not None or time.perf_counter() - killed > 120:
                    raise RuntimeError("the standby did not take over")
                time.sleep(0.01)
            took = time.perf_counter() - killed
            while confirmed(conn, slot) < endpos:
                if standby.poll() is not None or time.perf_counter() - started > 900:
                    raise RuntimeError("the standby did not drain the slot")
                time.sleep(0.02)
            elapsed = time.perf_counter() - started
        finally:
            for proc in (active, standby):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    return elapsed, took


def recvlogical_cmd(
    cluster: Cluster, dbname: str, slot: str, endpos: int, options: dict[str, str]
) -> list[str]:
    from common.formats import format_lsn

    return cluster.recvlogical(dbname, slot, options, endpos=format_lsn(endpos))


def endpoints_config(work: Path, count: int) -> Path:
    """A config file with ``count`` endpoints that take every event (``ep0`` ...): capture
    writes a delivery row per endpoint for each event, and this is what that costs."""
    lines = ["endpoints = []"] if count == 0 else []
    for i in range(count):
        lines += [
            "[[endpoints]]",
            f'name = "ep{i}"',
            f'url = "http://127.0.0.1:9/webhooks/ep{i}"',
            'events = ["*"]',
        ]
    path = work / f"endpoints-{count}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


CONFIG: Path | None = None  # --endpoints: the config file with them; None: the default two
JETSTREAM: list[str] | None = None  # --backend jetstream: the cluster's servers


# what --compare-appends and --compare-reads turn off in their third slot, and its name
COMPARED = {
    "appends": ("CT1_CDC_APPEND_THREAD", "executemany"),
    "reads": ("CT1_CDC_NATIVE_READ", "frame_at_a_time"),
}


def ct1_env(dsn: str, slot: str, outbox: Path, off: str | None = None) -> dict[str, str]:
    """``off``: a key of :data:`COMPARED`, the native part it names turned off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CT1_")}
    if off is not None:
        env[COMPARED[off][0]] = "off"
    if CONFIG is not None:
        env["CT1_CONFIG"] = str(CONFIG)
    env.update(
        {
            "CT1_SOURCE__DSN": dsn,
            "CT1_SOURCE__SLOT": slot,
            "CT1_SOURCE__HEARTBEAT_SECONDS": "1",
            "CT1_SOURCE__STATUS_INTERVAL_SECONDS": "1",
            "CT1_OUTBOX__PATH": str(outbox),
            "CT1_MAPPING__FILE": str(MAPPING),
            "CT1_ANALYTICS__ENABLED": "false",  # a periodic query of its own, not capture's work
        }
    )
    if JETSTREAM is not None:  # one stream per run, named for its slot
        env.update(
            {
                "CT1_OUTBOX__BACKEND": "jetstream",
                "CT1_OUTBOX__JETSTREAM__SERVERS": json.dumps(JETSTREAM),
                "CT1_OUTBOX__JETSTREAM__STREAM": stream_of(slot),
                "CT1_OUTBOX__JETSTREAM__SUBJECT": f"bench.{slot}",
            }
        )
    return env


def stream_of(slot: str) -> str:
    return f"BENCH_{slot.upper()}"


MAPPING = ROOT / "config" / "mapping.toml"


def without_carts(work: Path) -> Path:
    """The marketplace's mapping without its [cart_abandoned] section."""
    text = MAPPING.read_text(encoding="utf-8")
    lines = text.partition("[cart_abandoned]")[0].rstrip().splitlines()
    while lines and lines[-1].startswith("#"):  # its comment
        lines.pop()
    path = work / "mapping-without-carts.toml"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


def seed_open_carts(outbox: Path, carts: int) -> None:
    """``carts`` open carts (one item each, an hour from their deadline) in a new outbox,
    as capture would have left them: the timers held while it reads the backlog.  Their
    customers place no order in the backlog, so the run measures capture with that many
    timers held, not the work of converting them."""
    from cdc.carts import CartStore, CartTracker
    from cdc.decode import RowChange
    from cdc.mapping import load_mapping
    from outbox.store import Route, Router, open_outbox
    from outbox.writer import OutboxWriter

    rule = load_mapping(str(ROOT / "config" / "mapping.toml")).carts
    assert rule is not None
    writer = OutboxWriter(open_outbox(outbox), Router([Route("ct2", ("*",)), Route("ct3", ("*",))]))
    tracker = CartTracker(rule, CartStore(writer.state))
    now = time.time()
    for n in range(carts):
        cart = {"id": 10_000_000 + n, "user_id": 10_000_000 + n, "session_id": None, "status": "active"}
        item = {"id": 10_000_000 + n, "cart_id": cart["id"], "product_id": 1, "quantity": 1, "price": "9.99"}
        tracker.change(rule.carts, RowChange("insert", rule.carts, 1, "0/1", cart, None, ("id",)), now)
        tracker.change(rule.items, RowChange("insert", rule.items, 1, "0/1", item, None, ("id",)), now)
        if n % 5000 == 4999:
            writer.commit(None)
    writer.commit(None)
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=200_000, help="row changes in the backlog")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--txn-rows",
        type=int,
        default=BATCH,
        help=f"row changes per source transaction in the backlog (at least 4; default {BATCH})",
    )
    parser.add_argument("--big-rows", type=int, default=1_000_000, help="rows of the one big transaction")
    parser.add_argument(
        "--open-carts",
        type=int,
        default=0,
        help="carts left open at the start of the backlog (cart.abandoned timers)",
    )
    parser.add_argument(
        "--without-carts", action="store_true", help="capture with a mapping without [cart_abandoned]"
    )
    parser.add_argument(
        "--backend",
        choices=("sqlite", "jetstream"),
        default="sqlite",
        help="where ct1-cdc keeps events (jetstream: a three-node cluster started here, R3)",
    )
    parser.add_argument(
        "--endpoints",
        type=int,
        default=None,
        help="capture for this many endpoints taking every event (default: the two default ones)",
    )
    parser.add_argument(
        "--compare-appends",
        action="store_true",
        help="each round also drains with the writer's native insert thread off (executemany)",
    )
    parser.add_argument(
        "--compare-reads",
        action="store_true",
        help="each round also drains with the native frame reader off (a frame a call)",
    )
    parser.add_argument(
        "--standby",
        action="store_true",
        help="jetstream: a standby beside each capture round, the capture killed half-way",
    )
    args = parser.parse_args()
    if args.txn_rows < 4:
        parser.error("--txn-rows must be at least 4 (a view, an order, its update, and one more view)")
    if args.standby and args.backend != "jetstream":
        parser.error("--standby goes with --backend jetstream")
    if args.compare_appends and (args.standby or args.backend != "sqlite"):
        parser.error("--compare-appends goes with the sqlite backend alone")
    if args.compare_appends and args.compare_reads:
        parser.error("one of --compare-appends and --compare-reads at a time")
    compared = "appends" if args.compare_appends else "reads" if args.compare_reads else None
    global MAPPING, CONFIG, JETSTREAM

    work = Path(tempfile.mkdtemp(prefix="ct1-bench-"))
    work.chmod(0o711)
    cluster = create_cluster(work / "pg", settings={"max_wal_size": "'4GB'"})
    nats = None
    if args.backend == "jetstream":
        from sidecar.natscluster import create_nats_cluster

        nats = create_nats_cluster(work / "nats")
        JETSTREAM = nats.servers
    try:
        dsn = backlog_source(cluster)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for r in range(args.rounds):
                for tool in ("recv", "ct1", "ct1x") if compared else ("recv", "ct1"):
                    conn.execute(
                        "SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (f"{tool}_{r}",)
                    )
        if args.without_carts:
            MAPPING = without_carts(work)
        if args.endpoints is not None:
            CONFIG = endpoints_config(work, args.endpoints)
        print(f"writing a backlog of {args.rows} row changes ...", file=sys.stderr)
        rows = write_backlog(dsn, args.rows, args.txn_rows)
        endpos = current_lsn(dsn)
        options = wal2json_options(Settings(source={"dsn": dsn}))
        rates: dict[str, list[float]] = {"pg_recvlogical": [], "ct1_cdc": [], "compared": []}
        takeovers: list[float] = []
        for r in range(args.rounds):
            secs, _ = drain(
                recvlogical_cmd(cluster, "bench", f"recv_{r}", endpos, options), dsn, f"recv_{r}", endpos
            )
            rates["pg_recvlogical"].append(rows / secs)
            outbox = work / f"outbox_{r}.db"
            if args.open_carts:
                seed_open_carts(outbox, args.open_carts)
            if args.standby:
                secs, took = drain_with_standby(
                    [CLI, "run", "--role", "capture"],
                    dsn,
                    f"ct1_{r}",
                    endpos,
                    ct1_env(dsn, f"ct1_{r}", outbox),
                    ct1_env(dsn, f"ct1_{r}", work / f"standby_{r}.db"),
                    work / f"standby_{r}.log",
                )
                takeovers.append(round(took, 2))
                rss = 0
            else:
                secs, rss = drain(
                    [CLI, "run", "--role", "capture"],
                    dsn,
                    f"ct1_{r}",
                    endpos,
                    env=ct1_env(dsn, f"ct1_{r}", outbox),
                )
            rates["ct1_cdc"].append(rows / secs)
            events = _count(outbox)
            if compared:  # the same backlog, the native part off
                other = work / f"outbox_x_{r}.db"
                secs, _ = drain(
                    [CLI, "run", "--role", "capture"],
                    dsn,
                    f"ct1x_{r}",
                    endpos,
                    env=ct1_env(dsn, f"ct1x_{r}", other, compared),
                )
                rates["compared"].append(rows / secs)
                assert _count(other) == events, (other, events)
                print(f"round {r + 1}: {COMPARED[compared][1]} {rows / secs:,.0f} rows/s", file=sys.stderr)
            print(
                f"round {r + 1}: pg_recvlogical {rates['pg_recvlogical'][-1]:,.0f} rows/s, "
                f"ct1-cdc {rates['ct1_cdc'][-1]:,.0f} rows/s ({events} events, peak RSS {rss / 1024:.0f} MB)",
                file=sys.stderr,
            )
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (f"recv_{r}",))
                conn.execute("SELECT pg_drop_replication_slot(%s)", (f"ct1_{r}",))
                if compared:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (f"ct1x_{r}",))

        big_rss_mb = None
        big_secs = None
        if args.big_rows:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_create_logical_replication_slot('ct1_big', 'wal2json')")
                print(f"writing one transaction of {args.big_rows} rows ...", file=sys.stderr)
                conn.execute(
                    "INSERT INTO product_views (product_id, user_id, session_id) "
                    f"SELECT 1 + (i % 50), 1 + (i % 100), 'big' FROM generate_series(1, {args.big_rows}) i"
                )
            big_end = current_lsn(dsn)
            big_secs, rss = drain(
                [CLI, "run", "--role", "capture"],
                dsn,
                "ct1_big",
                big_end,
                env=ct1_env(dsn, "ct1_big", work / "outbox_big.db"),
            )
            big_rss_mb = round(rss / 1024, 1)
            big_events = _count(work / "outbox_big.db")
            print(
                f"one transaction of {args.big_rows} rows: {big_events} events in {big_secs:.1f} s, "
                f"peak RSS {big_rss_mb} MB",
                file=sys.stderr,
            )

        med_recv = statistics.median(rates["pg_recvlogical"])
        med_ct1 = statistics.median(rates["ct1_cdc"])
        result = {
            "bench": "capture",
            "rows": rows,
            "txn_rows": args.txn_rows,
            "rounds": args.rounds,
            "pg_recvlogical_rows_per_s": [round(x) for x in rates["pg_recvlogical"]],
            "ct1_cdc_rows_per_s": [round(x) for x in rates["ct1_cdc"]],
            "pg_recvlogical_median": round(med_recv),
            "ct1_cdc_median": round(med_ct1),
            "big_txn_rows": args.big_rows,
            "big_txn_seconds": None if big_secs is None else round(big_secs, 1),
            "big_txn_peak_rss_mb": big_rss_mb,
            "decoder": "compiled" if COMPILED else "python",
            "open_carts": args.open_carts,
            "cart_rule": not args.without_carts,
            "endpoints": "default (ct2, ct3)" if args.endpoints is None else args.endpoints,
            "backend": args.backend,
            **({"takeover_seconds": takeovers} if args.standby else {}),
            **(
                {
                    f"{COMPARED[compared][1]}_rows_per_s": [round(x) for x in rates["compared"]],
                    f"{COMPARED[compared][1]}_ratio": round(
                        statistics.median(rates["compared"]) / med_recv, 3
                    ),
                }
                if compared
                else {}
            ),
            "ratio": round(med_ct1 / med_recv, 3),
        }
        print(json.dumps(result))
    finally:
        if nats is not None:
            nats.stop()
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


def _count(path: Path) -> int:
    import sqlite3

    if JETSTREAM is not None:  # the stream of the run whose state file this is
        return _stream_count(stream_of("ct1_" + path.stem.removeprefix("outbox_")))

    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])


def _stream_count(stream: str) -> int:
    import asyncio

    from outbox.jetstream import JetStreamLog

    async def count() -> int:
        assert JETSTREAM is not None
        log = JetStreamLog(JETSTREAM, stream=stream)
        await log.connect()
        try:
            info = await log.js.stream_info(stream)
            return int(info.state.messages)
        finally:
            await log.close()

    return asyncio.run(count())


if __name__ == "__main__":
    main()
