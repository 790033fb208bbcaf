"""Endpoint health with plain values and an injected clock: pauses, probes, resumes,
slowing down and 410 Gone."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dispatcher.health import Health, after_attempt
from dispatcher.retry import Decision

NOW = 1_800_000_000.0
MAX = 8
PAUSE_AFTER = 3
PROBE = 30.0

DELIVERED = Decision("delivered")
RETRY = Decision("retry", next_attempt_at=NOW + 5)
SLOW = Decision("retry", next_attempt_at=NOW + 5, slow_down=True)
DEAD = Decision("dead")
GONE = Decision("disable")


def after(health: Health, decision: Decision, now: float = NOW):
    return after_attempt(health, decision, now, max_limit=MAX, pause_after=PAUSE_AFTER, probe_seconds=PROBE)


def test_a_success_on_a_healthy_endpoint_changes_nothing():
    healthy = Health("active", 0, 0.0, MAX)
    result = after(healthy, DELIVERED)
    assert result.health is healthy and result.change is None


def test_a_run_of_failures_pauses_the_endpoint_until_its_probe():
    health = Health("active", 0, 0.0, MAX)
    for failures in range(1, PAUSE_AFTER):
        health, change = after(health, RETRY)
        assert (health.state, health.failures, change) == ("active", failures, None)
    health, change = after(health, DEAD)  # a dead delivery is a failure too
    assert health == Health("paused", PAUSE_AFTER, NOW + PROBE, MAX)
    assert change == "paused"


def test_a_failed_probe_waits_another_interval_and_a_good_one_resumes():
    paused = Health("paused", PAUSE_AFTER, NOW + PROBE, MAX)
    later = NOW + PROBE + 1
    failed, change = after(paused, RETRY, later)
    assert failed == Health("paused", PAUSE_AFTER + 1, later + PROBE, MAX)
    assert change is None  # still paused: said once, when it paused
    resumed, change = after(failed, DELIVERED, later + PROBE)
    assert (resumed.state, resumed.failures, change) == ("active", 0, "resumed")


def test_a_success_ends_a_run_of_failures_below_the_pause():
    health, change = after(Health("active", 2, 0.0, MAX), DELIVERED)
    assert health == Health("active", 0, 0.0, MAX) and change is None


def test_slow_down_halves_the_limit_and_successes_win_it_back_one_by_one():
    health, _ = after(Health("active", 0, 0.0, MAX), SLOW)
    assert health.limit == MAX // 2
    health, _ = after(health, SLOW)
    health, _ = after(health, SLOW)
    health, _ = after(health, SLOW)
    assert health.limit == 1  # never below one
    for expected in range(2, MAX + 1):
        health, _ = after(health, DELIVERED)
        assert health.limit == expected
    health, _ = after(health, DELIVERED)
    assert health.limit == MAX  # never above the configured concurrency


def test_gone_disables_without_counting_a_failure_and_nothing_re_enables_it():
    health, change = after(Health("active", 1, 0.0, MAX), GONE)
    assert health == Health("disabled", 1, 0.0, MAX) and change == "disabled"
    health, change = after(health, GONE)  # another in flight: said once
    assert health.state == "disabled" and change is None
    health, change = after(health, RETRY)  # an attempt already in flight fails
    assert health.state == "disabled" and change is None
    health, change = after(health, DELIVERED)  # ... or succeeds: only the operator enables it
    assert health.state == "disabled" and change is None


decisions = st.sampled_from([DELIVERED, RETRY, SLOW, DEAD, GONE])


@given(st.lists(st.tuples(decisions, st.floats(0, 3600)), max_size=40))
def test_any_run_of_outcomes_keeps_the_health_consistent(steps):
    health = Health("active", 0, 0.0, MAX)
    now = NOW
    for decision, wait in steps:
        now += wait
        before = health
        health, change = after(health, decision, now)
        assert 1 <= health.limit <= MAX
        assert health.state in ("active", "paused", "disabled")
        if before.state == "disabled":
            assert health.state == "disabled"  # only the operator enables it again
        if health.state == "active":
            assert health.failures < PAUSE_AFTER
        if decision is DELIVERED and before.state != "disabled":
            assert (health.state, health.failures) == ("active", 0)
        if health.state == "paused" and decision is not DELIVERED:
            assert health.paused_until == now + PROBE
        assert (change is not None) == (health.state != before.state)
