"""wal2json format-version 2 messages → typed values (pure: no I/O).

One wal2json v2 message is one JSON object: ``B``/``C`` frame a transaction, ``I``/``U``/``D``
carry one row, ``T`` a truncate and ``M`` a logical message.  Numeric values arrive as JSON
number literals: we keep the literal's text so money never becomes a binary float.
``json``/``jsonb`` values arrive as a JSON string holding the value's text: they stay that
text, as a :class:`~common.jsontext.JsonText` that is written out as the JSON itself, so no
number inside them is rounded and no depth is too deep.
Columns that wal2json leaves out of an update (unchanged TOAST values) stay absent.
"""

from __future__ import annotations

import json
import math
import operator
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

import orjson

from common.errors import DecodeError
from common.formats import parse_lsn
from common.jsontext import JsonText

# -- message values ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Begin:
    xid: int
    commit_time: str
    lsn: int  # the commit record's start
    end_lsn: int  # the commit record's end: where a consumer resumes after this transaction


@dataclass(frozen=True, slots=True)
class Commit:
    xid: int
    commit_time: str
    lsn: int
    end_lsn: int


class RowChange(NamedTuple):  # a NamedTuple: immutable, and made twice as fast as a frozen dataclass
    op: str  # insert | update | delete
    table: str  # schema-qualified, as reported (a partition by its own name)
    xid: int
    lsn: str  # as wal2json prints it: the envelope's source.lsn
    new: dict[str, Any]  # columns after the change; absent for delete
    old: dict[str, Any] | None  # replica-identity values (all columns under FULL)
    pk: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Truncate:
    table: str
    xid: int
    lsn: int


@dataclass(frozen=True, slots=True)
class Message:
    prefix: str
    content: str
    lsn: int
    transactional: bool


Decoded = Begin | Commit | RowChange | Truncate | Message

_OPS = {"I": "insert", "U": "update", "D": "delete"}

# Types whose JSON number literal must be kept as text.  Floats are floats on purpose.
_FLOAT_TYPES = frozenset({"real", "double precision"})


class _NumberText(str):
    """A JSON number literal kept as the text it was written with."""

    __slots__ = ()


def _number_text(text: str) -> _NumberText:
    return _NumberText(text)


_decoder = json.JSONDecoder(parse_float=_number_text)

# Numbers a double cannot carry exactly: unconstrained numeric, or numeric(p,s) with p > 15.
# Only messages holding such a column pay for the slower decoder that keeps literal text.
_FLOAT_SAFE_DIGITS = 15
_TYPMOD = re.compile(r"^(?:numeric|decimal)\((\d+)(?:,(\d+))?\)$")


def iso_utc(pg_timestamp: str) -> str:
    """wal2json's ``2026-11-25 15:07:53.877066+00`` → ``2026-11-25T15:07:53.877066Z``."""
    # Fast path: the replication session runs with TimeZone=UTC (cdc/stream.py), so values
    # end in "+00"; anything else (a message of another session) is parsed.
    if len(pg_timestamp) >= 22 and pg_timestamp.endswith("+00") and pg_timestamp[10] == " ":
        body = pg_timestamp[:-3]
        if len(body) == 19:
            return f"{body[:10]}T{body[11:]}.000000Z"
        if body[19] == "." and body[20:].isdigit():
            return f"{body[:10]}T{body[11:19]}.{body[20:26].ljust(6, '0')}Z"
    try:
        parsed = datetime.fromisoformat(pg_timestamp)
    except ValueError:
        raise DecodeError(f"not a timestamp: {pg_timestamp!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_recent_timestamps: dict[str, str] = {}


def _timestamptz(value: Any) -> Any:
    # Rows of one transaction usually share now(): remember recent conversions.
    hit = _recent_timestamps.get(value) if isinstance(value, str) else None
    if hit is not None:
        return hit
    if isinstance(value, str) and value[:1].isdigit():
        if len(_recent_timestamps) > 256:
            _recent_timestamps.clear()
        converted = _recent_timestamps[value] = iso_utc(value)
        return converted
    return value  # null, infinity, -infinity


def _json(value: Any) -> Any:
    # wal2json quotes every json/jsonb value: its text is Postgres's own output, valid JSON.
    # Kept unparsed: a receiver gets the very JSON Postgres holds (integers past 64 bits,
    # any depth), and capture never pays for a parse.
    return JsonText(value) if isinstance(value, str) else value


def _numeric(value: Any) -> Any:
    # a literal with a fraction or exponent is already its text; an integer literal is not
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return str(value) if isinstance(value, _NumberText) else value


def _scaled(scale: int) -> Any:
    """numeric(p,s) with p <= 15 parsed by orjson as a float: every such value survives a
    double exactly, and Postgres always prints it with ``s`` decimals, so formatting with
    ``s`` decimals gives back the very text."""
    spec = f".{scale}f"

    def convert(value: Any) -> Any:
        if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
            return format(value, spec)
        return _numeric(value)

    return convert


def _float(value: Any) -> Any:
    return float(value) if isinstance(value, _NumberText) else value


# wal2json writes integers, floats and booleans unquoted, but decides by the column's own
# type: a domain over one arrives quoted ("42", "1.5", "t"), and with
# include-domain-data-type its type is named by the base type.  These make it the value a
# column of the base type gives.  Text that is not what the type prints stays text.


def _integer(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return value
    return value


def _double(value: Any) -> Any:
    if isinstance(value, str):  # a domain's text, or a literal kept as _NumberText
        try:
            number = float(value)
        except ValueError:
            return value
        # NaN and ±Infinity: null, as wal2json writes them for a column of the base type
        return number if math.isfinite(number) else None
    return value


def _boolean(value: Any) -> Any:
    return {"t": True, "f": False}.get(value, value) if isinstance(value, str) else value


def _bytea(value: Any) -> Any:
    # wal2json strips bytea's "\x" itself, but not a domain's
    return value[2:] if isinstance(value, str) and value.startswith("\\x") else value


class _Converters(dict[str, Any]):
    """Column type → converter (None for the many types taken as they are), cached."""

    def __missing__(self, ctype: str) -> Any:
        conv: Any
        scaled = _TYPMOD.match(ctype)
        if scaled and int(scaled.group(1)) <= _FLOAT_SAFE_DIGITS:
            conv = _scaled(int(scaled.group(2) or 0))
        elif ctype.startswith(("numeric", "decimal")):
            conv = _numeric
        elif ctype in _FLOAT_TYPES:
            conv = _double
        elif ctype in _INTEGER_TYPES:
            conv = _integer
        elif ctype == "boolean":
            conv = _boolean
        elif ctype == "bytea":
            conv = _bytea
        elif ctype == "timestamp with time zone":
            conv = _timestamptz
        elif ctype in ("json", "jsonb"):
            conv = _json
        elif ctype in _PLAIN_TYPES:
            conv = None
        else:
            conv = _float  # unknown types: a number is what orjson makes of it, whichever decoder ran
        self[ctype] = conv
        return conv


_INTEGER_TYPES = frozenset({"smallint", "integer", "bigint", "oid"})
_PLAIN_TYPES = frozenset(
    {
        "text",
        "character varying",
        "uuid",
        "date",
        "timestamp without time zone",
        "inet",
        "character",
    }
)
_CONVERTERS = _Converters()


# wal2json writes a type name that format_type() quotes (a type in a schema off the search
# path, or with capitals or spaces: "Sales Ops".stage) as it is, not as a JSON string, which
# makes the message invalid JSON.  Such a name is a run of SQL identifiers joined by dots,
# with an optional typmod and array brackets; it starts with a quote and goes on past the
# closing one, which a JSON string never does.  Only a message that fails to parse is
# searched, so valid messages pay nothing.
_IDENT = rb'(?:"(?:[^"]|"")*"|[A-Za-z_][A-Za-z0-9_$]*)'
_RAW_TYPE = re.compile(rb'"type":("(?:[^"]|"")*"(?:\.' + _IDENT + rb"|\([0-9, ]*\)|\[\])+)(?=[,}])")


def repair_type_names(payload: bytes | memoryview) -> bytes | None:
    """The message with every unquoted type name made a JSON string; None if it has none."""
    repaired, n = _RAW_TYPE.subn(
        lambda m: b'"type":' + json.dumps(m.group(1).decode("utf-8")).encode(), bytes(payload)
    )
    return repaired if n else None


def _loads(payload: bytes | memoryview) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        # orjson refuses a number past a double's range (a numeric of 309 digits or more)
        return _decoder.decode(bytes(payload).decode("utf-8"))


class _Plan(NamedTuple):
    """What decoding a column list of one type signature takes: the positions whose
    values need converting, and whether a number literal must be kept as text."""

    steps: tuple[tuple[int, Any], ...]
    literals: bool


def _needs_literals(ctype: str) -> bool:
    if ctype in ("numeric", "decimal"):
        return True
    scaled = _TYPMOD.match(ctype)
    return scaled is not None and int(scaled.group(1)) > _FLOAT_SAFE_DIGITS


class _Plans(dict[tuple[str, ...], _Plan]):
    """Type signature of a column list → its plan.  A table's messages share one signature
    (two with its identity), so the per-column work is done once, not once per row."""

    def __missing__(self, types: tuple[str, ...]) -> _Plan:
        if len(self) >= 4096:  # a schema changing without end: start over rather than grow
            self.clear()
        steps = tuple((i, _CONVERTERS[t]) for i, t in enumerate(types) if _CONVERTERS[t] is not None)
        plan = self[types] = _Plan(steps, any(_needs_literals(t) for t in types))
        return plan


_PLANS = _Plans()
_NO_PLAN = _Plan((), False)
_name = operator.itemgetter("name")
_type = operator.itemgetter("type")
_value = operator.itemgetter("value")


def _plan(items: list[dict[str, Any]] | None) -> _Plan:
    return _PLANS[tuple(map(_type, items))] if items else _NO_PLAN


def _columns(items: list[dict[str, Any]] | None, plan: _Plan) -> dict[str, Any]:
    if not items:
        return {}
    values = list(map(_value, items))
    for i, conv in plan.steps:
        values[i] = conv(values[i])
    return dict(zip(map(_name, items), values, strict=True))


def _row(action: str, obj: dict[str, Any], payload: bytes | memoryview) -> RowChange:
    columns = obj.get("columns")
    identity = obj.get("identity")
    plan = _plan(columns)
    old_plan = _plan(identity)
    if plan.literals or old_plan.literals:
        # a column a double cannot carry: parse again, keeping number literals as text
        obj = _decoder.decode(bytes(payload).decode("utf-8"))
        columns = obj.get("columns")
        identity = obj.get("identity")
    return RowChange(
        _OPS[action],
        f"{obj['schema']}.{obj['table']}",
        obj["xid"],
        obj["lsn"],
        _columns(columns, plan),
        _columns(identity, old_plan) if "identity" in obj else None,
        tuple(map(_name, obj.get("pk") or ())),
    )


def decode(payload: bytes | memoryview | str) -> Decoded:
    """Decode one wal2json v2 message.  Raises :class:`DecodeError` on anything else.

    Row changes, begins and commits go through the compiled decoder when it is built;
    whatever it leaves (other actions, anything unusual or malformed) is decoded here in
    Python.
    """
    if _compiled is not None and not isinstance(payload, str):
        try:
            msg = _compiled.decode_row(payload)
        except ValueError:
            msg = None  # the Python path decides, and names what is wrong
        if msg is not None:
            return cast(Decoded, msg)
    return decode_python(payload)


def decode_python(payload: bytes | memoryview | str) -> Decoded:
    """The reference decoder: every message, in Python."""
    try:
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        try:
            obj = _loads(payload)
        except ValueError:
            repaired = repair_type_names(payload)
            if repaired is None:
                raise
            payload = repaired
            obj = _loads(payload)
        action = obj["action"]
        if action in _OPS:
            return _row(action, obj, payload)
        if action == "B" or action == "C":
            cls = Begin if action == "B" else Commit
            return cls(
                xid=obj["xid"],
                commit_time=iso_utc(obj["timestamp"]),
                lsn=parse_lsn(obj["lsn"]),
                end_lsn=parse_lsn(obj["nextlsn"]),
            )
        if action == "T":
            return Truncate(
                table=f"{obj['schema']}.{obj['table']}", xid=obj["xid"], lsn=parse_lsn(obj["lsn"])
            )
        if action == "M":
            return Message(
                prefix=obj.get("prefix", ""),
                content=obj.get("content", ""),
                lsn=parse_lsn(obj["lsn"]),
                transactional=bool(obj.get("transactional")),
            )
    except DecodeError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeError, orjson.JSONDecodeError) as exc:
        raise DecodeError(f"malformed wal2json message: {exc}") from None
    raise DecodeError(f"unknown wal2json action {obj.get('action')!r}")


def _convert(ctype: str, value: Any) -> Any:
    """The compiled decoder's way back for the types it leaves to Python."""
    conv = _CONVERTERS[ctype]
    return value if conv is None else conv(value)


_compiled: Any
try:
    from cdc import _wal2json as _compiled
except ImportError:  # built without a C compiler: Python decodes everything
    _compiled = None
else:
    _compiled.setup(RowChange, _convert, Begin, Commit)

COMPILED = _compiled is not None  # for logs and tests
