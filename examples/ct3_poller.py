"""CT3 (platform control and revenue): a copy of every order, seeded from the export, then
kept current from ``/events``, with revenue figures as ``marketplace.analytics`` reports them.

    .venv/bin/python examples/ct3_poller.py --env-file /tmp/ct1-demo.env

The first run pages through ``GET /orders`` (``seed_then_tail``) and saves the export's
resume position; from then on it follows ``/events`` (Server-Sent Events, or ``--poll``
for long polls) from that position, which it keeps in the same SQLite file as the copy.
Killed at any point, the next run goes on where the last one stopped: nothing is skipped,
and the few events handled again are upserts that change nothing. Ctrl-C or SIGTERM stop
it cleanly.

Needs ``CT1_API_URL`` and ``CT1_API_KEY`` in the environment, or ``--env-file`` (the file
``ct1-cdc demo --env-file`` writes; waited for if not there yet).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from ct1_client import Client, SqlitePosition
from ct1_client.models import Analytics, Event, Order

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY,
    status TEXT,
    payment_status TEXT,
    total TEXT,
    currency TEXT,
    seller_id INTEGER
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-file", type=Path, help="export lines with CT1_API_URL and CT1_API_KEY")
    parser.add_argument("--db", type=Path, default=Path("ct3_orders.db"), help="the local SQLite file")
    parser.add_argument("--poll", action="store_true", help="long polls instead of Server-Sent Events")
    args = parser.parse_args()
    env = load_env(args.env_file, ["CT1_API_URL", "CT1_API_KEY"])

    db = sqlite3.connect(args.db, isolation_level=None)
    db.execute(SCHEMA)
    counts = {"seeded": 0, "events": 0}

    def upsert(order: Order) -> None:
        db.execute(
            "INSERT OR REPLACE INTO orders (id, status, payment_status, total, currency, seller_id)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (order.id, order.status, order.payment_status, str(order.total), order.currency, order.seller_id),
        )

    def on_row(order: Order) -> None:
        upsert(order)
        counts["seeded"] += 1
        if counts["seeded"] % 500 == 0:
            print(f"CT3: seeding: {counts['seeded']} orders", flush=True)

    def on_event(event: Any) -> None:
        counts["events"] += 1
        if not isinstance(event, Event):
            return
        record = event.data.record
        if isinstance(record, Order):
            if event.source.op == "delete":
                db.execute("DELETE FROM orders WHERE id = ?", (event.data.id,))
            else:
                upsert(record)
            print(
                f"CT3: evt {event.id:<6} {event.type:<22} order {event.data.id}: {record.status}", flush=True
            )
        elif isinstance(record, Analytics):
            print(f"CT3: evt {event.id:<6} analytics: GMV {record.gmv}, {record.orders} orders", flush=True)

    def on_seed_start() -> None:  # a seed that failed may have stored rows deleted since
        db.execute("DELETE FROM orders")
        print(f"CT3: seeding {args.db} from the orders export", flush=True)

    # the position beside the copy, in the same file
    with (
        SqlitePosition(args.db, "ct3-orders") as position,
        Client(env["CT1_API_URL"], env["CT1_API_KEY"]) as ct1,
    ):
        if position.load() is not None:
            print(f"CT3: going on from event {position.load()}", flush=True)
        last = ct1.seed_then_tail(
            "orders",
            on_row,
            on_event,
            position=position,
            event_types=["order.*", "payment.status_changed", "marketplace.analytics"],
            mode="poll" if args.poll else "sse",
            on_seed_start=on_seed_start,
        )
    total = db.execute("SELECT count(*) FROM orders").fetchone()[0]
    print(
        f"CT3: stopped at event {last}; {total} orders in {args.db}"
        f" ({counts['seeded']} from the export, {counts['events']} events)"
    )


if __name__ == "__main__":
    main()
