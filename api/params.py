"""Parameters declared once.

Each endpoint's parameters are one pydantic model (:mod:`api.models`), built from the
types below.  :func:`parse` validates a request into that model, and
:func:`parameters` derives the OpenAPI description of the same fields from pydantic's
own JSON Schema of the model, so what is documented and what is accepted cannot drift
apart.  A refused value is a 422 naming the parameter; its message is derived from
that same schema (``per_page must be between 1 and 500``).

The text of a request is read strictly: integers are ASCII digits only (no sign, no
spaces, no ``_``, no other script's digits), numbers ASCII digits with an optional
fraction, and text never holds a NUL.
"""

from __future__ import annotations

import functools
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, BeforeValidator, Field, PlainValidator, ValidationError, WithJsonSchema
from pydantic_core import PydanticCustomError

from api.errors import ApiError

MAX_ID = 2**63 - 1  # ids are 64-bit integers in SQLite and Postgres
EARLIEST = datetime.min.replace(tzinfo=UTC)  # dates are clamped to what a datetime can hold
LATEST = datetime.max.replace(tzinfo=UTC)

M = TypeVar("M", bound=BaseModel)
Obj = dict[str, Any]


class Location(str):
    """Field metadata: where a parameter is sent (a field without one is in the query)."""


PATH = Location("path")
HEADER = Location("header")


def refuse(predicate: str) -> PydanticCustomError:
    """A refusal; the message is ``"<parameter> <predicate>"``."""
    return PydanticCustomError("invalid_parameter", predicate)


# -- the types a model is built from -----------------------------------------------------------------


def _digits(value: Any) -> Any:
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):
            raise refuse("must be an integer")
        return int(value) if len(value) <= 20 else 10**20  # past any bound: refused by it
    if isinstance(value, bool) or not isinstance(value, int):
        raise refuse("must be an integer")
    return value


def _decimal(value: Any) -> Any:
    if isinstance(value, str):
        whole, _, fraction = value.partition(".")
        if not (value.isascii() and whole.isdigit() and (fraction.isdigit() or "." not in value)):
            raise refuse("must be a number")
        return float(value)
    return value


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.lower() if isinstance(value, str) else None
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise refuse("must be true or false")


def _no_nul(value: Any) -> Any:
    if isinstance(value, str) and "\x00" in value:
        raise refuse("must not contain NUL characters")
    return value


def _instant(value: Any, *, end: bool) -> datetime:
    """A date (``2026-11-25``) or an ISO 8601 time, in UTC.  As the end of a range a day
    means the whole day: the bound is exclusive.  Values past what a datetime holds in UTC
    (a time zone pushing year 1 or year 9999 over the edge, the day after 9999-12-31) are
    clamped to :data:`EARLIEST` / :data:`LATEST`."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not value.isascii():
        raise refuse("must be a date (YYYY-MM-DD) or an ISO 8601 time")
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return _after(start, timedelta(days=1)) if end else start
        moment = datetime.fromisoformat(value.upper())
    except ValueError:
        raise refuse("must be a date (YYYY-MM-DD) or an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        moment = moment.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+14:00 or 9999-12-31T23:00-14:00
        offset = moment.utcoffset()
        moment = EARLIEST if offset is not None and offset > timedelta(0) else LATEST
    return _after(moment, timedelta(microseconds=1)) if end else moment


def _after(moment: datetime, step: timedelta) -> datetime:
    return LATEST if LATEST - moment < step else moment + step


_DATE_SCHEMA: Obj = {
    "type": "string",
    "anyOf": [{"format": "date"}, {"format": "date-time"}],
}

Integer = BeforeValidator(_digits)
Id = Annotated[int, Field(ge=1, le=MAX_ID), Integer]
Number = BeforeValidator(_decimal)
Boolean = Annotated[bool, PlainValidator(_boolean), WithJsonSchema({"type": "boolean"})]
Text = BeforeValidator(_no_nul)
NO_NUL = r"^[^\x00]*$"
Start = Annotated[
    datetime, PlainValidator(functools.partial(_instant, end=False)), WithJsonSchema(_DATE_SCHEMA)
]
End = Annotated[datetime, PlainValidator(functools.partial(_instant, end=True)), WithJsonSchema(_DATE_SCHEMA)]


def date_range(start: datetime | None, end: datetime | None) -> None:
    """Refuse a range that ends before it starts (for a model validator)."""
    if start is not None and end is not None and end <= start:
        raise PydanticCustomError(
            "invalid_parameter", "must not be before date_from", {"parameter": "date_to"}
        )


# -- parsing a request -----------------------------------------------------------------------------


@functools.cache
def _fields(model: type[BaseModel]) -> tuple[tuple[str, str, bool], ...]:
    """(public name, location, repeated) of each field."""
    out = []
    for name, info in model.model_fields.items():
        where = next((m for m in info.metadata if isinstance(m, Location)), "query")
        repeated = schema_of(model, info.alias or name).get("type") == "array"
        out.append((info.alias or name, str(where), repeated))
    return tuple(out)


def parse(model: type[M], request: web.Request) -> M:
    """The request's parameters as ``model``; an empty value counts as absent."""
    values: dict[str, Any] = {}
    for name, where, repeated in _fields(model):
        if where == "query":
            if repeated:
                many = request.query.getall(name, ())
                if many:
                    values[name] = many
                continue
            value = request.query.get(name)
        elif where == "path":
            value = request.match_info.get(name)
        else:
            value = request.headers.get(name)
        if value:
            values[name] = value
    return validate(model, values)


def validate(model: type[M], values: Any) -> M:
    """``values`` (a mapping of parameters, or a JSON body) as ``model``, or a 422."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise refusal(model, exc) from None


def refusal(model: type[BaseModel], exc: ValidationError) -> ApiError:
    """The 422 for the first thing wrong, in words derived from the model's schema."""
    error = exc.errors(include_url=False)[0]
    ctx = error.get("ctx") or {}
    name = str(ctx.get("parameter") or (error["loc"][0] if error["loc"] else "body"))
    kind = error["type"]
    schema = schema_of(model, name)
    if "explain" in schema:  # the field says what it must be, whatever was wrong
        predicate = schema["explain"]
    elif kind == "invalid_parameter":
        predicate = error["msg"]
    elif kind == "missing":
        predicate = "is required"
    elif kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        predicate = f"must be between {_show(schema.get('minimum'))} and {_show(schema.get('maximum'))}"
    elif kind == "literal_error":
        predicate = f"must be one of {', '.join(map(str, schema.get('enum', ())))}"
    elif kind == "string_too_long":
        predicate = f"must be at most {ctx.get('max_length')} characters"
    else:
        predicate = "is not valid"
    return ApiError(422, "invalid_parameter", f"{name} {predicate}", name)


def _show(bound: Any) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


# -- the document ----------------------------------------------------------------------------------


@functools.cache
def _schemas(model: type[BaseModel]) -> dict[str, Obj]:
    doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {name: _openapi(prop) for name, prop in doc.get("properties", {}).items()}


def schema_of(model: type[BaseModel], name: str) -> Obj:
    """The OpenAPI 3.0 schema of one parameter (by its public name), as documented."""
    return _schemas(model).get(name, {})


def _openapi(prop: Obj) -> Obj:
    """A property of pydantic's JSON Schema as OpenAPI 3.0 has it: an optional value is
    its non-null branch; titles go."""
    prop = {k: v for k, v in prop.items() if k != "title"}
    branches = prop.pop("anyOf", None)
    if branches is not None:
        kept = [b for b in branches if b.get("type") != "null"]
        if len(kept) == 1:
            prop = {**kept[0], **prop}
        else:
            prop["anyOf"] = kept
    if prop.get("default", 0) is None:
        del prop["default"]
    return prop


def parameters(model: type[BaseModel]) -> list[Obj]:
    """The OpenAPI parameters of ``model``, one per field, in declaration order."""
    out = []
    for name, where, repeated in _fields(model):
        schema = dict(schema_of(model, name))
        schema.pop("explain", None)
        description = schema.pop("description", "")
        param: Obj = {
            "name": name,
            "in": where,
            "required": where == "path",
            "description": description,
            "schema": schema,
        }
        if repeated:
            param |= {"style": "form", "explode": True}
        out.append(param)
    return out


def body(model: type[BaseModel]) -> Obj:
    """The OpenAPI schema of a JSON body."""
    doc = model.model_json_schema()
    props = {}
    for name in doc.get("properties", {}):
        prop = dict(schema_of(model, name))
        prop.pop("explain", None)
        props[name] = prop
    return {"type": "object", "required": doc.get("required", []), "properties": props}
