"""Real wal2json output for many column types and awkward values: the compiled and the
Python decoder read every message alike, and the values are what Postgres holds."""

from __future__ import annotations

from cdc.capture import wal2json_options
from cdc.decode import RowChange, decode, decode_python
from cdc.stream import ReplicationStream, XLogData
from config.settings import Settings

TABLE = """
CREATE TABLE odd_types (
    id          bigserial PRIMARY KEY,
    n_free      numeric,
    n_money     numeric(12,2),
    n_wide      numeric(30,10),
    n_neg_scale numeric(5,-2),
    f8          double precision,
    f4          real,
    small       smallint,
    flag        boolean,
    label       text,
    chars       char(3),
    tags        text[],
    amounts     numeric[],
    doc         jsonb,
    raw         json,
    at          timestamptz,
    at_local    timestamp,
    day         date,
    span        interval,
    ip          inet,
    blob        bytea,
    uid         uuid,
    cash        money
)
"""

ROWS = [
    # ordinary values
    "(1.5, 59.90, 12345678901234567890.0123456789, 12300, 0.1, 1.5, 7, true, 'plain', 'abc',"
    " '{a,b}', '{1.10,2.2}', '{\"k\": [1, \"x\"]}', '{\"b\": 2}', '2026-11-25 15:07:53.877066+00',"
    " '2026-11-25 15:07:53', '2026-11-25', '1 day 02:03:04', '10.0.0.1', '\\x00ff', "
    " 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 12.34)",
    # awkward ones: specials, escapes, unicode, extremes
    "('NaN', -0.00, -99999999999999999999.9999999999, -99900, 'Infinity', '-Infinity', -32768,"
    " false, E'quote \" backslash \\\\ tab \\t newline \\n bell \\x07 é 漢 🚀', '  x', '{}',"
    " '{NaN}', '\"only a string\"', '[]', 'infinity', '-infinity', '-infinity', '-1 mon',"
    " '::1/128', '\\x', '00000000-0000-0000-0000-000000000000', -0.01)",
    # a numeric past a double's range and the smallest steps
    "(1e400::numeric, 0.01, 0.0000000001, 0, 5e-324, 1e-45, 0, true, '', '', NULL, NULL, 'null',"
    " 'null', '0001-01-01 00:00:00+00', '1999-12-31 23:59:59.999999', '4713-01-01 BC', '0',"
    " '0.0.0.0/0', '\\xdeadbeef', NULL, 0)",
    # every nullable column null
    "(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
    " NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
]

COLUMNS = (
    "n_free, n_money, n_wide, n_neg_scale, f8, f4, small, flag, label, chars, tags, amounts, doc, raw,"
    " at, at_local, day, span, ip, blob, uid, cash"
)


def _messages(db, end_lsn: int) -> list[bytes]:
    stream = ReplicationStream(db.dsn, db.slot, wal2json_options(Settings(source={"dsn": db.dsn})))
    stream.start(0)
    out: list[bytes] = []
    try:
        while True:
            frame = stream.read(timeout=5.0)
            assert frame is not None, "the slot stopped before the end"
            if isinstance(frame, XLogData):
                out.append(bytes(frame.payload))
            if frame.wal_end >= end_lsn and out and out[-1].startswith(b'{"action":"C"'):
                return out
    finally:
        stream.close()


def test_both_decoders_agree_on_real_values_of_every_kind(source_db):
    with source_db.connect() as conn:
        conn.execute(TABLE)
        conn.execute("ALTER TABLE odd_types REPLICA IDENTITY FULL")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (source_db.slot,))
        for values in ROWS:
            conn.execute(f"INSERT INTO odd_types ({COLUMNS}) VALUES {values}")
        conn.execute("UPDATE odd_types SET label = label || '!', n_money = n_money + 1")
        conn.execute("DELETE FROM odd_types WHERE id = 2")
        expected = {
            row[0]: row[1:]
            for row in conn.execute(
                "SELECT id, n_free::text, n_money::text, n_wide::text, label FROM odd_types"
            )
        }
    rows = [m for m in _messages(source_db, source_db.current_lsn()) if b'"table":"odd_types"' in m]
    assert len(rows) == 4 + 4 + 1
    changes = []
    for message in rows:
        mine, theirs = decode(memoryview(message)), decode_python(message)
        assert mine == theirs
        assert isinstance(mine, RowChange) and isinstance(theirs, RowChange)
        for got, want in ((mine.new, theirs.new), (mine.old or {}, theirs.old or {})):
            assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in want.items()}
        changes.append(mine)
    # the values are Postgres's own text, exactly
    for change in (c for c in changes if c.op == "update" and c.new["id"] in expected):
        n_free, n_money, n_wide, label = expected[change.new["id"]]
        assert (change.new["n_money"], change.new["n_wide"], change.new["label"]) == (n_money, n_wide, label)
        if n_free is not None and n_free != "NaN":
            assert change.new["n_free"] == n_free
    inserted = {c.new["id"]: c.new for c in changes if c.op == "insert"}
    ordinary, awkward, huge, empty = (inserted[i] for i in (1, 2, 3, 4))
    assert ordinary["n_money"] == "59.90" and ordinary["n_wide"] == "12345678901234567890.0123456789"
    assert ordinary["at"] == "2026-11-25T15:07:53.877066Z" and ordinary["at_local"] == "2026-11-25 15:07:53"
    assert ordinary["doc"] == {"k": [1, "x"]} and ordinary["raw"] == {"b": 2}
    assert (ordinary["f8"], ordinary["small"], ordinary["flag"]) == (0.1, 7, True)
    assert awkward["label"] == 'quote " backslash \\ tab \t newline \n bell \x07 é 漢 🚀'
    assert awkward["at"] == "infinity" and awkward["day"] == "-infinity"
    assert awkward["n_wide"] == "-99999999999999999999.9999999999"
    # wal2json writes NaN and ±Infinity of numeric and float columns as null (docs/mapping.md)
    assert (awkward["n_free"], awkward["f8"], awkward["f4"]) == (None, None, None)
    assert huge["n_free"] == "1" + "0" * 400
    assert huge["at"] == "0001-01-01T00:00:00.000000Z"
    assert all(value is None for key, value in empty.items() if key != "id")
    deleted = next(c for c in changes if c.op == "delete")
    assert deleted.old is not None and deleted.old["id"] == 2 and deleted.new == {}


DOMAINS = """
CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0);
CREATE DOMAIN small_count AS smallint;
CREATE DOMAIN big_id AS bigint;
CREATE DOMAIN price AS numeric(12,2);
CREATE DOMAIN exact AS numeric;
CREATE DOMAIN ratio AS double precision;
CREATE DOMAIN flag AS boolean;
CREATE DOMAIN blob AS bytea;
CREATE DOMAIN doc AS jsonb;
CREATE DOMAIN label AS text;
CREATE DOMAIN stamp AS timestamptz;
CREATE DOMAIN count_of_count AS positive_int;
CREATE TABLE domained (
    id bigserial PRIMARY KEY, i positive_int, s small_count, b big_id, p price, e exact, r ratio,
    f flag, x blob, d doc, t label, at stamp, nested count_of_count
)
"""


def test_domains_arrive_as_their_base_type_with_include_domain_data_type(source_db):
    with source_db.connect() as conn:
        conn.execute(DOMAINS)
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (source_db.slot,))
        conn.execute(
            "INSERT INTO domained (i, s, b, p, e, r, f, x, d, t, at, nested) VALUES"
            " (42, -7, 9223372036854775807, 59.9, 12345678901234567890.000000001, 1.5, true, '\\x00ff',"
            " '{\"big\": 12345678901234567890123}', 'plain', '2026-11-25 15:07:53.5+00', 3),"
            " (1, 0, -9223372036854775808, 0, 'NaN', 'NaN', false, '\\x', 'null', '', 'infinity', 1)"
        )
    options = {**wal2json_options(Settings(source={"dsn": source_db.dsn})), "include-domain-data-type": "1"}
    stream = ReplicationStream(source_db.dsn, source_db.slot, options)
    stream.start(0)
    messages: list[bytes] = []
    try:
        while not (messages and messages[-1].startswith(b'{"action":"C"')):
            frame = stream.read(timeout=5.0)
            assert frame is not None, "the slot stopped before the end"
            if isinstance(frame, XLogData):
                messages.append(bytes(frame.payload))
    finally:
        stream.close()
    rows = []
    for message in (m for m in messages if b'"table":"domained"' in m):
        mine, theirs = decode(memoryview(message)), decode_python(message)
        assert isinstance(mine, RowChange) and isinstance(theirs, RowChange)
        assert mine == theirs and {k: type(v) for k, v in mine.new.items()} == {
            k: type(v) for k, v in theirs.new.items()
        }
        rows.append(mine.new)
    first, second = rows
    assert first == {
        "id": 1,
        "i": 42,
        "s": -7,
        "b": 9223372036854775807,
        "p": "59.90",
        "e": "12345678901234567890.000000001",
        "r": 1.5,
        "f": True,
        "x": "00ff",
        "d": {"big": 12345678901234567890123},
        "t": "plain",
        "at": "2026-11-25T15:07:53.500000Z",
        # a domain over a domain is named by the domain it is over: text, as before
        "nested": "3",
    }
    assert type(first["i"]) is int and type(first["r"]) is float
    assert second["b"] == -9223372036854775808 and second["f"] is False and second["x"] == ""
    # NaN: numeric keeps Postgres's text (a plain numeric column gets wal2json's null),
    # double precision becomes null as a plain column does
    assert (second["e"], second["r"]) == ("NaN", None)
    assert second["d"] == None and second["at"] == "infinity"  # noqa: E711 (JSON null inside jsonb)
