"""Mapping rules: parsing errors name the rule and key; events follow the rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.decode import RowChange
from cdc.mapping import apply, load_mapping, parse_mapping
from common.errors import ConfigError
from tests.contract import TWELVE

ROOT = Path(__file__).resolve().parents[2]
MAPPING = load_mapping(str(ROOT / "config" / "mapping.toml"))


def change(op: str, new: dict, old: dict | None = None, table: str = "public.orders") -> RowChange:
    return RowChange(op=op, table=table, xid=1, lsn="0/1", new=new, old=old, pk=("id",))


def test_default_mapping_covers_the_ten_row_driven_event_types_and_cart_abandoned():
    assert MAPPING.carts is not None and MAPPING.carts.abandon_after == 3600
    assert [r.emit for r in MAPPING.rules if r.emit == "cart.abandoned"] == []  # derived, not a row rule
    assert MAPPING.event_types == sorted(TWELVE - {"marketplace.analytics"})  # analytics: no mapping


def test_one_update_can_emit_several_events_with_previous_values():
    old = {"id": 1, "status": "pending", "payment_status": "pending", "total": "1.00"}
    new = {**old, "status": "shipped", "payment_status": "paid"}
    drafts = apply(MAPPING, "public.orders", change("update", new, old))
    assert [d.type for d in drafts] == ["order.updated", "order.status_changed", "payment.status_changed"]
    assert all(d.previous == {"status": "pending", "payment_status": "pending"} for d in drafts)
    assert all(d.entity_id == 1 and d.object == "order" for d in drafts)


def test_when_changed_does_not_fire_when_the_column_is_unchanged_or_absent():
    old = {"id": 1, "status": "pending", "notes": None}
    drafts = apply(
        MAPPING, "public.orders", change("update", {"id": 1, "status": "pending", "notes": "x"}, old)
    )
    assert [d.type for d in drafts] == ["order.updated"]
    # unchanged TOAST: the column is absent from the change, so it did not change
    drafts = apply(
        MAPPING,
        "public.orders",
        change("update", {"id": 1, "notes": "y"}, {"id": 1}),
        shadow={"status": "pending", "payment_status": "paid"},
    )
    assert [d.type for d in drafts] == ["order.updated"]


def test_shadow_supplies_old_values_without_replica_identity_full():
    drafts = apply(
        MAPPING,
        "public.orders",
        change("update", {"id": 1, "status": "shipped", "payment_status": "paid"}, {"id": 1}),
        shadow={"status": "processing", "payment_status": "paid"},
    )
    assert [d.type for d in drafts] == ["order.updated", "order.status_changed"]
    assert drafts[1].previous == {"status": "processing"}


def test_unknown_old_value_counts_as_changed():
    drafts = apply(MAPPING, "public.orders", change("update", {"id": 1, "status": "shipped"}, {"id": 1}))
    assert "order.status_changed" in [d.type for d in drafts]
    assert drafts[-1].previous == {}


def test_excluded_columns_are_dropped_from_record_and_previous():
    new = {"id": 3, "name": "A", "password": "secret", "remember_token": "t"}
    drafts = apply(MAPPING, "public.users", change("insert", new, table="public.users"))
    assert drafts[0].record == {"id": 3, "name": "A"}
    upd = apply(
        MAPPING, "public.users", change("update", {**new, "password": "new"}, new, table="public.users")
    )
    assert upd[0].previous == {}


def test_delete_uses_identity_and_unmapped_tables_emit_nothing():
    m = parse_mapping(
        '[[rule]]\ntable = "public.t"\non = ["delete"]\nemit = "t.deleted"\nobject = "t"\nkey = "id"\n'
    )
    drafts = apply(m, "public.t", change("delete", {}, {"id": 5}, table="public.t"))
    assert drafts[0].entity_id == 5 and drafts[0].record == {"id": 5} and drafts[0].previous is None
    assert apply(m, "public.other", change("delete", {}, {"id": 5})) == []
    assert apply(m, "public.t", change("insert", {"id": 5}, table="public.t")) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rule = 3", "no [[rule]]"),
        ("[[rule]]\ntable='orders'\non=['insert']\nemit='a.b'\nobject='o'\nkey='id'", "schema-qualified"),
        (
            "[[rule]]\ntable='public.o'\non=['upsert']\nemit='a.b'\nobject='o'\nkey='id'",
            "'upsert' is not one of",
        ),
        ("[[rule]]\ntable='public.o'\non=['insert']\nemit='Bad Type'\nobject='o'\nkey='id'", "rule 1.emit"),
        ("[[rule]]\ntable='public.o'\non=['insert']\nemit='a.b'\nobject='o'", "missing 'key'"),
        (
            "[[rule]]\ntable='public.o'\non=['insert']\nemit='a.b'\nobject='o'\nkey='id'\ncolour=1",
            "unknown key 'colour'",
        ),
        (
            "[[rule]]\ntable='public.o'\non=['insert']\nwhen_changed=['s']\nemit='a.b'\nobject='o'\nkey='id'",
            "when_changed applies only",
        ),
        (
            "[defaults]\nexclude_columns=['id']\n[[rule]]\ntable='public.o'\non=['insert']\nemit='a.b'\nobject='o'\nkey='id'",
            "also excluded",
        ),
        ("[[rule]\n", "not valid TOML"),
        ("[surprise]\n", "unknown section"),
    ],
)
def test_bad_mapping_names_the_rule_and_the_problem(text, message):
    with pytest.raises(ConfigError) as err:
        parse_mapping(text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_mapping_file_names_the_setting(tmp_path):
    with pytest.raises(ConfigError, match=r"mapping\.file"):
        load_mapping(str(tmp_path / "nope.toml"))


values = st.one_of(st.none(), st.integers(), st.text(max_size=5), st.booleans())
rows = st.dictionaries(
    st.sampled_from(["id", "status", "payment_status", "notes", "password", "total"]), values, min_size=1
)


@given(
    new=rows,
    old=rows,
    op=st.sampled_from(["insert", "update", "delete"]),
    table=st.sampled_from(["public.users", "public.orders", "public.reviews", "public.carts"]),
)
def test_property_excluded_columns_never_appear_and_previous_only_lists_real_changes(new, old, op, table):
    c = change(op, new if op != "delete" else {}, old if op != "insert" else None, table=table)
    for draft in apply(MAPPING, table, c):
        assert "password" not in draft.record
        assert "password" not in (draft.previous or {})
        if op == "update":
            assert draft.previous is not None
            for col, before in draft.previous.items():
                assert col in new and col in old and old[col] == before != new[col]
        else:
            assert draft.previous is None
        if draft.type == "order.status_changed":
            assert "status" in new and (old.get("status", object()) != new["status"])
