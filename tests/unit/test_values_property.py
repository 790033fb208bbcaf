"""No value stops capture, and none is changed on the way: generated values of every type
wal2json sends go through decode -> mapping -> the outbox writer (a real SQLite file), and
the envelope a receiver reads, parsed exactly, holds what Postgres holds.

With both decoders: the compiled one (when built) and the Python reference.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc import decode as decoding
from cdc.decode import RowChange, decode, decode_python
from cdc.mapping import apply, parse_mapping
from common.jsontext import JsonText, dumps, loads
from outbox import store
from outbox.store import Route, Router
from outbox.writer import OutboxWriter
from tests.outbox_helpers import same_json

MAPPING = parse_mapping(
    """
[[rule]]
table = "public.t"
on = ["insert", "update", "delete"]
emit = "thing.changed"
object = "thing"
key = "id"
"""
)
DEEP = 5000  # levels of nesting in a json value: past orjson (254 out, 1024 in) and Python's ~1000


@dataclass(frozen=True)
class Col:
    type: str  # as wal2json names it (include-types)
    wire: str  # the JSON text wal2json writes as the value
    want: Any  # what a receiver must read: Postgres's value, exactly


def _col(ctype: str, wire: str, want: Any) -> Col:
    return Col(ctype, wire, want)


def _ints(ctype: str, bits: int) -> st.SearchStrategy[Col]:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    n = st.one_of(st.sampled_from([lo, hi, 0, -1, 1]), st.integers(lo, hi))
    return n.map(lambda v: _col(ctype, str(v), v))


def _numeric_text(digits: int, scale: int, negative: bool) -> str:
    if scale == 0:
        text = str(digits)
    else:
        whole, frac = divmod(digits, 10**scale)
        text = f"{whole}.{frac:0{scale}d}"
    return "-" + text if negative and digits else text


@st.composite
def _numeric(draw: st.DrawFn) -> Col:
    """Any size and scale (numeric prints neither an exponent nor a + sign)."""
    big = draw(st.sampled_from([10**15, 10**40, 10**400, 10**1000]))
    digits = draw(st.integers(0, big))
    scale = draw(st.integers(0, 30))
    text = _numeric_text(digits, scale, draw(st.booleans()))
    if draw(st.booleans()):
        return _col("numeric", text, text)
    # numeric(p,s): Postgres prints exactly s decimals
    precision = max(len(str(digits)), scale, 1)
    return _col(f"numeric({precision},{scale})", text, text)


@st.composite
def _money(draw: st.DrawFn) -> Col:
    """numeric(p,s) with p <= 15: the fast path through a double."""
    precision = draw(st.integers(1, 15))
    scale = draw(st.integers(0, precision))
    text = _numeric_text(draw(st.integers(0, 10**precision - 1)), scale, draw(st.booleans()))
    return _col(f"numeric({precision},{scale})", text, text)


def _floats() -> st.SearchStrategy[Col]:
    finite = st.one_of(
        st.floats(allow_nan=False, allow_infinity=False).map(lambda f: _col("double precision", repr(f), f)),
        st.floats(width=32, allow_nan=False, allow_infinity=False).map(lambda f: _col("real", repr(f), f)),
    )
    # NaN and ±Infinity: wal2json writes null (a documented limit)
    special = st.sampled_from(["double precision", "real"]).map(lambda t: _col(t, "null", None))
    return finite | special


def _text_value() -> st.SearchStrategy[str]:
    plain = st.text(st.characters(exclude_characters="\x00"))  # text holds no NUL
    awkward = st.sampled_from(['quote " backslash \\ / \b\f\n\r\t \x01 \x1f é 漢 🚀 \u2028', "\\u0041", ""])
    huge = st.sampled_from(["x" * 300_000, "漢🚀" * 100_000])
    return st.one_of(plain, awkward, huge)


@st.composite
def _text(draw: st.DrawFn) -> Col:
    value = draw(_text_value())
    ctype = draw(st.sampled_from(["text", "character varying", "character varying(20)"]))
    return _col(ctype, json.dumps(value, ensure_ascii=draw(st.booleans())), value)


_JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(10**40), 10**40),
    st.sampled_from([12345678901234567890123, 2**64, -(2**64) - 1, 2**63, -(2**63) - 1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
_JSON_VALUES = st.recursive(
    _JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


def _deep(levels: int, leaf: Any, as_object: bool) -> tuple[str, Any]:
    """A value nested ``levels`` deep, as jsonb prints it and as a Python value."""
    value = leaf
    for _ in range(levels):
        value = {"a": value} if as_object else [value]
    text = ('{"a": ' * levels if as_object else "[" * levels) + json.dumps(leaf)
    return text + ("}" if as_object else "]") * levels, value


@st.composite
def _json(draw: st.DrawFn) -> Col:
    ctype = draw(st.sampled_from(["json", "jsonb"]))
    if draw(st.integers(0, 4)) == 0:
        leaf = draw(st.sampled_from([12345678901234567890123, "x", None, 1.5]))
        text, value = _deep(draw(st.sampled_from([300, 1100, DEEP])), leaf, draw(st.booleans()))
    else:
        value = draw(_JSON_VALUES)
        text = json.dumps(value)  # jsonb's spacing: ", " and ": "
    # wal2json quotes json and jsonb: a JSON string holding the value's text
    return _col(ctype, json.dumps(text, ensure_ascii=draw(st.booleans())), value)


@st.composite
def _array(draw: st.DrawFn) -> Col:
    """Arrays of every kind arrive as Postgres's text form."""
    ctype = draw(st.sampled_from(["integer[]", "text[]", "numeric[]", "jsonb[]", "boolean[][]"]))
    items = draw(st.lists(st.one_of(st.integers().map(str), st.just("NULL"), _text_value().map(json.dumps))))
    text = "{" + ",".join(items) + "}"
    return _col(ctype, json.dumps(text), text)


@st.composite
def _timestamptz(draw: st.DrawFn) -> Col:
    at = draw(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)))
    day = f"{at.year:04d}-{at.month:02d}-{at.day:02d}"
    clock = f"{at.hour:02d}:{at.minute:02d}:{at.second:02d}"
    fraction = f".{at.microsecond:06d}".rstrip("0") if at.microsecond else ""
    wire = f"{day} {clock}{fraction}+00"  # the replication session runs in UTC
    return _col("timestamp with time zone", json.dumps(wire), f"{day}T{clock}.{at.microsecond:06d}Z")


@st.composite
def _domain(draw: st.DrawFn) -> Col:
    """A domain's value, with include-domain-data-type: typed by the base type, quoted."""
    kind = draw(st.sampled_from(["integer", "bigint", "smallint", "numeric", "boolean", "double", "bytea"]))
    if kind in ("integer", "bigint", "smallint"):
        bits = {"integer": 32, "bigint": 64, "smallint": 16}[kind]
        n = draw(st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
        return _col(kind, json.dumps(str(n)), n)
    if kind == "numeric":
        col = draw(_numeric() | _money())
        return _col(col.type, json.dumps(col.wire), col.want)
    if kind == "boolean":
        flag = draw(st.booleans())
        return _col("boolean", json.dumps("t" if flag else "f"), flag)
    if kind == "double":
        f = draw(st.floats(allow_nan=False, allow_infinity=False))
        return _col("double precision", json.dumps(repr(f)), f)
    data = draw(st.binary(max_size=20))
    return _col("bytea", json.dumps("\\x" + data.hex()), data.hex())


def _bytea() -> st.SearchStrategy[Col]:
    return st.binary(max_size=40).map(lambda b: _col("bytea", json.dumps(b.hex()), b.hex()))


_ANY = st.one_of(
    _ints("smallint", 16),
    _ints("integer", 32),
    _ints("bigint", 64),
    _numeric(),
    _money(),
    _floats(),
    st.booleans().map(lambda b: _col("boolean", json.dumps(b), b)),
    _text(),
    _json(),
    _array(),
    _timestamptz(),
    _bytea(),
    _domain(),
    st.sampled_from(["integer", "numeric", "jsonb", "text", "timestamp with time zone"]).map(
        lambda t: _col(t, "null", None)
    ),
)


def _message(action: str, row_id: int, cols: list[Col], old: list[Col] | None = None) -> bytes:
    def columns(values: list[Col]) -> str:
        items = [f'{{"name":"id","type":"bigint","value":{row_id}}}']
        items += [
            f'{{"name":"c{n}","type":{json.dumps(c.type)},"value":{c.wire}}}' for n, c in enumerate(values)
        ]
        return "[" + ",".join(items) + "]"

    parts = [f'"action":"{action}","xid":7,"lsn":"0/16B3748","schema":"public","table":"t"']
    if action != "D":
        parts.append('"columns":' + columns(cols))
    if old is not None:
        parts.append('"identity":' + columns(old))
    parts.append('"pk":[{"name":"id","type":"bigint"}]')
    return ("{" + ",".join(parts) + "}").encode()


def _record(row_id: int, cols: list[Col]) -> dict[str, Any]:
    return {"id": row_id, **{f"c{n}": c.want for n, c in enumerate(cols)}}


# -- reading as a receiver does -------------------------------------------------------------


@contextmanager
def _deep_enough() -> Iterator[None]:
    """The test's own exact parser (json.loads) recurses: room for DEEP levels."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * DEEP))
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


# -- the property ---------------------------------------------------------------------------


@pytest.fixture(params=["compiled", "python"])
def decoder(request: pytest.FixtureRequest) -> Any:
    if request.param == "compiled":
        if not decoding.COMPILED:
            pytest.skip("cdc._wal2json is not built")
        return lambda payload: decode(memoryview(payload))
    return decode_python


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[OutboxWriter]:
    w = OutboxWriter(store.open_outbox(tmp_path / "outbox.db"), Router([Route("ct2", ("*",))]))
    yield w
    w.close()


def _capture(
    writer: OutboxWriter, change: RowChange, shadow: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """What capture does with one change; the envelopes as a receiver parses them."""
    first = writer.last_event_id
    for draft in apply(MAPPING, "public.t", change, shadow):
        data = {
            "object": draft.object,
            "id": draft.entity_id,
            "record": draft.record,
            "previous": draft.previous,
        }
        at = "2026-11-25T00:00:00.000000Z"
        writer.add(
            draft.type, draft.object, draft.entity_id, data, at, draft.table, draft.op, change.lsn, change.xid
        )
    writer.commit("slot", 1)
    with _deep_enough():
        return [json.loads(store.envelope_json(r)) for r in store.iter_events(writer.conn, after=first)]


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(new=st.lists(_ANY, min_size=1, max_size=5), old=st.lists(_ANY, min_size=1, max_size=5))
def test_every_value_reaches_the_receiver_exactly(decoder, writer, new, old):
    old = (old * len(new))[: len(new)]  # the same columns before the update
    for action, cols, identity in (("I", new, None), ("U", new, old), ("D", [], old)):
        change = decoder(_message(action, 42, cols, identity))
        assert isinstance(change, RowChange)
        (event,) = _capture(writer, change)
        data = event["data"]
        want = _record(42, identity if action == "D" else cols)
        assert data["id"] == 42
        assert same_json(data["record"], want)
        if action == "U":  # previous: the old value of every column whose value changed
            previous = data["previous"]
            for n, (before, after) in enumerate(zip(old, new, strict=True)):
                if same_json(before.want, after.want) and before.type == after.type:
                    assert f"c{n}" not in previous
                elif f"c{n}" in previous:
                    assert same_json(previous[f"c{n}"], before.want)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cols=st.lists(_ANY, min_size=1, max_size=5))
def test_the_shadow_gives_back_what_it_was_given(decoder, writer, cols):
    # Tables without REPLICA IDENTITY FULL: old values come from the shadow in SQLite.
    change = decoder(_message("I", 7, cols))
    assert isinstance(change, RowChange)
    writer.shadow_put("public.t", "7", dict(change.new))
    writer.commit("slot", 1)  # to SQLite, out of the in-memory buffer
    shadow = writer.shadow_get("public.t", "7")
    assert shadow is not None
    assert {k: type(v) for k, v in shadow.items()} == {k: type(v) for k, v in change.new.items()}
    assert shadow == change.new
    # the same values again: nothing changed, so previous is empty
    same = decoder(_message("U", 7, cols))
    assert isinstance(same, RowChange)
    (event,) = _capture(writer, same, shadow)
    assert event["data"]["previous"] == {}


# -- the reports, as they were ---------------------------------------------------------------


def test_a_jsonb_integer_past_64_bits_is_written_and_read_back_exactly(decoder, writer):
    # issue 9: TypeError: Integer exceeds 64-bit range, in the writer, at every restart
    col = _col("jsonb", json.dumps('{"big": 12345678901234567890123}'), {"big": 12345678901234567890123})
    change = decoder(_message("I", 1, [col]))
    (event,) = _capture(writer, change)
    assert event["data"]["record"]["c0"] == {"big": 12345678901234567890123}
    assert '"c0":{"big": 12345678901234567890123}' in store.envelope_json(
        store.get_event(writer.conn, event["id"]) or ()
    )


def test_lossless_json_helpers():
    big = 12345678901234567890123
    assert loads(dumps({"n": big, "m": -(2**64), "j": JsonText('[1, {"x": 2.5}]')})) == {
        "n": big,
        "m": -(2**64),
        "j": [1, {"x": 2.5}],
    }
    # a json value is written as its text, even what no double can hold
    assert dumps({"j": JsonText('[1, {"x": 2e400}]')}) == b'{"j":[1, {"x": 2e400}]}'
    text, value = _deep(DEEP, big, as_object=False)
    with _deep_enough():
        assert same_json(json.loads(dumps(value)), value)  # any depth, big integers included
    assert dumps(JsonText(text)) == text.encode()
    assert JsonText('{"a": 1}') == {"a": 1} and JsonText('"x"') == "x" and JsonText("null") == None  # noqa: E711
    assert JsonText('{"a": 1}') != JsonText('{"a":1}')  # jsonb prints one text per value
    assert JsonText(text) != value  # too deep to parse here: unequal to all but its own text
    assert JsonText(text) == JsonText(text)
    assert dumps("\ud800") == b'"\\ud800"'  # a lone surrogate (accepted by json.loads) is escaped
    with pytest.raises(ValueError):
        loads("[NaN]")
    with pytest.raises(ValueError):
        loads("[1e400]")
