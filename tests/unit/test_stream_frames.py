"""The replication wire format: XLogData, keepalive, standby status update."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict

from cdc.stream import Keepalive, XLogData, parse_frame, plugin_options, status_update, utc_conninfo
from common.errors import SourceUnavailable

u64 = st.integers(min_value=0, max_value=2**64 - 1)


@given(u64, u64, st.binary(max_size=64))
def test_xlogdata_header_is_25_bytes_then_payload(start, end, payload):
    buf = b"w" + struct.pack(">QQq", start, end, 123) + payload
    assert parse_frame(buf) == XLogData(start, end, payload)


@given(u64, st.booleans())
def test_keepalive(end, reply):
    buf = b"k" + struct.pack(">QqB", end, 5, int(reply))
    assert parse_frame(buf) == Keepalive(end, reply)


def test_unknown_frame_is_an_error():
    with pytest.raises(SourceUnavailable):
        parse_frame(b"z123")


@pytest.mark.parametrize("frame", [b"w" + bytes(10), b"w" + bytes(23), b"k", b"k" + bytes(16)])
def test_a_frame_cut_short_is_named(frame):
    with pytest.raises(SourceUnavailable, match="cut short"):
        parse_frame(frame)


def test_status_update_layout_and_postgres_epoch():
    msg = status_update(1, 2, 3, reply=True, now=946_684_800 + 1.5)
    kind, write, flush, apply, clock, reply = struct.unpack(">cQQQqB", msg)
    assert (kind, write, flush, apply, clock, reply) == (b"r", 1, 2, 3, 1_500_000, 1)
    assert len(msg) == 34


def test_plugin_options_quote_names_and_escape_values():
    assert (
        plugin_options({"format-version": "2", "add-tables": "public.o'x"})
        == "\"format-version\" '2', \"add-tables\" 'public.o''x'"
    )


def test_the_replication_session_is_utc_after_whatever_options_the_user_gave(monkeypatch):
    monkeypatch.delenv("PGOPTIONS", raising=False)
    dsn = "host=db user=cdc options='-c statement_timeout=5s -c TimeZone=Europe/Berlin'"
    params = conninfo_to_dict(utc_conninfo(dsn))
    assert params["options"] == (
        "-c statement_timeout=5s -c TimeZone=Europe/Berlin -c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres"
    )
    assert (params["host"], params["user"]) == ("db", "cdc")
    assert conninfo_to_dict(utc_conninfo("postgresql://cdc@db/shop"))["options"] == (
        "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres"
    )
    # libpq's PGOPTIONS counts only without options in the DSN: keep it, UTC after it
    monkeypatch.setenv("PGOPTIONS", "-c work_mem=64MB")
    assert conninfo_to_dict(utc_conninfo("host=db"))["options"] == (
        "-c work_mem=64MB -c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres"
    )
