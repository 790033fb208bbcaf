"""The ``ct1-cdc`` command line.

Every command exits non-zero with a one-line reason on failure; ``--json`` prints JSON
Lines.  Logging is configured here, once.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import orjson

from cdc import jsontext, logs, source
from cdc.catalog import identity_index, read_catalog
from cdc.decode import format_lsn
from cdc.errors import ConfigError, Ct1Error
from cdc.mapping import Mapping, load_mapping
from cdc.schema import Problem, check_mapping, fully_identified, lacking_identity, leaves
from config.settings import Settings, load_settings
from outbox import source_state, store
from outbox.writer import OutboxWriter

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> None:
    click.echo(f"ct1-cdc: error: {message}", err=True)
    sys.exit(code)


def handled(fn: F) -> F:
    """Turn project errors into the one-line failure."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Ct1Error as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]


def settings_of(ctx: click.Context) -> Settings:
    obj = ctx.ensure_object(dict)
    if "settings" not in obj:
        obj["settings"] = load_settings(obj.get("config"))
    settings: Settings = obj["settings"]
    return settings


def emit_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, default=str).decode() + "\n")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    envvar="CT1_CONFIG",
    type=click.Path(dir_okay=False),
    help="TOML settings file [env CT1_CONFIG; default config/sidecar.toml]",
)
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
@click.version_option(package_name="ct1-cdc")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, log_level: str) -> None:
    """ct1-cdc: change-data-capture sidecar for the marketplace (Core Transaction 1)."""
    ctx.ensure_object(dict)["config"] = config_path
    logs.configure(log_level)


# -- setup ----------------------------------------------------------------------------------


@main.command()
@click.option(
    "--replica-identity-full",
    is_flag=True,
    help="ALTER the tables with when_changed rules to REPLICA IDENTITY FULL",
)
@click.option(
    "--sample-data", is_flag=True, help="create the sample marketplace schema if missing and load sample rows"
)
@click.option("--seed", default=1, show_default=True, help="sample data seed")
@click.option("--scale", default=1.0, show_default=True, help="sample data volume multiplier")
@click.option("--no-probe", is_flag=True, help="do not send a signed webhook.test to each endpoint")
@click.option("--json", "as_json", is_flag=True, help="print the checks as JSON Lines")
@click.pass_context
@handled
def setup(
    ctx: click.Context,
    replica_identity_full: bool,
    sample_data: bool,
    seed: int,
    scale: float,
    no_probe: bool,
    as_json: bool,
) -> None:
    """Check the source, create the slot and the outbox, optionally load sample data,
    and probe the endpoints with a signed webhook.test."""
    from cdc.app import router_for
    from cdc.capture import ensure_slot
    from config import sample

    settings = settings_of(ctx)
    mapping = load_mapping(settings.mapping.file)
    conn = source.connect(settings.source.dsn)
    with conn:
        checks = source.run_checks(conn, settings.source.slot)
        checks.append(source.wal2json_probe(conn))
        for check in checks:
            if as_json:
                emit_json(
                    {
                        "check": check.name,
                        "ok": check.ok,
                        "detail": check.detail,
                        "fix": None if check.ok else check.fix,
                    }
                )
            else:
                mark = "ok  " if check.ok else "FAIL"
                click.echo(
                    f"[{mark}] {check.name}: {check.detail}" + ("" if check.ok else f" -> fix: {check.fix}")
                )
        failed = [c for c in checks if not c.ok]
        if failed:
            first = failed[0]
            fail(f"{first.name} check failed ({first.detail}); fix: {first.fix}")
        if sample_data:
            if not sample.has_schema(conn):
                sample.create_schema(conn)
                click.echo("created the sample marketplace schema", err=True)
            base = sample.Volume()
            volume = sample.Volume(**{k: max(1, int(v * scale)) for k, v in vars(base).items()})
            counts = sample.generate(
                conn,
                seed=seed,
                volume=volume,
                progress=lambda table, n: click.echo(f"  sample data: {table} {n}", err=True),
            )
            click.echo(f"loaded sample data: {counts}", err=True)
        writer = OutboxWriter(store.open_outbox(settings.outbox.path), router_for(settings))
        try:
            problems = check_source_schema(conn, mapping, writer.conn, replica_identity_full)
            for problem in problems:
                if as_json:
                    emit_json(
                        {"check": "mapping", "ok": False, "detail": problem.message, "fix": problem.fix}
                    )
                else:
                    click.echo(f"[FAIL] mapping: {problem.message} -> fix: {problem.fix}")
            if problems:
                more = f" (and {len(problems) - 1} more above)" if len(problems) > 1 else ""
                fail(f"mapping does not fit the source: {problems[0].line()}{more}")
            if as_json:
                emit_json(
                    {"check": "mapping", "ok": True, "detail": f"{len(mapping.tables)} tables", "fix": None}
                )
            else:
                click.echo(f"[ok  ] mapping: {len(mapping.tables)} tables, every column found")
            created = ensure_slot(conn, settings.source.dsn, settings.source.slot, mapping, writer)
            secrets = store_secrets(writer.conn, settings)
            first_key = first_api_key(writer.conn)
            signing_secrets = {
                e.name: e.secret or stored_secret(writer.conn, e.name) for e in settings.endpoints
            }
        finally:
            writer.close()
        if first_key is not None:
            click.echo(
                f"created the first API key {first_key.id} (all permissions): {first_key.key}"
                " (shown once; more with `ct1-cdc keys create`)",
                err=True,
            )
        for name, secret in secrets.items():
            click.echo(
                f"endpoint {name}: generated signing secret {secret} (shown once: give it to the receiver)",
                err=True,
            )
    probes = {} if no_probe else probe_endpoints(settings, signing_secrets)
    summary = {
        "api_key": None if first_key is None else {"id": first_key.id, "key": first_key.key},
        "generated_secrets": secrets,
        "endpoints": probes,
        "slot": settings.source.slot,
        "slot_created": created,
        "outbox": settings.outbox.path,
        "mapped_tables": len(mapping.tables),
    }
    if as_json:
        emit_json(summary)
    else:
        state = "created" if created else "already present"
        click.echo(f"slot {settings.source.slot}: {state}; outbox {settings.outbox.path} ready")


def check_source_schema(
    conn: source.Conn, mapping: Mapping, outbox: Any, replica_identity_full: bool
) -> list[Problem]:
    """The mapping against the live schema.  With ``replica_identity_full``, tables whose
    updates or deletes would be lost and tables with when_changed rules get REPLICA
    IDENTITY FULL, each recorded in the outbox first so `ct1-cdc detach` restores it."""
    tables = [mapping.parts(t) for t in mapping.tables]
    catalog, names = read_catalog(conn, tables)
    shadowed = [
        catalog[t]
        for t in mapping.tables
        if mapping.watched(t)
        and t in catalog
        and catalog[t].kind in "rp"
        and not fully_identified(catalog[t])
    ]
    if not replica_identity_full:
        for relation in shadowed:
            click.echo(
                f"note: {relation.table} has when_changed rules; without REPLICA IDENTITY FULL a shadow"
                " of its watched columns is kept in the outbox (use --replica-identity-full)",
                err=True,
            )
        return check_mapping(mapping, catalog, names)
    relations = [r for _, r in lacking_identity(mapping, catalog)]
    relations += [one for relation in shadowed for one in leaves(relation)]  # each partition: its own
    to_full = {r.table: r for r in relations if r.identity != "f"}
    for relation in to_full.values():
        index = identity_index(conn, relation.schema, relation.name) if relation.identity == "i" else None
        source_state.record_identity_change(
            outbox, relation.table, relation.schema, relation.name, relation.identity, index
        )
        try:
            source.set_replica_identity(conn, relation.schema, relation.name, "f")
        except BaseException:
            source_state.forget_identity_change(outbox, relation.table)  # nothing for detach to undo
            raise
        click.echo(f"set REPLICA IDENTITY FULL on {relation.table} (`ct1-cdc detach` restores it)", err=True)
    if to_full:
        catalog, names = read_catalog(conn, tables)
    return check_mapping(mapping, catalog, names)


def first_api_key(conn: Any) -> Any:
    """An API key with every permission when none is active yet (shown once by setup)."""
    from api import keys as api_keys

    if api_keys.active_count(conn):
        return None
    return api_keys.create(conn, "first key (setup)", list(api_keys.PERMISSIONS), [])


def stored_secret(conn: Any, name: str) -> str | None:
    row = conn.execute("SELECT secret FROM endpoints WHERE name = ?", (name,)).fetchone()
    return None if row is None else row[0]


def probe_endpoints(settings: Settings, signing_secrets: dict[str, str | None]) -> dict[str, Any]:
    """Send each enabled endpoint a signed webhook.test and say how it answered.  A
    receiver that is not up yet is a warning: deliveries wait and retry for it."""
    import asyncio

    from dispatcher.probe import send_test
    from dispatcher.sender import Sender, check_url
    from dispatcher.worker import version

    cfg = settings.dispatcher

    async def probe_all() -> dict[str, Any]:
        sender = Sender(
            min(cfg.timeout_seconds, 5.0), concurrency=4, refuse_private=cfg.refuse_private_networks
        )
        results: dict[str, Any] = {}
        try:
            for endpoint in settings.endpoints:
                if not endpoint.enabled:
                    continue
                secret = signing_secrets.get(endpoint.name)
                try:
                    check_url(endpoint.name, endpoint.url, cfg.require_https, cfg.refuse_private_networks)
                except ConfigError as exc:
                    results[endpoint.name] = {"delivered": False, "status": 0, "error": str(exc)}
                    continue
                if not secret:
                    continue
                probe = await send_test(sender, endpoint, secret, version())
                results[endpoint.name] = probe.as_dict()
        finally:
            await sender.close()
        return results

    results = asyncio.run(probe_all())
    for name, result in results.items():
        if result["delivered"]:
            click.echo(
                f"endpoint {name}: webhook.test answered {result['status']} in {result['latency_ms']} ms",
                err=True,
            )
        else:
            answer = f"HTTP {result['status']}" if result["status"] else result["error"]
            click.echo(
                f"warning: endpoint {name}: webhook.test not accepted ({answer}); deliveries will retry"
                " until it answers 2xx",
                err=True,
            )
    return results


def store_secrets(conn: Any, settings: Settings) -> dict[str, str]:
    """A whsec_ secret for every configured endpoint that has none, kept in the outbox."""
    from dispatcher.deliveries import D
    from dispatcher.signing import generate_secret

    made: dict[str, str] = {}
    for endpoint in settings.endpoints:
        if endpoint.secret:
            continue
        row = conn.execute("SELECT secret FROM endpoints WHERE name = ?", (endpoint.name,)).fetchone()
        if row and row[0]:
            continue
        secret = generate_secret()
        with conn:
            conn.execute(store.Q["register_endpoint"], (endpoint.name, 0))
            conn.execute(D["set_endpoint_secret"], (secret, endpoint.name))
        made[endpoint.name] = secret
    return made


# -- run ------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--role",
    "roles",
    default=None,
    metavar="ROLES",
    help="comma list of capture,dispatch,api (default: all this version has)",
)
@click.pass_context
@handled
def run(ctx: click.Context, roles: str | None) -> None:
    """Run the sidecar until SIGINT/SIGTERM (then gone within 10 s).

    Exits 0 after a requested stop, 1 with one line when a role cannot start or fails.
    """
    from cdc import app

    settings = settings_of(ctx)
    chosen = app.parse_roles(roles)
    asyncio.run(app.run(settings, chosen, exit_within=app.STOP_SECONDS))


# -- outbox ---------------------------------------------------------------------------------


@main.group()
def outbox() -> None:
    """Inspect the outbox."""


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
            out.write(
                f"{row[0]:>8}  {row[2]}  {row[1]:<24} {data.get('object')}:{data.get('id')}"
                f"  {row[4]} {row[5]} lsn={row[6]}\n"
            )


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
    from cdc.cli_delivery import attempts_of

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


# -- endpoints ------------------------------------------------------------------------------


@main.group()
def endpoints() -> None:
    """List, enable or disable webhook endpoints."""


@main.group()
def keys() -> None:
    """Create, list or revoke API keys."""


# -- slot -----------------------------------------------------------------------------------


@main.group()
def slot() -> None:
    """Inspect or drop the replication slot."""


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
@handled
def demo(duration: float, rate: float, keep: bool) -> None:
    """A throwaway Postgres, the sample marketplace, capture and live traffic."""
    from cdc.demo import run_demo

    run_demo(duration=duration, rate=rate, keep=keep, echo=click.echo)


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


# The delivery commands live in their own module and attach to the groups above.
from cdc import cli_delivery, cli_keys, cli_source  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover
    entry()
