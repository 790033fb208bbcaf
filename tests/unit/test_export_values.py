"""Export values: excluded columns never survive, at any depth; everything else does."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from api.exports import _spreadsheet_safe, clean
from api.filters import decode_cursor, encode_cursor

names = st.sampled_from(["id", "name", "email", "password", "remember_token", "total", "items", "customer"])
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=5)
    | st.decimals(allow_nan=False, allow_infinity=False, places=2)
)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=4),
    max_leaves=12,
)


def keys_of(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value).union(*(keys_of(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(keys_of(v) for v in value))
    return set()


def kept(value: Any, excluded: frozenset[str]) -> set[str]:
    """Keys reachable without passing through an excluded key."""
    if isinstance(value, dict):
        return {k for k in value if k not in excluded}.union(
            *(kept(v, excluded) for k, v in value.items() if k not in excluded)
        )
    if isinstance(value, list):
        return set().union(*(kept(v, excluded) for v in value))
    return set()


@given(values, st.frozensets(names))
def test_no_excluded_column_survives_and_nothing_else_is_lost(value, excluded):
    out = clean(value, excluded)
    assert keys_of(out).isdisjoint(excluded)
    assert keys_of(out) == kept(value, excluded)


def test_values_take_the_event_forms():
    row = {"total": Decimal("59.90"), "at": datetime(2026, 11, 25, 14, 0, tzinfo=UTC), "n": None}
    assert clean(row, frozenset()) == {"total": "59.90", "at": "2026-11-25T14:00:00.000000Z", "n": None}


@given(st.integers(0, 2**62))
def test_cursors_round_trip(last_id):
    assert decode_cursor(encode_cursor(last_id)) == last_id


@pytest.mark.parametrize(
    ("text", "cell"),
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("+1+1", "'+1+1"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("-", "'-"),
        ("-5.00", "-5.00"),
        ("+44", "+44"),
        ("-1e3", "-1e3"),
        ("-.5", "-.5"),
        ("Ana Silva", "Ana Silva"),
        ("a=b", "a=b"),
        ("", ""),
    ],
)
def test_csv_text_a_spreadsheet_would_run_gets_a_leading_quote_numbers_do_not(text, cell):
    assert _spreadsheet_safe(text) == cell
