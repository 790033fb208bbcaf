"""kill -9 of the dispatcher during a burst of 10,000 events, while it makes the delivery
rows from each endpoint's cursor: after restarts every event reaches every endpoint at
least once, none is skipped, and a duplicate carries the same webhook-id and the same
body."""

from __future__ import annotations

import random
import signal
import time

import pytest

from dispatcher.signing import generate_secret
from outbox import store
from tests.acceptance.helpers import ThreadReceiver, spawn
from tests.outbox_helpers import append_events

EVENTS = 10_000


def fill(path, n: int) -> None:
    # as capture appends them: events only; the dispatcher makes each endpoint's rows from
    # its cursor, so the kills also land while cursors advance
    append_events(path, ["ct2", "ct3"], (("order.updated", "order", i % 200) for i in range(n)), rows=False)


def undelivered(path) -> int:
    """Deliveries not delivered yet, rows made or not (as `outbox stats` counts them)."""
    conn = store.connect(path, readonly=True)
    try:
        by_endpoint = store.stats(conn)["deliveries"]
        return sum(
            n for counts in by_endpoint.values() for status, n in counts.items() if status != "delivered"
        )
    finally:
        conn.close()


@pytest.mark.slow
def test_kill_9_during_a_burst_loses_nothing(tmp_path):
    outbox = tmp_path / "o.db"
    fill(outbox, EVENTS)
    secrets = {"ct2": generate_secret(), "ct3": generate_secret()}
    with ThreadReceiver() as ct2, ThreadReceiver() as ct3:
        ct2.secret, ct3.secret = secrets["ct2"], secrets["ct3"]
        config = tmp_path / "c.toml"
        config.write_text(
            f"[outbox]\npath = {str(outbox)!r}\n[dispatcher]\nconcurrency = 64\nendpoint_concurrency = 32\n"
            + "".join(
                f'[[endpoints]]\nname = "{name}"\nurl = "{rx.url}"\nsecret = "{secrets[name]}"\n'
                for name, rx in (("ct2", ct2), ("ct3", ct3))
            )
        )
        rng = random.Random(11)
        log = tmp_path / "run.log"
        kills_mid_burst = 0
        for _ in range(5):
            proc = spawn("run", "--role", "dispatch", config=config, log=log)
            time.sleep(rng.uniform(0.4, 1.0))  # python start-up takes most of the first ~0.3 s
            if undelivered(outbox) > 0:
                kills_mid_burst += 1
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        assert kills_mid_burst >= 3, "the burst finished before the kills: make it larger"
        final = spawn("run", "--role", "dispatch", config=config, log=log)
        try:
            deadline = time.monotonic() + 240
            while undelivered(outbox):
                assert time.monotonic() < deadline, "deliveries did not finish"
                time.sleep(0.2)
        finally:
            final.send_signal(signal.SIGTERM)
            final.wait(timeout=30)
        with store.connect(outbox, readonly=True) as conn:
            # each delivery counted once, however often a kill had it sent again
            assert store.stats(conn)["deliveries"] == {
                "ct2": {"delivered": EVENTS},
                "ct3": {"delivered": EVENTS},
            }
        for rx in (ct2, ct3):
            assert rx.rejected == 0
            ids = {e["id"] for e in rx.received}
            assert ids == set(range(1, EVENTS + 1))
            by_id: dict[str, dict] = {}
            for webhook_id, envelope in zip(rx.ids, rx.received, strict=True):
                assert webhook_id == f"evt_{envelope['id']}"
                assert by_id.setdefault(webhook_id, envelope) == envelope
