"""JSON that never loses a value (pure: stdlib and orjson only).

orjson is fast but not total: ``orjson.loads`` turns an integer past 64 bits into a binary
float, and ``orjson.dumps`` refuses such an integer and anything nested deeper than 254
levels.  Postgres has neither limit inside ``json``/``jsonb``, and one value capture cannot
write stops capture for good.  So:

- :class:`JsonText` carries a ``json``/``jsonb`` value as the text Postgres wrote and is
  written out as that very JSON: never parsed on the hot path, every number and any depth
  kept exactly as they are.
- :func:`dumps` is orjson's, with a way round for what orjson refuses.
- :func:`loads` is exact: the standard library's parser (integers stay integers).
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

__all__ = ["JsonText", "dumps", "loads"]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"number out of range: {text}")
    return number


_decoder = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)


def loads(text: str | bytes | bytearray) -> Any:
    """Parse JSON exactly: integers of any size stay integers (orjson would make floats of
    those past 64 bits).  Strict: ``NaN``, ``Infinity`` and numbers past a double's range
    are refused.  Raises ``ValueError`` (``UnicodeDecodeError`` included) on what is not
    JSON, ``RecursionError`` past about 900 levels of nesting."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")
    return _decoder.decode(text)


class JsonText(str):
    """A ``json``/``jsonb`` value as Postgres printed it, serialized as that JSON itself.

    Equality, for the mapping's "what changed" and value conditions: against another
    :class:`JsonText`, by text (``jsonb`` prints one text per value; a ``json`` column keeps
    the text it was given, so a new text is a change); against anything else (a value
    read back from the shadow, or parsed by psycopg), by the parsed value.  A value too
    deep to parse in Python is unequal to anything but its own text.
    """

    __slots__ = ()

    def value(self) -> Any:
        """The parsed value (exact: see :func:`loads`)."""
        return json.loads(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, JsonText):
            return str.__eq__(self, other)
        if other is None or isinstance(other, (str, int, float, dict, list)):
            try:
                return bool(json.loads(self) == other)
            except (ValueError, RecursionError):
                return False
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = str.__hash__

    def __repr__(self) -> str:
        return f"JsonText({str.__repr__(self)})"


_OPTION = orjson.OPT_PASSTHROUGH_SUBCLASS  # JsonText (a str subclass) reaches _default


def _default(value: Any) -> Any:
    if isinstance(value, JsonText):
        return orjson.Fragment(str.__str__(value))  # Fragment takes an exact str only
    # other subclasses of what orjson writes natively (passed through by _OPTION)
    base: type[Any]
    for base in (str, int, float, dict, list):
        if isinstance(value, base):
            return base(value)
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def dumps(value: Any, *, indent: bool = False) -> bytes:
    """``value`` as UTF-8 JSON.  Never fails on what capture or the API can hold: integers
    past 64 bits and nesting past orjson's 254 levels are written by a slower path."""
    option = _OPTION | orjson.OPT_INDENT_2 if indent else _OPTION
    try:
        return orjson.dumps(value, default=_default, option=option)
    except TypeError:  # orjson.JSONEncodeError: a huge integer, too deep, or not JSON at all
        return _dumps_whole(value, indent)


class _Token(bytes):
    """Punctuation already encoded, on :func:`_dumps_whole`'s stack among the values."""


_OPEN = {dict: (_Token(b"{"), _Token(b"}")), list: (_Token(b"["), _Token(b"]"))}


def _scalar(value: Any) -> bytes:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(int(value)).encode()  # any size: JSON numbers have no limit
    if isinstance(value, str) and not isinstance(value, JsonText):
        return _string(value)
    return orjson.dumps(value, default=_default, option=_OPTION)


def _string(value: str) -> bytes:
    try:
        return orjson.dumps(str.__str__(value))
    except TypeError:  # a lone surrogate (json.loads accepts "\ud800"): written as its escape
        return json.dumps(value).encode()


def _dumps_whole(value: Any, indent: bool) -> bytes:
    """Serialize without recursion (any depth), writing big integers as their digits.
    Containers go back to orjson whole when it can take them, so only the parts that
    need this path pay for it."""
    out: list[bytes] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if type(item) is _Token:
            out.append(item)
            continue
        if isinstance(item, tuple):
            item = list(item)
        kind = dict if isinstance(item, dict) else list if isinstance(item, list) else None
        if kind is None:
            out.append(_scalar(item))
            continue
        if not indent:
            try:  # most of a value is usually fine: only its troublesome parts come here
                out.append(orjson.dumps(item, default=_default, option=_OPTION))
                continue
            except TypeError:
                pass
        opening, closing = _OPEN[kind]
        out.append(opening)
        parts: list[Any] = []
        if kind is dict:
            for n, (key, member) in enumerate(item.items()):
                if not isinstance(key, str):
                    raise TypeError("Dict key must be str")
                parts.append(_Token((b"," if n else b"") + _string(key) + b":"))
                parts.append(member)
        else:
            for n, member in enumerate(item):
                if n:
                    parts.append(_Token(b","))
                parts.append(member)
        parts.append(closing)
        stack.extend(reversed(parts))
    return b"".join(out)
