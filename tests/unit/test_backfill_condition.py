"""``backfill --where`` must stay one SQL expression: nothing in it may end the expression
it is placed in (the operator's own SQL, but a typo or a paste must not run more)."""

from __future__ import annotations

import pytest

from cdc.backfill import condition_problem


@pytest.mark.parametrize(
    "condition",
    [
        "status = 'paid'",
        "created_at > now() - interval '90 days'",
        "note = 'it''s; -- not a comment /* nor this */ (('",
        '"Weird;Name" = 1',
        "label = E'a\\'; b'",
        "(a = 1 OR (b = 2)) AND c IN (1, 2)",
    ],
)
def test_one_expression_passes(condition: str) -> None:
    assert condition_problem(condition) is None


@pytest.mark.parametrize(
    ("condition", "problem"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("true; DROP TABLE users", "';'"),
        ("false) UNION ALL SELECT * FROM secrets --", "')' closes"),
        ("true -- and the ORDER BY is gone", "comment"),
        ("true /* ORDER BY */", "comment"),
        ("(true", "'(' is not closed"),
        ("x = 'open", "quote is not closed"),
        ("x = $$a$$", "'$'"),
        ("x = $1", "'$'"),
    ],
)
def test_what_could_end_the_expression_is_refused_with_why(condition: str, problem: str) -> None:
    found = condition_problem(condition)
    assert found is not None and problem in found
