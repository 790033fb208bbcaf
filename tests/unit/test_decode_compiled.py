"""The compiled row decoder (cdc._wal2json) against the Python reference decoder.

Both must give the same RowChange, value for value and type for type, for anything
wal2json writes; and for anything else, either the same result or the same DecodeError.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc import decode as decoding
from cdc.decode import Begin, Commit, RowChange, decode, decode_python
from common.errors import DecodeError

compiled_only = pytest.mark.skipif(
    not decoding.COMPILED, reason="cdc._wal2json is not built (no C compiler at install)"
)


def test_the_compiled_decoder_is_built_wherever_a_compiler_is():
    # The skips below must never hide the compiled path on a machine that can build it.
    if shutil.which("cc") or shutil.which("gcc"):
        assert decoding.COMPILED, "a C compiler is here but cdc._wal2json is not built: pip install -e ."


def _same(a: object, b: object) -> None:
    assert type(a) is type(b)
    assert a == b
    if isinstance(a, (Begin, Commit)):  # (== holds for 1 and True, 0 and -0.0)
        assert [type(v) for v in vars_of(a)] == [type(v) for v in vars_of(b)]  # type: ignore[arg-type]
    if isinstance(a, RowChange):
        assert isinstance(b, RowChange)
        for mine, theirs in ((a.new, b.new), (a.old or {}, b.old or {})):
            assert list(mine) == list(theirs)
            for key, value in mine.items():
                assert type(value) is type(theirs[key]), key


def _timestamp() -> st.SearchStrategy[str]:
    base = st.datetimes(min_value=datetime(1000, 1, 1)).map(lambda d: d.strftime("%Y-%m-%d %H:%M:%S"))
    fraction = st.one_of(st.just(""), st.integers(1, 999_999).map(lambda n: f".{n:06d}".rstrip("0") or ".0"))
    return st.one_of(
        st.builds(lambda b, f: f"{b}{f}+00", base, fraction),
        st.builds(lambda b, f: f"{b}{f}+05:30", base, fraction),
        st.sampled_from(["infinity", "-infinity"]),
    )


def _numeric(precision: int, scale: int) -> st.SearchStrategy[str]:
    limit = 10 ** (precision - scale) - 1
    return st.integers(-limit * 10**scale, limit * 10**scale).map(
        lambda n: format(Decimal(n).scaleb(-scale), f".{scale}f")
    )


# (type, strategy of the JSON text wal2json writes for a value of it)
_COLUMN_TYPES = [
    ("bigint", st.integers(-(2**63), 2**63 - 1).map(str)),
    ("integer", st.integers(-(2**31), 2**31 - 1).map(str)),
    ("text", st.text()),
    ("character varying", st.text(max_size=5)),
    ("uuid", st.uuids().map(str)),
    ("boolean", st.sampled_from(["true", "false"])),
    ("numeric(12,2)", _numeric(12, 2)),
    ("numeric(15,0)", _numeric(15, 0)),
    ("numeric(20,4)", _numeric(20, 4)),
    ("numeric", st.decimals(allow_nan=False, allow_infinity=False).map(lambda d: format(d, "f"))),
    ("double precision", st.floats(allow_nan=False, allow_infinity=False).map(repr)),
    ("timestamp with time zone", _timestamp()),
    (
        "timestamp without time zone",
        st.datetimes(min_value=datetime(1000, 1, 1)).map(lambda d: d.isoformat(sep=" ")),
    ),
    (
        "jsonb",
        st.recursive(st.none() | st.integers() | st.text(max_size=5), lambda c: st.lists(c, max_size=3)),
    ),
    # a domain's value: quoted by wal2json, typed by its base type (include-domain-data-type)
    ("integer", st.one_of(st.integers(-(2**31), 2**31 - 1).map(str), st.text(max_size=3)).map(json.dumps)),
    ("bigint", st.integers(-(2**63), 2**63 - 1).map(lambda n: json.dumps(str(n)))),
    ("smallint", st.integers(-(2**15), 2**15 - 1).map(lambda n: json.dumps(str(n)))),
    ("oid", st.integers(0, 2**32 - 1).map(lambda n: json.dumps(str(n)))),
    ("boolean", st.sampled_from(["t", "f", "true", ""]).map(json.dumps)),
    (
        "double precision",
        st.one_of(
            st.floats(allow_nan=False, allow_infinity=False).map(repr),
            st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "x"]),
        ).map(json.dumps),
    ),
    ("real", st.floats(width=32, allow_nan=False, allow_infinity=False).map(lambda f: json.dumps(repr(f)))),
    ("numeric(10,2)", _numeric(10, 2).map(json.dumps)),
    ("numeric", st.decimals(allow_nan=False, allow_infinity=False).map(lambda d: json.dumps(format(d, "f")))),
    (
        "bytea",
        st.one_of(
            st.binary(max_size=8).map(lambda b: "\\x" + b.hex()),
            st.binary(max_size=8).map(bytes.hex),
            st.sampled_from(["\\", "\\y"]),
        ).map(json.dumps),
    ),
]
_STRING_TYPES = {
    "text",
    "character varying",
    "uuid",
    "timestamp with time zone",
    "timestamp without time zone",
    "jsonb",
}


@st.composite
def _column(draw: st.DrawFn) -> str:
    ctype, values = draw(st.sampled_from(_COLUMN_TYPES))
    name = draw(st.text(min_size=1, max_size=12))
    ascii_only = draw(st.booleans())
    if draw(st.integers(0, 9)) == 0:
        value = "null"
    elif ctype == "jsonb":
        value = json.dumps(json.dumps(draw(values)), ensure_ascii=ascii_only)
    elif ctype in _STRING_TYPES:
        value = json.dumps(draw(values), ensure_ascii=ascii_only)
    else:
        value = draw(values)
    return (
        '{"name":' + json.dumps(name, ensure_ascii=ascii_only) + ',"type":' + json.dumps(ctype) + ',"value":'
        f"{value}}}"
    )


@st.composite
def _row_message(draw: st.DrawFn) -> bytes:
    action = draw(st.sampled_from("IUD"))
    parts = [
        f'"action":"{action}"',
        f'"xid":{draw(st.integers(1, 2**32))}',
        '"timestamp":"2026-11-25 15:07:53.877066+00"',
        '"lsn":"0/1A2B3C"',
        '"schema":' + json.dumps(draw(st.sampled_from(["public", "shop", "Ünïcode"]))),
        '"table":' + json.dumps(draw(st.text(min_size=1, max_size=10))),
    ]
    if action != "D":
        parts.append('"columns":[' + ",".join(draw(st.lists(_column(), max_size=8))) + "]")
    if action != "I" and draw(st.booleans()):
        parts.append('"identity":[' + ",".join(draw(st.lists(_column(), max_size=4))) + "]")
    pk = draw(st.lists(st.text(min_size=1, max_size=5), max_size=2))
    parts.append('"pk":[' + ",".join('{"name":' + json.dumps(p) + ',"type":"bigint"}' for p in pk) + "]")
    return ("{" + ",".join(parts) + "}").encode()


def vars_of(edge: Begin | Commit) -> list[object]:
    return [edge.xid, edge.commit_time, edge.lsn, edge.end_lsn]


def _lsn() -> st.SearchStrategy[str]:
    part = st.integers(0, 2**32 - 1)
    return st.one_of(
        st.builds(lambda a, b: f"{a:X}/{b:X}", part, part),
        st.builds(lambda a, b: f"{a:x}/{b:08x}", part, part),  # lower case, leading zeros
        st.sampled_from(["0/0", "FFFFFFFF/FFFFFFFF", "0/", "/1", "1/2/3", "0x1/2", "123456789/1", "g/1"]),
        st.sampled_from([" 1/2", "1_0/2", "+1/2", "1/2 ", "\uff11/2", "0/\\u0031"]),
    )


@st.composite
def _edge_message(draw) -> bytes:
    """A begin or commit as wal2json writes one (and some it never would: keys missing,
    repeated or unknown, values of other types)."""
    members = [
        ("action", draw(st.sampled_from(["B", "C"]))),
        ("xid", draw(st.one_of(st.integers(0, 2**32), st.sampled_from([7.0, -1, 0, 10**19, "7", None])))),
        ("timestamp", draw(_timestamp())),
        ("lsn", draw(_lsn())),
        ("nextlsn", draw(_lsn())),
    ]
    for key in draw(st.lists(st.sampled_from(["xid", "timestamp", "lsn", "nextlsn"]), max_size=1)):
        members = [m for m in members if m[0] != key]  # a key missing
    extra = draw(st.sampled_from([None, ("xid", 8), ("lsn", "0/99"), ("origin", "ünï"), ("action", "C")]))
    if extra is not None:  # repeated (the last one counts) or unknown
        members.insert(draw(st.integers(1, len(members))), extra)
    return (
        "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v, ensure_ascii=False)}" for k, v in members) + "}"
    ).encode()


@compiled_only
@settings(max_examples=200)
@given(
    st.sampled_from(["B", "C"]),
    st.integers(0, 2**32),
    _timestamp().filter(lambda t: t.endswith("+00")),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
)
def test_begins_and_commits_as_wal2json_writes_them_never_need_python(action, xid, stamp, lsn, next_lsn):
    payload = json.dumps(
        {
            "action": action,
            "xid": xid,
            "timestamp": stamp,
            "lsn": f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}",
            "nextlsn": f"{next_lsn >> 32:X}/{next_lsn & 0xFFFFFFFF:X}",
        },
        separators=(",", ":"),
    ).encode()
    _same(decoding._compiled.decode_row(payload), decode_python(payload))


@compiled_only
@settings(max_examples=400)
@given(_row_message())
def test_compiled_and_python_decoders_agree_on_row_messages(payload):
    _same(decode(memoryview(payload)), decode_python(payload))


def _outcome(fn, payload):
    try:
        return fn(payload)
    except DecodeError:
        return DecodeError


def _agree(payload: bytes) -> None:
    """Both decoders give the same result, or both the same DecodeError."""
    mine, theirs = _outcome(decode, memoryview(payload)), _outcome(decode_python, payload)
    if mine is DecodeError or theirs is DecodeError:
        assert mine is theirs
    else:
        _same(mine, theirs)


@compiled_only
@settings(max_examples=400)
@given(st.one_of(_row_message(), _edge_message()), st.data())
def test_damaged_messages_give_the_same_result_or_the_same_error(payload, data):
    # cut, overwrite or insert bytes anywhere: the compiled path may only ever agree
    at = data.draw(st.integers(0, len(payload)))
    how = data.draw(st.sampled_from(["cut", "overwrite", "insert"]))
    noise = data.draw(
        st.binary(min_size=1, max_size=3) | st.sampled_from([b'"', b",", b"}", b"]", b"\\", b"-0"])
    )
    if how == "cut":
        damaged = payload[:at]
    elif how == "overwrite":
        damaged = payload[:at] + noise + payload[at + len(noise) :]
    else:
        damaged = payload[:at] + noise + payload[at:]
    _agree(damaged)


@compiled_only
def test_truncates_and_messages_are_left_to_python():
    truncate = b'{"action":"T","xid":7,"lsn":"0/10","schema":"public","table":"t"}'
    message = b'{"action":"M","transactional":false,"prefix":"ct1-cdc","content":"x","lsn":"0/10"}'
    for payload in (truncate, message):
        assert decoding._compiled.decode_row(payload) is None
        _same(decode(payload), decode_python(payload))


@compiled_only
@settings(max_examples=400)
@given(_edge_message())
def test_compiled_and_python_decoders_agree_on_begins_and_commits(payload):
    _agree(payload)


@compiled_only
def test_begins_and_commits_written_the_usual_way_are_decoded_compiled():
    begin = (
        b'{"action":"B","xid":7,"timestamp":"2026-11-25 15:07:53+00","lsn":"0/10","nextlsn":"16/B374D848"}'
    )
    commit = b'{"action":"C","xid":7,"timestamp":"2026-11-25 15:07:53.1+00","lsn":"0/10","nextlsn":"0/20"}'
    assert decoding._compiled.decode_row(begin) == Begin(7, "2026-11-25T15:07:53.000000Z", 16, 0x16B374D848)
    assert decoding._compiled.decode_row(commit) == Commit(7, "2026-11-25T15:07:53.100000Z", 16, 32)


@compiled_only
def test_a_numeric_text_postgres_would_not_write_goes_to_python():
    # numeric(12,2) always prints two decimals; anything else takes the Python path
    raw = (
        b'{"action":"I","xid":1,"lsn":"0/1","schema":"public","table":"t",'
        b'"columns":[{"name":"n","type":"numeric(12,2)","value":1.5}],"pk":[]}'
    )
    with pytest.raises(ValueError):
        decoding._compiled.decode_row(raw)
    assert decode(raw).new == {"n": "1.50"}


# -- ordinary rows take the compiled path ---------------------------------------------------
#
# Every test above compares the compiled decoder with the Python one through decode(), which
# falls back to Python whenever the compiled decoder declines: a compiled decoder that
# declined every row would pass them all.  These show it decodes ordinary rows itself.


def _row(action: str, table: str, columns: str | None, identity: str | None = None) -> bytes:
    parts = [
        f'"action":"{action}","xid":48213,"timestamp":"2026-11-25 15:07:53.877066+00","lsn":"0/1A2B3C4"',
        f'"schema":"public","table":"{table}"',
    ]
    if columns is not None:
        parts.append(f'"columns":[{columns}]')
    if identity is not None:
        parts.append(f'"identity":[{identity}]')
    parts.append('"pk":[{"name":"id","type":"bigint"}]')
    return ("{" + ",".join(parts) + "}").encode()


# As wal2json 2.5 writes them for the sample marketplace, in capture's UTC session.
ORDINARY_ROWS = {
    "users insert": _row(
        "I",
        "users",
        '{"name":"id","type":"bigint","value":42},{"name":"name","type":"text","value":"Zoë \\"Z\\" Ñandú"},'
        '{"name":"email","type":"text","value":"zoe@example.com"},{"name":"password","type":"text","value":"x"},'
        '{"name":"remember_token","type":"text","value":null},{"name":"role","type":"text","value":"customer"},'
        '{"name":"email_verified_at","type":"timestamp with time zone","value":null},'
        '{"name":"created_at","type":"timestamp with time zone","value":"2026-11-25 15:07:53.877066+00"},'
        '{"name":"updated_at","type":"timestamp with time zone","value":"2026-11-25 15:07:53+00"}',
    ),
    "orders status update": _row(
        "U",
        "orders",
        '{"name":"id","type":"bigint","value":77},{"name":"user_id","type":"bigint","value":42},'
        '{"name":"status","type":"character varying(32)","value":"shipped"},'
        '{"name":"total","type":"numeric(12,2)","value":59.90},{"name":"paid","type":"boolean","value":true},'
        '{"name":"items","type":"integer","value":3},{"name":"weight","type":"double precision","value":1.25},'
        '{"name":"updated_at","type":"timestamp with time zone","value":"2026-11-25 15:07:53.1+00"}',
        '{"name":"id","type":"bigint","value":77},{"name":"status","type":"character varying(32)","value":"paid"}',
    ),
    "reviews delete": _row("D", "reviews", None, '{"name":"id","type":"bigint","value":9}'),
    "products insert": _row(
        "I",
        "products",
        '{"name":"id","type":"bigint","value":5},{"name":"price","type":"numeric(10,2)","value":1234.00},'
        '{"name":"cost","type":"numeric","value":0.3333333333333333333333},'
        '{"name":"uid","type":"uuid","value":"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"},'
        '{"name":"day","type":"date","value":"2026-11-25"},'
        '{"name":"attrs","type":"jsonb","value":"{\\"color\\": \\"red\\", \\"sizes\\": [38, 39]}"}',
    ),
}


def _decodes_without_python(payload: bytes) -> RowChange:
    """``decode`` of a row message, failing if it falls back to the Python decoder."""

    def python_path(payload: object) -> object:
        raise AssertionError("the row fell back to the Python decoder")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decoding, "decode_python", python_path)
        row = decode(memoryview(payload))
    assert isinstance(row, RowChange)
    return row


@compiled_only
@pytest.mark.parametrize("payload", ORDINARY_ROWS.values(), ids=ORDINARY_ROWS.keys())
def test_the_compiled_decoder_itself_decodes_ordinary_rows(payload):
    row = decoding._compiled.decode_row(payload)  # None or ValueError: declined
    assert isinstance(row, RowChange)
    _same(row, decode_python(payload))
    _same(_decodes_without_python(payload), row)


@compiled_only
def test_ordinary_values_need_no_python_converter():
    """Per value, the compiled decoder calls back into Python only for json/jsonb (kept as
    their text); timestamptz in a UTC session, numbers, booleans and text are its own."""
    called: list[str] = []

    def convert(ctype: str, value: object) -> object:
        called.append(ctype)
        return decoding._convert(ctype, value)

    decoding._compiled.setup(RowChange, convert)
    try:
        for payload in ORDINARY_ROWS.values():
            _decodes_without_python(payload)
    finally:
        decoding._compiled.setup(RowChange, decoding._convert)
    assert called == ["jsonb"]


def test_the_check_catches_a_compiled_decoder_that_declines_every_row(monkeypatch):
    class Declining:
        @staticmethod
        def decode_row(payload: object) -> None:
            raise ValueError("declined")

    monkeypatch.setattr(decoding, "_compiled", Declining)
    assert decode(ORDINARY_ROWS["users insert"]).new["id"] == 42  # the fallback hides it ...
    with pytest.raises(AssertionError, match="fell back to the Python decoder"):
        _decodes_without_python(ORDINARY_ROWS["users insert"])  # ... this does not
