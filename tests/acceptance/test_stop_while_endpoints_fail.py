"""SIGTERM ends `ct1-cdc run` cleanly while its endpoints refuse every connection.

The receivers are down (nothing listens on their ports): every delivery fails, after ten
failures an endpoint pauses and waits for its probe, and events keep coming.  A stop then
must end the process with exit code 0, not by the last-resort deadline (`stop_forced`,
exit 1), and every delivery it did not make stays pending for the next run.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from outbox import store
from sidecar.throwaway import free_port
from tests.acceptance.helpers import cli, spawn, write_config
from tests.conftest import SourceDb
from tests.waiting import wait_until

STOPS_WITHIN = 20  # generous: the bound is not what is tested, the clean stop is
ENDPOINTS = ("ct2", "ct3")


def refused_url() -> str:
    """A loopback URL on a port where nothing listens: every connection is refused."""
    return f"http://127.0.0.1:{free_port()}/webhooks/ct1"


def insert_users(db: SourceDb, start: int, count: int) -> None:
    with db.connect() as conn:
        for i in range(start, start + count):
            conn.execute(
                "INSERT INTO users (name, email, password) VALUES (%s, %s, 'pw')", (f"U{i}", f"u{i}@x.test")
            )


def delivery_counts(outbox: Path) -> dict[str, int]:
    """Deliveries by status over both endpoints, as `outbox stats` counts them (rows made
    or not yet: capture appends events only)."""
    conn = store.connect(outbox, readonly=True)
    try:
        counts: dict[str, int] = {}
        for by_status in store.stats(conn)["deliveries"].values():
            for status, n in by_status.items():
                counts[status] = counts.get(status, 0) + n
        return counts
    finally:
        conn.close()


def test_sigterm_stops_the_run_while_paused_endpoints_refuse_connections(source_db, tmp_path):
    outbox = tmp_path / "o.db"
    config = write_config(tmp_path / "c.toml", source_db.dsn, source_db.slot, outbox)
    config.write_text(
        config.read_text()
        + f"[api]\nhost = '127.0.0.1'\nport = {free_port()}\n"
        + "".join(f'[[endpoints]]\nname = "{name}"\nurl = "{refused_url()}"\n' for name in ENDPOINTS)
    )
    setup = cli("setup", "--json", "--no-probe", config=config)
    assert setup.returncode == 0, setup.stderr
    log = tmp_path / "run.log"
    proc = spawn("run", config=config, log=log)
    try:

        def logged(event: str, times: int = 1) -> bool:
            assert proc.poll() is None, log.read_text()
            return log.read_text().count(f'"event": "{event}"') >= times

        wait_until(lambda: logged("capture_started"), 30, interval=0.1, what="capture_started")
        wait_until(lambda: logged("run_started"), 30, interval=0.1, what="run_started")
        insert_users(source_db, 0, 30)  # 30 refused deliveries per endpoint: both pause after 10
        wait_until(lambda: logged("endpoint_paused", len(ENDPOINTS)), 30, interval=0.1, what="both paused")
        insert_users(source_db, 30, 20)  # events keep coming while the endpoints are paused
        wait_until(
            lambda: sum(delivery_counts(outbox).values()) == 50 * len(ENDPOINTS),
            30,
            interval=0.1,
            what="the later events in the outbox",
        )
        time.sleep(1)  # the paused endpoints' loops are waiting for their probe
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=STOPS_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"SIGTERM did not end `ct1-cdc run` within {STOPS_WITHIN} s:\n{log.read_text()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "stop_forced" not in text, text
    assert code == 0, text
    assert '"event": "run_stopped"' in text, text
    # nothing was delivered, nothing given up: every delivery waits for the next run
    assert delivery_counts(outbox) == {"pending": 50 * len(ENDPOINTS)}
