"""wal2json v2 decoding: exact numeric text, unicode, TOAST-absent columns, LSNs.

Every test runs twice: with the compiled row decoder (when built) and with the Python
decoder alone.
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc import decode as decoding
from cdc.decode import Begin, Commit, Message, RowChange, Truncate, decode, iso_utc
from common.errors import DecodeError
from common.formats import format_lsn, parse_lsn
from common.jsontext import JsonText, dumps


@pytest.fixture(scope="module", autouse=True, params=["compiled", "python"])
def decoder(request):
    if request.param == "compiled" and not decoding.COMPILED:
        pytest.skip("cdc._wal2json is not built")
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "python":
            patch.setattr(decoding, "_compiled", None)
        yield request.param


def _row(action: str, columns: list[dict[str, object]] | None, identity=None, pk=("id",)) -> bytes:
    obj: dict[str, object] = {
        "action": action,
        "xid": 7,
        "lsn": "0/16B3748",
        "schema": "public",
        "table": "orders",
        "pk": [{"name": p, "type": "bigint"} for p in pk],
    }
    if columns is not None:
        obj["columns"] = columns
    if identity is not None:
        obj["identity"] = identity
    return json.dumps(obj, ensure_ascii=False).encode()


def test_begin_and_commit_carry_commit_time_and_positions():
    b = decode(
        b'{"action":"B","xid":727,"timestamp":"2026-11-25 15:07:48.8999+00","lsn":"0/1530098","nextlsn":"0/1530690"}'
    )
    assert b == Begin(xid=727, commit_time="2026-11-25T15:07:48.899900Z", lsn=0x1530098, end_lsn=0x1530690)
    c = decode(
        b'{"action":"C","xid":727,"timestamp":"2026-11-25 17:07:48+02","lsn":"0/1530098","nextlsn":"0/1530690"}'
    )
    assert isinstance(c, Commit) and c.commit_time == "2026-11-25T15:07:48.000000Z"


def test_numeric_keeps_its_exact_text_even_beyond_float_precision():
    raw = (
        b'{"action":"I","xid":1,"lsn":"0/1","schema":"public","table":"t","columns":['
        b'{"name":"a","type":"numeric","value":12345678901234567890.123456789},'
        b'{"name":"b","type":"numeric(12,2)","value":59.90},'
        b'{"name":"c","type":"numeric","value":7},'
        b'{"name":"d","type":"double precision","value":0.5},'
        b'{"name":"e","type":"integer","value":3}],"pk":[]}'
    )
    change = decode(raw)
    assert isinstance(change, RowChange)
    assert change.new == {"a": "12345678901234567890.123456789", "b": "59.90", "c": "7", "d": 0.5, "e": 3}


def test_unicode_jsonb_and_timestamptz_are_normalised():
    change = decode(
        _row(
            "I",
            [
                {"name": "name", "type": "text", "value": "Zoë 李 ★"},
                {"name": "addr", "type": "jsonb", "value": '{"city": "Kraków"}'},
                {"name": "at", "type": "timestamp with time zone", "value": "2026-01-02 03:04:05+01"},
                {"name": "inf", "type": "timestamp with time zone", "value": "infinity"},
            ],
        )
    )
    assert isinstance(change, RowChange)
    assert change.new == {
        "name": "Zoë 李 ★",
        "addr": {"city": "Kraków"},
        "at": "2026-01-02T02:04:05.000000Z",
        "inf": "infinity",
    }


def test_update_without_unchanged_toast_column_leaves_it_absent():
    change = decode(
        _row(
            "U",
            [{"name": "id", "type": "bigint", "value": 1}, {"name": "s", "type": "text", "value": "c"}],
            identity=[{"name": "id", "type": "bigint", "value": 1}],
        )
    )
    assert isinstance(change, RowChange)
    assert change.op == "update" and change.new == {"id": 1, "s": "c"} and change.old == {"id": 1}
    assert "big" not in change.new


def test_delete_truncate_message_and_no_pk():
    d = decode(_row("D", None, identity=[{"name": "id", "type": "bigint", "value": 9}], pk=()))
    assert isinstance(d, RowChange) and d.op == "delete" and d.new == {} and d.old == {"id": 9} and d.pk == ()
    t = decode(b'{"action":"T","xid":2,"lsn":"0/10","schema":"s","table":"x"}')
    assert t == Truncate(table="s.x", xid=2, lsn=16)
    m = decode(
        b'{"action":"M","xid":null,"lsn":"0/20","transactional":false,"prefix":"ct1-cdc","content":"hb"}'
    )
    assert m == Message(prefix="ct1-cdc", content="hb", lsn=32, transactional=False)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"[]",
        b'{"action":"X"}',
        b'{"action":"I"}',
        b'{"action":"B","xid":1,"timestamp":"x","lsn":"0/1","nextlsn":"0/2"}',
        b'{"action":"C","xid":1,"timestamp":"2026-01-01 00:00:00+00","lsn":"zz","nextlsn":"0/2"}',
        b"\xff\xfe",
    ],
)
def test_malformed_messages_raise_decode_error(payload):
    with pytest.raises(DecodeError):
        decode(payload)


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_lsn_text_round_trips(value):
    assert parse_lsn(format_lsn(value)) == value


@given(st.decimals(allow_nan=False, allow_infinity=False, places=4, min_value=-(10**15), max_value=10**15))
def test_any_numeric_literal_survives_exactly(value):
    text = format(value, "f")
    raw = (
        '{"action":"I","xid":1,"lsn":"0/1","schema":"public","table":"t","columns":'
        '[{"name":"n","type":"numeric","value":' + text + '}],"pk":[]}'
    )
    change = decode(raw.encode())
    assert isinstance(change, RowChange)
    assert Decimal(change.new["n"]) == value
    assert change.new["n"] == text


@given(st.text(), st.text(min_size=1, max_size=20))
def test_any_text_value_and_column_name_survive(value, name):
    change = decode(_row("I", [{"name": name, "type": "text", "value": value}]))
    assert isinstance(change, RowChange)
    assert change.new == {name: value}


def test_iso_utc_rejects_garbage():
    with pytest.raises(DecodeError):
        iso_utc("yesterday")


def _numeric_row(ctype: str, literal: str) -> bytes:
    return (
        '{"action":"I","xid":1,"lsn":"0/1","schema":"public","table":"t","columns":'
        '[{"name":"n","type":"'
        + ctype
        + '","value":'
        + literal
        + '},{"name":"s","type":"text","value":"x"}],"pk":[]}'
    ).encode()


@pytest.mark.parametrize(
    ("ctype", "literal"),
    [
        ("numeric(12,2)", "59.90"),
        ("numeric(12,2)", "0.00"),
        ("numeric(12,2)", "-1234567890.12"),
        ("numeric(15,0)", "999999999999999"),
        ("numeric(15,6)", "123456789.000001"),
        ("numeric(16,2)", "99999999999999.99"),
        ("numeric(30,10)", "12345678901234567890.0123456789"),
        ("numeric", "0.1000"),
        ("numeric(5)", "12345"),
        ("numeric", "1" + "0" * 400),  # past a double's range
        ("numeric(1000,0)", "-" + "9" * 999),
    ],
)
def test_numeric_text_is_exact_for_every_precision(ctype, literal):
    change = decode(_numeric_row(ctype, literal))
    assert isinstance(change, RowChange)
    assert change.new["n"] == literal


@given(st.integers(min_value=0, max_value=10), st.data())
def test_property_numeric_up_to_15_digits_round_trips(scale, data):
    digits = data.draw(st.integers(min_value=-(10**15 - 1), max_value=10**15 - 1))
    value = Decimal(digits).scaleb(-scale)
    literal = format(value, f".{scale}f")
    change = decode(_numeric_row(f"numeric(15,{scale})", literal))
    assert isinstance(change, RowChange)
    assert change.new["n"] == literal


def test_jsonb_stays_the_text_postgres_wrote():
    # issue 9: {"big": 12345678901234567890123} stopped capture; no parse, nothing rounded
    text = '{"big": 12345678901234567890123, "deep": ' + "[" * 3000 + "]" * 3000 + "}"
    change = decode(_row("I", [{"name": "doc", "type": "jsonb", "value": text}]))
    assert isinstance(change, RowChange)
    assert isinstance(change.new["doc"], JsonText) and change.new["doc"] == JsonText(text)
    assert dumps(change.new) == b'{"doc":' + text.encode() + b"}"


@pytest.mark.parametrize(
    ("ctype", "quoted", "value"),
    [
        # a domain's value, as wal2json writes it with include-domain-data-type
        ("integer", "42", 42),
        ("smallint", "-32768", -32768),
        ("bigint", "9223372036854775807", 9223372036854775807),
        ("oid", "4294967295", 4294967295),
        ("numeric", "12345678901234567890.000000001", "12345678901234567890.000000001"),
        ("numeric(10,2)", "59.90", "59.90"),
        ("numeric(30,10)", "-1.0000000000", "-1.0000000000"),
        ("double precision", "1.5", 1.5),
        ("double precision", "1e+100", 1e100),
        ("real", "0.1", 0.1),
        ("double precision", "NaN", None),  # null, as for a column of the base type
        ("real", "-Infinity", None),
        ("boolean", "t", True),
        ("boolean", "f", False),
        ("bytea", "\\x00ff", "00ff"),  # wal2json strips the \x of a bytea, not of a domain's
        ("jsonb", '{"a": 1}', {"a": 1}),
        # what the type never prints stays text rather than stop capture
        ("integer", "forty-two", "forty-two"),
        ("boolean", "maybe", "maybe"),
    ],
)
def test_a_domain_arrives_as_its_base_type_gives_it(ctype, quoted, value):
    change = decode(_row("I", [{"name": "d", "type": ctype, "value": quoted}]))
    assert isinstance(change, RowChange)
    got = change.new["d"]
    assert got == value and type(got) is (JsonText if ctype == "jsonb" else type(value))


def test_without_include_domain_data_type_a_domain_stays_text():
    change = decode(_row("I", [{"name": "d", "type": "positive_int", "value": "42"}]))
    assert isinstance(change, RowChange) and change.new["d"] == "42"


def test_plain_bytea_and_numbers_are_untouched():
    change = decode(
        _row(
            "I",
            [
                {"name": "b", "type": "bytea", "value": "00ff"},
                {"name": "i", "type": "integer", "value": 7},
                {"name": "f", "type": "boolean", "value": True},
                {"name": "x", "type": "double precision", "value": 0.5},
            ],
        )
    )
    assert isinstance(change, RowChange)
    assert change.new == {"b": "00ff", "i": 7, "f": True, "x": 0.5}
