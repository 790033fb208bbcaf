"""First-try successes become rows of attempt_batches: one per endpoint and HTTP status,
never spanning more than BATCH_SPAN event ids (so `outbox show` finds an event's batch in
a short range of the index)."""

from __future__ import annotations

import json

from outbox.deliveries import Finished, success_batches
from outbox.store import BATCH_SPAN


def ok(endpoint: str, event_id: int, at: float, ms: float, status: int = 200) -> Finished:
    return Finished(endpoint, event_id, at, status, ms, None, None, "delivered", at, "order:1", "first")


def test_one_batch_per_endpoint_and_status_with_its_times():
    results = [
        ok("ct2", 5, 10.0, 3.0),
        ok("ct2", 2, 9.0, 1.0),
        ok("ct2", 7, 11.0, 9.0),
        ok("ct3", 5, 10.0, 2.0),
    ]
    results.append(ok("ct2", 8, 12.0, 4.0, status=204))
    batches = {(b["endpoint"], b["status"]): b for b in success_batches(results)}
    assert set(batches) == {("ct2", 200), ("ct3", 200), ("ct2", 204)}
    ct2 = batches[("ct2", 200)]
    assert (ct2["first"], ct2["last"], ct2["count"]) == (2, 7, 3)
    assert json.loads(ct2["event_ids"]) == [2, 5, 7]
    assert ct2["attempted_at"] == 9.0 and ct2["median_ms"] == 3.0 and ct2["max_ms"] == 9.0


def test_a_batch_never_spans_more_than_the_span():
    ids = [1, 2, BATCH_SPAN, BATCH_SPAN + 1, BATCH_SPAN + 2, 3 * BATCH_SPAN]
    batches = success_batches([ok("ct2", i, 0.0, 1.0) for i in ids])
    assert all(b["last"] - b["first"] <= BATCH_SPAN for b in batches)
    assert sorted(i for b in batches for i in json.loads(b["event_ids"])) == ids
    assert sum(b["count"] for b in batches) == len(ids)
