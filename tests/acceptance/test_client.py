"""The client (``ct1_client``) against a real ``ct1-cdc run``: every export paged to the
end, typed errors for the API's refusals, a consumer killed mid-batch that resumes with
nothing skipped, an event stream that reconnects across a restart of the API, and a
consumer seeded from an export while orders change."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ct1_client import (
    AsyncClient,
    AuthError,
    Client,
    FilePosition,
    InvalidRequest,
    MemoryPosition,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unavailable,
)
from ct1_client.models import CustomerDetail, Event, Order, OrderDetail, OrderRow, ProductDetail
from sidecar import sample
from sidecar.throwaway import free_port
from tests.acceptance.helpers import cli, spawn, write_config
from tests.conftest import SourceDb
from tests.waiting import wait_until

VOLUME = sample.Volume(customers=40, sellers=3, products=25, orders=90, reviews=50, views=100, carts=5)


@dataclass
class Sidecar:
    """``ct1-cdc run --role capture,api`` on a free loopback port, restartable."""

    config: Path
    log: Path
    url: str
    key: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = spawn("run", "--role", "capture,api", config=self.config, log=self.log)
        client = Client(self.url, self.key, retries=0)
        proc = self.proc

        def ready() -> bool:
            assert proc.poll() is None, self.log.read_text()[-3000:]
            # ready, and capture streaming the slot: an export's resume_event_id needs capture
            # to pass its snapshot (/readyz does not wait for the slot to be read; a loaded
            # CI run once exported before it was, and got none)
            return _ready(client) and "capture_started" in self.log.read_text()

        try:
            wait_until(ready, timeout=30, what="ct1-cdc run to be ready")
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(timeout=30) == 0, self.log.read_text()[-3000:]
            self.proc = None

    def client(self, **kw: Any) -> Client:
        return Client(self.url, self.key, **kw)

    def new_key(self, *permissions: str) -> str:
        created = cli(
            "keys",
            "create",
            "--name",
            "t",
            "--permissions",
            ",".join(permissions),
            "--json",
            config=self.config,
        )
        assert created.returncode == 0, created.stderr
        return str(json.loads(created.stdout.splitlines()[-1])["key"])


def _ready(client: Client) -> bool:
    try:
        return client._http.get(client._base + "/readyz").json().get("status") == "ready"
    except Exception:
        return False


@pytest.fixture
def sidecar(source_db: SourceDb, tmp_path: Path) -> Iterator[Sidecar]:
    with source_db.connect() as conn:
        sample.generate(conn, seed=8, volume=VOLUME)
    port = free_port()
    config = write_config(tmp_path / "c.toml", source_db.dsn, source_db.slot, tmp_path / "o.db")
    config.write_text(
        config.read_text()
        + f"[api]\nport = {port}\nrate_limit_per_minute = 6000\nrate_limit_burst = 40\n"
        + "cache_ttl_customers = 0\ncache_ttl_products = 0\ncache_ttl_analytics = 0\n"
    )
    setup = cli("setup", "--json", "--no-probe", config=config)
    assert setup.returncode == 0, setup.stderr
    key = json.loads(setup.stdout.splitlines()[-1])["api_key"]["key"]
    running = Sidecar(config, tmp_path / "run.log", f"http://127.0.0.1:{port}", key)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def sql_ids(db: SourceDb, query: str, *params: Any) -> list[int]:
    return [row[0] for row in db.execute(query, *params)]


# -- exports -------------------------------------------------------------------------------------


def test_every_export_iterates_to_the_end_under_paging_typed(sidecar, source_db):
    with sidecar.client() as ct1:
        expected = {
            "customers": sql_ids(source_db, "SELECT id FROM users WHERE role = 'customer' ORDER BY id"),
            "orders": sql_ids(source_db, "SELECT id FROM orders ORDER BY id"),
            "products": sql_ids(source_db, "SELECT id FROM products ORDER BY id"),
            "reviews": sql_ids(source_db, "SELECT id FROM reviews ORDER BY id"),
        }
        for name, ids in expected.items():
            paged = ct1.export(name, per_page=7)
            rows = list(paged)
            assert [r.id for r in rows] == ids, name
            assert paged.resume_event_id is not None, name  # capture runs: a position to follow
            assert [r.id for r in paged] == ids, name  # iterated again: read again
            streamed = ct1.export(name, stream=True)
            assert [r.model_dump() for r in streamed] == [r.model_dump() for r in rows], name
            assert streamed.resume_event_id is not None

        seller = source_db.execute("SELECT seller_id FROM orders WHERE seller_id IS NOT NULL LIMIT 1")[0][0]
        mine = list(ct1.seller_orders(seller, per_page=5))
        assert [o.id for o in mine] == sql_ids(
            source_db, "SELECT id FROM orders WHERE seller_id = %s ORDER BY id", seller
        )
        assert all(isinstance(o, OrderRow) and o.seller_id == seller for o in mine)
        total = source_db.execute("SELECT total::text FROM orders WHERE id = %s", mine[0].id)[0][0]
        assert str(mine[0].total) == total  # the exact text, as a Decimal

        product = source_db.execute(
            "SELECT product_id FROM reviews GROUP BY 1 ORDER BY count(*) DESC LIMIT 1"
        )[0][0]
        reviews = list(ct1.product_reviews(product, per_page=2))
        assert [r.id for r in reviews] == sql_ids(
            source_db, "SELECT id FROM reviews WHERE product_id = %s ORDER BY id", product
        )

        customer = ct1.customer(mine[0].user_id or 0, orders=3)
        assert isinstance(customer, CustomerDetail) and len(customer.order_history) <= 3
        assert customer.statistics is not None and customer.statistics.orders_count >= 1
        order = ct1.order(mine[0].id or 0)
        assert isinstance(order, OrderDetail) and order.items and order.payment is not None
        assert isinstance(ct1.product(product), ProductDetail)
        figures = ct1.analytics(date_from="2020-01-01")
        assert (
            figures.orders
            == source_db.execute("SELECT count(*) FROM orders WHERE status NOT IN ('cancelled', 'refunded')")[
                0
            ][0]
        )


def test_the_apis_refusals_are_typed_errors(sidecar):
    with sidecar.client(retries=0) as ct1:
        with pytest.raises(NotFound):
            ct1.order(10**9)
        with pytest.raises(InvalidRequest) as invalid:
            list(ct1.reviews(rating=9))
        assert invalid.value.status == 422 and invalid.value.field == "rating"
        with pytest.raises(InvalidRequest) as invalid:
            list(ct1.orders(date_from="yesterday"))
        assert invalid.value.field == "date_from"
    with Client(sidecar.url, "ct1_" + "0" * 40, retries=0) as stranger, pytest.raises(AuthError) as auth:
        list(stranger.events())
    assert auth.value.status == 401
    hooks_only = sidecar.new_key("core_transaction_1_webhooks")
    with Client(sidecar.url, hooks_only, retries=0) as ct1, pytest.raises(PermissionDenied) as denied:
        ct1.analytics()
    assert denied.value.status == 403

    # the key's bucket (40 at once): past it, 429 with Retry-After
    key = sidecar.new_key("core_transaction_1_export")
    with Client(sidecar.url, key, retries=0) as ct1:
        with pytest.raises(RateLimited) as limited:
            for _ in range(200):
                ct1.order(1)
        assert limited.value.retry_after >= 1
    # with retries, the client waits as told and gets through
    with Client(sidecar.url, key, retries=3) as ct1:
        assert ct1.order(1).id == 1


# -- a consumer killed mid-batch -------------------------------------------------------------------

CONSUMER = """
import os, signal, sys
from ct1_client import Client, FilePosition

url, key, position, handled, mode, kill_at = sys.argv[1:7]

def handle(event):
    with open(handled, "a") as fh:
        fh.write(f"{event.id}\\n")
        fh.flush()
        os.fsync(fh.fileno())
    if event.id == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)  # mid-batch: the rest of the batch not handled

with Client(url, key) as ct1:
    last = ct1.consume(handle, position=FilePosition(position), mode=mode, limit=10, wait=25,
                       event_types=["customer.*"])
print(last)
"""


@pytest.mark.parametrize("mode", ["poll", "sse"])
def test_a_consumer_killed_mid_batch_resumes_with_nothing_skipped(sidecar, source_db, tmp_path, mode):
    for i in range(60):
        source_db.execute(
            "INSERT INTO users (name, email, password) VALUES (%s, %s, 'pw')", f"C{i}", f"c{i}@x.test"
        )
    with sidecar.client() as ct1:

        def captured() -> list[int]:
            ids = [e.id for e in ct1.events(event_types="customer.*")]
            return ids if len(ids) >= 60 else []

        wanted = wait_until(captured, what="60 customer events")
    assert len(wanted) >= 60
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    position, handled = tmp_path / "position", tmp_path / "handled"
    kill_at = wanted[25]  # in the third batch of ten (poll) / somewhere in a chunk (sse)

    def run(kill: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                str(script),
                sidecar.url,
                sidecar.key,
                str(position),
                str(handled),
                mode,
                str(kill),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    first = run(kill_at)
    _, err = first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL, err
    saved = FilePosition(position).load() or 0
    # the batch in hand (at most ten events) was not acknowledged; the ones before it were
    assert saved < kill_at and len([i for i in wanted if saved < i <= kill_at]) <= 10
    second = run(0)
    wait_until(lambda: handled.exists() and str(wanted[-1]) in handled.read_text().split(), timeout=60)
    second.send_signal(signal.SIGTERM)
    out, err = second.communicate(timeout=30)
    assert second.returncode == 0, err  # a clean stop
    assert int(out.strip()) == wanted[-1] == FilePosition(position).load()

    seen = [int(x) for x in handled.read_text().split()]
    assert sorted(set(seen)) == wanted  # nothing skipped
    repeated = sorted({i for i in seen if seen.count(i) > 1})
    # only the events of the batch in hand when it was killed came again: after the saved
    # position, up to the one it died on
    assert repeated and all(saved < i <= kill_at for i in repeated)
    assert [i for i in seen if seen.count(i) > 2] == []


# -- SSE across a restart of the API -------------------------------------------------------------


def test_the_event_stream_reconnects_across_a_restart_and_misses_nothing(sidecar, source_db):
    got: list[Event[Order]] = []
    position = MemoryPosition()

    async def consume(stop: asyncio.Event) -> int:
        async with AsyncClient(sidecar.url, sidecar.key) as ct1:
            return await ct1.consume(
                got.append,
                position=position,
                event_types="order.created",
                mode="sse",
                stop=stop,
                handle_signals=False,
            )

    def insert_orders(n: int) -> None:
        user, seller = source_db.execute(
            "SELECT id, (SELECT id FROM users WHERE role = 'seller' LIMIT 1) FROM users LIMIT 1"
        )[0]
        for i in range(n):
            source_db.execute(
                "INSERT INTO orders (order_number, user_id, seller_id, status, payment_status, payment_method,"
                " subtotal, total, currency) VALUES (%s, %s, %s, 'pending', 'pending', 'card', 10, 10, 'EUR')",
                f"R-{time.monotonic_ns()}-{i}",
                user,
                seller,
            )

    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    with sidecar.client() as ct1:
        start = max([e.id for e in ct1.events()] or [0])
    position.save(start)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(loop.run_until_complete(consume(stop))))
    thread.start()
    try:
        insert_orders(5)
        wait_until(lambda: len(got) >= 5, timeout=30)
        sidecar.stop()  # the stream breaks off; the consumer retries with backoff
        insert_orders(5)  # committed while no API runs
        sidecar.start()
        insert_orders(5)
        wait_until(lambda: len(got) >= 15, timeout=60)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
    assert not thread.is_alive()
    loop.close()
    ids = [e.id for e in got]
    assert ids == sorted(set(ids)) and len(ids) == 15  # in order, none twice, none missed
    assert all(isinstance(e.data.record, Order) for e in got)
    assert result == [ids[-1]] and position.load() == ids[-1]


# -- seed, then tail -------------------------------------------------------------------------------


def test_seed_then_tail_keeps_a_copy_equal_to_the_table_while_orders_change(sidecar, source_db, tmp_path):
    copy: dict[int, dict[str, Any]] = {}
    versions: dict[int, str] = {}
    went_back: list[int] = []

    def on_row(row: OrderRow) -> None:
        copy[row.id or 0] = {"status": row.status, "total": str(row.total)}
        versions[row.id or 0] = str(row.updated_at)

    def on_event(event: Any) -> None:
        record = event.data.record
        stamp = str(record.updated_at)
        if event.data.id in versions and stamp < versions[event.data.id]:
            went_back.append(event.id)
        versions[event.data.id] = stamp
        copy[event.data.id] = {"status": record.status, "total": str(record.total)}

    done = threading.Event()

    def writer() -> None:
        rng = random.Random(4)
        ids = sql_ids(source_db, "SELECT id FROM orders")
        user = source_db.execute("SELECT id FROM users WHERE role = 'customer' LIMIT 1")[0][0]
        for n in range(150):
            if n % 10 == 0:
                source_db.execute(
                    "INSERT INTO orders (order_number, user_id, status, payment_status, payment_method,"
                    " subtotal, total, currency) VALUES (%s, %s, 'pending', 'pending', 'card', 1, 1, 'EUR')",
                    f"S-{n}",
                    user,
                )
            else:
                source_db.execute(
                    "UPDATE orders SET total = total + 1, status = %s, updated_at = clock_timestamp() WHERE id = %s",
                    rng.choice(["processing", "shipped", "delivered"]),
                    rng.choice(ids),
                )
            time.sleep(0.005)
        done.set()

    stop = threading.Event()
    position = FilePosition(tmp_path / "seed.position")
    with sidecar.client() as ct1:
        writing = threading.Thread(target=writer)
        writing.start()
        failed: list[BaseException] = []

        def consume(mode: Any) -> None:
            try:
                ct1.seed_then_tail(
                    "orders",
                    on_row,
                    on_event,
                    position=position,
                    per_page=4,
                    stop=stop,
                    mode=mode,
                    handle_signals=False,
                )
            except BaseException as exc:
                failed.append(exc)
                raise

        consumer = threading.Thread(target=consume, args=("poll",))
        consumer.start()

        def equal() -> bool:
            table = {
                i: {"status": s, "total": t}
                for i, s, t in source_db.execute("SELECT id, status, total::text FROM orders")
            }
            assert not failed, failed
            return done.is_set() and copy == table

        try:
            wait_until(equal, timeout=60, interval=0.5)
        finally:
            stop.set()
            writing.join()
            consumer.join(timeout=40)
    assert not consumer.is_alive()
    assert went_back == []  # no event applied over a newer row
    assert position.load() is not None


ASYNC_CONSUMER = """
import asyncio, sys
from ct1_client import AsyncClient, FilePosition

url, key, position, mode = sys.argv[1:5]

async def main():
    async with AsyncClient(url, key) as ct1:
        return await ct1.consume(lambda event: None, position=FilePosition(position), mode=mode, wait=25)

print(asyncio.run(main()))
"""


@pytest.mark.parametrize("client", ["sync", "async"])
@pytest.mark.parametrize("mode", ["poll", "sse"])
def test_the_client_stops_on_sigterm_even_while_waiting(sidecar, source_db, tmp_path, client, mode):
    """Caught up and waiting on the network (a 25 s long poll, or a quiet stream): SIGTERM
    ends it at once, cleanly, with the position of what it handled saved."""
    source_db.execute("INSERT INTO users (name, email, password) VALUES ('w', 'w@x.test', 'pw')")
    with sidecar.client() as ct1:
        (last,) = wait_until(lambda: [e.id for e in ct1.events(event_types="customer.*")], what="the event")
    script = tmp_path / "waiter.py"
    position = tmp_path / "p"
    if client == "sync":
        script.write_text(CONSUMER)
        args = [sidecar.url, sidecar.key, str(position), str(tmp_path / "h"), mode, "0"]
    else:
        script.write_text(ASYNC_CONSUMER)
        args = [sidecar.url, sidecar.key, str(position), mode]
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    wait_until(lambda: FilePosition(position).load() is not None, timeout=30, what="the consumer to catch up")
    time.sleep(0.5)  # now waiting for what comes next
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=15)  # well before a long poll would have ended
    assert proc.returncode == 0, err
    assert FilePosition(position).load() >= last and int(out.strip()) == FilePosition(position).load()


def test_a_failing_handler_stops_consume_with_its_own_error(sidecar, source_db, tmp_path):
    """Even an error that looks like the API's (the handler called the API itself and got
    Unavailable) is the handler's: raised, not retried; what was handled before is kept."""
    for i in range(3):
        source_db.execute(
            "INSERT INTO users (name, email, password) VALUES (%s, %s, 'pw')", f"H{i}", f"h{i}@x.test"
        )
    with sidecar.client() as ct1:
        ids = wait_until(
            lambda: (got := [e.id for e in ct1.events(event_types="customer.*")]) and len(got) >= 3 and got
        )
        calls: list[int] = []

        def handle(event: Any) -> None:
            calls.append(event.id)
            if event.id == ids[1]:
                raise Unavailable("the handler's own backend is down")

        position = FilePosition(tmp_path / "p")
        with pytest.raises(Unavailable, match="the handler's own backend"):
            ct1.consume(
                handle, position=position, event_types="customer.*", mode="poll", handle_signals=False
            )
    assert calls == ids[:2]  # not retried
    assert position.load() == ids[0]  # the one handled before it stays handled
