"""``[[snapshot]]`` and what a backfill makes of a row: the table's type, object and key,
the columns any rule excludes left out, the rules' conditions applied as to a new row."""

from __future__ import annotations

import pytest

from cdc.mapping import parse_mapping
from common.errors import ConfigError

RULES = """
[defaults]
exclude_columns = ["password"]

[[rule]]
table = "public.orders"
on = ["insert"]
emit = "order.created"
object = "order"
key = "id"
when = [{ column = "status", new_in = ["paid", "shipped"] }]

[[rule]]
table = "public.orders"
on = ["update"]
emit = "order.updated"
object = "order"
key = "id"
exclude_columns = ["internal_note"]

[[rule]]
table = "public.users"
on = ["insert", "update"]
emit = "customer.changed"
object = "customer"
key = "id"

[[rule]]
table = "public.audit"
on = ["truncate"]
emit = "audit.truncated"
object = "audit"
key = "id"
"""


def test_every_table_with_a_row_rule_is_snapshotted_as_object_dot_snapshot():
    mapping = parse_mapping(RULES)
    assert sorted(mapping.snapshots) == ["public.orders", "public.users"]  # not truncate-only
    orders = mapping.snapshots["public.orders"]
    assert (orders.emit, orders.object, orders.key) == ("order.snapshot", "order", "id")
    assert orders.exclude == {"password", "internal_note"}  # whatever any rule of the table leaves out


def test_a_row_goes_out_when_one_rule_would_emit_for_it_as_a_new_row():
    orders = parse_mapping(RULES).snapshots["public.orders"]
    paid = orders.draft({"id": 1, "status": "paid", "password": "x", "internal_note": "n", "total": "5.00"})
    assert paid is not None
    assert paid.record == {"id": 1, "status": "paid", "total": "5.00"}
    assert (paid.type, paid.op, paid.entity_id, paid.previous) == ("order.snapshot", "read", 1, None)
    # the insert rule's condition fails, but the update rule (no condition) still holds
    assert orders.draft({"id": 2, "status": "pending"}) is not None
    only_insert = parse_mapping(RULES.replace('on = ["update"]', 'on = ["delete"]')).snapshots[
        "public.orders"
    ]
    assert only_insert.draft({"id": 2, "status": "pending"}) is not None  # delete rules have no condition
    strict = parse_mapping(
        RULES.replace(
            'on = ["update"]\nemit = "order.updated"',
            'on = ["update"]\nemit = "order.updated"\nwhen = [{ column = "status", new = "shipped" }]',
        )
    )
    assert strict.snapshots["public.orders"].draft({"id": 2, "status": "pending"}) is None
    assert strict.snapshots["public.orders"].draft({"id": 3, "status": "shipped"}) is not None


def test_snapshot_sections_rename_disable_and_exclude():
    text = (
        RULES
        + """
[[snapshot]]
table = "public.orders"
emit = "order.state"
exclude_columns = ["total"]

[[snapshot]]
table = "public.users"
enabled = false
"""
    )
    mapping = parse_mapping(text)
    assert list(mapping.snapshots) == ["public.orders"]
    orders = mapping.snapshots["public.orders"]
    assert orders.emit == "order.state" and "total" in orders.exclude


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ('table = "public.nope"', "has no insert, update or delete rule"),
        ('table = "public.audit"', "has no insert, update or delete rule"),
        ('table = "orders"', "schema-qualified"),
        ('table = "public.orders"\nemit = "Bad Type"', "is not an event type"),
        ('table = "public.orders"\nenabled = "no"', "enabled must be true or false"),
        ('table = "public.orders"\nwhere = "x"', "unknown key 'where'"),
    ],
)
def test_a_bad_snapshot_section_is_refused_with_its_reason(section, error):
    with pytest.raises(ConfigError, match=error):
        parse_mapping(RULES + "\n[[snapshot]]\n" + section + "\n")


def test_naming_a_table_twice_is_refused():
    twice = '\n[[snapshot]]\ntable = "public.orders"\n' * 2
    with pytest.raises(ConfigError, match="named twice"):
        parse_mapping(RULES + twice)
