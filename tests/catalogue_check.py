"""Every event a test sees, checked against the catalogue's JSON Schemas (config/schemas), so
that the published catalogue cannot drift from what ct1-cdc sends.

Receivers record each envelope that does not fit and fail the test when they close:
answering anything but 200 would only make the dispatcher retry and hide the cause.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator

from config import catalogue
from ct1_client import receiver


@functools.cache
def validator(name: str) -> Draft202012Validator:
    schema = catalogue.schema(name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def problems(envelope: Mapping[str, Any]) -> list[str]:
    """What is wrong with ``envelope`` against the schema it answers to (none: it fits)."""
    name = catalogue.schema_name(envelope)
    where = f"{envelope.get('type')} (event {envelope.get('id')}, schema {name})"
    return [
        f"{where}: {error.json_path}: {error.message[:300]}"
        for error in validator(name).iter_errors(dict(envelope))
    ]


class SchemaWatch:
    """The schema failures of every envelope it was shown."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.checked = 0

    def check(self, envelope: Mapping[str, Any]) -> None:
        self.checked += 1
        self.failures += problems(envelope)

    def assert_clean(self) -> None:
        shown = "\n".join(self.failures[:20])
        assert not self.failures, f"{len(self.failures)} schema failures in {self.checked} events:\n{shown}"


class CheckedReceiver(receiver.Receiver):
    """A :class:`client.receiver.Receiver` that checks every verified envelope against its
    schema; leaving ``async with`` fails the test on any misfit (unless it already failed)."""

    def __init__(self, verify: receiver.Verify, **kwargs: Any) -> None:
        self.watch = SchemaWatch()

        def checked(body: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
            envelope = verify(body, headers)
            self.watch.check(envelope)
            return envelope

        super().__init__(checked, **kwargs)

    async def __aexit__(self, *exc: object) -> None:
        await super().__aexit__(*exc)
        if exc[0] is None:
            self.watch.assert_clean()
