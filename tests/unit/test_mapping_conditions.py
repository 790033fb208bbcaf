"""Value conditions, truncate rules and quoted table names in the mapping file."""

from __future__ import annotations

import pytest

from cdc.decode import RowChange
from cdc.mapping import apply, parse_mapping, parse_table, quote_table, same_value, truncate_drafts
from common.errors import ConfigError

RULES = """
[[rule]]
table = "public.orders"
on = ["update"]
when_changed = ["status"]
when = [{ column = "status", new = "shipped" }]
emit = "order.shipped"
object = "order"
key = "id"

[[rule]]
table = "public.users"
on = ["insert", "update"]
when = [{ column = "email_verified_at", old_null = true, new_null = false }]
emit = "customer.verified"
object = "customer"
key = "id"

[[rule]]
table = "public.orders"
on = ["update"]
when = [{ column = "total", new_in = [100, "250.50"] }, { column = "status", old_in = ["paid", "processing"] }]
emit = "order.big_and_moving"
object = "order"
key = "id"

[[rule]]
table = "public.orders"
on = ["delete"]
when = [{ column = "status", old = "cancelled" }]
emit = "order.purged"
object = "order"
key = "id"

[[rule]]
table = "public.orders"
on = ["truncate"]
emit = "order.all_removed"
object = "order"
key = "id"
"""
M = parse_mapping(RULES)


def change(op, new, old=None, table="public.orders"):
    return RowChange(op=op, table=table, xid=1, lsn="0/1", new=new, old=old, pk=("id",))


def types(drafts):
    return [d.type for d in drafts]


def test_status_becomes_shipped_fires_only_on_that_transition():
    before = {"id": 1, "status": "paid", "total": "10.00"}
    assert types(apply(M, "public.orders", change("update", {**before, "status": "shipped"}, before))) == [
        "order.shipped"
    ]
    # shipped -> shipped with another column changed: status did not change
    shipped = {**before, "status": "shipped"}
    assert "order.shipped" not in types(
        apply(M, "public.orders", change("update", {**shipped, "total": "9.00"}, shipped))
    )
    # paid -> processing: changed, but not to shipped
    assert "order.shipped" not in types(
        apply(M, "public.orders", change("update", {**before, "status": "processing"}, before))
    )


def test_null_to_value_in_shadow_mode_and_under_replica_identity_full():
    new = {"id": 7, "email_verified_at": "2026-12-01T10:00:00.000000Z", "name": "a"}
    full_old = {"id": 7, "email_verified_at": None, "name": "a"}
    assert types(apply(M, "public.users", change("update", new, full_old, "public.users"))) == [
        "customer.verified"
    ]
    # shadow mode: the WAL carries only the key, the shadow knows the old value
    shadow = {"email_verified_at": None}
    assert types(apply(M, "public.users", change("update", new, {"id": 7}, "public.users"), shadow)) == [
        "customer.verified"
    ]
    verified = {"email_verified_at": "2026-11-01T10:00:00.000000Z"}
    assert apply(M, "public.users", change("update", new, {"id": 7}, "public.users"), verified) == []
    # value -> null is not "verified"
    assert apply(M, "public.users", change("update", full_old, new, "public.users")) == []


def test_insert_sees_every_old_value_as_null():
    verified = {"id": 8, "email_verified_at": "2026-12-01T10:00:00.000000Z"}
    assert types(apply(M, "public.users", change("insert", verified, None, "public.users"))) == [
        "customer.verified"
    ]
    assert (
        apply(M, "public.users", change("insert", {"id": 9, "email_verified_at": None}, None, "public.users"))
        == []
    )


def test_an_unknown_old_value_matches_rather_than_miss_an_event():
    # no identity, no shadow: the old value is unknown
    new = {"id": 7, "email_verified_at": "2026-12-01T10:00:00.000000Z"}
    assert types(apply(M, "public.users", change("update", new, {"id": 7}, "public.users"))) == [
        "customer.verified"
    ]


def test_in_lists_compare_numbers_by_value_and_all_conditions_must_hold():
    old = {"id": 1, "status": "paid", "total": "99.00"}
    hit = apply(M, "public.orders", change("update", {**old, "total": "100.00"}, old))
    assert "order.big_and_moving" in types(hit)
    hit = apply(M, "public.orders", change("update", {**old, "total": "250.5"}, old))
    assert "order.big_and_moving" in types(hit)
    miss = apply(M, "public.orders", change("update", {**old, "total": "100.01"}, old))
    assert "order.big_and_moving" not in types(miss)
    pending = {**old, "status": "pending"}
    miss = apply(M, "public.orders", change("update", {**pending, "total": "100.00"}, pending))
    assert "order.big_and_moving" not in types(miss)


def test_delete_conditions_read_the_old_row_or_the_shadow():
    assert types(apply(M, "public.orders", change("delete", {}, {"id": 1, "status": "cancelled"}))) == [
        "order.purged"
    ]
    assert apply(M, "public.orders", change("delete", {}, {"id": 1, "status": "paid"})) == []
    # default identity: only the key in the WAL, the shadow holds status
    assert types(apply(M, "public.orders", change("delete", {}, {"id": 1}), {"status": "cancelled"})) == [
        "order.purged"
    ]
    assert M.watched("public.orders") == ("status",)


def test_unchanged_toast_column_takes_its_old_value_for_a_condition():
    old = {"id": 1, "status": "paid", "total": "100.00"}
    # total absent (unchanged TOAST stand-in): its old value 100.00 satisfies new_in
    hit = apply(M, "public.orders", change("update", {"id": 1, "status": "processing"}, old))
    assert "order.big_and_moving" in types(hit)


def test_truncate_rule_emits_one_draft_naming_the_truncated_relations():
    drafts = truncate_drafts(M, "public.orders", ["public.orders"])
    assert [(d.type, d.op, d.entity_id, d.record) for d in drafts] == [
        ("order.all_removed", "truncate", None, {"truncated": ["public.orders"]})
    ]
    assert truncate_drafts(M, "public.users", ["public.users"]) == []
    # a truncate rule never fires on rows
    assert "order.all_removed" not in types(apply(M, "public.orders", change("insert", {"id": 1})))


def test_same_value_rules():
    assert same_value("59.90", 59.9) and same_value(42, "42") and same_value(42, 42.0)
    assert not same_value(None, "x") and not same_value(1, True) and not same_value("true", True)
    assert same_value(True, True) and not same_value("shipped", "Shipped")


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("public.orders", ("public", "orders")),
        ('"Sales Ops"."Order Lines"', ("Sales Ops", "Order Lines")),
        ('"a.b"."say ""hi"""', ("a.b", 'say "hi"')),
        ('public."Select"', ("public", "Select")),
    ],
)
def test_table_names_quoted_like_sql(text, parts):
    assert parse_table(text) == parts
    assert parse_table(quote_table(*parts)) == parts


@pytest.mark.parametrize(
    ("when", "message"),
    [
        ('[{ column = "status" }]', "no test on 'status'"),
        ('[{ column = "status", new = "a", equals = 1 }]', "unknown key 'equals'"),
        ('[{ new = "a" }]', "column must be a non-empty string"),
        ('[{ column = "status", new_in = [] }]', "new_in must be a non-empty list"),
        ('[{ column = "status", old_null = "yes" }]', "old_null must be true"),
        ('[{ column = "status", new = [1] }]', "must be a string, number or boolean"),
        ('[{ column = "status", new = 1979-05-27 }]', "must be a string, number or boolean"),
        ('"status"', "when must be a list"),
        ('["status"]', "must be a table like"),
    ],
)
def test_bad_conditions_name_the_rule_and_the_key(when, message):
    text = f'[[rule]]\ntable = "public.orders"\non = ["update"]\nwhen = {when}\nemit = "a.b"\nobject = "o"\nkey = "id"\n'
    with pytest.raises(ConfigError, match=message) as info:
        parse_mapping(text, source="m.toml")
    assert str(info.value).startswith("m.toml: rule 1")


def test_truncate_rules_take_no_conditions_and_bad_ops_are_named():
    base = '[[rule]]\ntable = "public.orders"\nemit = "a.b"\nobject = "o"\nkey = "id"\n'
    with pytest.raises(ConfigError, match="when does not apply to truncate"):
        parse_mapping(base + 'on = ["truncate"]\nwhen = [{ column = "a", new = 1 }]\n')
    with pytest.raises(ConfigError, match="not one of insert, update, delete, truncate"):
        parse_mapping(base + 'on = ["upsert"]\n')
    with pytest.raises(ConfigError, match="schema-qualified"):
        parse_mapping(base.replace("public.orders", "Order Lines") + 'on = ["insert"]\n')
