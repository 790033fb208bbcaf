"""The client's pure parts: filters, errors, the SSE format, the handover's skip rule,
backoff, positions, and its models against the event catalogue."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from config import catalogue
from ct1_client import _core
from ct1_client.errors import (
    AuthError,
    Ct1Error,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    Unavailable,
    error_for,
)
from ct1_client.models import (
    RECORDS,
    Cart,
    Event,
    ManualEvent,
    Order,
    Record,
    WebhookTestEvent,
    parse_event,
)
from ct1_client.positions import CallbackPosition, FilePosition, SqlitePosition


def envelope(kind: str = "order.status_changed", **data: object) -> dict[str, object]:
    return {
        "id": 1042,
        "type": kind,
        "timestamp": "2026-11-25T14:00:00.123456Z",
        "data": {
            "object": "order",
            "id": 77,
            "record": {
                "id": 77,
                "status": "shipped",
                "total": "59.90",
                "created_at": "2026-11-25T13:00:00.000000Z",
            },
            "previous": {"status": "paid"},
            **data,
        },
        "source": {"table": "public.orders", "op": "update", "lsn": "0/1A2B3C4", "xid": 731},
    }


# -- models ------------------------------------------------------------------------------------


def test_an_order_event_is_typed_with_exact_money_and_utc_times():
    event = parse_event(envelope())
    assert isinstance(event, Event)
    record = event.data.record
    assert isinstance(record, Order)
    assert record.total == Decimal("59.90") and str(record.total) == "59.90"
    assert record.created_at == datetime(2026, 11, 25, 13, 0, tzinfo=UTC)
    assert event.data.previous is not None and event.data.previous.status == "paid"
    assert event.data.previous.total is None  # previous holds what changed only
    assert event.source.lsn == "0/1A2B3C4"


def test_columns_of_ones_own_schema_are_kept():
    raw = envelope()
    raw["data"]["record"]["loyalty_tier"] = "gold"  # type: ignore[index]
    record = parse_event(raw).data.record  # type: ignore[union-attr]
    assert record.model_extra == {"loyalty_tier": "gold"}


def test_manual_test_and_unknown_types_parse():
    manual = {
        "id": 5,
        "type": "seller.note_added",
        "timestamp": "2026-11-25T14:00:00.000000Z",
        "data": {"order_id": 7, "note": "gift wrap"},
        "source": {"table": None, "op": "manual", "lsn": None, "xid": None},
    }
    assert isinstance(parse_event(manual), ManualEvent)
    test = {
        "id": "evt_test",
        "type": "webhook.test",
        "timestamp": "2026-11-25T14:00:00.000000Z",
        "data": {"object": "webhook_test", "system": "ct2", "message": "hi"},
    }
    assert isinstance(parse_event(test), WebhookTestEvent)
    unknown = parse_event(envelope("shipment.created", object="shipment"))
    assert type(unknown.data.record) is Record  # type: ignore[union-attr]
    assert unknown.data.record.model_extra["status"] == "shipped"  # type: ignore[union-attr,index]


def test_a_wrong_value_is_refused_not_guessed():
    raw = envelope()
    raw["data"]["record"]["total"] = "lots"  # type: ignore[index]
    with pytest.raises(ValueError, match="total"):
        parse_event(raw)


@pytest.mark.parametrize("entry", [e for e in catalogue.CATALOGUE if e.type != "webhook.test"], ids=str)
def test_every_catalogue_type_has_a_model_with_each_documented_column(entry):
    """The client follows the catalogue: a type added to it, or a column added to a
    record's schema, fails here until the models know it."""
    model = RECORDS[entry.type]
    schema = catalogue.schema(entry.type)
    record = schema["$defs"].get(entry.object)
    if record is None:  # ct1.gap: a free-form record
        return
    documented = {name for name, rule in record["properties"].items() if rule is not False}
    assert documented <= set(model.model_fields), entry.type


def test_an_abandoned_cart_is_typed():
    raw = {
        "id": 9,
        "type": "cart.abandoned",
        "timestamp": "2026-11-25T14:00:00.000000Z",
        "data": {
            "object": "cart",
            "id": 4,
            "record": {
                "cart_id": 4,
                "customer_id": None,
                "session_id": "s",
                "items": [{"product_id": 1, "quantity": 2, "price": "3.50"}],
                "value": "7.00",
                "item_count": 2,
                "last_activity_at": "2026-11-25T13:00:00.000000Z",
                "idle_seconds": 3600.5,
                "abandon_after_seconds": 3600,
            },
            "previous": None,
        },
        "source": {"table": "public.carts", "op": "derived", "lsn": "0/1", "xid": 3},
    }
    cart = parse_event(raw).data.record  # type: ignore[union-attr]
    assert isinstance(cart, Cart) and cart.items[0].price == Decimal("3.50")


# -- filters and errors ----------------------------------------------------------------------


def test_filters_are_encoded_as_the_api_reads_them():
    assert _core.events_call(5, None, 10, 2.5).params == {"last_event_id": "5", "limit": "10", "wait": "2.5"}
    assert _core.query(
        has_orders=True,
        date_from=date(2026, 11, 1),
        seller_id=3,
        status=None,
        event_types=["order.*", "review.*"],
    ) == {
        "has_orders": "true",
        "date_from": "2026-11-01",
        "seller_id": "3",
        "event_types": "order.*,review.*",
    }


def test_an_unknown_filter_is_a_mistake_said_at_once():
    with pytest.raises(TypeError, match="unknown filter colour"):
        _core.query(_core.EXPORTS["orders"].filters, colour="red")


def body(code: str, message: str, field: str | None = None) -> bytes:
    return json.dumps(
        {"success": False, "error": {"code": code, "message": message, "field": field}}
    ).encode()


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, InvalidRequest),
        (401, AuthError),
        (403, PermissionDenied),
        (404, NotFound),
        (422, InvalidRequest),
        (503, Unavailable),
        (500, ServerError),
        (418, Ct1Error),
    ],
)
def test_each_status_becomes_its_exception(status, kind):
    error = error_for(status, body("x", "no", "per_page"), {})
    assert type(error) is kind and error.status == status
    assert error.field == "per_page" and "per_page" in str(error)


def test_a_rate_limit_says_how_long_to_wait():
    error = error_for(429, body("rate_limited", "slow down"), {"retry-after": "7"})
    assert isinstance(error, RateLimited) and error.retry_after == 7.0
    assert _core.Backoff().delay(error) == 7.0


def test_an_answer_that_is_not_json_still_says_what_came():
    error = error_for(502, b"<html>Bad Gateway</html>", {})
    assert isinstance(error, ServerError) and "Bad Gateway" in str(error)


def test_backoff_grows_within_bounds_and_resets():
    backoff = _core.Backoff(first=1, most=8)
    delays = [backoff.delay(Unavailable("x")) for _ in range(6)]
    assert all(0.5 <= d <= 1 for d in delays[:1]) and all(d <= 8 for d in delays)
    assert max(delays[3:]) > 1
    backoff.reset()
    assert backoff.delay(Unavailable("x")) <= 1


# -- Server-Sent Events ----------------------------------------------------------------------


def test_sse_messages_split_anywhere_are_put_back_together():
    stream = (
        b'retry: 1000\n\n: keep-alive\n\nid: 43\nevent: order.created\ndata: {"id":43}\n\n'
        b'id: 44\r\nevent: order.updated\r\ndata: {"id":\r\ndata: 44}\r\n\r\n'
    )
    for size in (1, 2, 7, len(stream)):
        parser = _core.SseParser()
        messages = []
        for start in range(0, len(stream), size):
            messages += parser.feed(stream[start : start + size])
        assert [(m.id, m.event, m.data) for m in messages] == [
            ("43", "order.created", '{"id":43}'),
            ("44", "order.updated", '{"id":\n44}'),
        ]


def test_a_stream_error_becomes_the_keys_exception():
    revoked = _core.Message(None, "error", body("unauthorized", "unknown or revoked API key").decode())
    assert isinstance(_core.stream_error(revoked), AuthError)
    forbidden = _core.Message(None, "error", body("forbidden", "lacks").decode())
    assert isinstance(_core.stream_error(forbidden), PermissionDenied)


# -- the handover's skip rule ----------------------------------------------------------------


def order_event(event_id: int, key: int) -> object:
    return parse_event({**envelope(), "id": event_id, "data": {**envelope()["data"], "id": key}})  # type: ignore[dict-item]


def test_an_event_already_in_a_later_page_is_skipped_and_no_other():
    pager = _core.Pager(_core.EXPORTS["orders"], {}, per_page=2)
    pages = [
        ([1, 2], {"next_cursor": "a", "resume_event_id": 100, "page_event_id": 100}),
        ([3, 5], {"next_cursor": "b", "resume_event_id": 100, "page_event_id": 130}),
        ([8], {"next_cursor": None, "resume_event_id": 100, "page_event_id": None}),
    ]
    for ids, meta in pages:
        pager.feed({"data": [{"id": i} for i in ids], "meta": meta})
    overlap = pager.overlap()
    assert overlap.resume_event_id == 100
    skip = overlap.already_in
    assert not skip(order_event(101, 2))  # first page: every event after resume is new
    assert skip(order_event(120, 3)) and skip(order_event(130, 5)) and skip(order_event(125, 4))
    assert not skip(order_event(131, 5))  # after its page was read
    assert not skip(order_event(120, 8))  # the last page has no position: apply all
    assert not skip(order_event(120, 9))  # past every exported row: inserted after
    other = parse_event(
        {**envelope("customer.updated"), "data": {"object": "customer", "id": 3, "record": {}}}
    )
    assert not skip(other)


# -- positions -------------------------------------------------------------------------------


def test_a_file_position_survives_and_is_replaced_whole(tmp_path):
    position = FilePosition(tmp_path / "ct3.position")
    assert position.load() is None
    position.save(41)
    position.save(42)
    assert FilePosition(tmp_path / "ct3.position").load() == 42
    assert [p.name for p in tmp_path.iterdir()] == ["ct3.position"]  # no temporary left behind
    (tmp_path / "ct3.position").write_text("garbage")
    with pytest.raises(ValueError, match="not an event id"):
        position.load()


def test_sqlite_positions_are_kept_by_name(tmp_path):
    a, b = SqlitePosition(tmp_path / "p.db", "a"), SqlitePosition(tmp_path / "p.db", "b")
    a.save(3)
    b.save(9)
    a.save(4)
    assert SqlitePosition(tmp_path / "p.db", "a").load() == 4 and b.load() == 9
    assert SqlitePosition(tmp_path / "p.db", "c").load() is None


def test_a_callback_position_calls_the_users_functions():
    kept: list[int] = []
    position = CallbackPosition(lambda: kept[-1] if kept else None, kept.append)
    position.save(5)
    assert position.load() == 5


def test_every_name_the_package_offers_is_there():
    import ct1_client

    assert sorted(ct1_client.__all__) == sorted(ct1_client._HOMES)
    for name in ct1_client.__all__:
        assert getattr(ct1_client, name).__name__ == name
    with pytest.raises(AttributeError):
        ct1_client.Nothing  # noqa: B018


def test_a_mappings_own_type_is_typed_by_its_object():
    own = parse_event(envelope("order.cancelled"))
    assert isinstance(own.data.record, Order) and own.data.record.total == Decimal("59.90")  # type: ignore[union-attr]


def test_consume_by_long_poll_needs_a_wait():
    from ct1_client import Client

    with Client("http://127.0.0.1:9", "k") as ct1, pytest.raises(ValueError, match="wait > 0"):
        ct1.consume(print, mode="poll", wait=0)


async def test_the_async_consumer_leaves_a_programs_own_signal_handler_alone():
    import asyncio
    import signal

    from ct1_client import AsyncClient

    def mine(signum: int, frame: object) -> None: ...

    stop = asyncio.Event()
    stop.set()  # returns before any request
    before = signal.signal(signal.SIGTERM, mine)
    try:
        async with AsyncClient("http://127.0.0.1:9", "k") as ct1:
            await ct1.consume(print, stop=stop)
        assert signal.getsignal(signal.SIGTERM) is mine
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        async with AsyncClient("http://127.0.0.1:9", "k") as ct1:
            await ct1.consume(print, stop=stop)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # its own, taken away again
    finally:
        signal.signal(signal.SIGTERM, before)


_TEXT = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=40
)


@given(
    messages=st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=10**12),
            st.from_regex(r"[a-z]{1,8}\.[a-z_]{1,12}", fullmatch=True),
            st.lists(_TEXT, min_size=1, max_size=3),
        ),
        max_size=8,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
    crlf=st.booleans(),
    keepalives=st.booleans(),
)
def test_sse_parsing_does_not_depend_on_where_the_network_cut_the_bytes(messages, cuts, crlf, keepalives):
    """Whatever the chunks a stream arrives in, the same messages come out, each data line
    put back together, UTF-8 split across chunks included."""
    nl = "\r\n" if crlf else "\n"
    text = f"retry: 1000{nl}{nl}"
    for event_id, kind, lines in messages:
        if keepalives:
            text += f": keep-alive{nl}{nl}"
        text += f"id: {event_id}{nl}event: {kind}{nl}" + "".join(f"data: {line}{nl}" for line in lines) + nl
    raw = text.encode("utf-8")
    points = sorted({c % (len(raw) + 1) for c in cuts})
    parser = _core.SseParser()
    got = []
    for start, end in zip([0, *points], [*points, len(raw)], strict=True):
        got += parser.feed(raw[start:end])
    assert [(m.id, m.event, m.data) for m in got] == [
        (str(i), kind, "\n".join(lines)) for i, kind, lines in messages
    ]
