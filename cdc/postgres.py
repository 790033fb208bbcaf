"""The source database as capture uses it beside the stream (a :class:`cdc.ports.SourceDatabase`):
one plain connection per session for the checks, the catalog, partition parents, slot
creation with the shadow's seed, heartbeats and slot health.

A lost connection leaves every method as :class:`SourceUnavailable`, so capture reconnects
instead of failing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Container, Iterator
from typing import Any

import psycopg
import psycopg.sql
import structlog

from cdc import chunks, source
from cdc.catalog import partition_parent, read_catalog
from cdc.mapping import Mapping
from cdc.ports import ChunkRead, Sink
from cdc.schema import Relation, tables_to_shadow
from cdc.source import Check
from common.errors import SourceUnavailable
from common.formats import normalize

log = structlog.get_logger("ct1_cdc.capture")


def shadow_tables(conn: source.Conn, mapping: Mapping) -> set[str]:
    """The mapped tables capture keeps a shadow of (see :func:`cdc.schema.tables_to_shadow`)."""
    watched = [t for t in mapping.tables if mapping.watched(t)]
    if not watched:
        return set()
    catalog, _ = read_catalog(conn, [mapping.parts(t) for t in watched], names=False)
    return tables_to_shadow(mapping, catalog)


def ensure_slot(
    conn: source.Conn,
    dsn: str,
    slot: str,
    mapping: Mapping,
    sink: Sink,
    shadowed: set[str] | None = None,
) -> bool:
    """Create the slot if missing, seeding the shadow from the slot's own snapshot.

    The shadow then holds the watched columns of every existing row exactly as of the
    first change the slot will stream, so the first update of an old row still knows
    what changed.  Returns True when the slot was created now.
    """
    tables = shadow_tables(conn, mapping) if shadowed is None else shadowed

    def seed(snapshot: str) -> None:
        rows = 0
        try:
            for table in sorted(tables):
                key = mapping.by_table[table][0].key
                cols = mapping.watched(table)
                query = psycopg.sql.SQL("SELECT {}, {} FROM {}").format(
                    psycopg.sql.Identifier(key),
                    psycopg.sql.SQL(", ").join(psycopg.sql.Identifier(c) for c in cols),
                    source.table_ident(*mapping.parts(table)),
                )
                for row in source.read_at_snapshot(dsn, snapshot, query):
                    values = {c: normalize(v) for c, v in zip(cols, row[1:], strict=True)}
                    sink.shadow_put(table, str(normalize(row[0])), values)
                    rows += 1
            sink.commit(slot, 0)
        except BaseException:
            sink.rollback()
            raise
        log.info("shadow_seeded", tables=sorted(tables), rows=rows)

    return source.create_slot(conn, dsn, slot, seed)


@contextlib.contextmanager
def _lost_is_unavailable() -> Iterator[None]:
    try:
        yield
    except psycopg.OperationalError as exc:
        raise SourceUnavailable(f"source connection lost: {exc}") from exc


class PostgresSource:
    """The source database of ``dsn`` for the capture of ``slot``."""

    def __init__(self, dsn: str, slot: str, mapping: Mapping) -> None:
        self.dsn = dsn
        self.slot = slot
        self.mapping = mapping
        self._conn: source.Conn | None = None

    @property
    def _live(self) -> source.Conn:
        if self._conn is None:
            raise SourceUnavailable("not connected to the source")
        return self._conn

    def open(self) -> None:
        self.close()
        self._conn = source.connect(self.dsn)

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def checks(self) -> list[Check]:
        with _lost_is_unavailable():
            return source.run_checks(self._live, self.slot)

    def catalog(self, tables: list[tuple[str, str]]) -> tuple[dict[str, Relation], list[str]]:
        with _lost_is_unavailable():
            return read_catalog(self._live, tables)

    def partition_parent(self, table: str, mapped: Container[str]) -> str:
        with _lost_is_unavailable():
            return partition_parent(self._live, table, mapped)

    def ensure_slot(self, mapping: Mapping, sink: Sink, shadowed: set[str]) -> bool:
        with _lost_is_unavailable():
            return ensure_slot(self._live, self.dsn, self.slot, mapping, sink, shadowed)

    def drop_slot(self) -> bool:
        with _lost_is_unavailable():
            return source.drop_slot(self._live, self.slot)

    def heartbeat(self) -> None:
        with _lost_is_unavailable():
            try:
                source.heartbeat(self._live)
            except psycopg.errors.InsufficientPrivilege:
                log.warning(
                    "heartbeat_not_permitted", fix="GRANT EXECUTE ON FUNCTION pg_logical_emit_message"
                )

    def slot_status(self) -> dict[str, Any] | None:
        with _lost_is_unavailable():
            return source.slot_status(self._live, self.slot)

    def key_columns(self, schema: str, name: str) -> list[tuple[str, str]]:
        with _lost_is_unavailable():
            return chunks.key_columns(self._live, schema, name)

    def count_rows(self, table: str, condition: str | None) -> int | None:
        with _lost_is_unavailable():
            return chunks.count_rows(self._live, self.mapping, table, condition)

    def read_chunk(
        self,
        table: str,
        keys: list[tuple[str, str]],
        after: list[Any] | None,
        condition: str | None,
        limit: int,
        reread: list[list[Any]],
        label: str,
    ) -> ChunkRead:
        with _lost_is_unavailable():
            return chunks.read_chunk(
                self._live, self.mapping, table, keys, after, condition, limit, reread, label
            )
