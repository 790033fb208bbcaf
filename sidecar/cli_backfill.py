"""``ct1-cdc backfill``: the rows the mapped tables already hold, as ``read`` events.

The command queues one job per table in the outbox; capture (``ct1-cdc run``) reads them
in chunks while it streams, and records each chunk's progress in the commit that holds its
events, so a job survives kill -9 of either process.  The command then shows the progress
until the jobs end (a bar on a terminal, JSON Lines with ``--json``); Ctrl-C cancels them.
"""

from __future__ import annotations

import difflib
import sys
import time
from pathlib import Path
from typing import Any

import click

from cdc import chunks, source
from cdc.backfill import BackfillError, condition_problem
from cdc.mapping import Mapping, load_mapping, parse_table
from common.errors import ConfigError, SourceUnavailable
from config.settings import Settings
from outbox import backfills, store
from sidecar.console import emit_json, fail, handled, main, settings_of

POLL_SECONDS = 0.5
ENDED = ("done", "cancelled", "failed")


def resolve_tables(mapping: Mapping, given: tuple[str, ...]) -> list[str]:
    """The tables to read: those given (checked against the mapping), else every table the
    mapping snapshots."""
    if not given:
        if not mapping.snapshots:
            raise ConfigError("the mapping snapshots no table (every [[snapshot]] is enabled = false)")
        return sorted(mapping.snapshots)
    tables = []
    for text in given:
        try:
            schema, name = parse_table(text if "." in text else f"public.{text}")
        except ValueError:
            raise ConfigError(f"--table {text!r}: not a table name like public.orders") from None
        table = f"{schema}.{name}"
        if table not in mapping.snapshots:
            near = difflib.get_close_matches(table, list(mapping.snapshots), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(
                f"--table {text}: not a table the mapping snapshots{hint}; "
                f"these are: {', '.join(sorted(mapping.snapshots))}"
            )
        tables.append(table)
    return tables


def progress(job: dict[str, Any], now: float) -> dict[str, Any]:
    """What ``status`` shows of a job: counts, rows a second and the time left."""
    started, rows, total = job.get("started_at"), int(job["rows_done"]), job.get("total")
    end = job.get("finished_at") or now
    rate = rows / (end - started) if started and end > started and rows else None
    left = None
    if rate and total is not None and job["state"] == "running":
        left = max(0.0, (total - rows) / rate)
    return {
        "id": job["id"],
        "table": job["table"],
        "state": job["state"],
        "rows": rows,
        "total": total,
        "events": job["events"],
        "rows_per_second": None if rate is None else round(rate, 1),
        "eta_seconds": None if left is None else round(left, 1),
        "condition": job.get("condition"),
        "reason": job["reason"],
        "error": job.get("error"),
        "cancel_requested": job.get("cancel_requested_at") is not None,
    }


def line(p: dict[str, Any]) -> str:
    total = p["total"]
    done = f"{p['rows']:,}" + (f"/{total:,}" if total is not None else "")
    pct = f" {100 * p['rows'] / total:5.1f}%" if total else ""
    bar = ""
    if total:
        filled = int(20 * min(1.0, p["rows"] / total))
        bar = " [" + "#" * filled + "." * (20 - filled) + "]"
    rate = f"  {p['rows_per_second']:,.0f} rows/s" if p["rows_per_second"] else ""
    eta = f"  ETA {p['eta_seconds']:.0f}s" if p["eta_seconds"] is not None else ""
    error = f"  {p['error']}" if p["error"] else ""
    return f"{p['table']:<28} {p['state']:<9}{bar} {done} rows{pct}{rate}{eta}{error}"


def check_against_source(
    settings: Settings, mapping: Mapping, tables: list[str], condition: str | None
) -> None:
    """Refuse now what capture would fail the job for later: a table without a key, a
    condition Postgres does not accept.  A source out of reach is only a warning: capture
    checks again when it starts the job."""
    try:
        with source.connect(settings.source.dsn, timeout=5) as conn:
            for table in tables:
                try:
                    chunks.check_request(conn, mapping, table, condition)
                except BackfillError as exc:
                    raise ConfigError(str(exc)) from None
    except SourceUnavailable as exc:
        click.echo(f"ct1-cdc: warning: could not check the request against the source ({exc})", err=True)


def _slot_active(settings: Settings) -> bool | None:
    try:
        with source.connect(settings.source.dsn, timeout=3) as conn:
            status = source.slot_status(conn, settings.source.slot)
    except Exception:
        return None
    return bool(status and status["active"])


def watch(settings: Settings, request: int, as_json: bool) -> list[dict[str, Any]]:
    """Show a request's jobs until they all end; Ctrl-C cancels them."""
    terminal = sys.stderr.isatty() and not as_json
    conn = store.connect(settings.outbox.capture_path, readonly=True)
    shown: dict[int, tuple[Any, ...]] = {}
    began = time.monotonic()
    warned = False
    drawn = 0
    try:
        while True:
            now = time.time()
            jobs = [progress(j, now) for j in backfills.jobs(conn, request)]
            if as_json:
                for p in jobs:
                    seen = (p["state"], p["rows"], p["total"])
                    if shown.get(p["id"]) != seen:
                        shown[p["id"]] = seen
                        emit_json(p)
                sys.stdout.flush()
            elif terminal:
                if drawn:
                    click.echo(f"\x1b[{drawn}F", nl=False, err=True)
                for p in jobs:
                    click.echo("\x1b[2K" + line(p), err=True)
                drawn = len(jobs)
            if all(p["state"] in ENDED for p in jobs):
                return jobs
            if not warned and time.monotonic() - began > 3 and all(p["state"] == "queued" for p in jobs):
                warned = True
                active = _slot_active(settings)
                if active is not True:
                    also = "; the source is out of reach just now" if active is None else ""
                    click.echo(
                        "ct1-cdc: waiting for capture: the backfill runs inside `ct1-cdc run` "
                        f"(start it; this keeps watching, Ctrl-C cancels){also}",
                        err=True,
                    )
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        writer = store.open_outbox(settings.outbox.capture_path)
        try:
            asked = backfills.cancel(writer, request)
        finally:
            writer.close()
        fail(
            f"interrupted: asked capture to cancel {asked} backfill job(s); `ct1-cdc backfill status` shows them",
            130,
        )
        raise  # not reached
    finally:
        conn.close()


@main.group(invoke_without_command=True)
@click.option(
    "--table",
    "tables",
    multiple=True,
    help="a mapped table, e.g. public.orders (repeat for more) [default: every table the mapping snapshots]",
)
@click.option("--where", "condition", help="only rows for which this SQL condition holds (run read-only)")
@click.option("--rate", type=click.FloatRange(min=0), help="rows a second at most [default: backfill.rate]")
@click.option("--no-wait", is_flag=True, help="queue the backfill and return (see `backfill status`)")
@click.option("--json", "as_json", is_flag=True, help="print progress as JSON Lines")
@click.pass_context
@handled
def backfill(
    ctx: click.Context,
    tables: tuple[str, ...],
    condition: str | None,
    rate: float | None,
    no_wait: bool,
    as_json: bool,
) -> None:
    """Send the rows the mapped tables already hold as events (source.op "read", type
    <object>.snapshot unless [[snapshot]] says otherwise), read in chunks while capture
    streams: no locks, no long transaction, and a row never goes out older than a change
    already sent.  Runs inside `ct1-cdc run`; resumes after a crash; Ctrl-C cancels."""
    if ctx.invoked_subcommand is not None:
        return
    settings = settings_of(ctx)
    mapping = load_mapping(settings.mapping.file)
    chosen = resolve_tables(mapping, tables)
    if condition is not None:
        problem = condition_problem(condition)
        if problem is not None:
            raise ConfigError(f"--where must be one SQL condition, like \"status = 'paid'\": {problem}")
    check_against_source(settings, mapping, chosen, condition)
    conn = store.open_outbox(settings.outbox.capture_path)
    try:
        given = settings.backfill.rate if rate is None else rate
        jobs = backfills.add(conn, chosen, condition, given, "cli", unless_busy=True)
    finally:
        conn.close()
    request = jobs[0]["request"]
    if no_wait:
        if as_json:
            for job in jobs:
                emit_json(progress(job, time.time()))
        else:
            click.echo(f"queued backfill {request}: {', '.join(chosen)}; `ct1-cdc backfill status` shows it")
        return
    ended = watch(settings, request, as_json)
    failed = [p for p in ended if p["state"] == "failed"]
    if failed:
        fail(f"backfill of {failed[0]['table']} failed: {failed[0]['error']}")
    if not as_json:
        rows = sum(p["rows"] for p in ended)
        events = sum(p["events"] for p in ended)
        click.echo(f"backfill {request}: {rows:,} rows read, {events:,} events sent")


@backfill.command("status")
@click.option("--all", "every", is_flag=True, help="the last 100 jobs of every request, not only the latest")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object per job")
@click.pass_context
@handled
def backfill_status(ctx: click.Context, every: bool, as_json: bool) -> None:
    """The jobs of the latest backfill: rows done/total, rate, time left."""
    settings = settings_of(ctx)
    jobs = []
    if Path(settings.outbox.capture_path).exists():  # no outbox yet: nothing was ever requested
        conn = store.open_outbox(settings.outbox.capture_path)  # an older outbox gets its backfills table
        try:
            jobs = backfills.recent(conn) if every else backfills.jobs(conn)
        finally:
            conn.close()
    now = time.time()
    if as_json:
        for job in jobs:
            emit_json(progress(job, now))
    elif not jobs:
        click.echo("no backfill has been requested")
    else:
        for job in jobs:
            click.echo(line(progress(job, now)))


@backfill.command("cancel")
@click.option("--json", "as_json", is_flag=True, help="print the count as JSON")
@click.pass_context
@handled
def backfill_cancel(ctx: click.Context, as_json: bool) -> None:
    """Ask capture to stop every backfill job still queued or running (at its next chunk;
    events already sent stay sent)."""
    settings = settings_of(ctx)
    conn = store.open_outbox(settings.outbox.capture_path)
    try:
        asked = backfills.cancel(conn)
    finally:
        conn.close()
    if as_json:
        emit_json({"cancel_requested": asked})
    else:
        click.echo(f"asked capture to cancel {asked} backfill job(s)")
