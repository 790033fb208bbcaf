"""Endpoint health (pure: the clock is passed in): what one attempt's outcome does to an
endpoint's state and to how many of its deliveries may be in flight.

- A success raises the limit by one, up to the configured concurrency, ends a run of
  failures, and resumes a paused endpoint (its probe got through).
- A failure counts one more in the run. After ``pause_after`` in a row an active endpoint
  is paused: its deliveries wait, and one probe goes ``probe_seconds`` later. A paused
  endpoint whose probe fails waits another ``probe_seconds``.
- A failure that asks to slow down (429, 502, 503, 504) halves the limit, never below 1.
- 410 Gone disables the endpoint until the operator enables it again; it counts no
  failure.
"""

from __future__ import annotations

from typing import NamedTuple

from dispatcher.retry import Decision


class Health(NamedTuple):
    state: str  # active | paused | disabled
    failures: int  # failed attempts in a row
    paused_until: float  # when a paused endpoint's next probe may go
    limit: int  # deliveries in flight at most


class After(NamedTuple):
    health: Health
    change: str | None  # resumed | paused | disabled: what the log says, None: nothing


def after_attempt(
    health: Health,
    decision: Decision,
    now: float,
    *,
    max_limit: int,
    pause_after: int,
    probe_seconds: float,
) -> After:
    """The endpoint's health after one attempt whose outcome is ``decision``."""
    state, failures, paused_until, limit = health
    if decision.action == "delivered":
        if failures == 0 and state != "paused" and limit >= max_limit:
            return After(health, None)  # the common case: nothing changes
        resumed = state == "paused"
        return After(
            Health("active" if resumed else state, 0, paused_until, min(max_limit, limit + 1)),
            "resumed" if resumed else None,
        )
    if decision.action == "disable":
        return After(
            Health("disabled", failures, paused_until, limit), None if state == "disabled" else "disabled"
        )
    failures += 1
    if decision.slow_down:
        limit = max(1, limit // 2)
    change = None
    if state == "paused":
        paused_until = now + probe_seconds
    elif state == "active" and failures >= pause_after:
        state, paused_until, change = "paused", now + probe_seconds, "paused"
    return After(Health(state, failures, paused_until, limit), change)
