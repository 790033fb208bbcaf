"""cart.abandoned exactly once across kill -9: ``ct1-cdc run --role capture`` is killed at
random moments while it reads a backlog in which hundreds of carts fall due, one after
another; afterwards every cart left alone is abandoned exactly once, and no converted one."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter

import pytest

from tests.acceptance.helpers import cli, spawn, write_config
from tests.conftest import MAPPING, read_events
from tests.waiting import wait_until

KILLS = 8
CARTS = 300


@pytest.mark.slow
def test_kill_9_while_carts_fall_due_fires_each_once(source_db, tmp_path):
    outbox = tmp_path / "outbox.db"
    mapping = MAPPING.read_text().replace('abandon_after = "1h"', "abandon_after = 1")
    config = write_config(tmp_path / "c.toml", source_db.dsn, source_db.slot, outbox, mapping=mapping)
    assert cli("setup", config=config).returncode == 0
    with source_db.connect() as conn:
        user = conn.execute("INSERT INTO users (name, email, password) VALUES ('u', 'u@x', 'p') RETURNING id")
        customer = user.fetchone()[0]
        shop = conn.execute(
            "INSERT INTO shops (user_id, name, slug) VALUES (%s, 's', 's') RETURNING id", (customer,)
        )
        product = conn.execute(
            "INSERT INTO products (shop_id, name, slug, price) VALUES (%s, 'p', 'p', 5) RETURNING id",
            (shop.fetchone()[0],),
        ).fetchone()[0]
        left, converted = [], []
        for n in range(CARTS):  # over ~3 s of commit time: deadlines one after another
            with conn.transaction():
                cart = conn.execute("INSERT INTO carts (user_id) VALUES (NULL) RETURNING id").fetchone()[0]
                conn.execute(
                    "INSERT INTO cart_items (cart_id, product_id, quantity, price) VALUES (%s, %s, 1, 5)",
                    (cart, product),
                )
            if n % 5 == 0:
                conn.execute("UPDATE carts SET status = 'converted' WHERE id = %s", (cart,))
                converted.append(cart)
            else:
                left.append(cart)
            time.sleep(0.01)
    time.sleep(1.5)  # the last deadline passed; heartbeats of the runs below move the stream past it
    seed = int(os.environ.get("CT1_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    log = tmp_path / "run.log"
    for _ in range(KILLS):
        proc = spawn("run", "--role", "capture", config=config, log=log)
        time.sleep(rng.uniform(0.3, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    final = spawn("run", "--role", "capture", config=config, log=log)
    try:
        wait_until(
            lambda: sum(e["type"] == "cart.abandoned" for e in read_events(outbox)) >= len(left),
            timeout=90,
            interval=0.2,
            last=True,
        )
        time.sleep(1)  # anything still to come would come now
        events = read_events(outbox)
    finally:
        final.send_signal(signal.SIGTERM)
        final.wait(timeout=30)
    fired = Counter(e["data"]["id"] for e in events if e["type"] == "cart.abandoned")
    assert sorted(fired) == sorted(left), f"seed {seed}: abandoned carts differ"
    assert set(fired.values()) == {1}, f"seed {seed}: fired twice: {[c for c, n in fired.items() if n > 1]}"
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
