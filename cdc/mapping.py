"""Mapping rules: row changes → business events (pure: no I/O).

The rule format is part of the contract (see DESIGN "Events")::

    [defaults]
    exclude_columns = ["password", "remember_token"]

    [[rule]]
    table = "public.orders"
    on = ["update"]
    when_changed = ["status"]
    emit = "order.status_changed"
    object = "order"
    key = "id"
    exclude_columns = []
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cdc.decode import RowChange
from cdc.errors import ConfigError

OPS = ("insert", "update", "delete")
_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_TABLE_RE = re.compile(r"^[^.\s]+\.[^.\s]+$")


@dataclass(frozen=True, slots=True)
class Rule:
    table: str
    on: frozenset[str]
    emit: str
    object: str
    key: str
    when_changed: tuple[str, ...] = ()
    exclude: frozenset[str] = frozenset()


class EventDraft(NamedTuple):
    """An event before the outbox gives it an id."""

    type: str
    object: str
    entity_id: Any
    record: dict[str, Any]
    previous: dict[str, Any] | None
    table: str
    op: str


@dataclass(slots=True)
class Mapping:
    rules: list[Rule]
    by_table: dict[str, list[Rule]] = field(default_factory=dict)
    _watched: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_table = {}
        for rule in self.rules:
            self.by_table.setdefault(rule.table, []).append(rule)
        self._watched = {}
        for table, rules in self.by_table.items():
            cols: dict[str, None] = {}
            for rule in rules:
                cols.update(dict.fromkeys(rule.when_changed))
            self._watched[table] = tuple(cols)

    @property
    def tables(self) -> list[str]:
        return sorted(self.by_table)

    def watched(self, table: str) -> tuple[str, ...]:
        """Columns whose old values some rule of ``table`` needs (for the shadow)."""
        return self._watched.get(table, ())

    @property
    def event_types(self) -> list[str]:
        return sorted({r.emit for r in self.rules})


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"mapping: {where} must be a list of non-empty strings")
    return list(value)


def parse_mapping(text: str, source: str = "mapping") -> Mapping:
    """Parse and validate a mapping file; every problem names the rule and the key."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(doc) - {"defaults", "rule"}
    if unknown:
        raise ConfigError(f"{source}: unknown section {sorted(unknown)[0]!r} (expected defaults, rule)")
    defaults = doc.get("defaults", {})
    if set(defaults) - {"exclude_columns"}:
        raise ConfigError(f"{source}: [defaults] accepts only exclude_columns")
    default_exclude = _strings(defaults.get("exclude_columns", []), "defaults.exclude_columns")
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list) or not raw_rules:
        raise ConfigError(f"{source}: no [[rule]] defined")
    rules: list[Rule] = []
    allowed = {"table", "on", "when_changed", "emit", "object", "key", "exclude_columns"}
    for n, raw in enumerate(raw_rules, start=1):
        where = f"rule {n}"
        extra = set(raw) - allowed
        if extra:
            raise ConfigError(f"{source}: {where}: unknown key {sorted(extra)[0]!r}")
        for required in ("table", "on", "emit", "object", "key"):
            if required not in raw:
                raise ConfigError(f"{source}: {where}: missing {required!r}")
        table = raw["table"]
        if not isinstance(table, str) or not _TABLE_RE.match(table):
            raise ConfigError(f"{source}: {where}: table must be schema-qualified, like public.orders")
        ons = _strings(raw["on"], f"{where}.on")
        bad = [o for o in ons if o not in OPS]
        if bad:
            raise ConfigError(f"{source}: {where}.on: {bad[0]!r} is not one of insert, update, delete")
        emit = raw["emit"]
        if not isinstance(emit, str) or not _TYPE_RE.match(emit):
            raise ConfigError(f"{source}: {where}.emit: {emit!r} is not an event type like order.created")
        for k in ("object", "key"):
            if not isinstance(raw[k], str) or not raw[k]:
                raise ConfigError(f"{source}: {where}.{k} must be a non-empty string")
        when = _strings(raw.get("when_changed", []), f"{where}.when_changed")
        if when and ons != ["update"]:
            raise ConfigError(f'{source}: {where}: when_changed applies only to on = ["update"]')
        exclude = frozenset(default_exclude) | frozenset(
            _strings(raw.get("exclude_columns", []), f"{where}.exclude_columns")
        )
        if raw["key"] in exclude:
            raise ConfigError(f"{source}: {where}: key {raw['key']!r} is also excluded")
        rules.append(
            Rule(
                table=table,
                on=frozenset(ons),
                emit=emit,
                object=raw["object"],
                key=raw["key"],
                when_changed=tuple(when),
                exclude=exclude,
            )
        )
    return Mapping(rules)


def load_mapping(path: str) -> Mapping:
    try:
        with open(path, encoding="utf-8") as fh:
            return parse_mapping(fh.read(), source=path)
    except FileNotFoundError:
        raise ConfigError(f"mapping file {path} not found (setting mapping.file)") from None


def _strip(values: dict[str, Any], exclude: frozenset[str]) -> dict[str, Any]:
    """``values`` without excluded columns (the same dict when none is present: drafts are
    only serialised, never changed)."""
    if exclude.isdisjoint(values):
        return values
    return {k: v for k, v in values.items() if k not in exclude}


def old_values(change: RowChange, shadow: dict[str, Any] | None) -> dict[str, Any]:
    """What we know of the row before an update: replica identity first, then the shadow."""
    known: dict[str, Any] = dict(shadow or {})
    if change.old:
        known.update(change.old)
    return known


def apply(
    mapping: Mapping, table: str, change: RowChange, shadow: dict[str, Any] | None = None
) -> list[EventDraft]:
    """Every rule of ``table`` that matches ``change`` emits one draft.

    ``table`` is the name to match (a partition's parent); ``shadow`` holds the last
    known values of the watched columns when the table has no REPLICA IDENTITY FULL.
    A watched column whose old value is unknown counts as changed: a missed status change
    is worse than a repeated one.  A column absent from the change (unchanged TOAST) never
    counts as changed.
    """
    rules = mapping.by_table.get(table)
    if not rules:
        return []
    drafts: list[EventDraft] = []
    changed: dict[str, Any] = {}
    unknown: set[str] = set()
    if change.op == "update":
        old = old_values(change, shadow)
        changed = {c: old[c] for c, v in change.new.items() if c in old and old[c] != v}
        if mapping.watched(table):
            unknown = {c for c in change.new if c not in old}
    for rule in rules:
        if change.op not in rule.on:
            continue
        if (
            change.op == "update"
            and rule.when_changed
            and not any(c in changed or c in unknown for c in rule.when_changed)
        ):
            continue
        row = change.new if change.op != "delete" else (change.old or {})
        previous = _strip(changed, rule.exclude) if change.op == "update" else None
        drafts.append(
            EventDraft(
                type=rule.emit,
                object=rule.object,
                entity_id=row.get(rule.key),
                record=_strip(row, rule.exclude),
                previous=previous,
                table=table,
                op=change.op,
            )
        )
    return drafts
