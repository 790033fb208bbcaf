"""HTTP API throughput against a bare aiohttp handler, same load tool, same run; and a
full ndjson export of a million orders.

    .venv/bin/python bench/api.py [--seconds 10] [--rounds 3] [--connections 32] [--orders 1000000]

* ``GET /events?limit=100`` with an API key (auth, rate-limit bucket, usage counter,
  outbox read, envelope building) served by ct1-cdc's app in its own process, against a
  bare aiohttp app in its own process answering the very same bytes; both loaded by
  ``wrk`` (Debian package ``wrk``) with the same connections and duration, alternating.
* the same with a random cursor per request (``wrk -s``), mostly past the page cache;
* ``GET /orders?format=ndjson`` over ``--orders`` orders: rows/s and the API process's
  peak RSS (VmHWM).

The last line is JSON with requests/s of both, their medians, ``ratio`` = ct1-cdc / bare,
and the export figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api import keys  # noqa: E402
from outbox import store  # noqa: E402
from sidecar import sample  # noqa: E402
from sidecar.throwaway import create_cluster, free_port  # noqa: E402
from tests.outbox_helpers import append_events  # noqa: E402

EVENTS_URL = "/api/core-transaction-1/events?limit=100&last_event_id=1000"


def serve(kind: str, port: int, config: str) -> None:
    """Child process: ct1-cdc's API (kind "ours") or a bare app answering body.bin."""
    from aiohttp import web

    if kind == "ours":
        from api.app import create_app
        from config.settings import load_settings

        app = create_app(load_settings(config))
    else:
        body = Path(config).read_bytes()

        async def bare(_: web.Request) -> web.Response:
            return web.Response(body=body, content_type="application/json")

        app = web.Application()
        app.router.add_get("/api/core-transaction-1/events", bare)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def start(kind: str, config: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--port", str(port), "--config", config],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(10)


RANDOM_PAGES = """
math.randomseed(7)
request = function()
  return wrk.format("GET", "/api/core-transaction-1/events?limit=100&last_event_id=" .. math.random(0, 19000))
end
"""


def wrk(port: int, key: str, seconds: int, connections: int, script: Path | None = None) -> float:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "-H",
            f"Authorization: Bearer {key}",
            *(["-s", str(script)] if script else []),
            f"http://127.0.0.1:{port}{EVENTS_URL}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if match is None or non2xx is not None:
        raise RuntimeError(f"wrk: unexpected output:\n{out}")
    return float(match.group(1))


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def export(port: int, key: str) -> tuple[int, float]:
    rows = 0
    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=None)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(
            f"http://127.0.0.1:{port}/api/core-transaction-1/orders",
            params={"format": "ndjson"},
            headers={"Authorization": f"Bearer {key}"},
        ) as resp,
    ):
        resp.raise_for_status()
        async for chunk in resp.content.iter_chunked(1 << 16):
            rows += chunk.count(b"\n")
    return rows, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--orders", type=int, default=1_000_000)
    parser.add_argument("--serve", choices=["ours", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.config)
        return
    if shutil.which("wrk") is None:
        sys.exit("bench/api.py needs wrk: apt-get install wrk")

    work = Path(tempfile.mkdtemp(prefix="ct1-bench-api-"))
    work.chmod(0o711)
    cluster = create_cluster(work / "pg")
    try:
        small = sample.Volume(customers=50, sellers=2, products=20, orders=10, reviews=10, views=10, carts=2)
        dsn, _ = cluster.sample_database("bench", small)
        outbox = work / "outbox.db"
        append_events(outbox, ["ct2"], [("order.created", "order", i % 500) for i in range(20_000)])
        conn = store.open_outbox(outbox)
        key = keys.create(conn, "bench", [keys.EXPORT], []).key
        conn.close()
        config = work / "sidecar.toml"
        config.write_text(
            f'[source]\ndsn = "{dsn}"\n[outbox]\npath = "{outbox}"\n'
            f'[mapping]\nfile = "{ROOT / "config" / "mapping.toml"}"\n'
            # the limiter runs, with a bucket large enough never to refuse
            "[api]\nrate_limit_per_minute = 1000000000\nrate_limit_burst = 1000000\n"
        )
        os.environ["CT1_CONFIG"] = str(config)

        ours, port = start("ours", str(config))
        body = work / "body.bin"  # the same bytes for the bare app
        import urllib.request

        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{EVENTS_URL}", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(request) as resp:
            body.write_bytes(resp.read())
        stop(ours)

        rates: dict[str, list[float]] = {"bare": [], "ours": []}
        for r in range(args.rounds):
            for kind in ("bare", "ours"):
                proc, port = start(kind, str(body if kind == "bare" else config))
                try:
                    wrk(port, key, 1, args.connections)  # warm-up
                    rates[kind].append(wrk(port, key, args.seconds, args.connections))
                finally:
                    stop(proc)
            print(
                f"round {r + 1}: bare {rates['bare'][-1]:,.0f} req/s, ct1-cdc {rates['ours'][-1]:,.0f} req/s",
                file=sys.stderr,
            )

        # the same request over and over is answered from the page cache; random cursors
        # over 19,000 events mostly are not: the cost of reading and building a page
        script = work / "random_pages.lua"
        script.write_text(RANDOM_PAGES)
        uncached: dict[str, float] = {}
        for kind in ("bare", "ours"):
            proc, port = start(kind, str(body if kind == "bare" else config))
            try:
                uncached[kind] = wrk(port, key, args.seconds, args.connections, script)
            finally:
                stop(proc)
        print(
            f"random cursors: bare {uncached['bare']:,.0f} req/s, ct1-cdc {uncached['ours']:,.0f} req/s",
            file=sys.stderr,
        )

        print(f"inserting {args.orders:,} orders ...", file=sys.stderr)
        with psycopg.connect(dsn, autocommit=True) as pg:
            pg.execute(
                "INSERT INTO orders (user_id, shop_id, subtotal, total, shipping_address)"
                " SELECT 3 + (i %% 40), 1, 10.50 + (i %% 1000), 15.49 + (i %% 1000),"
                ' \'{"city": "Zürich", "line1": "1 Main St"}\'::jsonb'
                " FROM generate_series(1, %s) i",
                (args.orders,),
            )
            pg.execute("VACUUM ANALYZE orders")
        ours, port = start("ours", str(config))
        try:
            rows, secs = asyncio.run(export(port, key))
            rss = peak_rss_mb(ours.pid)
        finally:
            stop(ours)
        print(f"export: {rows:,} rows in {secs:.1f} s, peak RSS {rss:.1f} MB", file=sys.stderr)

        med_bare, med_ours = statistics.median(rates["bare"]), statistics.median(rates["ours"])
        print(
            json.dumps(
                {
                    "bench": "api",
                    "connections": args.connections,
                    "seconds": args.seconds,
                    "bare_rps": [round(x) for x in rates["bare"]],
                    "ct1_cdc_rps": [round(x) for x in rates["ours"]],
                    "bare_median": round(med_bare),
                    "ct1_cdc_median": round(med_ours),
                    "random_cursors": {
                        "bare_rps": round(uncached["bare"]),
                        "ct1_cdc_rps": round(uncached["ours"]),
                        "ratio": round(uncached["ours"] / uncached["bare"], 3),
                    },
                    "export_rows": rows,
                    "export_seconds": round(secs, 1),
                    "export_rows_per_s": round(rows / secs),
                    "export_peak_rss_mb": round(rss, 1),
                    "ratio": round(med_ours / med_bare, 3),
                }
            )
        )
    finally:
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
