"""The mapping checked against the live schema (pure: the catalog is read by
:func:`cdc.catalog.read_catalog` and passed in).

A mapping that names a table or a column the source does not have, or that acts on updates
and deletes Postgres cannot send, loses changes without a word.  :func:`check_mapping`
finds each such mistake and says how to fix it; ``setup`` and ``run`` refuse to start on
one, and capture re-checks while it runs so a rule broken by DDL is reported, not silent.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cdc.carts import CartRule
from cdc.mapping import Mapping, quote_table

# relkind → what the table is, for mapped names that are not plain or partitioned tables
_NOT_TABLES = {"v": "a view", "m": "a materialized view", "f": "a foreign table"}


@dataclass(frozen=True, slots=True)
class Relation:
    """What the catalog says of one table (or of one partition of it)."""

    schema: str
    name: str
    kind: str  # pg_class.relkind: r table, p partitioned, v view, m matview, f foreign
    identity: str  # pg_class.relreplident: d default, n nothing, f full, i index
    has_pk: bool
    has_identity_index: bool
    columns: tuple[str, ...] = ()
    partitions: tuple[Relation, ...] = field(default_factory=tuple)  # leaves of a partitioned table
    enums: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (column, labels) of enum-typed columns

    @property
    def table(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def identifies_rows(self) -> bool:
        """Whether Postgres sends updates and deletes of this table to a logical slot."""
        return (
            self.identity == "f"
            or (self.identity == "d" and self.has_pk)
            or (self.identity == "i" and self.has_identity_index)
        )


@dataclass(frozen=True, slots=True)
class Problem:
    """One way the mapping and the source disagree."""

    kind: str  # missing_table | not_a_table | missing_column | no_identity
    table: str
    message: str
    fix: str
    rule: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "table": self.table,
            "rule": self.rule,
            "message": self.message,
            "fix": self.fix,
        }

    def line(self) -> str:
        return f"{self.message}; fix: {self.fix}"

    @property
    def key(self) -> tuple[str, str, int | None, str]:
        """What identifies the problem: the same while it lasts, whatever a did-you-mean
        suggests meanwhile."""
        return (self.kind, self.table, self.rule, self.message.split(" (did you mean")[0])


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def identity_fix(relation: Relation) -> str:
    return f"ALTER TABLE {quote_table(relation.schema, relation.name)} REPLICA IDENTITY FULL"


def leaves(relation: Relation) -> tuple[Relation, ...]:
    """The relations that hold a table's rows: its partitions, or the table itself."""
    return relation.partitions if relation.kind == "p" else (relation,)


def lacking_identity(mapping: Mapping, catalog: dict[str, Relation]) -> list[tuple[str, Relation]]:
    """(mapped table, relation) of every table, partitions one by one, whose updates and
    deletes some rule needs but Postgres would not send: no primary key under the default
    replica identity, or none."""
    lacking = []
    for table in mapping.tables:
        relation = catalog.get(table)
        if relation is None or not mapping.identity_needed(table):
            continue
        lacking += [(table, one) for one in leaves(relation) if not one.identifies_rows]
    return lacking


def fully_identified(relation: Relation) -> bool:
    """Whether every update of the table carries all old values (REPLICA IDENTITY FULL on
    the table, or on every partition: a partitioned parent's own setting reaches none)."""
    parts = leaves(relation)
    return bool(parts) and all(one.identity == "f" for one in parts)


def tables_to_shadow(mapping: Mapping, catalog: dict[str, Relation]) -> set[str]:
    """Tables with when_changed rules (or old-value conditions) whose old values the WAL
    will not carry: not REPLICA IDENTITY FULL (a partitioned table on every partition).
    Capture keeps a shadow of their watched columns instead."""
    return {
        table
        for table in mapping.tables
        if mapping.watched(table)
        and (relation := catalog.get(table)) is not None
        and relation.kind in "rp"
        and not fully_identified(relation)
    }


def check_mapping(mapping: Mapping, catalog: dict[str, Relation], all_tables: Iterable[str]) -> list[Problem]:
    """Every table, key, when_changed, condition and exclude_columns column of the mapping
    that the source lacks (with a did-you-mean), and every table whose updates or deletes
    some rule needs but the WAL will not carry."""
    problems: list[Problem] = []
    known = sorted(set(all_tables))
    for table in sorted(mapping.by_table):
        relation = catalog.get(table)
        rules = mapping.by_table[table]
        if relation is None:
            problems.append(
                Problem(
                    "missing_table",
                    table,
                    f"mapped table {table} does not exist in the source{_suggest(table, known)}",
                    f"correct table = in rule {', '.join(str(r.number) for r in rules)} of the mapping, "
                    "or create the table",
                    rules[0].number,
                )
            )
            continue
        if relation.kind in _NOT_TABLES:
            problems.append(
                Problem(
                    "not_a_table",
                    table,
                    f"mapped table {table} is {_NOT_TABLES[relation.kind]}: its changes are not in the WAL",
                    "map the table it reads from",
                    rules[0].number,
                )
            )
            continue
        columns = set(relation.columns)
        for rule in rules:
            if "truncate" in rule.on and rule.on == {"truncate"}:
                continue  # a truncate has no rows: no column is read
            for setting, column in rule.columns():
                if column in columns:
                    continue
                problems.append(
                    Problem(
                        "missing_column",
                        table,
                        f"rule {rule.number} ({rule.emit}): {setting} column {column!r} does not exist "
                        f"in {table}{_suggest(column, relation.columns)}",
                        f"correct {setting} in rule {rule.number} of the mapping",
                        rule.number,
                    )
                )
    for table in sorted(mapping.by_table):
        relation = catalog.get(table)
        if relation is None or not relation.enums:
            continue
        labels = dict(relation.enums)
        for rule in mapping.by_table[table]:
            for cond in rule.conditions:
                if cond.column not in labels:
                    continue
                named = [cond.old, cond.new, *(cond.old_in or ()), *(cond.new_in or ())]
                for value in (v for v in named if v is not None):
                    if str(value) in labels[cond.column]:
                        continue
                    problems.append(
                        Problem(
                            "unknown_value",
                            table,
                            f"rule {rule.number} ({rule.emit}): {value!r} is not a value of the enum column "
                            f"{cond.column!r} in {table}, so the condition never holds"
                            f"{_suggest(str(value), labels[cond.column])}",
                            f"use one of {', '.join(labels[cond.column])} in rule {rule.number} of the mapping",
                            rule.number,
                        )
                    )
    if mapping.carts is not None:
        problems += _check_carts(mapping.carts, catalog, known)
    for table, relation in lacking_identity(mapping, catalog):
        what = relation.table if relation.table == table else f"partition {relation.table} of {table}"
        why = "replica identity NOTHING" if relation.identity == "n" else "no primary key"
        problems.append(
            Problem(
                "no_identity",
                relation.table,
                f"updates and deletes of {what} would be lost: it has {why}, so Postgres does not"
                " send them to logical replication",
                f"{identity_fix(relation)} (or add a primary key; `ct1-cdc setup --replica-identity-full`"
                " does the former)",
            )
        )
    return problems


def _check_carts(rule: CartRule, catalog: dict[str, Relation], known: list[str]) -> list[Problem]:
    """The [cart_abandoned] section against the source: its tables and columns exist."""
    problems = []
    for setting, table in (("carts", rule.carts), ("items", rule.items), ("orders", rule.orders)):
        if table is None:
            continue
        relation = catalog.get(table)
        if relation is None:
            problems.append(
                Problem(
                    "missing_table",
                    table,
                    f"[cart_abandoned] {setting} table {table} does not exist in the source{_suggest(table, known)}",
                    f"correct {setting} in [cart_abandoned] of the mapping",
                )
            )
        elif relation.kind in _NOT_TABLES:
            problems.append(
                Problem(
                    "not_a_table",
                    table,
                    f"[cart_abandoned] {setting} table {table} is {_NOT_TABLES[relation.kind]}: "
                    "its changes are not in the WAL",
                    "name the table it reads from",
                )
            )
    for table, setting, column in rule.columns():
        relation = catalog.get(table)
        if relation is None or relation.kind in _NOT_TABLES or column in relation.columns:
            continue
        problems.append(
            Problem(
                "missing_column",
                table,
                f"[cart_abandoned] {setting} column {column!r} does not exist in {table}"
                f"{_suggest(column, relation.columns)}",
                f'correct {setting} in [cart_abandoned] of the mapping (or set it to "" if there is none)'
                if setting in ("customer", "session", "status", "order_customer")
                else f"correct {setting} in [cart_abandoned] of the mapping",
            )
        )
    return problems
