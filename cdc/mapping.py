"""Mapping rules: row changes → business events (pure: no I/O).

The rule format is part of the contract: users write their own, and docs/mapping.md is
its reference::

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
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

from cdc.carts import CartRule, parse_cart_rule
from cdc.decode import RowChange
from common.errors import ConfigError
from common.formats import is_event_type

ROW_OPS = ("insert", "update", "delete")
OPS = (*ROW_OPS, "truncate")
_PLAIN_PART = r'[^."\s]+'
_QUOTED_PART = r'"(?:[^"]|"")+"'
_TABLE_RE = re.compile(rf"^({_QUOTED_PART}|{_PLAIN_PART})\.({_QUOTED_PART}|{_PLAIN_PART})$")
_TESTS = ("old", "new", "old_in", "new_in", "old_null", "new_null")


def parse_table(text: str) -> tuple[str, str]:
    """``public.orders`` or ``"Sales Ops"."Order Lines"`` → (schema, name) as Postgres
    stores them.  Quoted parts keep their case, spaces and dots; ``""`` is a quote."""
    match = _TABLE_RE.match(text)
    if not match:
        raise ValueError(text)
    parts = []
    for part in match.groups():
        parts.append(part[1:-1].replace('""', '"') if part.startswith('"') else part)
    return parts[0], parts[1]


def quote_table(schema: str, name: str) -> str:
    """The way to write a table in SQL and in a mapping file (quoted only when needed)."""

    def one(part: str) -> str:
        return part if re.fullmatch(r"[a-z_][a-z0-9_$]*", part) else '"' + part.replace('"', '""') + '"'

    return f"{one(schema)}.{one(name)}"


class Condition(NamedTuple):
    """A declarative test of one column's old and new values; every given test must hold.

    For an insert every old value is null; for a delete every new value is null."""

    column: str
    old: Any = None  # equals (None: not tested; TOML has no null)
    new: Any = None
    old_in: tuple[Any, ...] | None = None
    new_in: tuple[Any, ...] | None = None
    old_null: bool | None = None  # True: is null, False: is not null
    new_null: bool | None = None

    @property
    def needs_old(self) -> bool:
        return self.old is not None or self.old_in is not None or self.old_null is not None

    @property
    def needs_new(self) -> bool:
        return self.new is not None or self.new_in is not None or self.new_null is not None


@dataclass(frozen=True, slots=True)
class Rule:
    table: str  # schema.name as Postgres reports it (unquoted): the key changes are matched by
    on: frozenset[str]
    emit: str
    object: str
    key: str
    when_changed: tuple[str, ...] = ()
    exclude: frozenset[str] = frozenset()
    conditions: tuple[Condition, ...] = ()
    number: int = 0  # position in the file, 1-based (for messages)
    rule_exclude: tuple[str, ...] = ()  # exclude_columns named by the rule itself
    schema: str = ""
    name: str = ""

    @property
    def where(self) -> str:
        return f"rule {self.number} ({self.emit} on {self.table})"

    def columns(self) -> list[tuple[str, str]]:
        """Every column the rule names, with the key it is named by (for schema checks)."""
        named = [("key", self.key)]
        named += [("when_changed", c) for c in self.when_changed]
        named += [("when.column", c.column) for c in self.conditions]
        named += [("exclude_columns", c) for c in self.rule_exclude]
        return named


@dataclass(frozen=True, slots=True)
class SnapshotRule:
    """How the existing rows of one table become events (``ct1-cdc backfill``): a row
    goes out as one ``emit`` event (``source.op`` ``read``) when one of the table's rules
    would emit for it were it inserted now; the columns any of them excludes stay out."""

    table: str
    emit: str
    object: str
    key: str
    exclude: frozenset[str]
    rules: tuple[Rule, ...]

    def draft(self, row: dict[str, Any]) -> EventDraft | None:
        for rule in self.rules:
            op = "insert" if "insert" in rule.on else "update"  # an update's old values: unknown
            if not rule.conditions or conditions_hold(rule, op, row, {}):
                record = _strip(row, self.exclude)
                return EventDraft(self.emit, self.object, row.get(self.key), record, None, self.table, "read")
        return None


class EventDraft(NamedTuple):
    """An event before the outbox gives it an id.  (:func:`apply` makes it positionally,
    on the hot path: keep the fields' order.)"""

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
    carts: CartRule | None = None  # [cart_abandoned]: the derived cart.abandoned
    snapshot_settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # [[snapshot]] by table
    by_table: dict[str, list[Rule]] = field(default_factory=dict)
    snapshots: dict[str, SnapshotRule] = field(default_factory=dict)  # backfilled tables
    _watched: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _parts: dict[str, tuple[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_table = {}
        self._parts = {}
        for rule in self.rules:
            self.by_table.setdefault(rule.table, []).append(rule)
            self._parts[rule.table] = (rule.schema, rule.name) if rule.name else _split(rule.table)
        self._watched = {}
        for table, rules in self.by_table.items():
            cols: dict[str, None] = {}
            for rule in rules:
                cols.update(dict.fromkeys(rule.when_changed))
                cols.update(dict.fromkeys(c.column for c in rule.conditions if c.needs_old))
            self._watched[table] = tuple(cols)
        self.snapshots = {}
        for table, rules in self.by_table.items():
            rows = tuple(r for r in rules if r.on - {"truncate"})
            given = self.snapshot_settings.get(table, {})
            if not rows or not given.get("enabled", True):
                continue
            first = next((r for r in rows if "insert" in r.on), rows[0])
            obj = given.get("object", first.object)
            self.snapshots[table] = SnapshotRule(
                table=table,
                emit=given.get("emit", f"{obj}.snapshot"),
                object=obj,
                key=given.get("key", first.key),
                exclude=frozenset()
                .union(*(r.exclude for r in rules))
                .union(given.get("exclude_columns", ())),
                rules=rows,
            )

    @property
    def tables(self) -> list[str]:
        """Every table capture reads: those of the rules and those of [cart_abandoned]."""
        return sorted(set(self.by_table) | set(self.carts.tables if self.carts else ()))

    def parts(self, table: str) -> tuple[str, str]:
        """(schema, name) of a mapped table."""
        return self._parts.get(table) or _split(table)

    def watched(self, table: str) -> tuple[str, ...]:
        """Columns whose old values some rule of ``table`` needs (for the shadow)."""
        return self._watched.get(table, ())

    def identity_needed(self, table: str) -> bool:
        """Whether some rule of ``table`` acts on updates or deletes, which Postgres can
        only send for a table with a primary key or a replica identity."""
        if self.carts is not None and table in (self.carts.carts, self.carts.items):
            return True  # cart.abandoned follows their updates and deletes
        return any(rule.on & {"update", "delete"} for rule in self.by_table.get(table, ()))

    def truncates(self, table: str) -> list[Rule]:
        return [rule for rule in self.by_table.get(table, ()) if "truncate" in rule.on]

    @property
    def event_types(self) -> list[str]:
        """Every type the mapping emits from the stream (backfill's types: :attr:`snapshots`)."""
        return sorted({r.emit for r in self.rules} | ({self.carts.emit} if self.carts else set()))


def _split(table: str) -> tuple[str, str]:
    schema, _, name = table.partition(".")
    return schema, name


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"mapping: {where} must be a list of non-empty strings")
    return list(value)


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, (str, int, float, bool)):
        return value
    raise ConfigError(f"{where} must be a string, number or boolean (use old_null/new_null for null)")


def _condition(raw: Any, where: str) -> Condition:
    if not isinstance(raw, dict):
        raise ConfigError(f'{where} must be a table like {{ column = "status", new = "shipped" }}')
    extra = set(raw) - {"column", *_TESTS}
    if extra:
        raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r} (expected column, {', '.join(_TESTS)})")
    column = raw.get("column")
    if not isinstance(column, str) or not column:
        raise ConfigError(f"{where}: column must be a non-empty string")
    if not set(raw) & set(_TESTS):
        raise ConfigError(f"{where}: no test on {column!r} (one of {', '.join(_TESTS)})")
    values: dict[str, Any] = {}
    for side in ("old", "new"):
        if side in raw:
            values[side] = _scalar(raw[side], f"{where}.{side}")
        if f"{side}_in" in raw:
            items = raw[f"{side}_in"]
            if not isinstance(items, list) or not items:
                raise ConfigError(f"{where}.{side}_in must be a non-empty list")
            values[f"{side}_in"] = tuple(_scalar(v, f"{where}.{side}_in") for v in items)
        if f"{side}_null" in raw:
            if not isinstance(raw[f"{side}_null"], bool):
                raise ConfigError(f"{where}.{side}_null must be true (is null) or false (is not null)")
            values[f"{side}_null"] = raw[f"{side}_null"]
    return Condition(column, **values)


def parse_mapping(text: str, source: str = "mapping") -> Mapping:
    """Parse and validate a mapping file; every problem names the rule and the key."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(doc) - {"defaults", "rule", "cart_abandoned", "snapshot"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown section {sorted(unknown)[0]!r} "
            "(expected defaults, rule, snapshot, cart_abandoned)"
        )
    defaults = doc.get("defaults", {})
    if set(defaults) - {"exclude_columns"}:
        raise ConfigError(f"{source}: [defaults] accepts only exclude_columns")
    default_exclude = _strings(defaults.get("exclude_columns", []), "defaults.exclude_columns")
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list) or not raw_rules:
        raise ConfigError(f"{source}: no [[rule]] defined")
    rules: list[Rule] = []
    allowed = {"table", "on", "when_changed", "when", "emit", "object", "key", "exclude_columns"}
    for n, raw in enumerate(raw_rules, start=1):
        where = f"rule {n}"
        extra = set(raw) - allowed
        if extra:
            raise ConfigError(f"{source}: {where}: unknown key {sorted(extra)[0]!r}")
        for required in ("table", "on", "emit", "object", "key"):
            if required not in raw:
                raise ConfigError(f"{source}: {where}: missing {required!r}")
        table = raw["table"]
        try:
            schema, name = parse_table(table) if isinstance(table, str) else parse_table("")
        except ValueError:
            raise ConfigError(
                f"{source}: {where}: table must be schema-qualified, like public.orders "
                '(quote names with capitals, spaces or dots: "Sales"."Order Lines")'
            ) from None
        ons = _strings(raw["on"], f"{where}.on")
        bad = [o for o in ons if o not in OPS]
        if bad:
            raise ConfigError(
                f"{source}: {where}.on: {bad[0]!r} is not one of insert, update, delete, truncate"
            )
        emit = raw["emit"]
        if not isinstance(emit, str) or not is_event_type(emit):
            raise ConfigError(f"{source}: {where}.emit: {emit!r} is not an event type like order.created")
        for k in ("object", "key"):
            if not isinstance(raw[k], str) or not raw[k]:
                raise ConfigError(f"{source}: {where}.{k} must be a non-empty string")
        when = _strings(raw.get("when_changed", []), f"{where}.when_changed")
        if when and ons != ["update"]:
            raise ConfigError(f'{source}: {where}: when_changed applies only to on = ["update"]')
        raw_when = raw.get("when", [])
        if not isinstance(raw_when, list):
            raise ConfigError(f"{source}: {where}.when must be a list of conditions")
        try:
            conditions = tuple(_condition(c, f"{where}.when[{i}]") for i, c in enumerate(raw_when, 1))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if conditions and "truncate" in ons:
            raise ConfigError(f"{source}: {where}: when does not apply to truncate (a truncate has no rows)")
        rule_exclude = _strings(raw.get("exclude_columns", []), f"{where}.exclude_columns")
        exclude = frozenset(default_exclude) | frozenset(rule_exclude)
        if raw["key"] in exclude:
            raise ConfigError(f"{source}: {where}: key {raw['key']!r} is also excluded")
        rules.append(
            Rule(
                table=f"{schema}.{name}",
                on=frozenset(ons),
                emit=emit,
                object=raw["object"],
                key=raw["key"],
                when_changed=tuple(when),
                exclude=exclude,
                conditions=conditions,
                number=n,
                rule_exclude=tuple(rule_exclude),
                schema=schema,
                name=name,
            )
        )
    carts = None
    if "cart_abandoned" in doc:

        def table(text: Any) -> str:
            schema, name = parse_table(text if isinstance(text, str) else "")
            return f"{schema}.{name}"

        carts = parse_cart_rule(doc["cart_abandoned"], source, table)
    return Mapping(rules, carts, _snapshot_settings(doc.get("snapshot", []), rules, source))


def _snapshot_settings(raw: Any, rules: list[Rule], source: str) -> dict[str, dict[str, Any]]:
    """``[[snapshot]]``: per table, what backfill emits (``emit``, ``object``, ``key``,
    ``exclude_columns``) or ``enabled = false``; a table named must have rules."""
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: snapshot must be a list of [[snapshot]] tables")
    mapped = {r.table for r in rules if r.on - {"truncate"}}
    settings: dict[str, dict[str, Any]] = {}
    for n, entry in enumerate(raw, start=1):
        where = f"{source}: snapshot {n}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table")
        extra = set(entry) - {"table", "emit", "object", "key", "exclude_columns", "enabled"}
        if extra:
            raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r}")
        try:
            schema, name = parse_table(entry.get("table", ""))
        except (ValueError, TypeError):
            raise ConfigError(f"{where}: table must be schema-qualified, like public.orders") from None
        table = f"{schema}.{name}"
        if table not in mapped:
            raise ConfigError(f"{where}: {table} has no insert, update or delete rule to snapshot")
        if table in settings:
            raise ConfigError(f"{where}: {table} is named twice")
        given = {k: v for k, v in entry.items() if k != "table"}
        if "emit" in given and not (isinstance(given["emit"], str) and is_event_type(given["emit"])):
            raise ConfigError(f"{where}.emit: {given['emit']!r} is not an event type like order.snapshot")
        for k in ("object", "key"):
            if k in given and not (isinstance(given[k], str) and given[k]):
                raise ConfigError(f"{where}.{k} must be a non-empty string")
        if "exclude_columns" in given:
            given["exclude_columns"] = _strings(given["exclude_columns"], f"snapshot {n}.exclude_columns")
        if "enabled" in given and not isinstance(given["enabled"], bool):
            raise ConfigError(f"{where}.enabled must be true or false")
        excluded = set(given.get("exclude_columns", ())) | {
            c for r in rules if r.table == table for c in r.exclude
        }
        if given.get("key") in excluded:
            raise ConfigError(f"{where}: key {given['key']!r} is also excluded")
        settings[table] = given
    return settings


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


_UNKNOWN = object()  # a value the WAL did not carry and the shadow does not know


def same_value(actual: Any, expected: Any) -> bool:
    """Whether a column's value equals a value written in the mapping file.

    Numbers compare by value whatever their form (``"59.90"`` from a numeric column equals
    ``59.9``); booleans only equal booleans; everything else compares as text."""
    if actual is None:
        return False
    if isinstance(expected, bool) or isinstance(actual, bool):
        return actual is expected
    if actual == expected:
        return True
    if isinstance(expected, str) and not isinstance(actual, str):
        return str(actual) == expected
    try:
        return Decimal(str(actual)) == Decimal(str(expected))
    except (InvalidOperation, ValueError):
        return False


def _test(value: Any, equals: Any, among: tuple[Any, ...] | None, null: bool | None) -> bool:
    if value is _UNKNOWN:
        return True  # an unknown value matches: a repeated event is safer than a missed one
    if null is not None and (value is None) != null:
        return False
    if equals is not None and not same_value(value, equals):
        return False
    return among is None or any(same_value(value, v) for v in among)


def conditions_hold(rule: Rule, op: str, new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Every condition of ``rule`` holds for a change (``old`` is what is known before it)."""
    for cond in rule.conditions:
        column = cond.column
        if cond.needs_old:
            before = None if op == "insert" else old.get(column, _UNKNOWN)
            if not _test(before, cond.old, cond.old_in, cond.old_null):
                return False
        if cond.needs_new:
            if op == "delete":
                after: Any = None
            elif column in new:
                after = new[column]
            else:  # unchanged TOAST: the value is the old one, if known
                after = old.get(column, _UNKNOWN)
            if not _test(after, cond.new, cond.new_in, cond.new_null):
                return False
    return True


def apply(
    mapping: Mapping, table: str, change: RowChange, shadow: dict[str, Any] | None = None
) -> list[EventDraft]:
    """Every rule of ``table`` that matches ``change`` emits one draft.

    ``table`` is the name to match (a partition's parent); ``shadow`` holds the last
    known values of the watched columns when the table has no REPLICA IDENTITY FULL.
    A watched column whose old value is unknown counts as changed, and an unknown value
    satisfies a condition: a missed status change is worse than a repeated one.  A column
    absent from the change (unchanged TOAST) never counts as changed.
    """
    rules = mapping.by_table.get(table)
    if not rules:
        return []
    drafts: list[EventDraft] = []
    changed: dict[str, Any] = {}
    unknown: set[str] = set()
    old: dict[str, Any] = {}
    if change.op == "update":
        old = old_values(change, shadow)
        changed = {c: old[c] for c, v in change.new.items() if c in old and old[c] != v}
        if mapping.watched(table):
            unknown = {c for c in change.new if c not in old}
    elif change.op == "delete" and shadow:
        old = old_values(change, shadow)
    for rule in rules:
        if change.op not in rule.on:
            continue
        if (
            change.op == "update"
            and rule.when_changed
            and not any(c in changed or c in unknown for c in rule.when_changed)
        ):
            continue
        if rule.conditions and not conditions_hold(rule, change.op, change.new, old or (change.old or {})):
            continue
        row = change.new if change.op != "delete" else (change.old or {})
        previous = _strip(changed, rule.exclude) if change.op == "update" else None
        # (positional: half the cost of keywords, once per event)
        drafts.append(
            EventDraft(
                rule.emit,
                rule.object,
                row.get(rule.key),
                _strip(row, rule.exclude),
                previous,
                table,
                change.op,
            )
        )
    return drafts


def truncate_drafts(mapping: Mapping, table: str, relations: list[str]) -> list[EventDraft]:
    """One draft per truncate rule of ``table``; ``relations`` are the tables Postgres
    reported truncated (the table itself, or some of its partitions)."""
    return [
        EventDraft(
            type=rule.emit,
            object=rule.object,
            entity_id=None,
            record={"truncated": relations},
            previous=None,
            table=table,
            op="truncate",
        )
        for rule in mapping.truncates(table)
    ]
