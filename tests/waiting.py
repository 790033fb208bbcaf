"""Waiting for something to become true, the one way every test does it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    check: Callable[[], T], timeout: float = 30, interval: float = 0.05, what: str = "", last: bool = False
) -> T:
    """Call ``check`` until it returns something truthy, and return that.  An exception
    from ``check`` ends the wait (a crashed process, say); after ``timeout`` seconds the
    test fails naming ``what`` (or the check) and its last answer, or, with ``last``, gets
    that last answer, so that its own assertion shows what is missing."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            if last:
                return result
            raise AssertionError(f"timed out after {timeout} s waiting for {what or check}: last {result!r}")
        time.sleep(interval)
