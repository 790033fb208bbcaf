"""JetStreamLog.watch: a bucket's entries, then one marker once what it held at the start
has come, whatever order nats-py gives its own marker in (CI at 6ec26c2+: a new dispatch
node applied rewinds made before it started, because nats-py's marker came first)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from outbox.jetstream import JetStreamLog


class Bucket:
    """What watch() uses of a nats-py KeyValue: status().values and watchall()."""

    def __init__(self, values: int | list[int], given: list[Any]) -> None:
        self.values = values if isinstance(values, list) else [values]
        self.given = given

    async def status(self) -> SimpleNamespace:
        """The number of values held: each call the next of ``values`` (the last stays)."""
        held = self.values[0] if len(self.values) == 1 else self.values.pop(0)
        return SimpleNamespace(values=held)

    async def watchall(self) -> AsyncIterator[Any]:
        async def entries() -> AsyncIterator[Any]:
            for entry in self.given:
                yield entry

        return entries()


def entry(revision: int, delta: int) -> SimpleNamespace:
    return SimpleNamespace(revision=revision, delta=delta, key=f"k{revision}", value=b"{}")


async def watched(bucket: Bucket) -> list[Any]:
    log = JetStreamLog(["nats://127.0.0.1:1"], stream="S", subject="s", partitions=1)
    return [None if e is None else e.revision async for e in log.watch(bucket)]


async def test_nats_py_marking_the_start_before_the_values_it_pushed_is_not_believed():
    # nats-py put its marker first: the server pushed both values before its consumer info
    # answered, so it saw nothing pending and nothing received yet
    bucket = Bucket(2, [None, entry(1, 1), entry(2, 0), entry(3, 0)])
    assert await watched(bucket) == [1, 2, None, 3]


async def test_the_marker_comes_after_the_last_value_held_at_the_start():
    bucket = Bucket(2, [entry(1, 1), entry(2, 0), None, entry(3, 0)])
    assert await watched(bucket) == [1, 2, None, 3]


async def test_an_empty_bucket_is_marked_at_once():
    assert await watched(Bucket(0, [None, entry(1, 0)])) == [None, 1]


async def test_a_bucket_emptied_as_the_watch_began_is_marked_by_nats_py():
    # three values when the watch began, none by the time nats-py's marker came
    assert await watched(Bucket([3, 0], [None, entry(4, 0)])) == [None, 4]


async def test_nats_py_marking_early_is_not_believed_while_the_bucket_holds_values():
    assert await watched(Bucket([1, 1], [None, entry(1, 0)])) == [1, None]
