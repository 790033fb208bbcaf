"""wal2json format-version 2 messages → typed values (pure: no I/O).

One wal2json v2 message is one JSON object: ``B``/``C`` frame a transaction, ``I``/``U``/``D``
carry one row, ``T`` a truncate and ``M`` a logical message.  Numeric values arrive as JSON
number literals: we keep the literal's text so money never becomes a binary float.
Columns that wal2json leaves out of an update (unchanged TOAST values) stay absent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from cdc.errors import DecodeError

# -- LSNs -------------------------------------------------------------------------------


def parse_lsn(text: str) -> int:
    """``"16/B374D848"`` → integer position."""
    try:
        hi, lo = text.split("/")
        return (int(hi, 16) << 32) | int(lo, 16)
    except (ValueError, AttributeError):
        raise DecodeError(f"not an LSN: {text!r}") from None


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


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


@dataclass(frozen=True, slots=True)
class RowChange:
    op: str  # insert | update | delete
    table: str  # schema-qualified, as reported (a partition by its own name)
    xid: int
    lsn: int
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
_FLOAT_TYPES = frozenset({"real", "double precision", "float4", "float8"})


class _NumberText(str):
    """A JSON number literal kept as the text it was written with."""

    __slots__ = ()


def _number_text(text: str) -> _NumberText:
    return _NumberText(text)


_decoder = json.JSONDecoder(parse_float=_number_text)


def iso_utc(pg_timestamp: str) -> str:
    """wal2json's ``2026-11-25 15:07:53.877066+00`` → ``2026-11-25T15:07:53.877066Z``."""
    try:
        parsed = datetime.fromisoformat(pg_timestamp)
    except ValueError:
        raise DecodeError(f"not a timestamp: {pg_timestamp!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_TIMESTAMPTZ = "timestamp with time zone"
_JSON_TYPES = frozenset({"json", "jsonb"})


def _value(column: dict[str, Any]) -> Any:
    value = column.get("value")
    if isinstance(value, str) and not isinstance(value, _NumberText):
        ctype = column.get("type")
        if ctype == _TIMESTAMPTZ and value[:1].isdigit():
            return iso_utc(value)
        if ctype in _JSON_TYPES:
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value
    if isinstance(value, _NumberText):
        if column.get("type") in _FLOAT_TYPES:
            return float(value)
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        ctype = column.get("type", "")
        if ctype.startswith("numeric") or ctype.startswith("decimal"):
            return str(value)
    return value


def normalize(value: Any) -> Any:
    """A value read with psycopg, in the form :func:`decode` gives the same column."""
    if value is None or isinstance(value, (bool, int, float, str, dict, list)):
        return value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value.isoformat(sep=" ")
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _columns(items: list[dict[str, Any]] | None) -> dict[str, Any]:
    if not items:
        return {}
    return {c["name"]: _value(c) for c in items}


def decode(payload: bytes | str) -> Decoded:
    """Decode one wal2json v2 message.  Raises :class:`DecodeError` on anything else."""
    try:
        text = payload.decode("utf-8") if isinstance(payload, (bytes, bytearray, memoryview)) else payload
        obj = _decoder.decode(text)
        action = obj["action"]
        if action in _OPS:
            return RowChange(
                op=_OPS[action],
                table=f"{obj['schema']}.{obj['table']}",
                xid=obj["xid"],
                lsn=parse_lsn(obj["lsn"]),
                new=_columns(obj.get("columns")),
                old=_columns(obj["identity"]) if "identity" in obj else None,
                pk=tuple(p["name"] for p in obj.get("pk") or ()),
            )
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
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DecodeError(f"malformed wal2json message: {exc}") from None
    raise DecodeError(f"unknown wal2json action {obj.get('action')!r}")
