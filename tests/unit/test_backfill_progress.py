"""What ``ct1-cdc backfill`` and ``backfill status`` show of a job: rows done of the total,
rows a second, the time left, and a bar."""

from __future__ import annotations

from sidecar.cli_backfill import line, progress

JOB = {
    "id": 3,
    "table": "public.orders",
    "state": "running",
    "rows_done": 25_000,
    "total": 100_000,
    "events": 24_990,
    "started_at": 1000.0,
    "finished_at": None,
    "condition": None,
    "reason": "cli",
    "error": None,
    "cancel_requested_at": None,
}


def test_rate_and_time_left_come_from_the_rows_done_so_far():
    p = progress(JOB, now=1010.0)
    assert (p["rows"], p["total"], p["rows_per_second"], p["eta_seconds"]) == (25_000, 100_000, 2500.0, 30.0)
    assert line(p) == (
        "public.orders                running   [#####...............] 25,000/100,000 rows  25.0%"
        "  2,500 rows/s  ETA 30s"
    )


def test_a_finished_job_keeps_its_rate_and_has_no_eta():
    done = {**JOB, "state": "done", "rows_done": 100_000, "finished_at": 1020.0}
    p = progress(done, now=5000.0)
    assert (p["rows_per_second"], p["eta_seconds"]) == (5000.0, None)


def test_a_queued_job_or_one_without_a_total_shows_what_it_knows():
    queued = progress({**JOB, "state": "queued", "rows_done": 0, "started_at": None, "total": None}, now=1.0)
    assert (queued["rows_per_second"], queued["eta_seconds"]) == (None, None)
    assert line(queued) == "public.orders                queued    0 rows"
    failed = progress({**JOB, "state": "failed", "error": "reading public.orders failed: boom"}, now=1010.0)
    assert line(failed).endswith("reading public.orders failed: boom")
