"""The event catalogue (config/catalogue.py, config/schemas) agrees with itself, with DESIGN's
list of types, with the default endpoints and mapping, and with docs/events.md."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from api.webhooks import CAPTURED_TYPES
from cdc.mapping import load_mapping
from config import catalogue
from config.settings import default_endpoints
from tests.catalogue_check import SchemaWatch, problems
from tests.contract import TWELVE

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED = TWELVE


def test_the_catalogue_is_designs_twelve_types_webhook_test_the_gap_marker_and_the_snapshots():
    assert set(catalogue.TYPES) == DOCUMENTED | {"webhook.test", "ct1.gap"} | set(catalogue.SNAPSHOTS)
    assert len(catalogue.TYPES) == len(catalogue.CATALOGUE)
    # a key needs the captured-types permission to send any of them by hand
    assert set(catalogue.TYPES) <= CAPTURED_TYPES


def test_every_schema_is_a_valid_draft_2020_12_schema_of_its_own_type():
    shipped = {p.stem for p in (ROOT / "config" / "schemas").glob("*.json")}
    assert shipped == set(catalogue.SCHEMAS) - set(catalogue.SNAPSHOTS)  # derived, not shipped
    for name in catalogue.SCHEMAS:
        schema = catalogue.schema(name)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        Draft202012Validator.check_schema(schema)
        assert schema["description"] == catalogue.description(name)
    for entry in catalogue.CATALOGUE:
        props = catalogue.schema(entry.type)["properties"]
        assert props["type"] == {"const": entry.type}
        assert props["data"]["properties"]["object"] == {"const": entry.object}
        op = props["source"].get("properties", {}).get("op")
        assert op == ({"const": entry.op} if entry.op else None), entry.type


def test_definitions_shared_by_schemas_are_the_same_in_each():
    """Each file stands alone, so the envelope's pieces (timestamp, LSN, decimal text,
    the records of the types of one table) are repeated: they must not drift apart."""
    seen: dict[str, tuple[str, Any]] = {}
    for name in catalogue.SCHEMAS:
        for key, definition in catalogue.schema(name).get("$defs", {}).items():
            first = seen.setdefault(key, (name, definition))
            assert definition == first[1], f"$defs/{key} differs between {first[0]} and {name}"


def test_every_record_keeps_the_never_leaving_columns_out():
    for entry in catalogue.CATALOGUE:
        if entry.op not in ("insert", "update"):
            continue
        record = catalogue.schema(entry.type)["$defs"][entry.object]
        assert record["properties"]["password"] is False
        assert record["properties"]["remember_token"] is False
        assert record["additionalProperties"] is True  # a schema of one's own has more columns
        assert "required" not in record  # nor need it have the sample's


def test_default_endpoints_receive_what_the_catalogue_says():
    endpoints = default_endpoints()
    assert [e.name for e in endpoints] == list(catalogue.BOTH)
    for entry in catalogue.CATALOGUE:
        if not entry.routed:
            continue
        receiving = tuple(
            e.name for e in endpoints if any(fnmatch.fnmatchcase(entry.type, g) for g in e.events)
        )
        assert receiving == entry.endpoints, entry.type
    assert catalogue.BY_TYPE["marketplace.analytics"].endpoints == ("ct3",)


def test_the_default_mapping_emits_the_row_types_as_the_catalogue_declares_them():
    mapping = load_mapping(str(ROOT / "config" / "mapping.toml"))
    emitted = {rule.emit for rule in mapping.rules}
    assert emitted == {e.type for e in catalogue.CATALOGUE if e.op in ("insert", "update")}
    for rule in mapping.rules:
        entry = catalogue.BY_TYPE[rule.emit]
        assert rule.object == entry.object and rule.on == {entry.op}, rule.where


ENVELOPES: list[tuple[dict[str, Any], str]] = [
    ({"type": "order.created", "source": {"op": "insert"}}, "order.created"),
    ({"type": "order.created", "source": {"op": "manual"}}, catalogue.MANUAL),
    ({"type": "seller.note_added", "source": {"op": "manual"}}, catalogue.MANUAL),
    ({"type": "deal.won", "source": {"op": "update"}}, catalogue.ENVELOPE),
    ({"type": "webhook.test", "source": None}, "webhook.test"),
]


@pytest.mark.parametrize(("envelope", "name"), ENVELOPES)
def test_each_envelope_answers_to_one_schema(envelope, name):
    assert catalogue.schema_name(envelope) == name


CUSTOMER = {
    "id": 228,
    "type": "customer.created",
    "timestamp": "2026-11-25T14:00:00.287992Z",
    "data": {
        "object": "customer",
        "id": 21,
        "record": {
            "id": 21,
            "name": "Mateo Novak",
            "created_at": "2026-11-25T14:00:00.287992Z",
            "shoe_size": 44,
        },
        "previous": None,
    },
    "source": {"table": "crm.people", "op": "insert", "lsn": "0/2362E78", "xid": 917},
}


def test_a_misfit_is_named_and_recorded():
    assert problems(CUSTOMER) == []  # columns of one's own, and fewer, are allowed
    bad = json.loads(json.dumps(CUSTOMER))
    bad["data"]["record"]["created_at"] = "2026-11-25 14:00:00+00"
    bad["data"]["record"]["password"] = "$2y$10$..."
    bad["source"]["lsn"] = 12345
    found = problems(bad)
    assert len(found) == 3 and all(p.startswith("customer.created (event 228") for p in found)
    watch = SchemaWatch()
    watch.check(CUSTOMER)
    watch.assert_clean()
    watch.check(bad)
    with pytest.raises(AssertionError, match="3 schema failures in 2 events"):
        watch.assert_clean()


# -- docs/events.md --------------------------------------------------------------------------------

EVENTS_MD = (ROOT / "docs" / "events.md").read_text(encoding="utf-8")


def sections() -> dict[str, str]:
    """The text under each ``### `type``` heading of docs/events.md."""
    parts = re.split(r"^### `([a-z0-9_.]+)`.*$", EVENTS_MD, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def example(name: str) -> dict[str, Any]:
    (block,) = re.findall(r"```json\n(.*?)```", sections()[name], flags=re.DOTALL)
    parsed: dict[str, Any] = json.loads(block)
    return parsed


def test_events_md_has_a_section_for_every_type_and_each_example_fits_its_schema():
    assert list(sections()) == [*catalogue.TYPES, catalogue.MANUAL]
    for name, text in sections().items():
        envelope = example(name)
        assert problems(envelope) == [], name
        if name in catalogue.BY_TYPE:
            assert envelope["type"] == name
            entry = catalogue.BY_TYPE[name]
            for endpoint in entry.endpoints:
                assert f"`{endpoint}`" in text.split("```")[0], (name, endpoint)
        else:
            assert envelope["source"]["op"] == "manual"


def test_events_md_names_every_documented_record_column():
    for entry in catalogue.CATALOGUE:
        definitions = catalogue.schema(entry.type)["$defs"]
        record = definitions.get(entry.object, {})
        for column in record.get("properties", {}):
            assert f"`{column}`" in EVENTS_MD, (entry.type, column)


def test_the_default_mapping_backfills_exactly_the_snapshot_types_of_the_catalogue():
    mapping = load_mapping(str(ROOT / "config" / "mapping.toml"))
    assert {r.emit for r in mapping.snapshots.values()} == set(catalogue.SNAPSHOTS)
    for snapshot, created in catalogue.SNAPSHOTS.items():
        schema = catalogue.schema(snapshot)
        assert schema["$defs"] == catalogue.schema(created)["$defs"]  # the same record
        assert schema["properties"]["source"]["properties"]["xid"] == {
            "type": "null",
            "description": "null: a read belongs to no source transaction",
        }
