"""Which ended role makes ``ct1-cdc run`` fail.  Found in CI: a capture host stopped with
SIGTERM exited 1 with "sends stopped on its own", because its manual-events server
returned on the stop in the same turn of the loop as the stop itself."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from common.errors import Ct1Error
from sidecar.runner import first_failure


@pytest.fixture(autouse=True)
def loop() -> Iterator[None]:
    global _loop
    _loop = asyncio.new_event_loop()
    yield
    _loop.close()


_loop: asyncio.AbstractEventLoop


def _ended(result: Any = None, error: BaseException | None = None) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = _loop.create_future()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
    return future


def test_a_role_that_returned_on_the_stop_is_no_failure() -> None:
    sends = _ended()
    assert first_failure([sends], {sends: "sends"}, stopping=True) is None


def test_a_role_that_returned_while_no_stop_was_asked_fails_the_run_by_its_name() -> None:
    sends = _ended()
    found = first_failure([sends], {sends: "sends"}, stopping=False)
    assert found is not None
    name, error = found
    assert name == "sends"
    assert isinstance(error, Ct1Error)
    assert str(error) == "sends stopped on its own"


def test_a_role_that_raised_fails_the_run_with_its_error_stop_or_not() -> None:
    boom = RuntimeError("replication connection lost")
    capture, sends = _ended(error=boom), _ended()
    running = {sends: "sends", capture: "capture"}
    for stopping in (True, False):
        found = first_failure([capture, sends], running, stopping)
        assert found == ("capture", boom)
