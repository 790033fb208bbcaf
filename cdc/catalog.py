"""The source's catalog as the mapping check needs it: each mapped table with its
partitions, columns, keys, replica identity and enum labels (SQL in ``sql/catalog.sql``).

What to make of it lives in :mod:`cdc.schema` (pure).
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

from cdc.schema import Relation
from cdc.source import Conn
from common import sqlfile

C = sqlfile.load("cdc", "catalog.sql")


def _relation(conn: Conn, row: tuple[Any, ...], partitions: tuple[Relation, ...] = ()) -> Relation:
    schema, name, kind, identity, pk, identity_index, columns, oid = row
    enums = conn.execute(C["enum_labels"], {"oid": oid}).fetchall()
    return Relation(
        schema,
        name,
        kind,
        identity,
        pk,
        identity_index,
        tuple(columns),
        partitions,
        tuple((column, tuple(labels)) for column, labels in enums),
    )


def read_catalog(
    conn: Conn, tables: list[tuple[str, str]], *, names: bool = True
) -> tuple[dict[str, Relation], list[str]]:
    """What the catalog says of each (schema, name), partitions included, and (``names``,
    and only when one of ``tables`` is missing) the name of every table a mapping could
    name, for a did-you-mean."""
    catalog: dict[str, Relation] = {}
    if tables:
        rows = conn.execute(
            C["relations"], {"schemas": [s for s, _ in tables], "names": [t for _, t in tables]}
        ).fetchall()
        for row in rows:
            partitions: tuple[Relation, ...] = ()
            if row[2] == "p":
                leaves = conn.execute(C["leaves"], {"oid": row[7]}).fetchall()
                partitions = tuple(_relation(conn, leaf) for leaf in leaves)
            relation = _relation(conn, row, partitions)
            catalog[relation.table] = relation
    if not names or len(catalog) == len(set(tables)):
        return catalog, []
    return catalog, [str(r[0]) for r in conn.execute(C["table_names"], {}).fetchall()]


def identity_index(conn: Conn, schema: str, name: str) -> str | None:
    """The index a table's REPLICA IDENTITY USING INDEX names, if any."""
    row = conn.execute(C["identity_index"], {"schema": schema, "name": name}).fetchone()
    return None if row is None else str(row[0])


def partition_parent(conn: Conn, table: str, mapped: Container[str]) -> str:
    """The nearest ancestor of a partition that is ``mapped`` (else its top-most parent),
    or the table itself when it is mapped or no partition (``table`` as wal2json reports
    it: schema and name joined by a dot, unquoted)."""
    chain = [str(r[0]) for r in conn.execute(C["partition_ancestors"], {"table": table}).fetchall()]
    return next((t for t in chain if t in mapped), chain[-1] if chain else table)
