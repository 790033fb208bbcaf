"""cart.abandoned's timers on a real outbox: how many open carts capture keeps per second,
and how many due carts a timer sweep fires per second, against a plain SQLite baseline.

    .venv/bin/python bench/carts.py [--carts 100000] [--rounds 3]

Each round: a fresh outbox; ``--carts`` carts with one item each go through the tracker
as capture feeds it (cart insert, item insert), committed every 5,000 carts as capture's
group commits are; then the stream's clock jumps past every deadline and sweeps fire them
all, a commit per sweep (1,000 carts).  The baseline is SQLite alone doing the same rows'
work: inserting two rows per cart into ``derived_state`` with ``executemany``, then reading
them back in deadline order and rewriting them disarmed.  The last line is JSON with the
medians and the ratios (tracker / baseline).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdc.carts import CartRule, CartStore, CartTracker  # noqa: E402
from cdc.decode import RowChange  # noqa: E402
from outbox.store import Route, Router, open_outbox  # noqa: E402
from outbox.writer import OutboxWriter  # noqa: E402

RULE = CartRule(carts="public.carts", items="public.cart_items", orders="public.orders", customer="user_id")
COMMIT_EVERY = 5000


def writer(path: Path) -> OutboxWriter:
    return OutboxWriter(open_outbox(path), Router([Route("ct2", ("*",)), Route("ct3", ("*",))]))


def tracker_round(path: Path, carts: int) -> tuple[float, float, int]:
    w = writer(path)
    tracker = CartTracker(RULE, CartStore(w.state))
    started = time.perf_counter()
    for n in range(carts):
        at = 1_000_000.0 + n * 0.001
        tracker.change(
            "public.carts",
            RowChange(
                "insert",
                "public.carts",
                n,
                "0/1",
                {"id": n, "user_id": n % 5000, "session_id": None, "status": "active"},
                None,
                ("id",),
            ),
            at,
        )
        item = {"id": n, "cart_id": n, "product_id": 1 + n % 50, "quantity": 1, "price": "9.99"}
        tracker.change(
            "public.cart_items", RowChange("insert", "public.cart_items", n, "0/1", item, None, ("id",)), at
        )
        if n % COMMIT_EVERY == COMMIT_EVERY - 1:
            w.commit("bench", n)
    w.commit("bench", carts)
    tracked = time.perf_counter() - started
    clock = 1_000_000.0 + carts * 0.001 + RULE.abandon_after + 10
    fired = 0
    started = time.perf_counter()
    while True:
        due = tracker.due(clock)
        if not due:
            break
        fired += len(due)
        w.commit("bench", carts + fired)
    swept = time.perf_counter() - started
    w.close()
    return carts / tracked, fired / swept, fired


def baseline_round(path: Path, carts: int) -> tuple[float, float]:
    conn = open_outbox(path)
    rows = [
        ("cart", f"n:{n}", f'["n:{n}",{n},{n % 5000},null,false,{n},{n + 3600}]', f"n:{n % 5000}", n + 3600.0)
        for n in range(carts)
    ]
    items = [("cart_item", f"n:{n}", f'["n:{n}","n:{n}",1,1,"9.99"]', f"n:{n}", None) for n in range(carts)]
    put = "INSERT INTO derived_state (kind, key, value, ref, due) VALUES (?, ?, ?, ?, ?) ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value, ref = excluded.ref, due = excluded.due"
    started = time.perf_counter()
    for start in range(0, carts, COMMIT_EVERY):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(put, rows[start : start + COMMIT_EVERY])
        conn.executemany(put, items[start : start + COMMIT_EVERY])
        conn.execute("COMMIT")
    tracked = time.perf_counter() - started
    started = time.perf_counter()
    done = 0
    while True:
        found = conn.execute(
            "SELECT key, value FROM derived_state WHERE kind = 'cart' AND due IS NOT NULL ORDER BY due, key LIMIT 1000"
        ).fetchall()
        if not found:
            break
        for key, _ in found:  # what a sweep does per cart: its items, then disarm it
            conn.execute(
                "SELECT key, value FROM derived_state INDEXED BY derived_state_ref WHERE kind = 'cart_item' AND ref = ?",
                (key,),
            ).fetchall()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE derived_state SET due = NULL WHERE kind = 'cart' AND key = ?", [(k,) for k, _ in found]
        )
        conn.execute("COMMIT")
        done += len(found)
    swept = time.perf_counter() - started
    conn.close()
    return carts / tracked, done / swept


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--carts", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ct1-bench-carts-"))
    figures: dict[str, list[float]] = {"tracked": [], "swept": [], "base_tracked": [], "base_swept": []}
    try:
        for r in range(args.rounds):
            base_tracked, base_swept = baseline_round(work / f"base{r}.db", args.carts)
            tracked, swept, fired = tracker_round(work / f"tracker{r}.db", args.carts)
            assert fired == args.carts, fired
            for name, value in zip(figures, (tracked, swept, base_tracked, base_swept), strict=True):
                figures[name].append(value)
            print(
                f"round {r + 1}: tracker {tracked:,.0f} carts/s kept, {swept:,.0f} carts/s fired; "
                f"SQLite alone {base_tracked:,.0f} / {base_swept:,.0f}",
                file=sys.stderr,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in figures.items()}
    print(
        json.dumps(
            {
                "bench": "carts",
                "carts": args.carts,
                "rounds": args.rounds,
                "tracked_carts_per_s": round(med["tracked"]),
                "swept_carts_per_s": round(med["swept"]),
                "sqlite_tracked_carts_per_s": round(med["base_tracked"]),
                "sqlite_swept_carts_per_s": round(med["base_swept"]),
                "tracked_ratio": round(med["tracked"] / med["base_tracked"], 3),
                "swept_ratio": round(med["swept"] / med["base_swept"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
