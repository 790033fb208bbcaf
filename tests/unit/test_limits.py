"""Token buckets with an injected clock."""

from __future__ import annotations

from api.limits import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_one_request_per_refill_interval():
    clock = Clock()
    limiter = RateLimiter(rate_per_minute=60, burst=3, clock=clock)
    assert [limiter.allow("k") for _ in range(3)] == [0, 0, 0]
    assert limiter.allow("k") == 1  # one token a second: retry in 1 s
    assert limiter.allow("other") == 0  # buckets are per key
    clock.now += 1.0
    assert limiter.allow("k") == 0
    assert limiter.allow("k") == 1
    clock.now += 60  # refills up to the burst, no further
    assert [limiter.allow("k") for _ in range(4)] == [0, 0, 0, 1]


def test_retry_after_is_whole_seconds_until_a_token_is_back():
    clock = Clock()
    limiter = RateLimiter(rate_per_minute=6, burst=1, clock=clock)  # a token every 10 s
    assert limiter.allow("k") == 0
    assert limiter.allow("k") == 10
    clock.now += 2.5
    assert limiter.allow("k") == 8  # 7.5 s left, rounded up


def test_zero_rate_turns_limits_off():
    limiter = RateLimiter(rate_per_minute=0, burst=1)
    assert all(limiter.allow("k") == 0 for _ in range(1000))
