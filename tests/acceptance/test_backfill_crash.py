"""``ct1-cdc backfill`` while orders change and ``ct1-cdc run`` is killed with SIGKILL at
random moments: a real receiver, verifying every signature, ends with exactly the table,
and no order's event carries an older version than one it received before."""

from __future__ import annotations

import json
import random
import signal
import time

import pytest

from dispatcher.signing import generate_secret
from sidecar import sample
from tests.acceptance.helpers import ThreadReceiver, cli, spawn, write_config
from tests.integration.test_backfill import Writers

ORDERS = 900


@pytest.mark.slow
def test_backfill_survives_kill_9_under_writes_and_the_receiver_converges(source_db, tmp_path):
    with source_db.connect() as conn:
        sample.generate(
            conn,
            seed=3,
            volume=sample.Volume(
                customers=50, sellers=3, products=20, orders=ORDERS, reviews=10, views=10, carts=0
            ),
        )
        conn.execute("UPDATE orders SET notes = '0'")
    secret = generate_secret()
    with ThreadReceiver() as rx:
        rx.secret = secret
        outbox = tmp_path / "outbox.db"
        config = write_config(tmp_path / "c.toml", source_db.dsn, source_db.slot, outbox)
        with open(config, "a") as fh:
            fh.write(
                # throttled, so that the backfill outlasts the kills (unthrottled: ~30,000 rows/s)
                f'[backfill]\nchunk_size = 40\nrate = 120\n[[endpoints]]\nname = "ct2"\nurl = "{rx.url}"\nsecret = "{secret}"\n'
            )
        setup = cli("setup", "--backfill", "--no-probe", "--json", config=config)
        assert setup.returncode == 0, setup.stderr
        assert "public.orders" in json.loads(setup.stdout.splitlines()[-1])["backfill"]

        def status() -> dict[str, dict]:
            shown = cli("backfill", "status", "--json", config=config)
            assert shown.returncode == 0, shown.stderr
            return {j["table"]: j for j in map(json.loads, shown.stdout.splitlines())}

        rng = random.Random(13)
        log = tmp_path / "run.log"
        kills_mid_backfill = 0
        with Writers(source_db, threads=2):
            for _ in range(4):
                proc = spawn("run", "--role", "capture,dispatch", config=config, log=log)
                time.sleep(rng.uniform(1.5, 3.0))
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                orders = status()["public.orders"]
                if orders["state"] != "done":
                    kills_mid_backfill += 1
            final = spawn("run", "--role", "capture,dispatch", config=config, log=log)
            try:
                deadline = time.monotonic() + 180
                while any(j["state"] != "done" for j in status().values()):
                    assert time.monotonic() < deadline, status()
                    time.sleep(0.5)
            except BaseException:
                final.send_signal(signal.SIGKILL)
                final.wait(timeout=30)
                raise
        try:
            assert kills_mid_backfill >= 2, "the backfill finished before the kills: make the table larger"
            table = {r[0]: r[1] for r in source_db.execute("SELECT id, notes FROM orders")}
            deadline = time.monotonic() + 120
            while True:
                view: dict[int, str] = {}
                for envelope in rx.received:
                    if envelope["data"]["object"] == "order":
                        view[envelope["data"]["id"]] = envelope["data"]["record"]["notes"]
                if view == table or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        finally:
            final.send_signal(signal.SIGTERM)
            final.wait(timeout=30)
        assert rx.rejected == 0
        missing = sorted(set(table) - set(view))
        assert not missing, f"{len(missing)} orders never reached the receiver: {missing[:10]}"
        wrong = {k: (view[k], v) for k, v in table.items() if view[k] != v}
        assert not wrong, f"{len(wrong)} orders differ (received, table): {list(wrong.items())[:10]}"
        seen: dict[int, int] = {}
        for envelope in rx.received:  # per entity, in the order they arrived
            if envelope["data"]["object"] != "order":
                continue
            key, version = envelope["data"]["id"], int(envelope["data"]["record"]["notes"])
            assert version >= seen.get(key, 0), (
                key,
                envelope["id"],
                envelope["source"]["op"],
                version,
                seen[key],
            )
            seen[key] = version
        assert any(e["source"]["op"] == "read" for e in rx.received)
