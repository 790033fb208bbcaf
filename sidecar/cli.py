"""The ``ct1-cdc`` command line.

Every command exits non-zero with a one-line reason on failure; ``--json`` prints JSON
Lines.  Logging is configured here, once.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click
import orjson

from common import jsontext
from common.errors import ConfigError
from common.formats import format_lsn
from outbox import store
from sidecar.console import emit_json, fail, handled, main, outbox, settings_of

# -- run ------------------------------------------------------------------------------------


def _roles(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str]:
    """A wrong role is a wrong command line (exit 2), found before the settings load."""
    from sidecar import runner

    try:
        return runner.parse_roles(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.option(
    "--role",
    "roles",
    default=None,
    metavar="ROLES",
    callback=_roles,
    help="comma list of capture,dispatch,api (default: all this version has)",
)
@click.pass_context
@handled
def run(ctx: click.Context, roles: list[str]) -> None:
    """Run the sidecar until SIGINT/SIGTERM (then gone within 10 s).

    Exits 0 after a requested stop, 1 with one line when a role cannot start or fails.
    """
    from sidecar import runner

    settings = settings_of(ctx)
    chosen = roles
    asyncio.run(runner.run(settings, chosen, exit_within=runner.STOP_SECONDS))


# -- outbox ---------------------------------------------------------------------------------


def _reader(ctx: click.Context) -> Any:
    return store.connect(settings_of(ctx).outbox.path, readonly=True)


def _types(values: tuple[str, ...]) -> list[str]:
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


@outbox.command("list")
@click.option("--type", "types", multiple=True, help="event type or glob (repeat or comma list)")
@click.option("--after", default=0, type=click.IntRange(min=0), help="only events with id > AFTER")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="at most this many")
@click.option("--json", "as_json", is_flag=True, help="one envelope per line, oldest first")
@click.pass_context
@handled
def outbox_list(
    ctx: click.Context, types: tuple[str, ...], after: int, limit: int | None, as_json: bool
) -> None:
    """List events, oldest first."""
    conn = _reader(ctx)
    out = sys.stdout
    for row in store.iter_events(conn, after=after, types=_types(types), limit=limit):
        if as_json:
            out.write(store.envelope_json(row) + "\n")
        else:
            try:
                data = jsontext.loads(row[3])
            except (ValueError, RecursionError):  # nested past what a parser takes: still listed
                data = {}
            subject = f"{data.get('object')}:{data.get('id')}" if "object" in data else "-"
            origin = f"{row[4]} {row[5]}" if row[4] else str(row[5])  # derived, manual: no table
            lsn = f" lsn={row[6]}" if row[6] else ""
            out.write(f"{row[0]:>8}  {row[2]}  {row[1]:<24} {subject}  {origin}{lsn}\n")


@outbox.command("show")
@click.argument("event_id", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def outbox_show(ctx: click.Context, event_id: int, as_json: bool) -> None:
    """Show one event with its deliveries."""
    conn = _reader(ctx)
    row = store.get_event(conn, event_id)
    if row is None:
        fail(f"no event {event_id} in the outbox")
    assert row is not None
    from sidecar.cli_delivery import attempts_of

    envelope = store.envelope_json(row)
    deliveries = store.event_deliveries(conn, event_id)
    attempts = attempts_of(conn, event_id)
    if as_json:  # the envelope as stored, never parsed: every number exact, any depth
        emit_json({"event": orjson.Fragment(envelope), "deliveries": deliveries, "attempts": attempts})
        return
    try:  # exact: an integer past 64 bits stays an integer
        click.echo(json.dumps(jsontext.loads(envelope), indent=2, ensure_ascii=False))
    except RecursionError:  # nested too deeply to lay out: shown as stored
        click.echo(envelope)
    for d in deliveries:
        click.echo(f"delivery to {d['endpoint']}: {d['status']} after {d['attempts']} attempt(s)")
    for a in attempts:
        click.echo(
            f"  attempt {a['at']} {a['endpoint']}: status {a['status']} in {a['duration_ms']} ms"
            + (f" ({a['error']})" if a["error"] else "")
        )


@outbox.command("stats")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def outbox_stats(ctx: click.Context, as_json: bool) -> None:
    """Counts of events by type and deliveries by endpoint and status."""
    stats = store.stats(_reader(ctx))
    stats["checkpoints"] = {k: format_lsn(v) for k, v in stats["checkpoints"].items()}
    if as_json:
        emit_json(stats)
        return
    click.echo(f"events: {stats['events']} (last id {stats['last_event_id']})")
    for t, n in stats["events_by_type"].items():
        click.echo(f"  {t:<28} {n}")
    for endpoint, by_status in stats["deliveries"].items():
        parts = ", ".join(f"{s} {n}" for s, n in sorted(by_status.items()))
        click.echo(f"deliveries to {endpoint}: {parts}")
    for slot, lsn in stats["checkpoints"].items():
        click.echo(f"checkpoint of slot {slot}: {lsn}")


# -- demo -----------------------------------------------------------------------------------


@main.command()
@click.option(
    "--duration",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="seconds of live traffic before the demo stops by itself",
)
@click.option(
    "--rate",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0.1, max=200),
    help="marketplace actions per second",
)
@click.option("--keep", is_flag=True, help="keep the outbox and the stopped cluster afterwards")
@click.option(
    "--ct2-url",
    metavar="URL",
    help="send CT2's webhooks to your receiver (e.g. examples/ct2_seller_sync.py) instead of the built-in one",
)
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="write CT1_API_URL, CT1_API_KEY and the webhook secrets there for your programs (removed at the end)",
)
@click.option(
    "--backend",
    type=click.Choice(["sqlite", "jetstream"]),
    default="sqlite",
    show_default=True,
    help="jetstream: three NATS nodes, two captures (one killed half-way), two dispatch and two API nodes",
)
@handled
def demo(
    duration: float, rate: float, keep: bool, ct2_url: str | None, env_file: Path | None, backend: str
) -> None:
    """A throwaway Postgres, the sample marketplace, capture and live traffic."""
    if backend == "jetstream":
        if ct2_url is not None or env_file is not None:
            fail("--ct2-url and --env-file go with the sqlite demo")
        from sidecar.demo_jetstream import run_jetstream_demo

        run_jetstream_demo(duration=duration, rate=rate, keep=keep, echo=click.echo)
        return
    from sidecar.demo import run_demo

    run_demo(duration=duration, rate=rate, keep=keep, echo=click.echo, ct2_url=ct2_url, env_file=env_file)


def entry() -> None:
    """The console script: usage errors, too, end in one line."""
    try:
        main(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(2)
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except click.exceptions.Abort:
        fail("aborted")
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


# The other commands live in their own modules and attach to the groups of console.
from sidecar import cli_backfill, cli_delivery, cli_keys, cli_recover, cli_setup, cli_source  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover
    entry()
