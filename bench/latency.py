"""End-to-end latency: source commit → webhook received, under a steady write load.

    .venv/bin/python bench/latency.py [--rate 1000] [--seconds 30]

A throwaway cluster gets the sample schema; ``ct1-cdc setup`` and ``ct1-cdc run`` (capture,
dispatch and the API in one process) deliver to a receiver on loopback in this script.  A writer
commits ``--rate`` orders per second for ``--seconds``; each order's latency is the time
from its commit returning to its ``order.created`` webhook arriving.  In the same run
``pg_recvlogical`` on a second slot gives the baseline: commit → the raw change printed
by the server's logical decoding; it runs alongside ct1-cdc, or with ``--baseline
apart`` in a phase of its own first (its walsender and reader then take no CPU from
ct1-cdc: on a two-core machine that is a fifth of a core at 2,000 orders/s).  The run
uses the settings' defaults (``--endpoint-concurrency N`` and ``--commit-interval-ms MS`` set
those two).  The last line is JSON with p50/p95/p99 of both, ``ratio`` = baseline p50 /
ct1-cdc p50, and ``cpu_us_per_order``: ct1-cdc's CPU (every thread) during the phase,
per order.  ``--timeline`` prints each second's orders with their p50 and max to stderr
(a backlog that builds and drains shows as a run of rising seconds).

    .venv/bin/python bench/latency.py --readers 20 [--patterns 40]

measures the same twice in one run: first alone, then while ``--readers`` clients of this
script, sharing ``--keys`` API keys (default 1), ask ``GET /events`` of the same process,
each as fast as it is answered and its key's rate limit allows (a 429 is waited out), with an
``event_types`` filter of ``--patterns`` globs that match nothing the writer produces
(from the start of the outbox every time).  The JSON line then also carries the loaded
figures and ``"loaded_p99_over_unloaded"`` (the issue's bound: at most 2).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import psycopg
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdc.capture import wal2json_options  # noqa: E402
from config.settings import Settings  # noqa: E402
from dispatcher.signing import generate_secret  # noqa: E402
from sidecar import sample  # noqa: E402
from sidecar.throwaway import create_cluster, free_port  # noqa: E402

EXPORT = "core_transaction_1_export"
CLI = str(Path(sys.executable).parent / "ct1-cdc")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(latencies: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in latencies]
    return {
        "p50_ms": round(percentile(ms, 50), 2),
        "p95_ms": round(percentile(ms, 95), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


def write_orders(dsn: str, rate: int, seconds: float, out: str) -> None:
    """The writer, in a process of its own so the receiver here is not slowed by it:
    commits ``rate`` orders per second and saves each order's commit time to ``out``."""
    committed: dict[int, float] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        user = conn.execute("SELECT min(id) FROM users").fetchone()[0]  # type: ignore[index]
        start = time.monotonic()
        n = 0
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * rate)
            while n < due:
                row = conn.execute(
                    "INSERT INTO orders (user_id, total) VALUES (%s, 10.00) RETURNING id", (user,)
                ).fetchone()
                committed[int(row[0])] = time.time()  # type: ignore[index]
                n += 1
            time.sleep(0.001)
    Path(out).write_text(json.dumps(committed))


async def read_events(
    session: aiohttp.ClientSession,
    url: str,
    key: str,
    globs: str,
    stop: asyncio.Event,
    answers: list[float],
    statuses: dict[int, int],
) -> None:
    """One client of the API (its key has the default rate limit: a burst of 100, then 10
    a second): the filtered page from the start, again and again, as fast as
    it is answered; a 429 is waited out as its Retry-After says."""
    while not stop.is_set():
        started = time.monotonic()
        async with session.get(
            url, params={"event_types": globs, "limit": "100"}, headers={"X-API-Key": key}
        ) as resp:
            await resp.read()
        answers.append(time.monotonic() - started)
        statuses[resp.status] = statuses.get(resp.status, 0) + 1
        if resp.status == 429:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), float(resp.headers["Retry-After"]))


def create_key(env: dict[str, str], name: str) -> str:
    command = [CLI, "keys", "create", "--name", name, "--permissions", EXPORT, "--json"]
    created = subprocess.run(command, env=env, check=True, capture_output=True)
    return str(json.loads(created.stdout)["key"])


# The harness shares the machine with what it measures, so it reads no more than it needs:
# the order's id by a pattern, not by parsing the whole JSON (a fallback parses it).
ORDER_INSERT_ID = re.compile(rb'"name":"id","type":"[^"]*","value":(\d+)')
ORDER_CREATED_ID = re.compile(
    rb'\{"id":\d+,"type":"order\.created",.*?"data":\{"object":"order","id":(\d+)[,}]'
)


def recvlogical_reader(proc: subprocess.Popen[bytes], seen: dict[int, float]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.time()
        if b'"table":"orders"' in line and b'"action":"I"' in line:
            match = ORDER_INSERT_ID.search(line)
            if match:
                seen[int(match[1])] = now
                continue
            for column in json.loads(line)["columns"]:
                if column["name"] == "id":
                    seen[int(column["value"])] = now
                    break


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="ct1-bench-latency-"))
    work.chmod(0o711)
    # commits flush WAL at once, as on a production server: the walsender only sends
    # flushed WAL, so synchronous_commit=off would add up to wal_writer_delay to both sides
    cluster = create_cluster(work / "pg", settings={"synchronous_commit": "on"})
    received: dict[int, float] = {}

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        match = ORDER_CREATED_ID.match(body)
        if match:
            received[int(match[1])] = now
        elif b'"order.created"' in body:
            envelope = json.loads(body)
            if envelope["type"] == "order.created":
                received[int(envelope["data"]["id"])] = now
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    api_port = free_port()
    run = recv = None
    try:
        small = sample.Volume(customers=20, sellers=2, products=10, orders=5, reviews=5, views=5, carts=2)
        dsn, _ = cluster.sample_database("bench", small)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot('baseline', 'wal2json')")
        config = work / "sidecar.toml"
        config.write_text(
            f"[source]\ndsn = {dsn!r}\nslot = 'ct1_latency'\n"
            f"[outbox]\npath = {str(work / 'outbox.db')!r}\n"
            + (
                f"commit_interval_ms = {args.commit_interval_ms}\n"
                if args.commit_interval_ms is not None
                else ""
            )
            + (
                f"[dispatcher]\nendpoint_concurrency = {args.endpoint_concurrency}\n"
                if args.endpoint_concurrency
                else ""
            )
            + f"[api]\nhost = '127.0.0.1'\nport = {api_port}\n"
            f"[mapping]\nfile = {str(ROOT / 'config' / 'mapping.toml')!r}\n"
            f'[[endpoints]]\nname = "ct2"\nurl = "http://127.0.0.1:{port}/hook"\n'
            f'secret = "{generate_secret()}"\n'
        )
        # (CT1_CDC_APPEND_THREAD=off and CT1_CDC_NATIVE_READ=off pass: capture's writer
        # without its insert thread, capture reading a frame a call)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("CT1_") or k in ("CT1_CDC_APPEND_THREAD", "CT1_CDC_NATIVE_READ")
        }
        env["CT1_CONFIG"] = str(config)
        options = wal2json_options(Settings(source={"dsn": dsn}))
        baseline_seen: dict[int, float] = {}

        def start_baseline() -> subprocess.Popen[bytes]:
            proc = subprocess.Popen(
                cluster.recvlogical("bench", "baseline", options, output="-", fsync_interval=0),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            threading.Thread(target=recvlogical_reader, args=(proc, baseline_seen), daemon=True).start()
            return proc

        async def phase(name: str) -> list[float]:
            print(f"{name}: writing {args.rate} orders/s for {args.seconds} s ...", file=sys.stderr)
            out = work / f"committed-{name}.json"
            writer = multiprocessing.get_context("spawn").Process(
                target=write_orders, args=(dsn, args.rate, args.seconds, str(out))
            )
            writer.start()
            await asyncio.to_thread(writer.join)
            phase_committed = {int(k): v for k, v in json.loads(out.read_text()).items()}
            deadline = time.monotonic() + 30
            seen = baseline_seen if name == "baseline" else received
            while any(i not in seen for i in phase_committed) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            committed.update(phase_committed)
            if args.timeline:
                timeline(name, phase_committed, seen)
            return [seen[i] - t for i, t in phase_committed.items() if i in seen]

        committed: dict[int, float] = {}
        if args.baseline == "apart":  # pg_recvlogical alone first, before ct1-cdc has a slot
            recv = start_baseline()
            await asyncio.sleep(2)
            base = await phase("baseline")
            recv.send_signal(signal.SIGTERM)
            recv.wait(timeout=30)
            committed.clear()
        subprocess.run([CLI, "setup", "--no-probe"], env=env, check=True, capture_output=True)
        api_keys = [create_key(env, f"reader{n}") for n in range(min(args.keys, args.readers))]
        run_log = open(work / "run.log", "wb")  # noqa: SIM115 - closed with the work dir
        run = subprocess.Popen(
            [CLI, "--log-level", "warning", "run"], env=env, stdout=subprocess.DEVNULL, stderr=run_log
        )
        if args.baseline == "alongside":
            recv = start_baseline()
        await asyncio.sleep(2)  # the readers connected

        cpu_before = cpu_seconds(run.pid)
        ours = await phase("alone")
        cpu_alone = cpu_seconds(run.pid) - cpu_before
        if not ours:
            raise SystemExit(
                "no order reached the receiver; ct1-cdc run said:\n" + (work / "run.log").read_text()[-3000:]
            )
        loaded: dict[str, object] = {}
        if args.readers:
            stop = asyncio.Event()
            answers: list[float] = []
            statuses: dict[int, int] = {}
            url = f"http://127.0.0.1:{api_port}/api/core-transaction-1/events"
            globs = ",".join([f"nothing{i}.*" for i in range(args.patterns - 1)] + ["review.*"])
            async with aiohttp.ClientSession() as session:
                readers = [
                    asyncio.create_task(read_events(session, url, key, globs, stop, answers, statuses))
                    for key in itertools.islice(itertools.cycle(api_keys), args.readers)
                ]
                under_load = await phase("loaded")
                stop.set()
                await asyncio.gather(*readers)
            loaded = {
                "readers": args.readers,
                "keys": len(api_keys),
                "patterns": args.patterns,
                "reader_requests": len(answers),
                "reader_statuses": statuses,
                "reader_answer": summary(answers) if answers else None,
                "loaded": summary(under_load),
                "loaded_p99_over_unloaded": round(
                    summary(under_load)["p99_ms"] / max(summary(ours)["p99_ms"], 0.001), 3
                ),
            }
        if args.baseline == "alongside":
            base = [baseline_seen[i] - t for i, t in committed.items() if i in baseline_seen]
        capture_lag = _capture_lag(work / "outbox.db")
        result: dict[str, object] = {
            "bench": "latency",
            "rate": args.rate,
            "seconds": args.seconds,
            "orders": len(ours),
            "received": len(ours),
            "achieved_rate": round(len(ours) / args.seconds),
            **summary(ours),
            "baseline": summary(base),
            "baseline_run": args.baseline,
            "endpoint_concurrency": args.endpoint_concurrency or "default",
            "commit_interval_ms": "default" if args.commit_interval_ms is None else args.commit_interval_ms,
            "capture_only": summary(capture_lag),
            # ct1-cdc's CPU (every thread) while the phase wrote and delivered, per order
            "cpu_us_per_order": round(cpu_alone / max(len(ours), 1) * 1e6, 1),
            **loaded,
        }
        result["ratio"] = round(summary(base)["p50_ms"] / max(summary(ours)["p50_ms"], 0.001), 3)
        return result
    finally:
        for proc in (run, recv):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
        await runner.cleanup()
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process so far (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timeline(name: str, committed: dict[int, float], seen: dict[int, float]) -> None:
    """Per second of the phase (by commit time): orders, and their latency's p50 and max,
    to stderr; a backlog that builds and drains shows as a run of rising seconds."""
    start = min(committed.values(), default=0.0)
    print(f"{name}: second 0 starts at {start:.1f} (epoch)", file=sys.stderr)
    buckets: dict[int, list[float]] = {}
    for i, t in committed.items():
        if i in seen:
            buckets.setdefault(int(t - start), []).append(seen[i] - t)
    for second in sorted(buckets):
        got = sorted(buckets[second])
        print(
            f"{name} second {second:3d}: {len(got):5d} orders, p50 {got[len(got) // 2] * 1000:8.1f} ms, "
            f"max {got[-1] * 1000:8.1f} ms",
            file=sys.stderr,
        )


def _capture_lag(path: Path) -> list[float]:
    """Source commit → committed in the outbox, per order.created event."""
    import sqlite3
    from datetime import datetime

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT occurred_at, created_at FROM events WHERE type = 'order.created'"
        ).fetchall()
    finally:
        conn.close()
    return [created - datetime.fromisoformat(occurred).timestamp() for occurred, created in rows]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=int, default=1000, help="orders committed per second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--endpoint-concurrency",
        type=int,
        default=0,
        help="dispatcher.endpoint_concurrency of the run (default: the setting's own default)",
    )
    parser.add_argument(
        "--commit-interval-ms",
        type=float,
        default=None,
        help="outbox.commit_interval_ms of the run (default: the setting's own default)",
    )
    parser.add_argument(
        "--baseline",
        choices=["alongside", "apart"],
        default="alongside",
        help="pg_recvlogical on its own slot during ct1-cdc's phase, or in a phase of its own "
        "before it (on a small machine the baseline's walsender and reader take CPU from ct1-cdc)",
    )
    parser.add_argument(
        "--timeline", action="store_true", help="print each second's orders and latency to stderr"
    )
    parser.add_argument("--readers", type=int, default=0, help="concurrent filtered /events clients")
    parser.add_argument(
        "--keys", type=int, default=1, help="API keys the readers share (each has its own rate limit)"
    )
    parser.add_argument("--patterns", type=int, default=40, help="globs in each reader's event_types")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
