"""CT2 (seller operations): keep a local table of one seller's orders from ct1-cdc's webhooks.

    .venv/bin/python examples/ct2_seller_sync.py --env-file /tmp/ct1-demo.env --listen 127.0.0.1:8002

It serves ``POST /webhooks/ct1`` with the receiver kit and loads the seller's orders
from the export (``seller_orders``); webhooks that come before the load is done are
answered 500, so ct1-cdc delivers them again. Every webhook is verified (Standard
Webhooks, the secret in ``CT2_WEBHOOK_SECRET``), handled once by its ``webhook-id``, and
applied to ``orders`` in a SQLite file. A row is only replaced by a newer version of
itself (``updated_at``), so a webhook that arrives while the export runs, or a retry that
arrives late, never takes a row back. Stop it with Ctrl-C or SIGTERM.

Needs ``CT1_API_URL``, ``CT1_API_KEY`` and ``CT2_WEBHOOK_SECRET`` in the environment, or
``--env-file`` (the file ``ct1-cdc demo --env-file`` writes; waited for if not there yet).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from ct1_client import AsyncClient
from ct1_client.kit import SqliteSeen, webhook_handler
from ct1_client.models import Event, Order

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY,
    order_number TEXT,
    status TEXT,
    payment_status TEXT,
    total TEXT,
    currency TEXT,
    updated_at TEXT
)
"""


def load_env(path: Path | None, names: list[str], wait: float = 180.0) -> dict[str, str]:
    """The settings from the environment, or from ``path``'s ``export NAME=value`` lines."""
    if path is not None:
        deadline = time.monotonic() + wait
        while not path.exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"{path} did not appear within {wait:.0f} s: is the demo running?")
            time.sleep(0.5)
        for line in path.read_text().splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            os.environ.setdefault(name.strip(), value.strip())
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise SystemExit(f"set {', '.join(missing)} (or give --env-file)")
    return {n: os.environ[n] for n in names}


class SellerOrders:
    """The seller's orders in SQLite, each row replaced only by a newer version."""

    def __init__(self, path: Path, seller_id: int) -> None:
        self.seller_id = seller_id
        self.db = sqlite3.connect(path)
        self.db.execute(SCHEMA)
        self.applied = 0

    def upsert(self, order: Order) -> bool:
        """Apply ``order`` if it is the seller's (``False`` when it is not)."""
        if order.seller_id != self.seller_id or order.id is None:
            return False
        with self.db:
            self.db.execute(
                "INSERT INTO orders (id, order_number, status, payment_status, total, currency, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET order_number = excluded.order_number,"
                " status = excluded.status, payment_status = excluded.payment_status,"
                " total = excluded.total, currency = excluded.currency, updated_at = excluded.updated_at"
                " WHERE excluded.updated_at >= orders.updated_at",
                (
                    order.id,
                    order.order_number,
                    order.status,
                    order.payment_status,
                    None if order.total is None else str(order.total),
                    order.currency,
                    None if order.updated_at is None else order.updated_at.isoformat(),
                ),
            )
        self.applied += 1
        return True

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM orders").fetchone()[0])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--env-file", type=Path, help="export lines with CT1_API_URL, CT1_API_KEY, CT2_WEBHOOK_SECRET"
    )
    parser.add_argument("--listen", default="127.0.0.1:8002", help="host:port to serve /webhooks/ct1 on")
    parser.add_argument(
        "--seller", type=int, help="the seller's user id (default: the seller of the first order)"
    )
    parser.add_argument("--db", type=Path, default=Path("ct2_orders.db"), help="the local SQLite file")
    args = parser.parse_args()
    env = load_env(args.env_file, ["CT1_API_URL", "CT1_API_KEY", "CT2_WEBHOOK_SECRET"])

    table: SellerOrders | None = None  # ready once the export is loaded

    def handle(event: Any) -> None:
        if table is None:
            raise RuntimeError("still loading the export")  # a 500: ct1-cdc delivers it again
        if (
            isinstance(event, Event)
            and isinstance(event.data.record, Order)
            and table.upsert(event.data.record)
        ):
            print(f"CT2: {event.type:<22} order {event.data.id} -> {event.data.record.status}", flush=True)

    seen = SqliteSeen(args.db.with_suffix(".seen.db"))
    app = web.Application()
    app.router.add_post("/webhooks/ct1", webhook_handler(env["CT2_WEBHOOK_SECRET"], handle, seen))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = args.listen.rpartition(":")
    await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()  # a port in use fails here
    print(f"CT2: receiving webhooks at http://{args.listen}/webhooks/ct1", flush=True)

    async with AsyncClient(env["CT1_API_URL"], env["CT1_API_KEY"]) as ct1:  # the loop keeps serving
        seller = args.seller
        if seller is None:
            async for order in ct1.orders(per_page=50):
                if order.seller_id is not None:
                    seller = order.seller_id
                    break
            if seller is None:
                raise SystemExit("no order has a seller yet: give --seller")
        loading = SellerOrders(args.db, seller)
        seeded = 0
        async for order in ct1.seller_orders(seller):  # every page, typed
            loading.upsert(order)
            seeded += 1
    print(f"CT2: seller {seller}: {seeded} orders loaded from the export into {args.db}", flush=True)

    table = loading
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    seen.close()
    print(f"CT2: stopped; seller {seller} has {table.count()} orders in {args.db} ({table.applied} applied)")


if __name__ == "__main__":
    asyncio.run(main())
