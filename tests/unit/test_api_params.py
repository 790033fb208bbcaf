"""The OpenAPI document and the validators cannot disagree: for every operation, the
documented parameters are the model's fields, and values at a documented bound are
accepted while values just past it are refused, naming the parameter."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Any

import pytest
from pydantic import BaseModel

from api import openapi
from api.errors import ApiError
from api.models import AnalyticsQuery, EventsQuery, ProductsQuery, WebhookSend
from api.params import EARLIEST, LATEST, validate

DOC = openapi.document("test")
OPERATIONS = [
    (path, method, op)
    for path, ops in DOC["paths"].items()
    for method, op in ops.items()
    if path in openapi.MODELS
]


def public_names(model: type[BaseModel]) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items()}


def documented(op: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if "requestBody" in op:
        return op["requestBody"]["content"]["application/json"]["schema"]["properties"]  # type: ignore[no-any-return]
    return {p["name"]: p["schema"] for p in op.get("parameters", [])}


def accepted(model: type[BaseModel], values: dict[str, Any]) -> bool:
    try:
        validate(model, values)
    except ApiError as exc:
        assert exc.status == 422 and exc.code == "invalid_parameter"
        assert exc.field in values, (exc.field, values)
        return False
    return True


def with_required(model: type[BaseModel], name: str, value: Any) -> dict[str, Any]:
    """``value`` for ``name``, with a valid value for each other required field."""
    base: dict[str, Any] = {"id": "7", "event": "note.added", "data": {}, "system": "ct2"}
    required = {info.alias or n for n, info in model.model_fields.items() if info.is_required()}
    return {**{k: base[k] for k in required if k != name}, name: value}


def test_every_operation_with_parameters_has_a_model_and_every_route_is_one():
    assert {path for path, _, _ in OPERATIONS} == set(openapi.MODELS)
    for path, _, op in OPERATIONS:
        assert set(documented(op)) == public_names(openapi.MODELS[path]), path


@pytest.mark.parametrize(("path", "method", "op"), OPERATIONS, ids=[f"{m} {p}" for p, m, _ in OPERATIONS])
def test_documented_bounds_are_the_validators_bounds(path, method, op):
    model = openapi.MODELS[path]
    for name, schema in documented(op).items():
        kind = schema.get("type")
        probe = (lambda v: v) if "requestBody" in op else str  # a query/path/header value is text
        if kind == "integer":
            low, high = schema["minimum"], schema["maximum"]
            for good in (low, high, (low + high) // 2):
                assert accepted(model, with_required(model, name, probe(good))), (path, name, good)
            for bad in (low - 1, high + 1):
                assert not accepted(model, with_required(model, name, probe(bad))), (path, name, bad)
            for bad in (f" {low + 1}", f"+{low + 1}", "１", "١", f"{low + 1}.0", "x"):
                assert not accepted(model, with_required(model, name, bad)), (path, name, bad)
        elif kind == "number":
            low, high = schema["minimum"], schema["maximum"]
            for good in (low, high, (low + high) / 2):
                assert accepted(model, with_required(model, name, str(good))), (path, name, good)
            for bad in (str(high + 0.001), "-0.5", "nan", "inf", "1e1", "+1", "١"):
                assert not accepted(model, with_required(model, name, bad)), (path, name, bad)
        elif "enum" in schema:
            for good in schema["enum"]:
                assert accepted(model, with_required(model, name, good)), (path, name, good)
            assert not accepted(model, with_required(model, name, "not-" + schema["enum"][0]))
        elif kind == "boolean":
            for good in ("true", "false"):
                assert accepted(model, with_required(model, name, good))
            assert not accepted(model, with_required(model, name, "maybe"))
        elif kind == "string" and "maxLength" in schema:
            longest = schema["maxLength"]
            fill = "a" if "pattern" not in schema or re.fullmatch(schema["pattern"], "a") else None
            if fill is not None and name != "event":
                assert accepted(model, with_required(model, name, fill * longest)), (path, name)
                assert not accepted(model, with_required(model, name, fill * (longest + 1))), (path, name)
            if schema.get("pattern") == "^[^\\x00]*$":
                assert not accepted(model, with_required(model, name, "a\x00b"))
        elif kind == "string" and "anyOf" in schema:  # a date or a time
            for good in ("2026-11-25", "2026-11-25T14:00:00Z", "0001-01-01", "9999-12-31"):
                assert accepted(model, with_required(model, name, good)), (path, name, good)
            for bad in ("2026-13-01", "25/11/2026", "２０２６-11-25", "tomorrow"):
                assert not accepted(model, with_required(model, name, bad)), (path, name, bad)


def test_patterns_documented_are_the_patterns_enforced():
    types = documented(DOC["paths"][f"{openapi.BASE}/events"]["get"])["event_types"]["items"]["pattern"]
    for value in ("order.*", "order.created, review.*", "a,,b", "x" * 100, "[or]der.?"):
        assert re.fullmatch(types, value) and accepted(EventsQuery, {"event_types": [value]}), value
    for value in ("order;drop", "a b", "x" * 101, "order.*\n"):
        assert not re.fullmatch(types, value) and not accepted(EventsQuery, {"event_types": [value]}), value
    event = documented(DOC["paths"][f"{openapi.BASE}/webhooks/send"]["post"])["event"]["pattern"]
    for value in ("order.note_added", "a.b.c"):
        assert re.fullmatch(event, value) and accepted(
            WebhookSend, with_required(WebhookSend, "event", value)
        )
    for value in ("Bad Type", "order", "order.", "order.note\n", "a." + "b" * 100):
        assert not accepted(WebhookSend, with_required(WebhookSend, "event", value)), value


def test_text_with_a_nul_is_refused_for_the_nul_whatever_its_length():
    for value in ("\x00", "a" * 300 + "\x00"):
        with pytest.raises(ApiError) as refused:
            validate(ProductsQuery, {"search": value})
        assert refused.value.message == "search must not contain NUL characters"


def test_dates_at_the_edges_are_clamped_into_what_a_datetime_holds():
    q = validate(AnalyticsQuery, {"date_from": "9999-12-01", "date_to": "9999-12-31"})
    assert q.date_to == LATEST
    assert validate(AnalyticsQuery, {"date_from": "0001-01-01T00:00:00+14:00"}).date_from == EARLIEST
    assert validate(AnalyticsQuery, {"date_to": "9999-12-31T20:00:00-14:00"}).date_to == LATEST
    previous, start, end = validate(
        AnalyticsQuery, {"date_from": "0001-01-01", "date_to": "0001-01-31"}
    ).period(date(2026, 11, 25))
    assert previous == start == EARLIEST and end == datetime(1, 2, 1, tzinfo=UTC)
    previous, start, end = validate(AnalyticsQuery, {"date_to": "0001-01-05"}).period(date(2026, 11, 25))
    assert previous == start == EARLIEST


def test_analytics_without_date_to_ends_today_and_refuses_a_start_after_it():
    today = date(2026, 11, 25)
    previous, start, end = validate(AnalyticsQuery, {}).period(today)
    assert end == datetime(2026, 11, 26, tzinfo=UTC) and (end - start).days == 30 == (start - previous).days
    assert validate(AnalyticsQuery, {"date_from": "2026-11-25"}).period(today)[1] == datetime(
        2026, 11, 25, tzinfo=UTC
    )
    for future in ("2026-11-26", "2030-01-01"):
        with pytest.raises(ApiError) as refused:
            validate(AnalyticsQuery, {"date_from": future}).period(today)
        assert refused.value.field == "date_from" and refused.value.status == 422
