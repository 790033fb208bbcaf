"""Plain (non-replication) SQL against the source: setup checks, slot management,
slot health, heartbeats and replica identities.

Connecting and creating or dropping a slot turn driver errors into a :class:`SetupError`
(the user must change something) or :class:`SourceUnavailable` (retry later); capture
runs the other queries through :class:`cdc.postgres.PostgresSource`, which turns a lost
connection into :class:`SourceUnavailable`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import set_json_loads

from cdc.mapping import quote_table
from common.errors import SetupError, SourceUnavailable
from common.jsontext import JsonText

HEARTBEAT_PREFIX = "ct1-cdc"

Conn = psycopg.Connection[tuple[Any, ...]]


def connect(dsn: str, *, timeout: int = 10) -> Conn:
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=timeout)
    except psycopg.OperationalError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        reason = lines[0] if lines else "unknown error"  # libpq's first line says why
        raise SourceUnavailable(
            f"cannot connect to the source ({reason}): check source.dsn / CT1_SOURCE__DSN"
        ) from exc


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def run_checks(conn: Conn, slot: str) -> list[Check]:
    """Everything the source needs for capture, each with the exact fix when it fails."""
    checks: list[Check] = []

    def one(query: str, *args: Any) -> Any:
        row = conn.execute(query, args).fetchone()
        return None if row is None else row[0]

    wal_level = one("SHOW wal_level")
    checks.append(
        Check(
            "wal_level",
            wal_level == "logical",
            f"wal_level = {wal_level}",
            "ALTER SYSTEM SET wal_level = logical; then restart Postgres",
        )
    )
    version = int(one("SHOW server_version_num"))
    checks.append(
        Check(
            "server_version",
            version >= 120000,
            f"server_version_num = {version}",
            "upgrade to PostgreSQL 12 or newer",
        )
    )
    privileged = one("SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user")
    role = one("SELECT quote_ident(current_user)")  # named in the fix as SQL takes it
    # Amazon RDS and Aurora give no REPLICATION attribute: a member of their predefined
    # role rds_replication may replicate (it exists on those servers alone)
    rds = one(
        "SELECT count(*) FROM pg_roles WHERE rolname = 'rds_replication'"
        " AND pg_has_role(current_user, oid, 'MEMBER')"
    )
    has_rds_role = one("SELECT count(*) FROM pg_roles WHERE rolname = 'rds_replication'")
    checks.append(
        Check(
            "replication_privilege",
            bool(privileged) or bool(rds),
            "role has REPLICATION"
            if privileged
            else "role is a member of rds_replication"
            if rds
            else "role lacks REPLICATION",
            f"GRANT rds_replication TO {role} (as the master user)"
            if has_rds_role
            else f"ALTER ROLE {role} WITH REPLICATION",
        )
    )
    slot_exists = one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", slot)
    max_slots = int(one("SHOW max_replication_slots"))
    used_slots = int(one("SELECT count(*) FROM pg_replication_slots"))
    room = bool(slot_exists) or used_slots < max_slots
    checks.append(
        Check(
            "replication_slots",
            room,
            f"{used_slots} of max_replication_slots = {max_slots} used",
            f"ALTER SYSTEM SET max_replication_slots = {max_slots + 1}; then restart Postgres",
        )
    )
    max_senders = int(one("SHOW max_wal_senders"))
    used_senders = int(one("SELECT count(*) FROM pg_stat_replication"))
    checks.append(
        Check(
            "wal_senders",
            used_senders < max_senders,
            f"{used_senders} of max_wal_senders = {max_senders} used",
            f"ALTER SYSTEM SET max_wal_senders = {max_senders + 1}; then restart Postgres",
        )
    )
    try:
        allowed = one("SELECT current_setting('output_plugin_libraries', true)")
    except psycopg.errors.InsufficientPrivilege:
        # a role without pg_read_all_settings cannot read it: the wal2json probe (a temporary
        # slot) then shows whether the server loads the plugin
        allowed = None
        checks.append(
            Check(
                "output_plugin_libraries",
                True,
                "not readable by this role (needs pg_read_all_settings): the wal2json probe decides",
            )
        )
    if allowed is not None:
        names = list_setting(allowed)
        checks.append(
            Check(
                "output_plugin_libraries",
                "wal2json" in names,
                f"output_plugin_libraries = {allowed}",
                f"ALTER SYSTEM SET output_plugin_libraries = {plugin_list_with_wal2json(names)}; "
                "SELECT pg_reload_conf()",
            )
        )
    return checks


def xid_not_begun(conn: Conn, xid: int) -> int | None:
    """The source's newest transaction id when ``xid`` is after it (not begun yet; xids
    compare as Postgres does, modulo 2^32), else None."""
    # (this session assigns no xid of its own, so age() counts from the next to be assigned:
    # 0 for that one, negative past it)
    row = conn.execute(
        "SELECT age(%s::text::xid) <= 0, (txid_snapshot_xmax(txid_current_snapshot()) - 1) %% 4294967296",
        (str(xid),),
    ).fetchone()
    if row is None or not row[0]:
        return None
    return int(row[1])


def list_setting(value: str) -> list[str]:
    """The items of a list setting as Postgres shows it: comma-separated, an item with a
    comma or a space in double quotes (``"a, b"`` is one item)."""
    items: list[str] = []
    item: list[str] = []
    quoted = False
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == '"':
            if quoted and value[i + 1 : i + 2] == '"':
                item.append('"')  # "" inside quotes: one quote
                i += 1
            else:
                quoted = not quoted
        elif ch == "," and not quoted:
            items.append("".join(item).strip())
            item = []
        else:
            item.append(ch)
        i += 1
    items.append("".join(item).strip())
    return [name for name in items if name]


def plugin_list_with_wal2json(names: list[str]) -> str:
    """The value for ``ALTER SYSTEM SET output_plugin_libraries``: each library its own
    quoted literal (``'pgoutput', 'wal2json'``).  One literal holding commas would be one
    item named "pgoutput, wal2json", which loads nothing; an item like that, left by such a
    fix, is split back into its names."""
    libraries: list[str] = []
    for name in [part.strip() for item in names for part in item.split(",")] + ["wal2json"]:
        if name and name not in libraries:
            libraries.append(name)
    return ", ".join("'" + name.replace("'", "''") + "'" for name in libraries)


def wal2json_probe(conn: Conn) -> Check:
    """Create and drop a temporary slot to prove the server can load wal2json."""
    if conn.execute("SHOW wal_level").fetchone() != ("logical",):
        return Check("wal2json", False, "not probed: wal_level is not logical", "")
    try:
        conn.execute("SELECT pg_create_logical_replication_slot('ct1_cdc_probe', 'wal2json', true)")
        conn.execute("SELECT pg_drop_replication_slot('ct1_cdc_probe')")
    except psycopg.Error as exc:
        message = (str(exc).strip().splitlines() or [""])[0]
        if "could not access file" in message:
            fix = "install wal2json on the database server: apt-get install postgresql-<major>-wal2json"
        elif "may not be used as an output plugin" in message:
            fix = "add wal2json to output_plugin_libraries and reload"
        else:
            fix = "see the server log"
        return Check("wal2json", False, message, fix)
    return Check("wal2json", True, "wal2json loads")


# -- slots ----------------------------------------------------------------------------------


def slot_exists(conn: Conn, slot: str) -> bool:
    row = conn.execute(
        "SELECT plugin, database FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()
    if row is None:
        return False
    plugin, database = row
    current = conn.execute("SELECT current_database()").fetchone()
    if plugin != "wal2json":
        raise SetupError(f"slot {slot} uses plugin {plugin}, not wal2json: choose another source.slot")
    if current is None or database != current[0]:
        raise SetupError(f"slot {slot} belongs to database {database}: choose another source.slot")
    return True


def _slot_error(slot: str, exc: psycopg.Error) -> SetupError:
    message = (str(exc).strip().splitlines() or [""])[0]
    if "may not be used as an output plugin" in message:
        return SetupError(f"{message}: add wal2json to output_plugin_libraries and reload")
    if "could not access file" in message:
        return SetupError(f"{message}: install wal2json (apt-get install postgresql-<major>-wal2json)")
    if "wal_level" in message:
        return SetupError(f"{message}: ALTER SYSTEM SET wal_level = logical; then restart Postgres")
    if "replication slots" in message and "in use" in message:
        return SetupError(f"{message}: raise max_replication_slots and restart Postgres")
    return SetupError(f"cannot create slot {slot}: {message}")


def create_slot(conn: Conn, dsn: str, slot: str, on_snapshot: Callable[[str], None] | None = None) -> bool:
    """Create the wal2json slot if it is missing; True if it was created now.

    The slot is created over a replication connection that exports its snapshot; while
    that connection is open, ``on_snapshot(name)`` may read the source exactly as of the
    slot's start (``SET TRANSACTION SNAPSHOT``), so nothing falls between that read and
    the first streamed change.
    """
    if slot_exists(conn, slot):
        return False
    version = int(conn.execute("SHOW server_version_num").fetchone()[0])  # type: ignore[index]
    export = "(SNAPSHOT 'export')" if version >= 150000 else "EXPORT_SNAPSHOT"
    try:
        repl = psycopg.connect(dsn, replication="database", autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise SourceUnavailable(f"cannot open a replication connection: {exc}") from exc
    try:
        with repl:
            try:
                row = repl.execute(f'CREATE_REPLICATION_SLOT "{slot}" LOGICAL wal2json {export}').fetchone()
            except psycopg.errors.DuplicateObject:
                return False
            except psycopg.Error as exc:
                raise _slot_error(slot, exc) from exc
            assert row is not None
            if on_snapshot is not None:
                try:
                    on_snapshot(str(row[2]))
                except BaseException:
                    repl.close()
                    drop_slot(conn, slot)
                    raise
    except psycopg.OperationalError as exc:
        raise SourceUnavailable(f"replication connection lost while creating the slot: {exc}") from exc
    return True


def json_text(data: str | bytes) -> JsonText:
    return JsonText(data if isinstance(data, str) else bytes(data).decode("utf-8"))


def read_at_snapshot(
    dsn: str, snapshot: str, query: sql.Composed, params: tuple[Any, ...] = ()
) -> Iterator[tuple[Any, ...]]:
    """Stream a query's rows as of an exported snapshot (server-side cursor)."""
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        # json/jsonb as the text Postgres prints, as the WAL gives it: never parsed, so no
        # depth or number size can fail here
        set_json_loads(json_text, conn)
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        with conn.cursor(name="ct1_snapshot_read") as cur:
            cur.itersize = 5000
            cur.execute(query, params)
            yield from cur


def table_ident(schema: str, name: str) -> sql.Composable:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


def drop_slot(conn: Conn, slot: str) -> bool:
    if not conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone():
        return False
    for attempt in range(20):
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            return True
        except psycopg.errors.ObjectInUse as exc:
            if attempt == 19:
                raise SetupError(f"slot {slot} is in use: stop `ct1-cdc run` first") from exc
            time.sleep(0.25)  # a walsender that just lost its client may still hold it
    return True


def slot_status(conn: Conn, slot: str) -> dict[str, Any] | None:
    # wal_status and safe_wal_size came with PostgreSQL 13: on 12 they are unknown (None)
    health = "wal_status, safe_wal_size" if conn.info.server_version >= 130000 else "NULL::text, NULL::bigint"
    row = conn.execute(
        sql.SQL(
            """
        SELECT slot_name, plugin, database, active, active_pid,
               confirmed_flush_lsn::text, restart_lsn::text,
               pg_current_wal_lsn()::text,
               pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,
               pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,
               {health}
        FROM pg_replication_slots WHERE slot_name = %s
        """
        ).format(health=sql.SQL(health)),  # one of two fixed texts above
        (slot,),
    ).fetchone()
    if row is None:
        return None
    keys = (
        "slot",
        "plugin",
        "database",
        "active",
        "active_pid",
        "confirmed_flush_lsn",
        "restart_lsn",
        "current_lsn",
        "lag_bytes",
        "retained_bytes",
        "wal_status",
        "safe_wal_size",
    )
    return dict(zip(keys, row, strict=True))


def heartbeat(conn: Conn) -> None:
    """A non-transactional logical message: decoded, sent to us, lets the slot advance.
    It carries the server's time when emitted: every transaction committed before then
    comes before it in the stream, so it moves the stream's clock (cart.abandoned)."""
    conn.execute(
        "SELECT pg_logical_emit_message(false, %s, 'heartbeat ' || extract(epoch FROM clock_timestamp()))",
        (HEARTBEAT_PREFIX,),
    )


# -- tables ---------------------------------------------------------------------------------


HEARTBEAT_AHEAD = 3600.0  # a heartbeat time further ahead of our clock than this is not believed


def heartbeat_time(content: str, now: float) -> float | None:
    """When a heartbeat was emitted, by the server's clock: ``heartbeat <Unix seconds>``.
    None for anything else (an older heartbeat without a time, or a message someone else
    emitted with our prefix: a time that is not finite, not positive, or more than
    :data:`HEARTBEAT_AHEAD` ahead of ``now``, would fire every timer at once)."""
    word, _, stamp = content.partition(" ")
    if word != "heartbeat" or not stamp or len(stamp) > 40:
        return None
    try:
        seconds = float(stamp)
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds <= 0 or seconds > now + HEARTBEAT_AHEAD:
        return None
    return seconds


def set_replica_identity(conn: Conn, schema: str, name: str, identity: str, index: str | None = None) -> None:
    """``ALTER TABLE ... REPLICA IDENTITY`` FULL (``f``), DEFAULT (``d``), NOTHING (``n``)
    or USING INDEX ``index`` (``i``).  Needs ownership of the table."""
    clause = {"f": "FULL", "d": "DEFAULT", "n": "NOTHING"}.get(identity)
    tail: sql.Composable
    if identity == "i" and index:
        tail = sql.SQL("USING INDEX {}").format(sql.Identifier(index))
    elif clause is not None:
        tail = sql.SQL(clause)
    else:
        raise ValueError(f"unknown replica identity {identity!r}")
    try:
        conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY {}").format(table_ident(schema, name), tail))
    except psycopg.errors.InsufficientPrivilege as exc:
        raise SetupError(
            f"cannot change the replica identity of {schema}.{name}: only its owner can; run as the owner: "
            f"ALTER TABLE {quote_table(schema, name)} REPLICA IDENTITY {clause or 'USING INDEX ' + str(index)}"
        ) from exc
