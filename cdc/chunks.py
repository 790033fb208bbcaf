"""Reading a table's existing rows for backfill, one chunk at a time (SQL against the
source; what to make of the rows lives in :mod:`cdc.backfill`).

Each chunk is one short ``REPEATABLE READ READ ONLY`` transaction: its snapshot, the next
rows by key (and the rows of keys asked again), then the chunk's watermark, a logical
message written after the snapshot so that every transaction the snapshot sees comes
before it in the stream.  Rows are read as capture's decoder gives them (numeric as exact
text, json as its text, times in ISO 8601 UTC).
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg import sql
from psycopg.adapt import Loader
from psycopg.types.json import set_json_loads

from cdc import source
from cdc.backfill import WATERMARK_PREFIX, BackfillBusy, BackfillError, condition_problem, no_key
from cdc.catalog import C
from cdc.decode import iso_utc
from cdc.mapping import Mapping
from cdc.ports import ChunkRead
from cdc.stream import SESSION_SETTINGS
from common.errors import Ct1Error
from common.formats import normalize, parse_lsn

# Each statement of a chunk is bounded well below wal_sender_timeout (60 s by default):
# capture reads nothing from the stream meanwhile.
STATEMENT_TIMEOUT_MS = 10_000
LOCK_TIMEOUT_MS = 2_000  # DDL holding the table: the chunk waits no longer, and is tried again
COUNT_TIMEOUT_MS = 2_000  # a table too big to count this fast shows no total, only progress


# Types psycopg loads as capture's decoder gives them already (native, fast); every other
# column is taken as the text Postgres prints, as wal2json writes it, with timestamps
# with time zone in ISO 8601 UTC like every event's.
NATIVE = frozenset(
    {"int2", "int4", "int8", "oid", "float4", "float8", "bool", "text", "varchar", "json", "jsonb"}
)


class _AsText(Loader):
    def load(self, data: Any) -> str:
        return bytes(data).decode("utf-8")


class _Hex(Loader):
    def load(self, data: Any) -> str:
        text = bytes(data).decode("ascii")
        return text[2:] if text.startswith("\\x") else text  # as wal2json: hex without its \x


class _Numeric(Loader):
    def load(self, data: Any) -> str | None:
        text = bytes(data).decode("ascii")
        return None if text[-1:] in ("N", "y") else text  # NaN, ±Infinity: null, as wal2json writes them


class _IsoUtc(Loader):
    def load(self, data: Any) -> str:
        text = bytes(data).decode("utf-8")
        return iso_utc(text) if text[:1].isdigit() else text  # infinity stays infinity


def _load_as_events_write(cur: psycopg.Cursor[Any], types: list[tuple[Any, ...]]) -> None:
    """Make ``cur`` load each column type of a table as capture's decoder gives it (a
    domain as its base type, as capture reads the WAL with include-domain-data-type)."""
    set_json_loads(source.json_text, cur)  # json as its text, as the WAL gives it
    for oid, name, base in types:
        if name == "timestamptz":
            cur.adapters.register_loader(oid, _IsoUtc)
        elif name == "bytea":
            cur.adapters.register_loader(oid, _Hex)
        elif name == "numeric":
            cur.adapters.register_loader(oid, _Numeric)
        elif name not in NATIVE:
            cur.adapters.register_loader(oid, _AsText)
        elif base is not None:
            native = cur.adapters.get_loader(base, psycopg.pq.Format.TEXT)
            if native is not None:
                cur.adapters.register_loader(oid, native)


def key_columns(conn: source.Conn, schema: str, name: str) -> list[tuple[str, str]]:
    """(column, type) of the key a table is read in order of; empty without one."""
    rows = conn.execute(C["key_columns"], {"schema": schema, "name": name}).fetchall()
    return [(str(r[0]), str(r[1])) for r in rows]


def _condition(condition: str | None) -> sql.Composable:
    if not condition:
        return sql.SQL("true")
    problem = condition_problem(condition)
    if problem is not None:
        raise BackfillError(f"the backfill condition must be one SQL expression: {problem}")
    # an operator's own expression (checked to stay one), run read-only: SQL text of theirs
    return sql.SQL("({})").format(sql.SQL(condition))


# A value Postgres quotes at the end of an error ('invalid input syntax for type integer:
# "hunter2"') may be a row's: it never reaches the job's error, the log or the terminal.
_QUOTED_VALUE = re.compile(r': "(?:[^"]|"")*"\s*$')


def _failed(table: str, exc: psycopg.Error) -> Ct1Error:
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return BackfillBusy(f"{table} is locked (DDL?): the chunk is read again later")
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return BackfillError(
            f"reading {table} ran past {STATEMENT_TIMEOUT_MS} ms (or was cancelled): lower "
            "[backfill] chunk_size, narrow --where to indexed columns, or add an index"
        )
    message = _QUOTED_VALUE.sub(": (value left out)", exc.diag.message_primary or str(exc))
    return BackfillError(f"reading {table} failed: {message}")


def _read_only(conn: source.Conn, isolation: str = "") -> None:
    """Open the transaction a backfill reads in: read only, bounded in time and in how
    long it waits for a lock, printing values as capture's stream does."""
    conn.execute(f"BEGIN {isolation} READ ONLY")
    conn.execute(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
    conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
    for key, value in SESSION_SETTINGS.items():
        conn.execute(sql.SQL("SELECT set_config({}, {}, true)").format(sql.Literal(key), sql.Literal(value)))


def check_request(conn: source.Conn, mapping: Mapping, table: str, condition: str | None) -> None:
    """What capture would refuse later, refused when the backfill is asked for: a table
    without a key to read by, a condition Postgres does not accept (planned, not run)."""
    if not key_columns(conn, *mapping.parts(table)):
        raise BackfillError(no_key(table))
    query = sql.SQL("EXPLAIN SELECT 1 FROM {} WHERE {}").format(
        source.table_ident(*mapping.parts(table)), _condition(condition)
    )
    try:
        _read_only(conn)
        try:
            conn.execute(query)
        finally:
            conn.execute("ROLLBACK")
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        raise _failed(table, exc) from exc


def count_rows(conn: source.Conn, mapping: Mapping, table: str, condition: str | None) -> int | None:
    """Rows to read (None when counting takes longer than :data:`COUNT_TIMEOUT_MS`: capture
    streams nothing meanwhile, and the planner's estimate is not worth showing as a total)."""
    query = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
        source.table_ident(*mapping.parts(table)), _condition(condition)
    )
    try:
        _read_only(conn)
        try:
            conn.execute(f"SET LOCAL statement_timeout = {COUNT_TIMEOUT_MS}")  # capture waits meanwhile
            row = conn.execute(query).fetchone()
        finally:
            conn.execute("ROLLBACK")
    except (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable):
        return None
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        raise _failed(table, exc) from exc
    return int(row[0]) if row else None


def read_chunk(
    conn: source.Conn,
    mapping: Mapping,
    table: str,
    keys: list[tuple[str, str]],
    after: list[Any] | None,
    condition: str | None,
    limit: int,
    reread: list[list[Any]],
    label: str,
) -> ChunkRead:
    schema, name = mapping.parts(table)
    ident = source.table_ident(schema, name)
    cols = sql.SQL(", ").join(sql.Identifier(k) for k, _ in keys)

    def typed(values: list[Any]) -> sql.Composable:
        def one(value: Any, kind: str) -> sql.Composable:
            if kind == "bytea":  # keys come as hex without its \\x, as wal2json gives them
                return sql.SQL("decode({}, 'hex')").format(sql.Literal(value))
            return sql.SQL("CAST({} AS {})").format(
                sql.Literal(value if value is None else str(value)), sql.SQL(kind)
            )

        return sql.SQL(", ").join(one(v, t) for v, (_, t) in zip(values, keys, strict=True))

    where = _condition(condition)
    if after is not None:
        where = sql.SQL("({}) > ({}) AND {}").format(cols, typed(after), where)
    page = sql.SQL("SELECT * FROM {} WHERE {} ORDER BY {} LIMIT {}").format(
        ident, where, cols, sql.Literal(limit)
    )
    again = None
    if reread:
        again = sql.SQL("SELECT * FROM {} WHERE ({}) IN ({}) AND {}").format(
            ident,
            cols,
            sql.SQL(", ").join(sql.SQL("({})").format(typed(k)) for k in reread),
            _condition(condition),
        )
    try:
        _read_only(conn, "ISOLATION LEVEL REPEATABLE READ")
        try:
            # txid_current_snapshot, not pg_current_snapshot: Postgres 12 has only the former
            snap = conn.execute("SELECT txid_current_snapshot()::text, now()").fetchone()
            assert snap is not None
            types = conn.execute(C["column_types"], {"schema": schema, "name": name}).fetchall()
            with conn.cursor() as cur:
                _load_as_events_write(cur, types)
                cur.execute(page)
                rows = _dicts(cur)
                rereads = []
                if again is not None:
                    cur.execute(again)
                    rereads = _dicts(cur)
        finally:
            conn.execute("ROLLBACK")  # read only: nothing to keep
        # The watermark: a transaction of its own, after the snapshot, so its commit comes
        # after every transaction the snapshot sees.  Flushed at once even where
        # synchronous_commit is off: else the walsender would see it only when the WAL
        # writer next flushes (up to 3 x wal_writer_delay), and every chunk would wait so.
        with conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = on")
            conn.execute("SELECT pg_logical_emit_message(true, %s, %s)", (WATERMARK_PREFIX, label))
        passed = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()  # past its commit
        assert passed is not None
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        raise _failed(table, exc) from exc
    return ChunkRead(str(snap[0]), str(normalize(snap[1])), rows, rereads, parse_lsn(str(passed[0])))


def _dicts(cur: psycopg.Cursor[Any]) -> list[dict[str, Any]]:
    names = [d.name for d in cur.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
