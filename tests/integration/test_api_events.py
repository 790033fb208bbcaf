"""The events cursor over HTTP, in-process with aiohttp's test client and a real outbox."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from api import events as events_module
from api import keys
from api.app import BASE, FEED, create_app
from config.settings import Settings
from outbox import store
from tests.outbox_helpers import append_events


@pytest.fixture
async def setup(tmp_path: Path):
    settings = Settings(outbox={"path": str(tmp_path / "o.db")})
    append_events(
        settings.outbox.path,
        ["ct2"],
        [
            ("order.created", "order", 1),
            ("customer.created", "customer", 2),
            ("order.status_changed", "order", 1),
            ("review.created", "review", 3),
        ],
    )
    conn = store.open_outbox(settings.outbox.path)
    export = keys.create(conn, "export", [keys.EXPORT], [])
    hooks_only = keys.create(conn, "hooks", [keys.WEBHOOKS], [])
    fenced = keys.create(conn, "fenced", [keys.EXPORT], ["10.0.0.0/8"])
    revoked = keys.create(conn, "old", [keys.EXPORT], [])
    keys.revoke(conn, revoked.id)
    conn.close()
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    yield (
        client,
        {"export": export.key, "hooks": hooks_only.key, "fenced": fenced.key, "revoked": revoked.key},
    )
    await client.close()


async def test_events_page_by_cursor_and_filter_by_type(setup):
    client, k = setup
    auth = {"Authorization": f"Bearer {k['export']}"}
    resp = await client.get(f"{BASE}/events", params={"limit": "2"}, headers=auth)
    body = await resp.json()
    assert resp.status == 200 and body["success"] is True
    assert [e["id"] for e in body["data"]] == [1, 2]
    assert body["meta"]["last_event_id"] == 2
    resp = await client.get(
        f"{BASE}/events", params={"last_event_id": "2"}, headers={"X-API-Key": k["export"]}
    )
    assert [e["id"] for e in (await resp.json())["data"]] == [3, 4]
    resp = await client.get(
        f"{BASE}/events", params=[("event_types", "order.*"), ("event_types", "review.created")], headers=auth
    )
    assert [e["type"] for e in (await resp.json())["data"]] == [
        "order.created",
        "order.status_changed",
        "review.created",
    ]
    resp = await client.get(f"{BASE}/events", params={"last_event_id": "4"}, headers=auth)
    body = await resp.json()
    assert body["data"] == [] and body["meta"]["last_event_id"] == 4


@pytest.mark.parametrize(
    ("key", "status", "code"),
    [
        (None, 401, "unauthorized"),
        ("ct1_nonsense", 401, "unauthorized"),
        ("revoked", 401, "unauthorized"),
        ("hooks", 403, "forbidden"),
        ("fenced", 403, "forbidden"),
    ],
)
async def test_auth_matrix(setup, key, status, code):
    client, k = setup
    headers = {} if key is None else {"Authorization": f"Bearer {k.get(key, key)}"}
    resp = await client.get(f"{BASE}/events", headers=headers)
    body = await resp.json()
    assert resp.status == status and body == {"success": False, "error": body["error"]}
    assert body["error"]["code"] == code


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"last_event_id": "-1"}, "last_event_id"),
        ({"last_event_id": str(2**63)}, "last_event_id"),
        ({"event_types": "order;drop"}, "event_types"),
        ({"wait": "31"}, "wait"),
        ({"wait": "-1"}, "wait"),
        ({"wait": "soon"}, "wait"),
        ({"wait": "nan"}, "wait"),
        # only ASCII digits: no sign, no spaces, no underscores, no other scripts' digits
        ({"limit": "+5"}, "limit"),
        ({"limit": " 5"}, "limit"),
        ({"limit": "1_0"}, "limit"),
        ({"limit": "５"}, "limit"),
        ({"last_event_id": "١"}, "last_event_id"),
        ({"last_event_id": "-0"}, "last_event_id"),
        ({"wait": "+1"}, "wait"),
        ({"wait": "١"}, "wait"),
        ({"wait": "1_0"}, "wait"),
        ({"wait": " 1"}, "wait"),
        ({"wait": "1e1"}, "wait"),
    ],
)
async def test_bad_parameters_are_422_with_the_field(setup, params, field):
    client, k = setup
    resp = await client.get(
        f"{BASE}/events", params=params, headers={"Authorization": f"Bearer {k['export']}"}
    )
    body = await resp.json()
    assert resp.status == 422 and body["error"]["field"] == field


async def test_unknown_paths_and_methods_get_json_errors(setup):
    client, _ = setup
    resp = await client.get(f"{BASE}/nope")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    resp = await client.post(f"{BASE}/events")
    assert resp.status == 405 and (await resp.json())["success"] is False
    resp = await client.get("/healthz")
    assert resp.status == 200 and (await resp.json()) == {"status": "ok"}


def later(seconds: float, fn: Callable[[], None]) -> asyncio.Task[None]:
    """Run ``fn`` (another writer of the outbox) after ``seconds``, off the loop."""

    async def go() -> None:
        await asyncio.sleep(seconds)
        await asyncio.to_thread(fn)

    return asyncio.create_task(go())


async def test_long_poll_returns_as_soon_as_a_matching_event_is_committed(setup, tmp_path):
    client, k = setup
    auth = {"X-API-Key": k["export"]}
    path = tmp_path / "o.db"
    # nothing new: the wait runs out and the answer is an empty page at the same position
    resp = await client.get(f"{BASE}/events", params={"last_event_id": "4", "wait": "0.2"}, headers=auth)
    body = await resp.json()
    assert body["data"] == [] and body["meta"]["last_event_id"] == 4
    # a non-matching commit does not end the wait; the matching one does, long before 20 s
    later(0.2, lambda: append_events(path, ["ct2"], [("customer.created", "customer", 9)]))
    later(0.6, lambda: append_events(path, ["ct2"], [("order.created", "order", 9)]))
    started = time.monotonic()
    resp = await client.get(
        f"{BASE}/events",
        params={"last_event_id": "4", "wait": "20", "event_types": "order.*"},
        headers=auth,
    )
    body = await resp.json()
    assert time.monotonic() - started < 10, "the long poll was not woken by the commit"
    assert [(e["id"], e["type"]) for e in body["data"]] == [(6, "order.created")]
    assert body["meta"]["last_event_id"] == 6


async def read_sse(resp: Any, count: int) -> list[dict[str, Any]]:
    """The next ``count`` events of a stream, as {id, event, data}; comments skipped."""
    got: list[dict[str, Any]] = []
    fields: dict[str, Any] = {}
    while len(got) < count:
        line = (await asyncio.wait_for(resp.content.readline(), 10)).decode().rstrip("\n")
        if not line:
            if "id" in fields:
                got.append(fields)
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = json.loads(value) if name == "data" else value
    return got


async def test_event_stream_resumes_without_missing_or_repeating_an_event(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(events_module, "KEEPALIVE_SECONDS", 0.2)
    client, k = setup
    auth = {"X-API-Key": k["export"]}
    path = tmp_path / "o.db"
    resp = await client.get(f"{BASE}/events/stream", params={"last_event_id": "1"}, headers=auth)
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    first = await read_sse(resp, 3)
    assert [(e["id"], e["event"]) for e in first] == [
        ("2", "customer.created"),
        ("3", "order.status_changed"),
        ("4", "review.created"),
    ]
    assert first[0]["data"]["id"] == 2 and first[0]["data"]["type"] == "customer.created"
    comment = await asyncio.wait_for(resp.content.readline(), 10)  # idle: a keep-alive comment
    assert comment.startswith(b":")
    append_events(path, ["ct2"], [("order.created", "order", 7), ("order.updated", "order", 7)])
    assert [e["id"] for e in await read_sse(resp, 2)] == ["5", "6"]
    resp.close()  # the client goes away; events keep being committed
    append_events(path, ["ct2"], [("order.updated", "order", 7), ("review.created", "review", 8)])
    resp = await client.get(
        f"{BASE}/events/stream",
        params={"last_event_id": "1", "event_types": "order.*"},
        headers={**auth, "Last-Event-ID": "6"},  # the header wins over the query
    )
    assert [e["id"] for e in await read_sse(resp, 1)] == ["7"]  # 8 is a review: filtered out
    append_events(path, ["ct2"], [("order.created", "order", 9)])
    assert [e["id"] for e in await read_sse(resp, 1)] == ["9"]
    resp.close()


async def test_event_stream_rejects_a_bad_last_event_id(setup):
    client, k = setup
    resp = await client.get(
        f"{BASE}/events/stream", headers={"X-API-Key": k["export"], "Last-Event-ID": "abc"}
    )
    assert resp.status == 422 and (await resp.json())["error"]["field"] == "Last-Event-ID"


async def start_app(settings: Settings) -> TestClient:
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    return client


async def test_rate_limit_answers_429_with_retry_after_per_key(tmp_path):
    settings = Settings(
        outbox={"path": str(tmp_path / "o.db")}, api={"rate_limit_per_minute": 6, "rate_limit_burst": 3}
    )
    conn = store.open_outbox(settings.outbox.path)
    one, two = (keys.create(conn, n, [keys.EXPORT], []) for n in ("one", "two"))
    conn.close()
    client = await start_app(settings)
    try:
        statuses = []
        for _ in range(4):
            resp = await client.get(f"{BASE}/events", headers={"X-API-Key": one.key})
            statuses.append(resp.status)
        assert statuses == [200, 200, 200, 429]
        body = await resp.json()
        assert body["error"]["code"] == "rate_limited" and resp.headers["Retry-After"] == "10"
        resp = await client.get(f"{BASE}/events", headers={"X-API-Key": two.key})
        assert resp.status == 200  # another key has its own bucket
    finally:
        await client.close()


async def test_usage_is_counted_per_key_and_route_and_last_used_at_kept(setup, tmp_path):
    client, k = setup
    auth = {"X-API-Key": k["export"]}
    for _ in range(3):
        assert (await client.get(f"{BASE}/events", headers=auth)).status == 200
    assert (await client.get(f"{BASE}/events/stream", headers={**auth, "Last-Event-ID": "x"})).status == 422
    await client.close()  # flushes the counters
    conn = store.connect(tmp_path / "o.db", readonly=True)
    rows = conn.execute(
        "SELECT k.name, u.route, u.requests FROM api_usage u JOIN api_keys k ON k.id = u.key_id ORDER BY 2"
    ).fetchall()
    used = conn.execute("SELECT name, last_used_at FROM api_keys ORDER BY name").fetchall()
    conn.close()
    assert rows == [
        ("export", f"{BASE}/events", 3),
        ("export", f"{BASE}/events/stream", 1),
    ]
    assert {name: last is not None for name, last in used} == {
        "export": True,
        "fenced": False,
        "hooks": False,
        "old": False,
    }


@pytest.mark.parametrize(
    ("proxies", "forwarded", "status"),
    [
        ([], "10.1.2.3", 403),  # no trusted proxy: the header is ignored
        (["127.0.0.1"], "10.1.2.3", 200),  # from a trusted proxy: the client is 10.1.2.3
        (["127.0.0.1"], "10.1.2.3, 192.0.2.9", 403),  # the last untrusted hop counts
        (["127.0.0.0/8", "192.0.2.0/24"], "10.1.2.3, 192.0.2.9", 200),
        (["127.0.0.1"], "not-an-address", 403),
    ],
)
async def test_x_forwarded_for_counts_only_from_trusted_proxies(tmp_path, proxies, forwarded, status):
    settings = Settings(outbox={"path": str(tmp_path / "o.db")}, api={"trusted_proxies": proxies})
    conn = store.open_outbox(settings.outbox.path)
    fenced = keys.create(conn, "fenced", [keys.EXPORT], ["10.0.0.0/8"])
    conn.close()
    client = await start_app(settings)
    try:
        resp = await client.get(
            f"{BASE}/events", headers={"X-API-Key": fenced.key, "X-Forwarded-For": forwarded}
        )
        assert resp.status == status
    finally:
        await client.close()


async def test_full_pages_are_reused_and_the_tail_page_always_grows(setup, tmp_path):
    client, k = setup
    auth = {"X-API-Key": k["export"]}

    async def page(**params: str) -> list[int]:
        resp = await client.get(f"{BASE}/events", params=params, headers=auth)
        return [e["id"] for e in (await resp.json())["data"]]

    assert await page(limit="2") == [1, 2]
    assert await page(limit="10") == [1, 2, 3, 4]  # the tail: not full
    append_events(tmp_path / "o.db", ["ct2"], [("order.created", "order", 5)])
    assert await page(limit="2") == [1, 2]
    assert await page(limit="10") == [1, 2, 3, 4, 5]
    assert await page(limit="10", event_types="order.*") == [1, 3, 5]


async def test_a_key_revoked_while_the_api_runs_stops_working_within_a_second(setup, tmp_path):
    client, k = setup
    auth = {"X-API-Key": k["export"]}
    assert (await client.get(f"{BASE}/events", headers=auth)).status == 200
    conn = store.open_outbox(tmp_path / "o.db")
    (key_id,) = [r["id"] for r in keys.listing(conn) if r["name"] == "export"]
    keys.revoke(conn, key_id)
    conn.close()
    await asyncio.sleep(1.1)
    resp = await client.get(f"{BASE}/events", headers=auth)
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"


async def test_capture_in_the_same_process_wakes_a_long_poll_without_polling(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(events_module, "POLL_SECONDS", 3600)  # only the commit callback can wake it
    client, k = setup
    feed = client.server.app[FEED]

    def commit() -> None:  # what capture's on_commit does in `ct1-cdc run`
        append_events(tmp_path / "o.db", ["ct2"], [("order.created", "order", 9)])
        feed.notify()

    later(0.3, commit)
    started = time.monotonic()
    resp = await client.get(
        f"{BASE}/events", params={"last_event_id": "4", "wait": "20"}, headers={"X-API-Key": k["export"]}
    )
    assert [e["id"] for e in (await resp.json())["data"]] == [5]
    assert time.monotonic() - started < 10, "the commit callback did not wake the long poll"


async def test_a_rare_filter_finds_its_event_in_one_read_and_loses_nothing(setup, tmp_path):
    client, k = setup
    auth = {"X-API-Key": k["export"]}
    append_events(tmp_path / "o.db", ["ct2"], [("customer.created", "customer", i) for i in range(10)])
    append_events(tmp_path / "o.db", ["ct2"], [("order.created", "order", 99)])

    async def get(**params: str) -> dict[str, Any]:
        resp = await client.get(
            f"{BASE}/events", params={"event_types": "order.created", **params}, headers=auth
        )
        return await resp.json()

    body = await get(last_event_id="4")
    assert [e["id"] for e in body["data"]] == [15] and body["meta"]["last_event_id"] == 15
    # nothing after it: the cursor moves to the newest event, matched or not
    append_events(tmp_path / "o.db", ["ct2"], [("customer.created", "customer", 100)])
    body = await get(last_event_id="15")
    assert body["data"] == [] and body["meta"]["last_event_id"] == 16
    body = await get(last_event_id="4", wait="5")
    assert [e["id"] for e in body["data"]] == [15]
    resp = await client.get(
        f"{BASE}/events/stream", params={"last_event_id": "1", "event_types": "order.created"}, headers=auth
    )
    assert [e["id"] for e in await read_sse(resp, 1)] == ["15"]
    resp.close()


class ThreadSpy:
    """``outbox.store`` as the events handlers see it, recording the thread of each call."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: list[tuple[str, threading.Thread]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def spied(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, threading.current_thread()))
            return attr(*args, **kwargs)

        return spied


async def test_event_reads_never_run_on_the_event_loop(setup, tmp_path, monkeypatch):
    """Issue 10, fault 1: a filtered read ran on the loop the dispatcher shares."""
    monkeypatch.setattr(events_module, "KEEPALIVE_SECONDS", 0.2)
    spy = ThreadSpy(store)
    monkeypatch.setattr(events_module, "store", spy)
    client, k = setup
    auth = {"X-API-Key": k["export"]}
    globs = ",".join(f"nothing{i}.*" for i in range(40)) + ",order.*"
    resp = await client.get(f"{BASE}/events", params={"event_types": globs}, headers=auth)
    assert [e["id"] for e in (await resp.json())["data"]] == [1, 3]
    resp = await client.get(
        f"{BASE}/events", params={"event_types": globs, "last_event_id": "4", "wait": "0.3"}, headers=auth
    )
    assert (await resp.json())["data"] == []
    resp = await client.get(f"{BASE}/events/stream", params={"event_types": globs}, headers=auth)
    assert [e["id"] for e in await read_sse(resp, 2)] == ["1", "3"]
    resp.close()
    assert spy.calls, "the handlers read nothing through outbox.store"
    on_loop = sorted({name for name, thread in spy.calls if thread is threading.main_thread()})
    # data_version reads no event, only a counter: the feed polls it on the loop while requests wait
    assert on_loop in ([], ["data_version"]), f"read on the event loop: {on_loop}"


async def sse_until_closed(resp: Any, seconds: float) -> list[str]:
    """Every line of a stream until the server ends it (fails after ``seconds``)."""
    lines = []
    async with asyncio.timeout(seconds):
        while line := await resp.content.readline():
            lines.append(line.decode().rstrip("\n"))
    return lines


def revoke_key(path: Path, name: str) -> None:
    conn = store.open_outbox(path)
    (key_id,) = [r["id"] for r in keys.listing(conn) if r["name"] == name]
    keys.revoke(conn, key_id)
    conn.close()


async def test_revoking_a_key_ends_its_open_event_stream(setup, tmp_path):
    """Issue 10, fault 2: the stream went on receiving full records after revocation."""
    client, k = setup
    resp = await client.get(f"{BASE}/events/stream", headers={"X-API-Key": k["export"]})
    assert len(await read_sse(resp, 4)) == 4
    revoke_key(tmp_path / "o.db", "export")
    await asyncio.sleep(1.2)  # a key is looked up at most once a second
    append_events(tmp_path / "o.db", ["ct2"], [("order.created", "order", 50)])
    lines = await sse_until_closed(resp, 8)
    assert "event: error" in lines, lines
    error = json.loads(lines[lines.index("event: error") + 1].removeprefix("data: "))
    assert error["error"]["code"] == "unauthorized"
    # nothing of the event committed after the revocation reached the revoked key
    assert not any(line.startswith("id: 5") for line in lines)


async def test_revoking_a_key_ends_its_long_poll(setup, tmp_path):
    client, k = setup
    later(0.3, lambda: revoke_key(tmp_path / "o.db", "export"))
    started = time.monotonic()
    resp = await client.get(
        f"{BASE}/events", params={"last_event_id": "4", "wait": "25"}, headers={"X-API-Key": k["export"]}
    )
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
    assert time.monotonic() - started < 15, "the long poll ran its whole wait after revocation"


async def test_a_permission_taken_away_ends_an_open_stream(setup, tmp_path):
    client, k = setup
    resp = await client.get(f"{BASE}/events/stream", headers={"X-API-Key": k["export"]})
    assert len(await read_sse(resp, 4)) == 4
    conn = store.open_outbox(tmp_path / "o.db")
    with conn:
        conn.execute(
            "UPDATE api_keys SET permissions = ? WHERE name = 'export'", (json.dumps([keys.WEBHOOKS]),)
        )
    conn.close()
    lines = await sse_until_closed(resp, 8)
    error = json.loads(lines[lines.index("event: error") + 1].removeprefix("data: "))
    assert error["error"]["code"] == "forbidden"


async def raw_request(client: TestClient, request: bytes) -> tuple[int, bytes, bytes]:
    """Send bytes as they are (aiohttp's client refuses what an attacker would send)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


@pytest.mark.parametrize("header", [b"Authorization: Bearer \xff\xfe\xfa", b"X-API-Key: ct1_\xc3\x28\x80"])
async def test_a_key_header_that_is_not_utf8_is_a_401(setup, header, caplog):
    """Issue 10, fault 4: such a header answered 500 with a traceback logged each time."""
    client, _ = setup
    status, _, body = await raw_request(
        client,
        b"GET "
        + BASE.encode()
        + b"/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + header
        + b"\r\n\r\n",
    )
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"
    assert "unhandled error" not in caplog.text


async def test_failed_authentication_is_rate_limited_per_address(tmp_path):
    settings = Settings(
        outbox={"path": str(tmp_path / "o.db")}, api={"rate_limit_per_minute": 6, "rate_limit_burst": 3}
    )
    store.open_outbox(settings.outbox.path).close()
    client = await start_app(settings)
    try:
        statuses = []
        for n in range(5):
            resp = await client.get(f"{BASE}/events", headers={"X-API-Key": f"ct1_guess{n}"})
            statuses.append(resp.status)
        assert statuses == [401, 401, 401, 429, 429]
        assert (await resp.json())["error"]["code"] == "rate_limited" and int(
            resp.headers["Retry-After"]
        ) >= 1
    finally:
        await client.close()
