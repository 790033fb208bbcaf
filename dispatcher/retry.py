"""What to do after a delivery attempt (pure: the clock and randomness are passed in).

Only 2xx succeeds.  410 Gone disables the endpoint.  Everything else — timeouts and
connection errors (status 0), redirects (never followed), 5xx and other 4xx — is retried
on the schedule (seconds to wait before each attempt; the first entry is for the first
attempt, normally 0) with ±20 % jitter; ``Retry-After`` may push the next attempt later,
up to :data:`MAX_RETRY_AFTER`.  After the last scheduled attempt the delivery is dead.
429, 502, 503 and 504 also ask the endpoint to slow down.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

MAX_RETRY_AFTER = 86_400.0  # a receiver cannot park a delivery for longer than a day
JITTER = 0.2
SLOW_DOWN = frozenset({429, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt as the sender saw it.  ``status`` 0 means no HTTP answer."""

    status: int
    retry_after: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # delivered | retry | dead | disable
    next_attempt_at: float | None = None
    slow_down: bool = False


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP date)."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def decide(
    outcome: Outcome,
    attempts: int,
    schedule: Sequence[float],
    now: float,
    rng: random.Random,
) -> Decision:
    """``attempts`` counts the attempts made so far, this one included."""
    status = outcome.status
    if 200 <= status <= 299:
        return Decision("delivered")
    if status == 410:
        return Decision("disable")
    slow = status in SLOW_DOWN
    if attempts >= len(schedule):
        return Decision("dead", slow_down=slow)
    delay = schedule[attempts] * rng.uniform(1 - JITTER, 1 + JITTER)
    asked = parse_retry_after(outcome.retry_after, now)
    if asked is not None:
        delay = max(delay, min(asked, MAX_RETRY_AFTER))
    return Decision("retry", next_attempt_at=now + delay, slow_down=slow)
