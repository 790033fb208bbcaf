"""The mapping against a catalog: every mistake named, with a did-you-mean and the fix."""

from __future__ import annotations

from cdc.mapping import parse_mapping
from cdc.schema import Relation, check_mapping, lacking_identity

MAPPING = parse_mapping(
    """
[[rule]]
table = "public.orders"
on = ["update"]
when_changed = ["status"]
when = [{ column = "payment_status", new = "paid" }]
emit = "order.paid"
object = "order"
key = "id"
exclude_columns = ["secret_note"]

[[rule]]
table = "public.audit"
on = ["insert", "delete"]
emit = "audit.changed"
object = "audit"
key = "user_id"

[[rule]]
table = "public.sales"
on = ["update"]
emit = "sale.updated"
object = "sale"
key = "id"

[[rule]]
table = "public.feed"
on = ["insert"]
emit = "feed.added"
object = "feed"
key = "id"
"""
)


def table(name, columns, *, kind="r", identity="d", pk=True, partitions=()):
    return Relation("public", name, kind, identity, pk, False, tuple(columns), tuple(partitions))


def good_catalog():
    return {
        "public.orders": table("orders", ["id", "status", "payment_status", "secret_note"]),
        "public.audit": table("audit", ["user_id", "action"], identity="f", pk=False),
        "public.sales": table(
            "sales",
            ["id", "region"],
            kind="p",
            partitions=[table("sales_eu", ["id", "region"]), table("sales_default", ["id", "region"])],
        ),
        "public.feed": table("feed", ["id", "body"], pk=False),  # insert only: no identity needed
    }


def test_a_mapping_that_fits_has_no_problems():
    assert check_mapping(MAPPING, good_catalog(), good_catalog()) == []


def test_missing_table_suggests_the_close_name():
    catalog = good_catalog()
    del catalog["public.orders"]
    (problem,) = check_mapping(MAPPING, catalog, [*catalog, "public.order"])
    assert problem.kind == "missing_table"
    assert (
        "public.orders does not exist" in problem.message and "did you mean 'public.order'" in problem.message
    )


def test_every_named_column_is_checked_with_a_suggestion():
    catalog = good_catalog()
    catalog["public.orders"] = table("orders", ["id", "state", "payment_statsu", "note"])
    problems = check_mapping(MAPPING, catalog, catalog)
    messages = [p.message for p in problems]
    assert [p.kind for p in problems] == ["missing_column"] * 3
    assert any("when_changed column 'status'" in m and "did you mean 'state'" in m for m in messages)
    assert any("when.column column 'payment_status'" in m and "'payment_statsu'" in m for m in messages)
    assert any("exclude_columns column 'secret_note'" in m for m in messages)
    assert all(p.rule == 1 for p in problems)


def test_wrong_key_is_a_problem():
    catalog = good_catalog()
    catalog["public.audit"] = table("audit", ["userid", "action"], identity="f", pk=False)
    (problem,) = check_mapping(MAPPING, catalog, catalog)
    assert "key column 'user_id'" in problem.message and "'userid'" in problem.message


def test_deletes_without_identity_are_refused_with_the_exact_fix():
    catalog = good_catalog()
    catalog["public.audit"] = table("audit", ["user_id", "action"], pk=False)
    (problem,) = check_mapping(MAPPING, catalog, catalog)
    assert problem.kind == "no_identity" and problem.table == "public.audit"
    assert "updates and deletes of public.audit would be lost" in problem.message
    assert problem.fix.startswith("ALTER TABLE public.audit REPLICA IDENTITY FULL")
    catalog["public.audit"] = table("audit", ["user_id"], identity="n", pk=True)
    (problem,) = check_mapping(MAPPING, catalog, catalog)
    assert "replica identity NOTHING" in problem.message


def test_partitions_are_checked_one_by_one():
    catalog = good_catalog()
    catalog["public.sales"] = table(
        "sales",
        ["id", "region"],
        kind="p",
        partitions=[table("sales_eu", ["id", "region"]), table("sales_default", ["id", "region"], pk=False)],
    )
    assert [(t, r.table) for t, r in lacking_identity(MAPPING, catalog)] == [
        ("public.sales", "public.sales_default")
    ]
    (problem,) = check_mapping(MAPPING, catalog, catalog)
    assert "partition public.sales_default of public.sales" in problem.message
    assert problem.fix.startswith("ALTER TABLE public.sales_default REPLICA IDENTITY FULL")


def test_views_are_not_tables():
    catalog = good_catalog()
    catalog["public.feed"] = table("feed", ["id"], kind="v")
    (problem,) = check_mapping(MAPPING, catalog, catalog)
    assert problem.kind == "not_a_table" and "is a view" in problem.message


def test_a_missing_table_beside_one_without_identity_reports_both():
    catalog = good_catalog()
    del catalog["public.orders"]
    catalog["public.audit"] = table("audit", ["user_id", "action"], pk=False)
    problems = check_mapping(MAPPING, catalog, catalog)
    assert [(p.kind, p.table) for p in problems] == [
        ("missing_table", "public.orders"),
        ("no_identity", "public.audit"),
    ]


def test_a_problem_keeps_its_identity_whatever_the_suggestion():
    catalog = good_catalog()
    catalog["public.audit"] = table("audit", ["userid"], identity="f", pk=False)
    (first,) = check_mapping(MAPPING, catalog, catalog)
    catalog["public.audit"] = table("audit", ["userid", "user_idx"], identity="f", pk=False)
    (second,) = check_mapping(MAPPING, catalog, catalog)
    assert first.message != second.message and first.key == second.key


def test_full_identity_of_a_partitioned_table_means_every_partition():
    from cdc.schema import fully_identified

    eu, other = table("sales_eu", ["id"], identity="f"), table("sales_other", ["id"])
    assert not fully_identified(table("sales", ["id"], kind="p", identity="f", partitions=[eu, other]))
    assert fully_identified(table("sales", ["id"], kind="p", partitions=[eu, eu]))
    assert fully_identified(table("t", ["id"], identity="f")) and not fully_identified(table("t", ["id"]))


def test_a_condition_value_an_enum_cannot_hold_is_a_problem():
    mapping = parse_mapping(
        '[[rule]]\ntable = "public.deals"\non = ["update"]\n'
        'when = [{ column = "stage", old_in = ["draft"], new = "wonn" }]\n'
        'emit = "deal.won"\nobject = "deal"\nkey = "id"\n'
    )
    deals = Relation(
        "public", "deals", "r", "d", True, False, ("id", "stage"), (), (("stage", ("draft", "won")),)
    )
    (problem,) = check_mapping(mapping, {"public.deals": deals}, ["public.deals"])
    assert problem.kind == "unknown_value"
    assert "'wonn' is not a value of the enum column 'stage'" in problem.message
    assert "did you mean 'won'" in problem.message and problem.fix.startswith("use one of draft, won")
