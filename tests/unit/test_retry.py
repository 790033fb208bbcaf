"""The retry policy with an injected clock and random source: no waiting."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from config.settings import DEFAULT_RETRY_SCHEDULE
from dispatcher.retry import MAX_RETRY_AFTER, Outcome, decide, parse_retry_after

NOW = 1_800_000_000.0
SCHEDULE = DEFAULT_RETRY_SCHEDULE


def rng() -> random.Random:
    return random.Random(1)


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_only_2xx_succeeds(status):
    assert decide(Outcome(status), 1, SCHEDULE, NOW, rng()).action == "delivered"


@pytest.mark.parametrize("status", [0, 301, 302, 307, 400, 401, 404, 409, 422, 500, 501])
def test_everything_else_retries_on_the_schedule(status):
    d = decide(Outcome(status), 1, SCHEDULE, NOW, rng())
    assert d.action == "retry"
    assert NOW + 5 * 0.8 <= d.next_attempt_at <= NOW + 5 * 1.2
    assert not d.slow_down


def test_gone_disables_the_endpoint():
    assert decide(Outcome(410), 3, SCHEDULE, NOW, rng()).action == "disable"


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_overload_statuses_slow_the_endpoint_down(status):
    assert decide(Outcome(status), 1, SCHEDULE, NOW, rng()).slow_down


def test_schedule_spans_about_three_days_then_dead():
    total = sum(SCHEDULE)
    assert 2.5 * 86400 <= total <= 3.5 * 86400
    assert len(SCHEDULE) == 12
    assert decide(Outcome(500), len(SCHEDULE), SCHEDULE, NOW, rng()).action == "dead"
    assert decide(Outcome(500), len(SCHEDULE) - 1, SCHEDULE, NOW, rng()).action == "retry"


@given(st.integers(min_value=1, max_value=11), st.integers(min_value=0, max_value=2**32))
def test_property_delay_grows_with_jitter_bounds(attempts, seed):
    d = decide(Outcome(503), attempts, SCHEDULE, NOW, random.Random(seed))
    assert d.next_attempt_at is not None
    base = SCHEDULE[attempts]
    assert NOW + base * 0.8 <= d.next_attempt_at <= NOW + base * 1.2


def test_retry_after_seconds_and_date_are_honoured_within_bounds():
    later = decide(Outcome(429, "120"), 1, SCHEDULE, NOW, rng())
    assert later.next_attempt_at == NOW + 120
    date = format_datetime(datetime.fromtimestamp(NOW + 600, tz=UTC), usegmt=True)
    assert decide(Outcome(503, date), 1, SCHEDULE, NOW, rng()).next_attempt_at == pytest.approx(NOW + 600)
    capped = decide(Outcome(429, str(10**9)), 1, SCHEDULE, NOW, rng())
    assert capped.next_attempt_at == NOW + MAX_RETRY_AFTER
    # a Retry-After shorter than the schedule does not make the retry come sooner
    sooner = decide(Outcome(503, "1"), 5, SCHEDULE, NOW, rng())
    assert sooner.next_attempt_at >= NOW + SCHEDULE[5] * 0.8


@pytest.mark.parametrize("value", [None, "", "soon", "-5", "Wed, 99 Foo 2026"])
def test_unusable_retry_after_is_ignored(value):
    assert parse_retry_after(value, NOW) is None
